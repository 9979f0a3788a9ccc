"""Latte / Latte-skip (class-to-video): the family contract, forward and cached-pass parity
against the independent PyTorch reference (through the converter), the converter both ways
and its errors, the c2v Skip-Cache schedule counts, bad inputs. Tiny models: 3 frames of
4x4x4 latents, width 32, 4 pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_family_contract import FamilyContract, pytest_generate_tests  # noqa: F401 (parametrizes the contract)
from torch_reference import (
    TorchDiT,
    TorchLatte,
    create_diffusion,
    latte_cache_schedule,
    numpy_state_dict,
    randomize_latte_parameters_,
)

from skipdit_jax.cache import SkipCache
from skipdit_jax.convert import dit_from_torch, from_torch, latte_from_torch, latte_to_torch
from skipdit_jax.errors import CheckpointError, UserError
from skipdit_jax.models import Latte, LatteConfig, family_of, latte_preset
from skipdit_jax.models.families import family_for_state_dict

TINY = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=8, num_heads=4, num_frames=3)


def _cfg(**kw) -> LatteConfig:
    return LatteConfig(**{**TINY, "num_classes": 5, "long_skip": True, **kw})


def _random_params(config, seed=3, scale=0.05):
    params = family_of(config).init_params(seed)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed + 1)
    return jax.tree.unflatten(treedef, [np.asarray(a) + scale * rng.standard_normal(a.shape).astype(np.float32) for a in leaves])


class TestLatteFamily(FamilyContract):
    @staticmethod
    def make_configs():
        # One config keeps the file's time down; the unconditional, no-sigma, no-skip model is
        # covered by the parity and bad-input tests below.
        return {"latte-skip": _cfg()}

    @pytest.fixture
    def case(self, config_id):  # the contract's fixture, with Latte's parameters
        config = self.make_configs()[config_id]
        family = family_of(config)
        x = jax.random.normal(jax.random.key(0), (2, *family.sample_shape))
        cond = family.example_condition(2)
        return family, _random_params(config), x, jnp.array([10, 900], jnp.int32), None if cond is None else jnp.asarray(cond)


# ---- parity with the PyTorch reference ---------------------------------------------------------
def _torch_model(long_skip=True, num_classes=5, learn_sigma=True, seed=0):
    torch.manual_seed(seed)
    kw = {k: v for k, v in TINY.items()}
    model = TorchLatte(**kw, num_classes=num_classes, learn_sigma=learn_sigma, long_skip=long_skip)
    return randomize_latte_parameters_(model, seed=seed).eval()


def _to_torch_video(x):  # (B, F, H, W, C) -> (B, F, C, H, W)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 1, 4, 2, 3)))


def _from_torch_video(x):
    return x.detach().numpy().transpose(0, 1, 3, 4, 2)


@pytest.mark.parametrize(
    "long_skip,num_classes,learn_sigma",
    [(True, 5, True), (False, 0, False)],
    ids=["conditional-skip", "unconditional-vanilla-no-sigma"],
)
def test_forward_parity_through_the_converter(long_skip, num_classes, learn_sigma):
    ref = _torch_model(long_skip=long_skip, num_classes=num_classes, learn_sigma=learn_sigma)
    state = numpy_state_dict(ref)
    config, params = latte_from_torch({"ema": state}, num_heads=4)
    got_arch = (config.long_skip, config.num_classes, config.num_frames, config.depth, config.learn_sigma)
    assert got_arch == (long_skip, num_classes, 3, 8, learn_sigma)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32)
    t = np.array([999, 17])
    y = np.array([1, 5]) if num_classes else None  # 5 = the null label
    with torch.no_grad():
        want = _from_torch_video(ref(_to_torch_video(x), torch.from_numpy(t), None if y is None else torch.from_numpy(y)))
    got = Latte(config).apply({"params": params}, x, t, y)
    assert got.shape == (2, 3, 4, 4, 8 if learn_sigma else 4)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)
    # ...and back: the exported dict is the reference's, key for key.
    back = latte_to_torch(config, params)
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_allclose(back[k], state[k], atol=1e-6, err_msg=k)


@pytest.mark.parametrize("long_skip,image_labels", [(True, True), (False, False)], ids=["skip-own-labels", "vanilla-video-label"])
def test_joint_image_video_forward_parity(long_skip, image_labels):
    """3 video frames + 2 images (the official latte_img.py training forward): images pass the
    spatial blocks (and the skip fusions) only, conditioned on their own labels or the video's."""
    ref = _torch_model(long_skip=long_skip)
    config, params = latte_from_torch(numpy_state_dict(ref), num_heads=4)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 4, 4, 4)).astype(np.float32)
    t, y = np.array([999, 17]), np.array([1, 5])
    y_images = np.array([[0, 3], [2, 4]]) if image_labels else None
    with torch.no_grad():
        want = ref(
            _to_torch_video(x), torch.from_numpy(t), torch.from_numpy(y), use_image_num=2,
            y_image=None if y_images is None else torch.from_numpy(y_images),
        )
    apply = jax.jit(lambda x, y_images: Latte(config).apply({"params": params}, x, t, y, y_images))
    got = apply(x, y_images)
    assert got.shape == (2, 5, 4, 4, 8)
    np.testing.assert_allclose(np.asarray(got), _from_torch_video(want), atol=2e-5, rtol=1e-4)
    if image_labels:
        # Frames meet only in temporal blocks, which images skip: other images (and other
        # image labels) change the images' outputs and leave the video's exactly as it was.
        other = apply(np.concatenate([x[:, :3], -x[:, 3:]], axis=1), y_images[:, ::-1])
        np.testing.assert_array_equal(np.asarray(other[:, :3]), np.asarray(got[:, :3]))
        assert float(jnp.abs(other[:, 3:] - got[:, 3:]).max()) > 1e-3


