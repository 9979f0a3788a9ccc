"""Cache strategies for the one jitted sampler: Skip-Cache (`skip_cache`), the other
caching methods (`baselines/`), plans (`plan`) and the by-name registry (`registry`)."""

from skipdit_jax.cache.baselines import FORA, PAB, DeltaDiT, PABVideo, TeaCache, calibrate_teacache
from skipdit_jax.cache.plan import CachePlan, plan_from_schedule
from skipdit_jax.cache.registry import METHODS, make_cache, parse_cache_spec
from skipdit_jax.cache.skip_cache import ShallowCache, SkipCache

__all__ = [
    "CachePlan",
    "DeltaDiT",
    "FORA",
    "METHODS",
    "PAB",
    "PABVideo",
    "ShallowCache",
    "SkipCache",
    "TeaCache",
    "calibrate_teacache",
    "make_cache",
    "parse_cache_spec",
    "plan_from_schedule",
]
