"""Latte-T2V / Latte-T2V-skip (text-to-video): forward parity of the vanilla model with
diffusers' `LatteTransformer3DModel` (through a sharded diffusers folder), of the skip model
and of the cached (shallow) pass with the official-code reference, the family contract,
the converter both ways and both layouts, and bad inputs. Tiny models: 3 frames of 4x4x4
latents, width 32 (2 heads), captions of 5 tokens of width 16, random non-zero weights."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_latte_t2v_reference import TorchLatteT2V, numpy_state_dict, randomize_

from skipdit_jax.convert import from_torch, latte_t2v_from_torch, latte_t2v_to_torch, load_latte_t2v, save_latte_t2v_diffusers
from skipdit_jax.convert.latte_t2v import latte_t2v_expected_shapes
from skipdit_jax.errors import CheckpointError, ConfigError, UserError
from skipdit_jax.models import LatteT2V, LatteT2VConfig, family_of, latte_t2v_preset
from skipdit_jax.models.families import family_for_state_dict

TINY = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, num_heads=2, num_frames=3, caption_channels=16)
B, L = 2, 5


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, 3, 4, 4, 4)).astype(np.float32)
    text = rng.standard_normal((B, L, 16)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], np.int32)  # padding masked out
    return x, text, mask


def _to_torch_video(x):  # (B, F, H, W, C) -> (B, C, F, H, W)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))


def _from_torch_video(y):
    return y.detach().numpy().transpose(0, 2, 3, 4, 1)


def _reference(long_skip=True, layers=4, seed=0):
    torch.manual_seed(seed)
    ref = TorchLatteT2V(2, 16, 4, layers, 4, 2, 16, 3, long_skip=long_skip)
    return randomize_(ref, seed=seed, scale=0.15).eval()


# ---- the vanilla model against diffusers, through a sharded diffusers folder ---------------------
def test_vanilla_parity_with_diffusers_through_a_sharded_folder(tmp_path):
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(0)
    ref = LatteTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=32,
        attention_bias=True,
        sample_size=4,
        patch_size=2,
        activation_fn="gelu-approximate",
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=16,
        video_length=3,
    )
    randomize_(ref, seed=1, scale=0.15).eval()
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="40KB", safe_serialization=True)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    config, params = load_latte_t2v(tmp_path)  # a pipeline root: heads, size, frames from transformer/config.json
    assert config == LatteT2VConfig(**TINY, depth=2)

    x, text, mask = _inputs()
    t = np.array([999, 17])
    # diffusers hands encoder_attention_mask to the blocks as given: a (B*F, 1, L) bias.
    bias = ((1 - torch.from_numpy(mask).float()) * -10000.0).unsqueeze(1).repeat_interleave(3, dim=0)
    with torch.no_grad():
        want = ref(_to_torch_video(x), torch.from_numpy(t), torch.from_numpy(text), encoder_attention_mask=bias).sample
        unmasked = ref(_to_torch_video(x), torch.from_numpy(t), torch.from_numpy(text)).sample
    assert float((want - unmasked).abs().max()) > 1e-2  # the mask matters here
    family = family_of(config)
    cond = {"text_emb": text, "text_mask": mask, "null_emb": text, "null_mask": mask}

    def passes(x, t, cond):  # the plain forward, and the unit pieces the cache baselines compose
        h, c = family.embed(params, x, t, cond)
        by_units = family.head(params, family.run_units(params, family.run_units(params, h, c, 0, 1), c, 1, 2), c)
        return LatteT2V(config).apply({"params": params}, x, t, text, mask), by_units, family.probe(params, h, c)

    got, by_units, probe = jax.jit(passes)(x, t, cond)
    assert got.shape == (B, 3, 4, 4, 8) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _from_torch_video(want), atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(by_units, got, atol=1e-5)
    assert probe.shape == family.probe_shape(B) == family.hidden_shape(B) == (B, 3, 4, 32)

    # ...and back: a diffusers folder that diffusers loads, key for key and value for value.
    save_latte_t2v_diffusers(config, params, tmp_path / "export")
    back = LatteTransformer3DModel.from_pretrained(tmp_path / "export")
    want_state, got_state = ref.state_dict(), back.state_dict()
    assert set(got_state) == set(want_state)
    for k, v in want_state.items():
        np.testing.assert_array_equal(got_state[k].numpy(), v.numpy(), err_msg=k)


# ---- the skip model: one Latte-skip.pt-style file, three compiled passes shared by the tests ------
def _condition(seed=0, length=L):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, length), np.int32)
    mask[1, 2:] = 0
    null_mask = np.zeros((B, length), np.int32)
    null_mask[:, 0] = 1
    return {
        "text_emb": jnp.asarray(rng.standard_normal((B, length, 16)), jnp.float32),
        "text_mask": jnp.asarray(mask),
        "null_emb": jnp.asarray(rng.standard_normal((B, length, 16)), jnp.float32),
        "null_mask": jnp.asarray(null_mask),
    }


@pytest.fixture(scope="module")
def skip_model(tmp_path_factory):
    """The reference skip model (4 pairs), saved as a Latte-skip.pt ({"model", "ema"}, with
    an old-diffusers buffer and an unknown key in "ema") and loaded back, with the family's
    plain, full and shallow passes jitted once for every test here."""
    ref = _reference()
    state = {k: torch.from_numpy(v) for k, v in numpy_state_dict(ref).items()}
    extra = {"caption_projection.y_embedding": torch.zeros(120, 16), "ema_decay_hint": torch.zeros(1)}
    path = tmp_path_factory.mktemp("t2v") / "Latte-skip.pt"
    torch.save({"model": {k: v * 0 for k, v in state.items()}, "ema": {**state, **extra}}, path)
    with pytest.warns(UserWarning, match="ignored 1 key.*ema_decay_hint"):
        config, params = load_latte_t2v(path, num_heads=2, input_size=4, num_frames=3)
    family = family_of(config)
    passes = dict(
        apply=jax.jit(family.apply),
        full=jax.jit(family.forward_full, static_argnums=4),
        shallow=jax.jit(family.forward_shallow, static_argnums=5),
    )
    return ref, config, params, family, passes


def test_skip_and_cached_pass_parity_with_the_official_code(skip_model):
    """The full forward, and a full step then a cached step (N=2, k=1) of the official
    `LatteT2V_skip_cache` schedule: forward_full / forward_shallow reproduce both."""
    ref, config, params, family, passes = skip_model
    assert config == LatteT2VConfig(**TINY, depth=4, long_skip=True)
    assert params["skip_fusions"]["linear"]["kernel"].shape == (2, 64, 32)
    x, _, _ = _inputs(1)
    x2 = x + 0.3 * np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    cond = _condition()
    args = (torch.tensor(np.asarray(cond["text_emb"])), torch.tensor(np.asarray(cond["text_mask"])))
    with torch.no_grad():
        want_plain = _from_torch_video(ref(_to_torch_video(x2), torch.tensor([600, 600]), *args))
        ref.enable_cache(2, 1, start_t=700, close_t=50)
        want_full = _from_torch_video(ref(_to_torch_video(x), torch.tensor([900, 900]), *args))
        want_cached = _from_torch_video(ref(_to_torch_video(x2), torch.tensor([600, 600]), *args))
    assert (ref.n_full, ref.n_cached) == (2, 1)

    plain = passes["apply"](params, x2, jnp.array([600, 600]), cond)
    np.testing.assert_allclose(np.asarray(plain), want_plain, atol=5e-5, rtol=1e-4)
    full, deep = passes["full"](params, x, jnp.array([900, 900]), cond, 1)
    np.testing.assert_allclose(np.asarray(full), want_full, atol=5e-5, rtol=1e-4)
    assert deep.shape == family.deep_feature_shape(B) == (B, 3, 4, 32)
    cached = passes["shallow"](params, x2, jnp.array([600, 600]), cond, deep, 1)
    np.testing.assert_allclose(np.asarray(cached), want_cached, atol=5e-5, rtol=1e-4)
    assert float(np.abs(want_cached - want_plain).max()) > 1e-3  # the cached step really differs

    # The PyTorch-layout export is the reference's dict (plus the recorded tables).
    back = latte_t2v_to_torch(config, params)
    ref_state = numpy_state_dict(ref)
    assert set(back) - set(ref_state) == {"pos_embed.pos_embed", "temp_pos_embed"}
    for k, v in ref_state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


# ---- the family contract (as tests/test_family_contract.py, on the shared compiled passes) ----------
def _cfg(**kw) -> LatteT2VConfig:
    return LatteT2VConfig(**{**TINY, "depth": 4, "long_skip": True, **kw})


def test_family_contract(skip_model):
    _, config, params, family, passes = skip_model
    x = jnp.asarray(_inputs(2)[0])
    t = jnp.array([10, 900], jnp.int32)
    cond = _condition(3)
    plain = passes["apply"](params, x, t, cond)
    assert plain.shape == (B, 3, 4, 4, 8) and plain.dtype == jnp.float32 and np.isfinite(np.asarray(plain)).all()
    # The cache passes rebuild the plain forward; a stale deep feature does not.
    out, deep = passes["full"](params, x, t, cond, 1)
    np.testing.assert_allclose(out, plain, atol=1e-5)
    np.testing.assert_allclose(passes["shallow"](params, x, t, cond, deep, 1), plain, atol=1e-5)
    other = deep + jax.random.normal(jax.random.key(1), deep.shape, deep.dtype)
    assert float(jnp.abs(passes["shallow"](params, x, t, cond, other, 1) - plain).max()) > 1e-3
    # Guidance and dropout: the null condition swaps the captions and changes the output.
    family.check_condition(cond, B)
    null = family.null_condition(cond)
    assert jax.tree.structure(null) == jax.tree.structure(cond)
    jax.tree.map(np.testing.assert_array_equal, family.drop_condition(cond, jnp.ones((B,), bool)), null)
    jax.tree.map(np.testing.assert_array_equal, family.drop_condition(cond, jnp.zeros((B,), bool)), cond)
    half = family.drop_condition(cond, jnp.array([True, False]))
    guided = passes["apply"](params, x, t, half)
    np.testing.assert_array_equal(half["text_emb"][0], cond["null_emb"][0])
    assert float(jnp.abs(guided[0] - plain[0]).max()) > 1e-3
    np.testing.assert_allclose(guided[1], plain[1], atol=1e-5)  # rows are independent
    with pytest.raises(UserError):
        family.check_condition(None, B)
    # Registry and conversion round trips; parameters float32 and counted.
    from skipdit_jax.models.families import config_from_dict, config_to_dict

    d = config_to_dict(config)
    assert d["family"] == "latte_t2v" and config_from_dict(d) == config
    state = family.to_torch(params)
    assert family_for_state_dict(state) is type(family)
    got_config, back = type(family).from_torch(state, num_heads=2)
    assert got_config == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(family.abstract_params()))
    assert family.count_params(params) == family.count_params() == 142_336
    assert jax.tree.structure(family.abstract_params()) == jax.tree.structure(params)


def test_family_condition_pieces_and_example():
    family = family_of(_cfg())
    assert (family.name, family.condition_kind, family.cache_units, family.depth_units) == ("latte_t2v", "text", 2, 4)
    cond = _condition()
    null = family.null_condition(cond)
    np.testing.assert_array_equal(null["text_emb"], cond["null_emb"])
    np.testing.assert_array_equal(null["text_mask"], cond["null_mask"])
    ex = family.example_condition(3)
    family.check_condition(ex, 3)
    assert ex["text_emb"].shape == (3, 120, 16) and not ex["text_emb"].any()
    assert ex["text_mask"].tolist() == [[1] + [0] * 119] * 3
    spec = family.batch_spec(4)
    assert {k: v.shape for k, v in spec.items()} == {
        "image": (4, 3, 4, 4, 4),
        "text_emb": (4, 120, 16),
        "text_mask": (4, 120),
        "null_emb": (4, 120, 16),
        "null_mask": (4, 120),
    }
    batch = {k: np.zeros(v.shape, v.dtype) for k, v in spec.items()}
    assert {k: v.dtype for k, v in family.condition_from_batch(batch).items()} == {
        "text_emb": jnp.float32,
        "text_mask": jnp.int32,
        "null_emb": jnp.float32,
        "null_mask": jnp.int32,
    }
    # Every rule names one axis per dimension, and every weight matrix of the preset has a rule.
    from skipdit_jax.sharding import _path_str, logical_axes

    preset = family_of(latte_t2v_preset("Latte-T2V-skip"))
    for path, leaf in jax.tree_util.tree_flatten_with_path(preset.abstract_params())[0]:
        axes = logical_axes(_path_str(path), leaf.ndim, preset.param_axes)
        assert leaf.ndim < 2 or any(axes), _path_str(path)


# ---- presets, configs and bad inputs ---------------------------------------------------------------
def test_presets_and_config_errors():
    c = latte_t2v_preset("Latte-T2V")
    assert (c.depth, c.hidden_size, c.num_heads, c.patch_size, c.input_size, c.num_frames, c.caption_channels) == (
        28,
        1152,
        16,
        2,
        64,
        16,
        4096,
    )
    assert not c.long_skip and latte_t2v_preset("Latte-T2V-skip").long_skip
    # The model's parameters are exactly the checkpoint's tensors (the converter's list); the
    # skip model's 1.094B float32 parameters twice ({"model", "ema"}) are Latte-skip.pt's 8.76 GB.
    counts = {}
    for name in ("Latte-T2V", "Latte-T2V-skip"):
        cfg = latte_t2v_preset(name)
        counts[name] = family_of(cfg).count_params()
        assert counts[name] == sum(int(np.prod(s)) for s in latte_t2v_expected_shapes(cfg).values())
    assert counts == {"Latte-T2V": 1_057_246_880, "Latte-T2V-skip": 1_094_486_432}
    # diffusers' position table, also at the interpolation scale of sample_size >= 128.
    from diffusers.models.embeddings import PatchEmbed

    from skipdit_jax.models.text_blocks import patch_pos_embed

    for size, scale in ((8, 1), (16, 2)):
        want = PatchEmbed(height=size, width=size, patch_size=2, in_channels=4, embed_dim=32, interpolation_scale=scale).pos_embed
        np.testing.assert_allclose(patch_pos_embed(32, size // 2, scale), want[0].numpy(), atol=1e-6)
    assert latte_t2v_preset("Latte-T2V", input_size=128).interpolation_scale == 2
    with pytest.raises(ConfigError, match="depth must be even"):
        _cfg(depth=3)
    with pytest.raises(ConfigError, match="unknown Latte-T2V preset"):
        latte_t2v_preset("Latte-T2V-XL")


def test_bad_conditions_and_inputs_give_one_clear_user_error():
    family = family_of(_cfg())
    cond = _condition()
    cases = [
        (
            {**cond, "text_emb": jnp.zeros((B, L, 8))},
            "width D=8 .text_emb. does not match the model's caption projection .caption_channels 16.",
        ),
        ({k: v for k, v in cond.items() if k != "null_mask"}, "lacks null_mask"),
        (cond["text_emb"], "condition dict with keys text_emb, text_mask, null_emb, null_mask"),
        ({**cond, "text_mask": cond["text_mask"][:, :3]}, "text_mask must have shape .2, 5."),
        (
            {**cond, "null_emb": jnp.zeros((B, 7, 16)), "null_mask": jnp.zeros((B, 7), jnp.int32)},
            "null_emb must have the shape of text_emb",
        ),
        ({**cond, "text_emb": jnp.zeros((3, L, 16))}, "to match the noise batch"),
    ]
    for bad, needle in cases:
        with pytest.raises(UserError, match=needle) as e:
            family.check_condition(bad, B)
        assert "\n" not in str(e.value)
    params = family.abstract_params()
    with pytest.raises(UserError, match=r"video latents of shape \(batch, 3, 4, 4, 4\)"):  # noise without its frame axis
        family.apply(params, jnp.zeros((B, 4, 4, 4)), jnp.zeros((B,), jnp.int32), cond)
    with pytest.raises(UserError, match="does not match the model's caption projection"):
        family.apply(params, jnp.zeros((B, 3, 4, 4, 4)), jnp.zeros((B,), jnp.int32), {**cond, "text_emb": jnp.zeros((B, L, 8))})


def test_converter_errors_and_the_other_families():
    from torch_reference import TorchDiT, TorchLatte
    from torch_reference import numpy_state_dict as torch_numpy_state_dict

    state = numpy_state_dict(_reference(layers=2))
    assert family_for_state_dict(state).name == "latte_t2v"
    dit_state = torch_numpy_state_dict(TorchDiT(8, 2, 4, 32, 4, 4, num_classes=5, long_skip=True))
    latte_state = torch_numpy_state_dict(TorchLatte(4, 2, 4, 32, 4, 4, num_frames=3, num_classes=5))
    with pytest.raises(CheckpointError, match="not a Latte-T2V checkpoint: it looks like a DiT checkpoint"):
        latte_t2v_from_torch(dit_state)
    with pytest.raises(CheckpointError, match="not a Latte-T2V checkpoint: it looks like a class-to-video Latte"):
        latte_t2v_from_torch(latte_state)
    with pytest.raises(CheckpointError, match=r"not a latte_t2v checkpoint \(it looks like a dit"):
        from_torch(dit_state, family="latte_t2v")
    with pytest.raises(CheckpointError, match=r"not a latte checkpoint \(it looks like a latte_t2v"):
        from_torch(state, family="latte", num_heads=2)
    with pytest.raises(CheckpointError, match="no multiple of 72: pass num_heads"):
        latte_t2v_from_torch(state)
    kw = dict(num_heads=2, input_size=4, num_frames=3)
    bad = {**state, "transformer_blocks.1.attn2.to_k.weight": state["transformer_blocks.1.attn2.to_k.weight"][:, :-1]}
    with pytest.raises(CheckpointError, match=r"wrong shapes: transformer_blocks.1.attn2.to_k.weight \(32, 31\)"):
        latte_t2v_from_torch(bad, **kw)
    with pytest.raises(CheckpointError, match="missing keys: skip_norms.0.bias"):
        latte_t2v_from_torch({k: v for k, v in state.items() if k != "skip_norms.0.bias"}, **kw)
    with pytest.raises(CheckpointError, match="unexpected keys: transformer_blocks.0.norm1.weight"):  # another architecture
        latte_t2v_from_torch({**state, "transformer_blocks.0.norm1.weight": np.ones(32, np.float32)}, **kw)
    with pytest.raises(CheckpointError, match="unexpected keys: other.weight"):
        latte_t2v_from_torch({**state, "other.weight": np.ones(3, np.float32)}, strict=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tables of the export fit: no warning, no error
        config, _ = latte_t2v_from_torch(latte_t2v_to_torch(*latte_t2v_from_torch(state, **kw)), num_heads=2)
    assert (config.input_size, config.num_frames) == (4, 3)
    with pytest.raises(CheckpointError, match="shape .1, 4, 32., expected .1, 1, 32."):
        latte_t2v_from_torch(latte_t2v_to_torch(config, _), num_heads=2, input_size=2)


def test_skipdit_convert_takes_a_diffusers_folder(tmp_path):
    from absl import flags

    from skipdit_jax import model_store
    from skipdit_jax.commands import convert as convert_cmd

    config, params = latte_t2v_from_torch(
        numpy_state_dict(_reference(long_skip=False, layers=2)), num_heads=2, input_size=4, num_frames=3
    )
    save_latte_t2v_diffusers(config, params, tmp_path / "Latte" / "transformer")
    fv = flags.FlagValues()
    convert_cmd.define_flags(fv)
    fv(["skipdit"])
    assert convert_cmd.main([str(tmp_path / "Latte"), str(tmp_path / "out")], fv) == 0
    got_config, got = model_store.load_model(tmp_path / "out")
    assert got_config == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, params)
    fv.family = "dit"
    with pytest.raises(UserError, match="diffusers model folder, which holds a latte_t2v model"):
        convert_cmd.main([str(tmp_path / "Latte"), str(tmp_path / "out2")], fv)
