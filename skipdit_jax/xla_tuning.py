"""XLA flags that make this project's programs faster on CPU, applied by the `skipdit`
command and the benchmarks before JAX starts its backends.

Measured on 2 AMD EPYC cores with jaxlib 0.10 (BENCHMARKS.md): XLA's CPU backend wraps
each matmul together with neighbouring elementwise work into an XNNPACK "ynn" fusion, and
for the transposed matmuls of a backward pass those fusions run at half the speed of the
plain matmul; turning them off makes the DiT training step ~10% faster and the
sampling passes no slower. The flag is only set for jaxlib versions it was measured on
(an unknown flag in XLA_FLAGS aborts the process), never when the user already chose a
value, and `SKIPDIT_NO_XLA_TUNING=1` turns the whole thing off.
"""

from __future__ import annotations

import os

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
_TESTED_JAXLIB = ((0, 10), (0, 11))  # [min, max] major.minor


def _jaxlib_version() -> tuple[int, int] | None:
    try:
        from jaxlib import version

        major, minor = version.__version_info__[:2]
        return int(major), int(minor)
    except Exception:  # noqa: BLE001 - any oddity means "unknown version": leave flags alone
        return None


def tune_xla_cpu_flags() -> list[str]:
    """Append CPU_FLAGS to XLA_FLAGS (effective only if no JAX backend has started yet).

    Returns the flags it added.
    """
    if os.environ.get("SKIPDIT_NO_XLA_TUNING"):
        return []
    v = _jaxlib_version()
    if v is None or not _TESTED_JAXLIB[0] <= v <= _TESTED_JAXLIB[1]:
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = [f for f in CPU_FLAGS if f.split("=")[0] not in current]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
