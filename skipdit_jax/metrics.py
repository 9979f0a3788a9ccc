"""Fidelity metrics between sample sets (JAX)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def psnr(a, b, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over whole sets, for images in a range of width
    `data_range` (2 for [-1, 1]). Identical sets give +inf."""
    mse = float(jnp.mean(jnp.square(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))
