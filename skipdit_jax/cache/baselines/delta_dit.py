"""Delta-DiT (Chen et al. 2024) as the Skip-DiT authors implemented it for DiT: cache the
change across a block range. While t > switch_t the first m blocks run and the cached
change of the rest (output - their input) is added; later the cached change of the first
depth-m blocks is added to the embedding and the last m blocks run (m = depth // 4). Same
cadence as their PAB."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from skipdit_jax.cache.baselines.common import IntervalBaseline, authors_cadence
from skipdit_jax.errors import ConfigError
from skipdit_jax.models.families import as_family
from skipdit_jax.models.family import ModelFamily


@dataclasses.dataclass(frozen=True)
class DeltaDiT(IntervalBaseline):
    blocks: int | None = None  # m; None = depth // 4
    switch_t: int = 600

    name = "delta-dit"

    def __post_init__(self):
        super().__post_init__()
        if self.blocks is not None and (int(self.blocks) != self.blocks or self.blocks < 1):
            raise ConfigError(f"delta-dit blocks must be an integer >= 1, got {self.blocks}")

    def m(self, family: ModelFamily) -> int:
        return self.blocks_per_cached_step(family.depth_units)

    def blocks_per_cached_step(self, depth: int) -> int:
        return self.blocks if self.blocks is not None else max(1, depth // 4)

    def check_model(self, model) -> None:
        family = as_family(model)
        super().check_model(family)
        half = family.depth_units // 2
        if not 1 <= self.m(family) <= half:
            raise ConfigError(f"delta-dit blocks must be in 1..{half} for depth {family.depth_units}, got {self.m(family)}")

    def full_steps(self, timesteps):
        return authors_cadence(timesteps, self.interval)

    def init_carry(self, family: ModelFamily, batch: int):
        z = jnp.zeros(family.hidden_shape(batch), family.compute_dtype)
        return (z, z)  # (change across the rear blocks, change across the front blocks)

    def full_pass(self, family, params, x, t, cond, carry):
        m, depth = self.m(family), family.depth_units
        h0, c = family.embed(params, x, t, cond)
        h1 = family.run_units(params, h0, c, 0, m)  # after the first m blocks
        h3 = family.run_units(params, h1, c, m, depth - m)  # before the last m blocks
        h4 = family.run_units(params, h3, c, depth - m, depth)
        deltas = (h4 - h1, h3 - h0)
        return family.head(params, h4, c), jax.tree.map(lambda d, z: d.astype(z.dtype), deltas, carry)

    def cached_pass(self, family, params, x, t, cond, carry):
        m, depth = self.m(family), family.depth_units
        rear_delta, front_delta = carry
        h0, c = family.embed(params, x, t, cond)

        def early(h0):  # front blocks computed, the rear's change reused
            return family.run_units(params, h0, c, 0, m) + rear_delta.astype(h0.dtype)

        def late(h0):  # the front's change reused, rear blocks computed
            return family.run_units(params, h0 + front_delta.astype(h0.dtype), c, depth - m, depth)

        h = jax.lax.cond(t[0] > self.switch_t, early, late, h0)
        return family.head(params, h, c), carry
