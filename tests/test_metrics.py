"""Metrics against known values: PSNR of a known noise level, SSIM and LPIPS of identical
images, the Fréchet distance of Gaussians against closed forms, and a safe LPIPS loader."""

import io
import pickle

import numpy as np
import pytest
import scipy.linalg

from skipdit_jax.evaluation import image_metrics as metrics
from skipdit_jax.errors import UserError


def test_psnr_of_known_noise_level():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    sigma = 0.1
    b = a + sigma * rng.choice([-1.0, 1.0], a.shape).astype(np.float32)  # mse exactly sigma^2
    assert metrics.psnr(a, b) == pytest.approx(10 * np.log10(4 / sigma**2), abs=1e-3)
    assert metrics.psnr(a, a) == float("inf")


def test_ssim_identical_is_one_and_falls_with_noise():
    rng = np.random.default_rng(1)
    a = np.tanh(rng.standard_normal((3, 16, 16, 1))).astype(np.float32)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    s_small = metrics.ssim(a, a + 0.05 * rng.standard_normal(a.shape).astype(np.float32))
    s_big = metrics.ssim(a, a + 0.5 * rng.standard_normal(a.shape).astype(np.float32))
    assert 1.0 > s_small > s_big
    # Independent images share almost no structure.
    assert abs(metrics.ssim(a, np.tanh(rng.standard_normal(a.shape)).astype(np.float32))) < 0.15


def test_ssim_of_constant_images_matches_the_formula():
    # Flat images: variances and covariance vanish, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
    a = np.full((1, 12, 12, 1), 0.2, np.float32)
    b = np.full((1, 12, 12, 1), -0.3, np.float32)
    c1 = (0.01 * 2) ** 2
    assert metrics.ssim(a, b) == pytest.approx((2 * 0.2 * -0.3 + c1) / (0.2**2 + 0.3**2 + c1), rel=1e-4)


def test_cosine_similarity():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((5, 7)).astype(np.float32)
    np.testing.assert_allclose(metrics.cosine_similarity(a, 2 * a), 1.0, atol=1e-6)
    np.testing.assert_allclose(metrics.cosine_similarity(a, -a), -1.0, atol=1e-6)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(3)
    d = 6
    a = rng.standard_normal((d, d))
    s1 = a @ a.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # Commuting case: S2 = 4 S1 -> tr(S1 + 4 S1 - 2 * 2 S1) = tr(S1).
    assert metrics.frechet_distance(mu1, s1, mu2, 4 * s1) == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.trace(s1), rel=1e-9)
    # Diagonal case: sum (sqrt(s1) - sqrt(s2))^2.
    v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-9)
    # General case against SciPy's sqrtm.
    b = rng.standard_normal((d, d))
    s2 = b @ b.T + 0.1 * np.eye(d)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-7)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_samples_and_singular_covariances():
    rng = np.random.default_rng(4)
    f1 = rng.standard_normal((5, 20))  # 5 samples, 20 features: singular covariance
    assert np.isfinite(metrics.frechet_distance_of_features(f1, f1 + 1.0))
    assert metrics.frechet_distance_of_features(f1, f1 + 1.0) == pytest.approx(20.0, rel=1e-6)
    with pytest.raises(UserError, match="at least 2"):
        metrics.frechet_distance_of_features(f1[:1], f1)


def test_lpips_identical_zero_and_grows_with_distortion():
    rng = np.random.default_rng(5)
    a = np.tanh(rng.standard_normal((2, 64, 64, 3))).astype(np.float32)
    np.testing.assert_allclose(metrics.lpips(a, a), 0.0, atol=1e-6)
    small = metrics.lpips(a, a + 0.05 * rng.standard_normal(a.shape).astype(np.float32))
    big = metrics.lpips(a, a + 0.5 * rng.standard_normal(a.shape).astype(np.float32))
    assert (small > 0).all() and (big > small).all()
    with pytest.raises(UserError, match="RGB"):
        metrics.lpips(a[..., :1], a[..., :1])


def test_lpips_weight_loader_refuses_code():
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    payload = pickle.dumps({"w": Evil()})
    with pytest.raises(UserError, match="refusing"):
        metrics._NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    arrays = {"a": {"kernel": np.ones((2, 3), np.float32)}}
    loaded = metrics._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arrays))).load()
    np.testing.assert_array_equal(loaded["a"]["kernel"], arrays["a"]["kernel"])