def test_joint_images_config_batch_spec_and_too_few_frames():
    config = _cfg(joint_images=2)
    assert LatteConfig.from_json(config.to_json()) == config and '"joint_images": 2' in config.to_json()
    family = family_of(config)
    assert family.sample_shape == (3, 4, 4, 4)  # sampling and the caches see the video only
    assert family.batch_spec(6)["image"].shape == (6, 5, 4, 4, 4)
    spec = family.batch_spec(6)
    assert spec["image_labels"].shape == (6, 2)  # a class-conditional model: each image its own label
    assert "image_labels" not in family_of(_cfg(joint_images=2, num_classes=0)).batch_spec(6)
    batch = {"label": np.array([1, 2]), "image_labels": np.array([[0, 3], [4, 5]])}
    cond = family.condition_from_batch(batch)
    dropped = family.drop_condition(cond, jnp.array([True, False]))
    np.testing.assert_array_equal(dropped["label"], [config.null_label, 2])
    np.testing.assert_array_equal(dropped["image_labels"], [[config.null_label] * 2, [4, 5]])
    params = family.init_params(0)
    x = jax.random.normal(jax.random.key(0), (2, 5, 4, 4, 4))
    t = jnp.array([3, 700])
    want = Latte(config).apply({"params": params}, x, t, jnp.array([1, 2]), jnp.array([[0, 3], [4, 5]]))
    np.testing.assert_array_equal(family.apply(params, x, t, cond), want)
    with pytest.raises(UserError, match="joint_images"):
        _cfg(joint_images=-1)
    with pytest.raises(UserError, match=r"frames >= 3") as e:  # checked before any computation
        family.apply(family.abstract_params(), jnp.zeros((1, 2, 4, 4, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
    assert "\n" not in str(e.value)


def test_cached_guided_ddim_matches_the_official_cache():
    """DDIM-10 with guidance (scale 4 on all 4 eps channels, as the c2v `forward_with_cfg`) and
    the c2v Skip-Cache (N=2, k=1 pair, full for t >= 900, dropped after t < 50) through the
    jitted sampler equals the reference's module-held cache (`Latte_skip_cache`) in the
    official loop (batch [cond; uncond]): full and cached steps both take part."""
    from skipdit_jax.sampling import sample

    ref = _torch_model().enable_cache(2, 1, start_t=900, close_t=50)
    config, params = latte_from_torch(numpy_state_dict(ref), num_heads=4)
    noise = np.random.default_rng(1).standard_normal((2, 3, 4, 4, 4)).astype(np.float32)
    y = np.array([0, 3])
    scale = 4.0
    diffusion = create_diffusion("ddim10")
    x = np.concatenate([noise, noise]).transpose(0, 1, 4, 2, 3).astype(np.float64)  # (2B, F, C, H, W)
    y2 = torch.from_numpy(np.concatenate([y, np.full_like(y, 5)]))  # 5 = the null label
    with torch.no_grad():
        for i in reversed(range(diffusion.num_timesteps)):
            t = torch.full((4,), int(diffusion.timestep_map[i]), dtype=torch.long)
            half = torch.from_numpy(x[:2]).float()
            out = ref(torch.cat([half, half]), t, y2)
            eps, rest = out[:, :, :4], out[:, :, 4:]
            cond, uncond = eps[:2], eps[2:]
            guided = uncond + scale * (cond - uncond)
            out = torch.cat([torch.cat([guided, guided]), rest], dim=2).double().numpy()
            x = diffusion.ddim_step(out, x, i, channel_axis=2)
    assert (ref.n_full, ref.n_cached) == (5, 5)  # t = 900 (full), 800 (cached), ..., 0 (cached)
    got = sample(
        config, params, noise=noise, labels=y, sampler="ddim", num_steps=10, cfg_scale=scale, cache=SkipCache(2, 1, 900, 49)
    )
    np.testing.assert_allclose(np.asarray(got), x[:2].transpose(0, 1, 3, 4, 2), atol=1e-4, rtol=1e-4)


# ---- the c2v Skip-Cache schedule ---------------------------------------------------------------
@pytest.mark.parametrize(
    "respacing,interval,full,cached",
    [("250", 2, 143, 107), ("250", 3, 108, 142), ("250", 4, 90, 160), ("ddim50", 2, 28, 22), ("ddim50", 3, 21, 29)],
)
def test_c2v_skip_cache_schedule_counts(respacing, interval, full, cached):
    timesteps = [int(t) for t in create_diffusion(respacing).timestep_map[::-1]]
    schedule = SkipCache(interval, 1, 900, 49).full_steps(timesteps)
    assert list(schedule) == latte_cache_schedule(timesteps, interval, 900, 50)
    assert (int(schedule.sum()), int((~schedule).sum())) == (full, cached)


def test_skip_cache_accepts_latte_skip_and_counts_pairs():
    family = family_of(latte_preset("Latte-XL/2-skip"))
    assert (family.cache_units, family.depth_units, family.sample_shape) == (7, 14, (16, 32, 32, 4))
    SkipCache(2, 1, 900, 49).check_model(family)
    SkipCache(2, 6, 900, 49).check_model(family)
    with pytest.raises(UserError):
        SkipCache(2, 7, 900, 49).check_model(family)
    # The released Latte-XL/2-skip: 692.4M trainable parameters for UCF-101, 692.3M unconditional.
    assert family.count_params() == 692_418_848
    assert family_of(latte_preset("Latte-XL/2-skip", num_classes=0)).count_params() == 692_301_344


# ---- converter: inference, validation, the other family -----------------------------------------
def test_converter_infers_and_validates():
    state = numpy_state_dict(_torch_model())
    config, _ = latte_from_torch(state, num_heads=4)
    assert config == _cfg()
    with pytest.raises(CheckpointError, match="num_heads"):
        latte_from_torch(state)
    with pytest.raises(CheckpointError, match="does not match preset"):
        latte_from_torch(state, preset="Latte-XL/2")
    bad = dict(state)
    bad["blocks.3.mlp.fc2.weight"] = bad["blocks.3.mlp.fc2.weight"][:, :-1]
    with pytest.raises(CheckpointError, match="wrong shapes: blocks.3.mlp.fc2.weight"):
        latte_from_torch(bad, num_heads=4)
    bad = {k: v for k, v in state.items() if k != "skip_norms.1.bias"}
    with pytest.raises(CheckpointError, match="missing keys: skip_norms.1.bias"):
        latte_from_torch(bad, num_heads=4)
    bad = {**state, "extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match="unexpected keys: extra.weight"):
        latte_from_torch(bad, num_heads=4)
    bad = {**state, "temp_embed": state["temp_embed"] + 1}
    with pytest.raises(CheckpointError, match="temp_embed is not the standard"):
        latte_from_torch(bad, num_heads=4)


def test_the_other_family_gives_one_clear_error():
    dit_state = numpy_state_dict(TorchDiT(8, 2, 4, 32, 4, 4, num_classes=5, long_skip=True))
    latte_state = numpy_state_dict(_torch_model())
    assert family_for_state_dict(latte_state).name == "latte"
    assert family_for_state_dict(dit_state).name == "dit"
    with pytest.raises(CheckpointError, match="not a Latte checkpoint.*DiT"):
        latte_from_torch(dit_state, num_heads=4)
    with pytest.raises(CheckpointError, match="not a latte checkpoint .it looks like a dit"):
        from_torch(dit_state, family="latte", num_heads=4)
    with pytest.raises(CheckpointError, match="not a dit checkpoint .it looks like a latte"):
        from_torch(latte_state, family="dit", num_heads=4)
    with pytest.raises(CheckpointError, match="Latte .video. checkpoint, not a DiT one"):
        dit_from_torch(latte_state, num_heads=4)


# ---- configs and bad inputs --------------------------------------------------------------------
def test_presets_and_config_errors():
    c = latte_preset("Latte-XL/2-skip", num_classes=0)
    assert (c.depth, c.hidden_size, c.num_heads, c.patch_size, c.long_skip, c.num_frames) == (28, 1152, 16, 2, True, 16)
    assert latte_preset("Latte-skip") == latte_preset("Latte-XL/2-skip")
    assert not latte_preset("Latte-S/4").long_skip
    with pytest.raises(UserError, match="number of pairs must be even"):
        _cfg(depth=6)
    with pytest.raises(UserError, match="unknown Latte preset"):
        latte_preset("Latte-M/2")


def test_bad_inputs_give_one_clear_user_error():
    config = _cfg()
    family = family_of(config)
    params = _random_params(config)
    with pytest.raises(UserError, match="frames"):
        family.apply(params, jnp.zeros((2, 4, 4, 4)), jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32))
    uncond = family_of(_cfg(num_classes=0, long_skip=False))
    with pytest.raises(UserError, match="unconditional"):
        uncond.check_condition(jnp.zeros((2,), jnp.int32), 2)
