"""The other caching methods, one small file each, as strategies of the one jitted
sampler, for models *without* long skips (where they were proposed): FORA, PAB (the
Skip-DiT authors' DiT form), PAB-video (the published video form: spatial / temporal
attention broadcast), Delta-DiT, TeaCache. They work on any family that provides the unit
pieces (DiT: units are blocks; Latte: (spatial, temporal) pairs). Unit-count costs for the
predicted speedup: a full step runs depth units, a cached step `blocks_per_cached_step`
(0 for FORA, PAB and TeaCache, whose adaLN/gating work is ignored; m for Delta-DiT);
PAB-video counts attention and MLP shares per step (`PABVideo.step_costs`)."""

from skipdit_jax.cache.baselines.delta_dit import DeltaDiT
from skipdit_jax.cache.baselines.fora import FORA
from skipdit_jax.cache.baselines.pab import PAB
from skipdit_jax.cache.baselines.pab_video import PABVideo
from skipdit_jax.cache.baselines.teacache import TeaCache, calibrate_teacache

__all__ = ["FORA", "PAB", "PABVideo", "DeltaDiT", "TeaCache", "calibrate_teacache"]
