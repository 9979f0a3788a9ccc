"""Cache strategies by name: `make_cache("fora", 2)`, `make_cache("teacache", 0.1)`,
`make_cache("pab-video", 2)` (the published Latte PAB settings); Skip-Cache specs as text
(`parse_cache_spec`: ours, "N[,k[,start_t,close_t]]", and the official text-to-video
"N{N}-{start}-{close}")."""

from __future__ import annotations

import re

from skipdit_jax.cache.baselines import FORA, PAB, DeltaDiT, PABVideo, TeaCache
from skipdit_jax.cache.skip_cache import ShallowCache, SkipCache
from skipdit_jax.cache.skip_cache import parse_cache_spec as _parse_numbers_spec
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




# The official text-to-video spec, as its model name carries it: "LatteT2V_skip_cache_N2-700-50",
# the `--cache` flag "_N2-700-50" or the config's "N2-700-50". The prefix and "_" are optional.
_T2V_SPEC = re.compile(r"^(?:LatteT2V_skip_cache)?_?N(\d+)(?:-(\d+)-(\d+))?$")
T2V_DEFAULT_START, T2V_DEFAULT_CLOSE = 700, 50


def parse_cache_spec(text: str | None) -> SkipCache | None:
    """A Skip-Cache from its text form; None/""/"none"/"off" -> None (no cache).

    * The official text-to-video form "N{N}-{start}-{close}" (e.g. "N2-700-50", also with
      the "LatteT2V_skip_cache_" / "_" prefix of the official model name and flag) ->
      `SkipCache(N, 1, start, close)`: one (spatial, temporal) pair computed at each end.
      "N3" alone takes the official default thresholds 700 and 50 (the official parser
      needs all three numbers except for the bare model name, which means N2-700-50).
      The semantics equal the official `LatteT2V_skip_cache` counter: a step is full when
      `counter % N == 0`, when the cache is empty, or when t >= start; after a step with
      t <= close the counter and the cache are dropped, so every later step is full.
    * Ours, "N", "N,k" or "N,k,start_t,close_t" (class-to-image defaults k=4, start 1000,
      close 20).
    """
    if text is None:
        return None
    spec = str(text).strip()
    if spec == "LatteT2V_skip_cache":
        return SkipCache(2, 1, T2V_DEFAULT_START, T2V_DEFAULT_CLOSE)
    if spec[:1] in ("N", "_", "L"):
        m = _T2V_SPEC.match(spec)
        if m is None:
            raise ConfigError(f"bad cache spec {text!r}: expected N{{N}}-{{start}}-{{close}} (e.g. N2-700-50) or N{{N}}")
        n, start, close = m.groups()
        if start is None:
            start, close = T2V_DEFAULT_START, T2V_DEFAULT_CLOSE
        return SkipCache(int(n), 1, int(start), int(close))
    return _parse_numbers_spec(spec)
