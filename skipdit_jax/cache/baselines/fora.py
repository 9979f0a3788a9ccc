"""FORA (Selvaraju et al. 2024): a full step every N; on the others, reuse cached block
outputs. Its exact caching rule is in the class docstring."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.cache.baselines.common import IntervalBaseline, authors_cadence, record_branches, stack_sizes
from skipdit_jax.models.family import ModelFamily


@dataclasses.dataclass(frozen=True)
class FORA(IntervalBaseline):
    name = "fora"

    def full_steps(self, timesteps):
        return np.arange(len(timesteps)) % self.interval == 0

    def init_carry(self, family: ModelFamily, batch: int):
        shape = family.deep_feature_shape(batch)
        return tuple(jnp.zeros((n, *shape), family.compute_dtype) for n in stack_sizes(family))  # per block: gated attention + gated MLP output

    def full_pass(self, family, params, x, t, cond, carry):
        def gated_sum(attn, mlp, gates):
            return (gates[0][:, None] * attn + gates[1][:, None] * mlp).astype(carry[0].dtype)

        return record_branches(family, params, x, t, cond, gated_sum)

    def cached_pass(self, family, params, x, t, cond, carry):
        # x_{i+1} = x_i + attn_i + mlp_i with every term cached: the blocks collapse to a sum.
        h, c = family.embed(params, x, t, cond)
        h = h + sum(s.sum(axis=0) for s in carry).astype(h.dtype)
        return family.head(params, h, c), carry


