"""The other DiT caching methods, one small file each, as strategies of the one jitted
sampler, for models *without* long skips (where they were proposed): FORA, PAB,
Delta-DiT, TeaCache. Block-count costs for the predicted speedup: a full step runs depth
blocks, a cached step `blocks_per_cached_step` (0 for FORA, PAB and TeaCache, whose
adaLN/gating work is ignored; m for Delta-DiT)."""

from skipdit_jax.cache.baselines.delta_dit import DeltaDiT
from skipdit_jax.cache.baselines.fora import FORA
from skipdit_jax.cache.baselines.pab import PAB
from skipdit_jax.cache.baselines.teacache import TeaCache, calibrate_teacache

__all__ = ["FORA", "PAB", "DeltaDiT", "TeaCache", "calibrate_teacache"]
