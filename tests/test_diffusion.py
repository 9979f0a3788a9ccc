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


def _adm_space_timesteps(num_timesteps, section_counts):
    """guided-diffusion's respace.space_timesteps, transcribed (a set; ValueError on bad input)."""
    if section_counts.startswith("ddim"):
        desired_count = int(section_counts[len("ddim") :])
        for i in range(1, num_timesteps):
            if len(range(0, num_timesteps, i)) == desired_count:
                return set(range(0, num_timesteps, i))
        raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")
    section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        if section_count <= 1:
            frac_stride = 1
        else:
            frac_stride = (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


def test_space_timesteps_rules():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "250")[:3] == [0, 4, 8] and space_timesteps(1000, "250")[-1] == 999
    assert space_timesteps(1000, "10,10,5")[:3] == [0, 37, 74] and len(space_timesteps(1000, "10,10,5")) == 25
    assert space_timesteps(100, "1") == [0]
    assert space_timesteps(1000, "1") == [0]
    assert space_timesteps(1000, "1,1,1") == [0, 334, 667]  # sections of 334, 333, 333 steps
    # The accumulating float stride: 20 * (999 / 20) sums to 499.49999999999994, so ADM keeps
    # 499 where round(20 * 24.975) = 500 would keep 500.
    assert 499 in space_timesteps(1000, "21") and 500 not in space_timesteps(1000, "21")
    assert space_timesteps(1000, "0,5") == [500, 625, 750, 874, 999]  # a 0-step section, as in ADM
    for bad in ("ddim7x", "ddim600", "ddim1", "ddim0", "0", "0,0", "-1,5", "x,2", "", "1,,2", "600,600", "1001"):
        with pytest.raises(ConfigError):
            space_timesteps(1000, bad)


@pytest.mark.parametrize("num_timesteps", [1000, 100])
def test_space_timesteps_matches_adm_for_every_count(num_timesteps):
    for n in range(1, num_timesteps + 1):
        spec = str(n)
        got = space_timesteps(num_timesteps, spec)
        assert got == sorted(_adm_space_timesteps(num_timesteps, spec)), spec
        assert len(got) == n and got[0] == 0 and (n == 1 or got[-1] == num_timesteps - 1), spec


@pytest.mark.parametrize(
    "spec",
    [
        "10,10,5", "250,200", "1,1,1", "5,1,30", "100,100,100,100,100", "3,3,3", "7,7,7,7,7,7,7",
        "21,21,21", "333,333,333", "334,333,333", "1,500", "0,5", "5,0,5", "143,142,142,142,142,142,142",
        "13,27,49,88,101,3", "2,2,2,2,2,2,2,2,2,2,2",
    ],
)
def test_space_timesteps_matches_adm_for_sections(spec):
    assert space_timesteps(1000, spec) == sorted(_adm_space_timesteps(1000, spec))


def test_space_timesteps_ddim_matches_adm():
    possible = 0
    for n in range(1, 1001):
        try:
            want = _adm_space_timesteps(1000, f"ddim{n}")
        except ValueError:
            with pytest.raises(ConfigError, match="cannot create exactly"):
                space_timesteps(1000, f"ddim{n}")
            continue
        possible += 1
        got = space_timesteps(1000, f"ddim{n}")
        assert set(got) == want and got == sorted(got) and len(got) == n, n
    # One count per distinct len(range(0, 1000, s)) for s in 1..999, i.e. per ceil(1000 / s).
    assert possible == len({len(range(0, 1000, s)) for s in range(1, 1000)})
    assert space_timesteps(1000, "ddim1000") == list(range(1000))
    assert space_timesteps(1000, "ddim2") == [0, 500]


def test_one_step_schedule():
    d = create_diffusion("1")
    assert d.num_steps == 1 and d.timestep_map.tolist() == [0]
    beta0 = np.linspace(1e-4, 0.02, 1000)[0]
    np.testing.assert_allclose(d.tables_f64["betas"], [beta0])
    # ADM has no t=1 posterior variance to clip to here; the documented fallback is log(beta_0).
    np.testing.assert_allclose(d.tables_f64["posterior_log_variance_clipped"], [np.log(beta0)])
    np.testing.assert_allclose(d.tables_f64["fixed_large_log_variance"], [np.log(beta0)])
    for name, table in d.tables_f64.items():
        assert np.isfinite(table).all(), name

    ref = ADMDiffusion("1")
    rng = np.random.default_rng(1)
    xt = rng.standard_normal((2, 3, 3, 2))
    model_out = rng.standard_normal((2, 3, 3, 4)) * 0.5
    noise = rng.standard_normal(xt.shape)
    t = jnp.zeros((2,), jnp.int32)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    ddpm = np.asarray(d.ddpm_step(f32(model_out), f32(xt), t, f32(noise)))
    ddim = np.asarray(d.ddim_step(f32(model_out), f32(xt), t, f32(noise), eta=1.0))
    assert np.isfinite(ddpm).all() and np.isfinite(ddim).all()
    # At t=0 both steps return the x0 prediction, noise-free: (x - sqrt(1 - abar) eps) / sqrt(abar).
    x0 = (xt - np.sqrt(beta0) * model_out[..., :2]) / np.sqrt(1 - beta0)
    np.testing.assert_allclose(ddpm, x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ddim, x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ddpm, ref.ddpm_step(model_out, xt, 0, noise, channel_axis=-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ddim, ref.ddim_step(model_out, xt, 0, channel_axis=-1), rtol=1e-5, atol=1e-5)
    fixed = create_diffusion("1", learn_sigma=False)
    out = np.asarray(fixed.ddpm_step(f32(model_out[..., :2]), f32(xt), t, f32(noise)))
    np.testing.assert_allclose(out, x0, rtol=1e-5, atol=1e-5)


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
