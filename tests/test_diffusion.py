"""ADM diffusion pieces not covered by the sampler parity tests: respacing rules, q_sample
and the hybrid training loss against a float64 NumPy/SciPy-free reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipdit_jax.diffusion import create_diffusion, space_timesteps
from skipdit_jax.errors import ConfigError

from torch_reference import ADMDiffusion


def test_space_timesteps_rules():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "250")[:3] == [0, 4, 8] and space_timesteps(1000, "250")[-1] == 999
    assert len(space_timesteps(1000, "10,10,5")) == 25
    assert space_timesteps(100, "1") == [0]
    for bad in ("ddim7x", "ddim600", "0", "x,2", "600,600"):
        with pytest.raises(ConfigError):
            space_timesteps(1000, bad)


def test_q_sample():
    d = create_diffusion()
    x0, noise = jnp.ones((2, 2, 2, 1)), jnp.full((2, 2, 2, 1), 2.0)
    out = d.q_sample(x0, jnp.array([0, 999]), noise)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(out[1, 0, 0, 0], np.sqrt(abar[999]) + 2 * np.sqrt(1 - abar[999]), rtol=1e-5)
    np.testing.assert_allclose(out[0, 0, 0, 0], np.sqrt(abar[0]) + 2 * np.sqrt(1 - abar[0]), rtol=1e-5)


def _reference_hybrid_loss(model_out, x0, xt, noise, t):
    """ADM's hybrid loss in float64, from the ADM paper's formulas and the reference tables."""
    ref = ADMDiffusion("1000")
    c = x0.shape[-1]
    mse = ((noise - model_out[..., :c]) ** 2).mean(axis=(1, 2, 3))
    vbs = []
    for b in range(x0.shape[0]):
        i = int(t[b])
        p = ref.p_mean_variance(model_out[b : b + 1], xt[b : b + 1], i, channel_axis=-1)
        true_mean = ref.posterior_mean_coef1[i] * x0[b] + ref.posterior_mean_coef2[i] * xt[b]
        true_logvar = ref.posterior_log_variance_clipped[i]
        m, lv = p["mean"][0], p["log_variance"][0]
        if i == 0:
            # Decoder NLL: the Gaussian's mass in the 8-bit bin of x0 (tanh CDF approximation).
            cdf = lambda v: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))  # noqa: E731
            inv = np.exp(-0.5 * lv)
            hi, lo = cdf(inv * (x0[b] - m + 1 / 255)), cdf(inv * (x0[b] - m - 1 / 255))
            logp = np.where(
                x0[b] < -0.999, np.log(np.maximum(hi, 1e-12)),
                np.where(x0[b] > 0.999, np.log(np.maximum(1 - lo, 1e-12)), np.log(np.maximum(hi - lo, 1e-12))),
            )
            vbs.append(-logp.mean() / math.log(2))
        else:
            kl = 0.5 * (-1 + lv - true_logvar + np.exp(true_logvar - lv) + (true_mean - m) ** 2 * np.exp(-lv))
            vbs.append(kl.mean() / math.log(2))
    vb = np.asarray(vbs)
    return mse + vb, mse, vb


def test_hybrid_loss_matches_reference():
    d = create_diffusion()
    rng = np.random.default_rng(0)
    x0 = np.clip(rng.standard_normal((4, 4, 4, 2)) * 0.6, -1, 1)
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = 1.0, -1.0  # exercise the edge bins of the decoder NLL
    noise = rng.standard_normal(x0.shape)
    model_out = rng.standard_normal((4, 4, 4, 4)) * 0.5
    t = np.array([0, 1, 500, 999])
    xt = np.asarray(d.q_sample(jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32)), np.float64)
    losses = d.training_losses(lambda x, tt: jnp.asarray(model_out, jnp.float32), jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
    loss, mse, vb = _reference_hybrid_loss(model_out, x0, xt, noise, t)
    np.testing.assert_allclose(losses["mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(losses["vb"], vb, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(losses["loss"], loss, rtol=2e-4, atol=1e-5)


def test_vb_term_trains_only_the_variance():
    d = create_diffusion()
    x0 = jax.random.normal(jax.random.key(0), (2, 2, 2, 1))
    noise = jax.random.normal(jax.random.key(1), x0.shape)
    t = jnp.array([10, 700])

    def vb_of(out):
        return d.training_losses(lambda x, tt: out, x0, t, noise)["vb"].sum()

    g = jax.grad(vb_of)(jax.random.normal(jax.random.key(2), (2, 2, 2, 2)))
    assert not np.any(np.asarray(g[..., :1]))  # stop-gradient on eps
    assert np.all(np.abs(np.asarray(g[..., 1:])) > 0)


def test_fixed_variance_model_loss_is_mse():
    d = create_diffusion(learn_sigma=False)
    x0 = jnp.zeros((2, 2, 2, 1))
    noise = jnp.ones_like(x0)
    out = d.training_losses(lambda x, t: jnp.zeros_like(x), x0, jnp.array([3, 4]), noise)
    np.testing.assert_allclose(out["loss"], [1.0, 1.0])
