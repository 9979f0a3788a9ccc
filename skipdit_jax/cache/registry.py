"""Cache strategies by name: `make_cache("fora", 2)`, `make_cache("teacache", 0.1)`,
`make_cache("pab-video", 2)` (the published Latte PAB settings)."""

from __future__ import annotations

from skipdit_jax.cache.baselines import FORA, PAB, DeltaDiT, PABVideo, TeaCache
from skipdit_jax.cache.skip_cache import ShallowCache, SkipCache
from skipdit_jax.errors import ConfigError

METHODS = {
    "skip-cache": "SkipCache(N): Skip-DiT's static cache (needs a model with long skips)",
    "shallow-cache": "ShallowCache(N): the same static cache on a DiT without long skips (the ablation)",
    "fora": (
        "FORA(N): per-block attention/MLP outputs reused under fresh gates; full at the first step "
        "and where the step index counted from the end is a multiple of N"
    ),
    "pab": "PAB(N): the same cache on the Skip-DiT authors' cadence (steps 0, 1, every N-th from the start, t <= 10 full)",
    "pab-video": (
        "PABVideo(N): PAB's video form: spatial attention reused for N steps, temporal for N+1, inside "
        "100 < t < 800, the published Latte MLP broadcast (N=2 is the published Latte setting; video models)"
    ),
    "delta-dit": "DeltaDiT(N)",
    "teacache": "TeaCache(threshold)",
}


def make_cache(method: str, setting: float, shallow_blocks: int = 4, coefficients=None):
    """A strategy from a method name and its one setting (N, or TeaCache's threshold)."""
    method = method.strip().lower()
    if method not in METHODS:
        raise ConfigError(f"unknown cache method {method!r}; choose from {', '.join(METHODS)}")
    if method == "teacache":
        return TeaCache(float(setting), tuple(coefficients) if coefficients is not None else (1.0, 0.0))
    if float(setting) != int(setting):
        raise ConfigError(f"{method} takes an integer interval N >= 1, got {setting}")
    n = int(setting)
    if method == "skip-cache":
        return SkipCache(n, shallow_blocks)
    if method == "shallow-cache":
        return ShallowCache(n, shallow_blocks)
    if method == "pab-video":
        return PABVideo(spatial_range=n, temporal_range=n + 1)
    return {"fora": FORA, "pab": PAB, "delta-dit": DeltaDiT}[method](n)


