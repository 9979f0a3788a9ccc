"""Skip-Cache: reuse the deep feature across sampling steps, recompute only shallow blocks.

A cache strategy tells the sampler three things:
  * `full_steps(timesteps)`: a host-side boolean per sampling step (True = full pass),
    computed once from the timestep list so the jitted loop never decides on the host;
  * `init_carry(...)`: what it carries between steps (here the deep feature);
  * `full_pass(...)` / `cached_pass(...)`: the two model calls `lax.cond` chooses between.

The Skip-Cache schedule reproduces the official `DiT_cache` counter exactly: a step is
full when `counter % interval == 0`, when the cache is empty, or when `t >= start_t`;
after a step with `t <= close_t` the counter and the cache are reset (so every later step
is full). The counter advances once per sampling step (the guidance batch is one forward).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from skipdit_jax.errors import ConfigError
from skipdit_jax.model_config import ModelConfig
from skipdit_jax.models import DiT


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """The per-step schedule of a cache and its predicted (block-count) speedup."""

    full: np.ndarray  # bool, one per sampling step, in sampling order
    predicted_speedup: float

    @property
    def num_full(self) -> int:
        return int(self.full.sum())

    @property
    def num_cached(self) -> int:
        return int((~self.full).sum())


@dataclasses.dataclass(frozen=True)
class SkipCache:
    """Skip-DiT's static cache.

    Args:
      interval: N; a full pass every N steps (1 = every step full, i.e. no caching).
      shallow_blocks: k; a cached step runs the first k and the last k blocks.
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
    def check_model(self, config: ModelConfig) -> None:
        half = config.num_encoder_blocks
        if not 1 <= self.shallow_blocks <= half - 1:
            raise ConfigError(
                f"shallow_blocks must be in 1..{half - 1} for depth {config.depth} "
                f"(at least one block on each side must be skipped), got {self.shallow_blocks}"
            )
        if self.requires_long_skip and not config.long_skip:
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

    def cached_blocks(self, config: ModelConfig | None = None) -> int:
        """Blocks a cached step runs: the first k and the last k."""
        return 2 * self.shallow_blocks

    def plan(self, timesteps: Sequence[int], depth: int) -> CachePlan:
        """The schedule and its block-count speedup: depth blocks per full step, 2k per
        cached step (embedders and final layer are ignored)."""
        full = self.full_steps(timesteps)
        cost = full.sum() * depth + (~full).sum() * self.cached_blocks()
        return CachePlan(full=full, predicted_speedup=float(len(full) * depth / cost))

    # ---- device-side passes ----------------------------------------------------------------
    def init_carry(self, config: ModelConfig, batch: int):
        """The deep feature: the hidden state entering decoder block depth-k."""
        return jnp.zeros((batch, config.num_patches, config.hidden_size), config.compute_dtype)

    def full_pass(self, config: ModelConfig, params, x, t, y, carry):
        out, deep = DiT(config).apply({"params": params}, x, t, y, self.shallow_blocks, method=DiT.forward_full)
        return out, deep.astype(carry.dtype)

    def cached_pass(self, config: ModelConfig, params, x, t, y, carry):
        out = DiT(config).apply({"params": params}, x, t, y, carry, self.shallow_blocks, method=DiT.forward_shallow)
        return out, carry


@dataclasses.dataclass(frozen=True)
class ShallowCache(SkipCache):
    """The same static cache on a model without long skips: the ablation that shows the
    skips are what make deep-feature reuse work. (On a Skip-DiT it equals SkipCache.)"""

    name = "shallow-cache"
    requires_long_skip = False

    def cached_blocks(self, config: ModelConfig | None = None) -> int:
        """Without long skips nothing reads the first k blocks' outputs on a cached step (the
        decoder starts from the cached deep feature), so XLA drops them: k blocks run."""
        if config is not None and config.long_skip:
            return 2 * self.shallow_blocks
        return self.shallow_blocks


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

