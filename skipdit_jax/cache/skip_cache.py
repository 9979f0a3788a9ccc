"""Skip-Cache: reuse the deep feature across sampling steps, recompute only shallow blocks.

A cache strategy tells the sampler three things:
  * `full_steps(timesteps)`: a host-side boolean per sampling step (True = full pass),
    computed once from the timestep list so the jitted loop never decides on the host;
  * `init_carry(family, batch)`: what it carries between steps (here the deep feature);
  * `full_pass(...)` / `cached_pass(...)`: the two model calls `lax.cond` chooses between.
It sees the model only through its family (`skipdit_jax.models.family`): the family's
`forward_full` / `forward_shallow` passes and its unit counts (blocks for DiT).

The Skip-Cache schedule reproduces the official `DiT_cache` counter exactly: a step is
full when `counter % interval == 0`, when the cache is empty, or when `t >= start_t`;
after a step with `t <= close_t` the counter and the cache are reset (so every later step
is full). The counter advances once per sampling step (the guidance batch is one forward).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from skipdit_jax.cache.plan import CachePlan, plan_from_schedule
from skipdit_jax.errors import ConfigError
from skipdit_jax.models.families import as_family
from skipdit_jax.models.family import ModelFamily


@dataclasses.dataclass(frozen=True)
class SkipCache:
    """Skip-DiT's static cache.

    Args:
      interval: N; a full pass every N steps (1 = every step full, i.e. no caching).
      shallow_blocks: k; a cached step runs the first k and the last k units (blocks;
        block pairs for families whose units are pairs).
      start_t: steps with t >= start_t are always full (1000 = never forced).
      close_t: after a step with t <= close_t the cache is dropped; later steps are full.
    Defaults are the official class-to-image settings (k=4, start 1000, close 20).
    """

    interval: int
    shallow_blocks: int = 4
    start_t: int = 1000
    close_t: int = 20

    name = "skip-cache"
    requires_long_skip = True

    def __post_init__(self):
        if int(self.interval) != self.interval or self.interval < 1:
            raise ConfigError(f"cache interval must be an integer >= 1, got {self.interval}")
        if int(self.shallow_blocks) != self.shallow_blocks or self.shallow_blocks < 1:
            raise ConfigError(f"shallow_blocks must be an integer >= 1, got {self.shallow_blocks}")
        if self.close_t > self.start_t:
            raise ConfigError(f"close_t ({self.close_t}) must not exceed start_t ({self.start_t})")

    # ---- host-side schedule ----------------------------------------------------------------
    def check_model(self, model) -> None:
        """Raise `ConfigError` unless the strategy fits `model` (a model config or family)."""
        family = as_family(model)
        half = family.cache_units
        if not 1 <= self.shallow_blocks <= half - 1:
            raise ConfigError(
                f"shallow_blocks must be in 1..{half - 1} for a model of {family.depth_units} units "
                f"(at least one unit on each side must be skipped), got {self.shallow_blocks}"
            )
        if self.requires_long_skip and not family.has_long_skips:
            raise ConfigError(
                "SkipCache needs a model with long skips; for the shallow/deep cache on a vanilla DiT "
                "(the ablation) ask for ShallowCache explicitly"
            )

    def full_steps(self, timesteps: Sequence[int]) -> np.ndarray:
        """True where the step runs the full network, for original-scale timesteps in
        sampling order."""
        full, counter, empty = [], 0, True
        for t in (int(t) for t in timesteps):
            is_full = counter % self.interval == 0 or empty or t >= self.start_t
            full.append(is_full)
            empty = False  # a step with an empty cache is always full, so it fills it
            counter += 1
            if t <= self.close_t:
                counter, empty = 0, True
        return np.asarray(full, bool)

    def cached_blocks(self, has_long_skips: bool = True) -> int:
        """Units a cached step runs: the first k and the last k."""
        return 2 * self.shallow_blocks

    def units_per_cached_step(self, model) -> int:
        """What a cached step costs on `model` (a config or family), in units."""
        return self.cached_blocks(as_family(model).has_long_skips)

    def plan(self, timesteps: Sequence[int], depth: int, has_long_skips: bool | None = None) -> CachePlan:
        """The schedule and its block-count speedup: `depth` units per full step,
        `cached_blocks` per cached step (embedders and final layer are ignored).
        `has_long_skips` defaults to what the strategy is for (True for SkipCache)."""
        skips = self.requires_long_skip if has_long_skips is None else has_long_skips
        return plan_from_schedule(self.full_steps(timesteps), depth, self.cached_blocks(skips))

    # ---- device-side passes ----------------------------------------------------------------
    def init_carry(self, family: ModelFamily, batch: int):
        """The deep feature: the hidden state entering the last k decoder-side units."""
        return jnp.zeros(family.deep_feature_shape(batch), family.compute_dtype)

    def full_pass(self, family: ModelFamily, params, x, t, cond, carry):
        out, deep = family.forward_full(params, x, t, cond, self.shallow_blocks)
        return out, deep.astype(carry.dtype)

    def cached_pass(self, family: ModelFamily, params, x, t, cond, carry):
        return family.forward_shallow(params, x, t, cond, carry, self.shallow_blocks), carry


@dataclasses.dataclass(frozen=True)
class ShallowCache(SkipCache):
    """The same static cache on a model without long skips: the ablation that shows the
    skips are what make deep-feature reuse work. (On a Skip-DiT it equals SkipCache.)"""

    name = "shallow-cache"
    requires_long_skip = False

    def cached_blocks(self, has_long_skips: bool = False) -> int:
        """Without long skips nothing reads the first k blocks' outputs on a cached step (the
        decoder starts from the cached deep feature), so XLA drops them: k blocks run."""
        return 2 * self.shallow_blocks if has_long_skips else self.shallow_blocks


def parse_cache_spec(spec: str | None) -> SkipCache | None:
    """`"N"`, `"N,k"` or `"N,k,start_t,close_t"` -> SkipCache; None/""/"none" -> None."""
    if spec is None or str(spec).strip().lower() in ("", "none", "off"):
        return None
    parts = str(spec).split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"bad cache spec {spec!r}: expected N[,shallow_blocks[,start_t,close_t]] integers") from None
    if len(values) not in (1, 2, 4):
        raise ConfigError(f"bad cache spec {spec!r}: expected N, N,k or N,k,start_t,close_t")
    return SkipCache(*values)

