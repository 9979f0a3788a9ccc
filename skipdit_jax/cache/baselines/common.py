"""What the cache baselines share: the model check, the block-count plan, the cadence of
the Skip-DiT authors' DiT baselines, and `BranchCache`, the per-block branch cache of
FORA and PAB (the two differ only in their schedule).

Every baseline is a strategy of the one jitted sampler (see `skipdit_jax.sampling`) and
reaches the model only through its family's adaLN-block pieces (`embed`, `block_stacks`,
`block_with_branches`, `block_modulation`, `run_units`, `head`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.cache.plan import CachePlan, plan_from_schedule
from skipdit_jax.errors import ConfigError
from skipdit_jax.models.families import as_family
from skipdit_jax.models.family import ModelFamily


def check_interval(interval) -> None:
    if int(interval) != interval or interval < 1:
        raise ConfigError(f"cache interval must be an integer >= 1, got {interval}")


@dataclasses.dataclass(frozen=True)
class Baseline:
    """Shared parts: model check and block-count plan (from the subclass's `full_steps`)."""

    name = "baseline"
    adaptive = False

    def check_model(self, model) -> None:
        """Raise `ConfigError` unless the strategy fits `model` (a model config or family)."""
        if as_family(model).has_long_skips:
            raise ConfigError(
                f"{self.name} is a baseline for models without long skips; on a Skip-DiT use Skip-Cache "
                "(method 'skip-cache'), or give a DiT checkpoint"
            )

    def blocks_per_cached_step(self, depth: int) -> int:
        return 0

    def units_per_cached_step(self, model) -> int:
        """What a cached step costs on `model` (a config or family), in blocks."""
        return self.blocks_per_cached_step(as_family(model).depth_units)

    def plan(self, timesteps: Sequence[int], depth: int) -> CachePlan:
        return plan_from_schedule(self.full_steps(timesteps), depth, self.blocks_per_cached_step(depth))


@dataclasses.dataclass(frozen=True)
class IntervalBaseline(Baseline):
    interval: int

    def __post_init__(self):
        check_interval(self.interval)


def authors_cadence(timesteps, interval: int) -> np.ndarray:
    """Full unless (counter % N != 0 and counter > 1 and 10 < t < 1000): the cadence of the
    Skip-DiT authors' PAB and Delta-DiT implementations for DiT."""
    counter = np.arange(len(timesteps))
    t = np.asarray(timesteps)
    cached = (counter % interval != 0) & (counter > 1) & (t > 10) & (t < 1000)
    return ~cached


def record_branches(family: ModelFamily, params, x, t, cond, per_block):
    """Run every block of a model without long skips; `per_block(attn, mlp, gates)` says
    what to keep of each. Returns (output, one stacked record per block stack)."""
    h, c = family.embed(params, x, t, cond)

    def body(h, p):
        out, (attn, mlp), gates = family.block_with_branches(p, h, c)
        return out, per_block(attn, mlp, gates)

    kept = []
    for stack in family.block_stacks(params):
        h, k = jax.lax.scan(body, h, stack)
        kept.append(k)
    return family.head(params, h, c), tuple(kept)


def stack_sizes(family: ModelFamily, params=None) -> tuple[int, ...]:
    params = family.abstract_params() if params is None else params
    return tuple(jax.tree.leaves(s)[0].shape[0] for s in family.block_stacks(params))


@dataclasses.dataclass(frozen=True)
class BranchCache(IntervalBaseline):
    """The cache FORA and PAB share; a subclass only supplies `full_steps`.

    A full step runs every block and stores, per block, the outputs of its attention and
    its MLP *before* their adaLN gates. A cached step runs neither attention nor MLP (nor
    their LayerNorms): it computes the fresh embedding and conditioning vector, each
    block's adaLN modulation from that vector, and rebuilds the residual stream with the
    current gates, block by block:

        h = h + gate_msa(now) * attn(stored);  h = h + gate_mlp(now) * mlp(stored)

    One cache serves the whole model batch (the guidance batch is one forward).
    """

    def init_carry(self, family: ModelFamily, batch: int):
        shape = family.deep_feature_shape(batch)
        # Per block stack: (blocks, 2, *shape) -- (attention, MLP) outputs before the gates.
        return tuple(jnp.zeros((n, 2, *shape), family.compute_dtype) for n in stack_sizes(family))

    def full_pass(self, family, params, x, t, cond, carry):
        dtype = carry[0].dtype
        return record_branches(family, params, x, t, cond, lambda attn, mlp, _: jnp.stack([attn, mlp]).astype(dtype))

    def cached_pass(self, family, params, x, t, cond, carry):
        h, c = family.embed(params, x, t, cond)

        def body(h, xs):
            p, (attn, mlp) = xs
            gate_msa, gate_mlp = family.block_modulation(p, c)[2::3]
            h = h + gate_msa[:, None] * attn
            return h + gate_mlp[:, None] * mlp, None

        for stack, stored in zip(family.block_stacks(params), carry):
            h, _ = jax.lax.scan(body, h, (stack, (stored[:, 0].astype(h.dtype), stored[:, 1].astype(h.dtype))))
        return family.head(params, h, c), carry
