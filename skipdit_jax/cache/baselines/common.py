"""What the cache baselines share: the model check, the block-count plan, the cadence of
the Skip-DiT authors' DiT baselines, and `BranchCache`, the per-block branch cache of
FORA and PAB (the two differ only in their schedule).

Every baseline is a strategy of the one jitted sampler (see `skipdit_jax.sampling`) and
reaches the model only through its family's unit pieces (`embed`, `unit_stacks`,
`unit_with_branches`, `unit_from_branches`, `unit_broadcast`, `run_units`, `probe`,
`head`; see `skipdit_jax.models.family`), so the same code serves DiT (units = blocks)
and Latte (units = (spatial, temporal) pairs); plans count those units.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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
        family = as_family(model)
        # Hunyuan-DiT's skips are native (no skip-free variant exists) and its unit pieces carry
        # the encoder outputs in the hidden state, so the unit-based baselines apply to it.
        if family.has_long_skips and not family.units_carry_skips:
            raise ConfigError(
                f"{self.name} is a baseline for models without long skips; on a model with them (Skip-DiT, "
                "Latte-skip) use Skip-Cache (method 'skip-cache'), or give a DiT / Latte checkpoint"
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


def unit_indices(family: ModelFamily, params) -> list[jax.Array]:
    """Per unit stack, the global indices of its units (what `unit_*` pieces take)."""
    out, start = [], 0
    for n in stack_sizes(family, params):
        out.append(jnp.arange(start, start + n))
        start += n
    return out


def record_branches(family: ModelFamily, params, x, t, cond, per_unit):
    """Run every unit of a model without long skips; `per_unit(branches)` says what to keep
    of each unit's pre-gate branch outputs. Returns (output, one stacked record per unit stack)."""
    h, c = family.embed(params, x, t, cond)

    def body(h, xs):
        p, i = xs
        out, branches = family.unit_with_branches(p, h, c, i)
        return out, per_unit(branches)

    kept = []
    for stack, index in zip(family.unit_stacks(params), unit_indices(family, params), strict=True):
        h, k = jax.lax.scan(body, h, (stack, index))
        kept.append(k)
    return family.head(params, h, c), tuple(kept)


def stack_sizes(family: ModelFamily, params=None) -> tuple[int, ...]:
    params = family.abstract_params() if params is None else params
    return tuple(jax.tree.leaves(s)[0].shape[0] for s in family.unit_stacks(params))


def stacked_zeros(family: ModelFamily, batch: int, dtype):
    """Per unit stack, zeros shaped like the stacked branch records of its units."""
    shapes = family.branch_shapes(batch)
    is_shape = lambda s: isinstance(s, tuple) and all(isinstance(d, int) for d in s)  # noqa: E731
    return tuple(jax.tree.map(lambda s, n=n: jnp.zeros((n, *s), dtype), shapes, is_leaf=is_shape) for n in stack_sizes(family))


@dataclasses.dataclass(frozen=True)
class BranchCache(IntervalBaseline):
    """The cache FORA and PAB share; a subclass only supplies `full_steps`.

    A full step runs every unit and stores, per block, the outputs of its attention and
    its MLP *before* their adaLN gates. A cached step runs neither attention nor MLP (nor
    their LayerNorms): it computes the fresh embedding and conditioning vector, each
    block's adaLN modulation from that vector, and rebuilds the residual stream with the
    current gates, block by block (and, for Latte, through the pair's layout changes):

        h = h + gate_msa(now) * attn(stored);  h = h + gate_mlp(now) * mlp(stored)

    One cache serves the whole model batch (the guidance batch is one forward).
    """

    def init_carry(self, family: ModelFamily, batch: int):
        # Per unit stack: the units' branch records, e.g. (blocks, 2, *shape) for DiT.
        return stacked_zeros(family, batch, family.compute_dtype)

    def full_pass(self, family, params, x, t, cond, carry):
        dtype = family.compute_dtype
        return record_branches(family, params, x, t, cond, lambda br: jax.tree.map(lambda a: a.astype(dtype), br))

    def cached_pass(self, family, params, x, t, cond, carry):
        h, c = family.embed(params, x, t, cond)

        def body(h, xs):
            p, i, branches = xs
            return family.unit_from_branches(p, h, c, i, branches), None

        dtype = h.dtype
        for stack, index, stored in zip(family.unit_stacks(params), unit_indices(family, params), carry, strict=True):
            h, _ = jax.lax.scan(body, h, (stack, index, jax.tree.map(lambda a: a.astype(dtype), stored)))
        return family.head(params, h, c), carry
