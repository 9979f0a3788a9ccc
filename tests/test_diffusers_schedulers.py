"""diffusers' DDIM / DDPM schedulers: timesteps and every step against diffusers' own
`DDIMScheduler` / `DDPMScheduler`, config loading, and the jitted sampler driven by them
against a reference loop that calls diffusers' `step` with the same model's outputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

from skipdit_jax.diffusion import DiffusersDDIM, DiffusersDDPM  # noqa: E402
from skipdit_jax.errors import ConfigError  # noqa: E402
from skipdit_jax.models.families import family_of  # noqa: E402
from skipdit_jax.sampling import sample, sampling_timesteps  # noqa: E402

from helpers import random_params, tiny_config  # noqa: E402

DDIM_CONFIGS = [
    dict(),  # diffusers' defaults: linear, leading, clip_sample on, set_alpha_to_one
    dict(clip_sample=False),  # Latte
    dict(timestep_spacing="trailing", set_alpha_to_one=False, prediction_type="v_prediction", clip_sample=False),
    dict(timestep_spacing="linspace", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
         clip_sample_range=1.5),
    dict(steps_offset=1, prediction_type="sample", set_alpha_to_one=False, clip_sample=False),
]
DDPM_CONFIGS = [
    dict(beta_start=0.00085, beta_end=0.02, beta_schedule="scaled_linear", prediction_type="v_prediction",
         steps_offset=1, clip_sample=False),  # Hunyuan-DiT
    dict(timestep_spacing="linspace", variance_type="fixed_large"),
    dict(timestep_spacing="trailing", variance_type="learned_range", clip_sample=False),
]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_equal_diffusers(spacing):
    for offset in (0, 1, 3):
        for n in (1, 7, 20, 50, 100, 333, 999):
            for ours, theirs in ((DiffusersDDIM, schedulers.DDIMScheduler), (DiffusersDDPM, schedulers.DDPMScheduler)):
                ref = theirs(timestep_spacing=spacing, steps_offset=offset)
                ref.set_timesteps(n)
                if ref.timesteps.max() >= 1000:  # diffusers would fail at its first step
                    with pytest.raises(ConfigError, match="steps_offset"):
                        ours(timestep_spacing=spacing, steps_offset=offset).timesteps(n)
                    continue
                np.testing.assert_array_equal(ours(timestep_spacing=spacing, steps_offset=offset).timesteps(n), ref.timesteps.numpy())


@pytest.mark.parametrize("cfg", DDIM_CONFIGS + DDPM_CONFIGS)
def test_alphas_cumprod_equal_diffusers(cfg):
    ddpm = cfg in DDPM_CONFIGS
    ours = (DiffusersDDPM if ddpm else DiffusersDDIM)(**cfg).alphas_cumprod()
    theirs = (schedulers.DDPMScheduler if ddpm else schedulers.DDIMScheduler)(**cfg).alphas_cumprod.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=3e-6, atol=0)  # diffusers builds it in float32, ours in float64


def _same_tables(ours, theirs):
    """Give diffusers our float64 alpha-bar, so the step tests compare the rules alone (near
    t=0 `sample` prediction divides by 1 - alpha-bar ~ 1e-4, which turns float32 table
    rounding into 1e-3 relative differences)."""
    ac = torch.from_numpy(ours.alphas_cumprod())
    theirs.alphas_cumprod = ac
    if isinstance(theirs, schedulers.DDIMScheduler):
        theirs.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if ours.set_alpha_to_one else ac[0]


def test_the_released_samplers_timesteps():
    assert list(DiffusersDDIM.latte().timesteps(50)[[0, 1, -1]]) == [980, 960, 0]
    assert list(DiffusersDDPM.hunyuan().timesteps(100)[[0, 1, -1]]) == [991, 981, 1]
    assert list(sampling_timesteps("ddim", 50, scheduler=DiffusersDDIM.latte())[:2]) == [980, 960]


@pytest.mark.parametrize("cfg", DDIM_CONFIGS)
@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_ddim_steps_equal_diffusers(cfg, eta):
    ours, theirs = DiffusersDDIM(**cfg), schedulers.DDIMScheduler(**cfg)
    _same_tables(ours, theirs)
    n = 12
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    tables = ours.step_tables(n, eta)
    theirs.set_timesteps(n)
    for i, t in enumerate(theirs.timesteps):
        out = rng.standard_normal(x.shape).astype(np.float32)
        z = rng.standard_normal(x.shape).astype(np.float32)
        coef = {k: jnp.asarray(v[i]) for k, v in tables.items()}
        got = ours.step(jnp.asarray(out), jnp.asarray(x), coef, jnp.asarray(z) if ours.needs_noise(eta) else None)
        want = theirs.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=eta, variance_noise=torch.from_numpy(z)).prev_sample
        np.testing.assert_allclose(np.asarray(got), want.float().numpy(), rtol=2e-5, atol=2e-5, err_msg=f"step {i} (t={int(t)})")
        x = want.float().numpy()  # walk the chain along diffusers' states


@pytest.mark.parametrize("cfg", DDPM_CONFIGS)
def test_ddpm_steps_equal_diffusers(cfg, monkeypatch):
    ours, theirs = DiffusersDDPM(**cfg), schedulers.DDPMScheduler(**cfg)
    _same_tables(ours, theirs)
    learned = cfg.get("variance_type") == "learned_range"
    n = 10
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)  # NCHW: diffusers splits channels on axis 1
    noise = {}
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: noise["z"])
    tables = ours.step_tables(n)
    theirs.set_timesteps(n)
    for i, t in enumerate(theirs.timesteps):
        out = rng.standard_normal((2, 6 if learned else 3, 4, 4)).astype(np.float32)
        if learned:
            out[:, 3:] = np.tanh(out[:, 3:])  # a variance fraction in [-1, 1]
        noise["z"] = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
        coef = {k: jnp.asarray(v[i]) for k, v in tables.items()}
        var = jnp.asarray(out[:, 3:]) if learned else None
        got = ours.step(jnp.asarray(out[:, :3]), jnp.asarray(x), coef, jnp.asarray(noise["z"].numpy()), model_var=var)
        want = theirs.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample
        np.testing.assert_allclose(np.asarray(got), want.float().numpy(), rtol=2e-5, atol=2e-5, err_msg=f"step {i} (t={int(t)})")
        x = want.float().numpy()


def test_from_config_dict_file_and_folder(tmp_path):
    ref = schedulers.DDIMScheduler(timestep_spacing="trailing", prediction_type="v_prediction", set_alpha_to_one=False)
    cfg = dict(ref.config)  # includes keys DDIM does not use (_class_name, thresholding, ...)
    cfg["variance_type"] = "learned_range"  # Latte's file carries it; DDIM ignores it
    want = DiffusersDDIM(timestep_spacing="trailing", prediction_type="v_prediction", set_alpha_to_one=False)
    assert DiffusersDDIM.from_config(cfg) == want
    (tmp_path / "scheduler_config.json").write_text(json.dumps(cfg))
    assert DiffusersDDIM.from_config(tmp_path / "scheduler_config.json") == want
    assert DiffusersDDIM.from_config(str(tmp_path), clip_sample=False) == DiffusersDDIM(
        timestep_spacing="trailing", prediction_type="v_prediction", set_alpha_to_one=False, clip_sample=False
    )
    assert DiffusersDDPM.from_config(dict(schedulers.DDPMScheduler(variance_type="fixed_large").config)) == DiffusersDDPM(
        variance_type="fixed_large"
    )
    assert hash(want) == hash(DiffusersDDIM.from_config(cfg))  # a jit / lru_cache key


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: DiffusersDDIM.from_config({"thresholding": True}), "thresholding"),
        (lambda: DiffusersDDIM.from_config({"trained_betas": [0.1, 0.2]}), "trained_betas"),
        (lambda: DiffusersDDIM.from_config({"rescale_betas_zero_snr": True}), "rescale_betas_zero_snr"),
        (lambda: DiffusersDDIM.from_config({"beta_schedule": "squaredcos_cap_v2"}), "beta_schedule"),
        (lambda: DiffusersDDIM.from_config({"timestep_spacing": "karras"}), "timestep_spacing"),
        (lambda: DiffusersDDIM.from_config({"prediction_type": "flow"}), "prediction_type"),
        (lambda: DiffusersDDIM.from_config({"steps_offset": True}), "number"),
        (lambda: DiffusersDDPM(variance_type="learned"), "variance_type"),
        (lambda: DiffusersDDIM.from_config("/nonexistent/scheduler"), "no scheduler config"),
        (lambda: DiffusersDDIM().timesteps(0), "num_steps"),
        (lambda: DiffusersDDIM().timesteps(1001), "num_steps"),
        (lambda: DiffusersDDIM(steps_offset=30).timesteps(50), "steps_offset"),
        (lambda: DiffusersDDPM().step_tables(10, eta=0.5), "eta"),
    ],
)
def test_bad_settings_are_one_line_config_errors(build, match):
    with pytest.raises(ConfigError, match=match) as e:
        build()
    assert "\n" not in str(e.value)


# ---- the jitted sampler against a loop around diffusers' step ------------------------------
CFG = tiny_config(depth=4)
PARAMS = random_params(CFG)
FAMILY = family_of(CFG)
NOISE = np.asarray(jax.random.normal(jax.random.key(1), (2, 8, 8, 4)))
LABELS = np.array([1, 7])
KEYS = jax.random.split(jax.random.key(5), 2)
STEPS, SCALE = 6, 3.0
_model = jax.jit(FAMILY.apply)


def _reference(theirs, eta=0.0, monkeypatch=None):
    """The Latte pipeline's loop: batch [uncond; text], guidance on all channels, keep the
    first C, diffusers' step; step noise = our per-sample keys' noise at index n-1-i."""
    cond = np.concatenate([np.asarray(FAMILY.null_condition(jnp.asarray(LABELS))), LABELS])
    theirs.set_timesteps(STEPS)
    x = torch.from_numpy(NOISE.copy())
    for i, t in enumerate(theirs.timesteps):
        xin = np.concatenate([x.numpy()] * 2)
        out = torch.from_numpy(np.array(_model(PARAMS, xin, np.full(4, int(t), np.int32), cond)))
        uncond, text = out.chunk(2)
        guided = (uncond + SCALE * (text - uncond))[..., :4]
        idx = STEPS - 1 - i
        z = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, idx), NOISE.shape[1:])) for k in KEYS])
        kw = dict(eta=eta, variance_noise=torch.from_numpy(z)) if isinstance(theirs, schedulers.DDIMScheduler) else {}
        if not kw:  # DDPMScheduler draws its own noise: hand it ours
            monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, _z=z, **k: torch.from_numpy(_z))
        x = theirs.step(guided, t, x, **kw).prev_sample
    return x.numpy()


@pytest.mark.parametrize(
    "cfg,eta",
    [(dict(clip_sample=False), 0.0), (dict(timestep_spacing="trailing", prediction_type="v_prediction", set_alpha_to_one=False), 0.7)],
)
def test_jitted_ddim_sampler_equals_a_diffusers_loop(cfg, eta):
    got = sample(CFG, PARAMS, noise=NOISE, labels=LABELS, sampler="ddim", num_steps=STEPS, cfg_scale=SCALE,
                 scheduler=DiffusersDDIM(**cfg), eta=eta, rng=KEYS)
    want = _reference(schedulers.DDIMScheduler(**cfg), eta)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_jitted_ddpm_sampler_equals_a_diffusers_loop(monkeypatch):
    cfg = dict(beta_start=0.00085, beta_end=0.02, beta_schedule="scaled_linear", prediction_type="v_prediction",
               steps_offset=1, clip_sample=False)
    got = sample(CFG, PARAMS, noise=NOISE, labels=LABELS, sampler="ddpm", num_steps=STEPS, cfg_scale=SCALE,
                 scheduler=DiffusersDDPM(**cfg), rng=KEYS)
    want = _reference(schedulers.DDPMScheduler(**cfg), monkeypatch=monkeypatch)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(sampler="ddpm"), "pass sampler='ddim'"),
        (dict(respacing="ddim6"), "respacing"),
        (dict(clip_denoised=True), "clip_sample"),
        (dict(num_steps=None), "num_steps"),
        (dict(scheduler=DiffusersDDPM(), sampler="ddpm", eta=0.5), "eta"),
        (dict(scheduler="ddim"), "DiffusersDDIM or DiffusersDDPM"),
    ],
)
def test_sampler_rejects_scheduler_misuse(kw, match):
    args = dict(noise=NOISE, labels=LABELS, sampler="ddim", num_steps=STEPS, scheduler=DiffusersDDIM())
    args.update(kw)
    with pytest.raises(ConfigError, match=match):
        sample(CFG, PARAMS, **args)
