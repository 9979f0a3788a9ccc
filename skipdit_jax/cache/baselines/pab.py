"""PAB for DiT, as the Skip-DiT authors implemented it (their `skip-dit-c2i` models.py):
on cached steps every block reuses *both* its attention and MLP outputs from the last full
step, re-gated with the current step's adaLN gates; the residual stream is recomputed.
Steps 0 and 1 and steps with t <= 10 are always full."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.cache.baselines.common import IntervalBaseline, authors_cadence, record_branches, stack_sizes
from skipdit_jax.models.family import ModelFamily


@dataclasses.dataclass(frozen=True)
class PAB(IntervalBaseline):
    name = "pab"

    def full_steps(self, timesteps):
        return authors_cadence(timesteps, self.interval)

    def init_carry(self, family: ModelFamily, batch: int):
        shape = family.deep_feature_shape(batch)
        return tuple(jnp.zeros((n, 2, *shape), family.compute_dtype) for n in stack_sizes(family))  # per block: (attention, MLP) before the gates

    def full_pass(self, family, params, x, t, cond, carry):
        return record_branches(family, params, x, t, cond, lambda attn, mlp, _: jnp.stack([attn, mlp]).astype(carry[0].dtype))

    def cached_pass(self, family, params, x, t, cond, carry):
        h, c = family.embed(params, x, t, cond)

        def body(h, xs):
            p, branches = xs
            mod = family.block_modulation(p, c)
            g1, g2 = mod[2], mod[5]
            return h + g1[:, None] * branches[0] + g2[:, None] * branches[1], None

        for stack, stored in zip(family.block_stacks(params), carry):
            h, _ = jax.lax.scan(body, h, (stack, stored.astype(h.dtype)))
        return family.head(params, h, c), carry


