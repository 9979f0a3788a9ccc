"""Hunyuan-DiT v1.2 (text-to-image): forward parity with diffusers' `HunyuanDiT2DModel`, the
cached (shallow) pass against a PyTorch loop over diffusers' own modules written from the
reference's cache semantics, the family contract, the converter both ways and its errors;
v1.0/v1.1 (style and image-size conditions): parity through every pass, converter, errors.
Tiny model: 6 blocks of width 64 (2 heads), 8x8x4 latents (non-square RoPE grids checked alone),
CLIP 5x32 and T5 7x48 captions, random non-zero weights. Passes are compiled once and shared."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from skipdit_jax.convert import from_torch, hunyuan_from_torch, hunyuan_to_torch
from skipdit_jax.errors import CheckpointError, ConfigError, UserError
from skipdit_jax.models import HunyuanConfig, HunyuanDiT, family_of, hunyuan_preset
from skipdit_jax.models.families import config_from_dict, config_to_dict, family_for_state_dict
from skipdit_jax.models.hunyuan import rope_tables

TINY = dict(
    input_size=8, hidden_size=64, depth=6, num_heads=2, mlp_ratio=2.5, text_len=5, text_len_t5=7,
    cross_attention_dim=32, cross_attention_dim_t5=48, pooled_projection_dim=40,
)
B = 2


def tiny_diffusers(v11=False, *, text_len=5, text_len_t5=7, clip_dim=32, t5_dim=48, seed=0, weight_scale=0.15):
    """A tiny diffusers HunyuanDiT2DModel (6 blocks, width 64, 8x8 latents) with random non-zero
    weights (norm weights near 1); the reference every Hunyuan-DiT test file builds on."""
    from diffusers import HunyuanDiT2DModel

    torch.manual_seed(seed)
    ref = HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, patch_size=2, sample_size=8, hidden_size=64,
        num_layers=6, mlp_ratio=2.5, cross_attention_dim=clip_dim, cross_attention_dim_t5=t5_dim, pooled_projection_dim=40,
        text_len=text_len, text_len_t5=text_len_t5, use_style_cond_and_image_meta_size=v11,
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else weight_scale * noise)
    return ref.eval()


def _reference(v11=False):
    """`tiny_diffusers`, its numpy state dict, and our converted config and parameters."""
    ref = tiny_diffusers(v11)
    state = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    config, params = hunyuan_from_torch(state, input_size=8)
    return ref.eval(), state, config, params


@pytest.fixture(scope="module")
def model():
    return _reference()


@pytest.fixture(scope="module")
def passes(model):
    """The family's passes, compiled once for every test (eager passes cost seconds)."""
    family = family_of(model[2])
    return family, {
        "apply": jax.jit(family.apply),
        "full": jax.jit(family.forward_full, static_argnums=4),
        "shallow": jax.jit(family.forward_shallow, static_argnums=5),
    }


def _cond(inputs, seed=5):
    x, t, clip, clip_mask, t5, t5_mask = inputs
    rng = np.random.default_rng(seed)
    return {"clip_emb": clip, "clip_mask": clip_mask, "t5_emb": t5, "t5_mask": t5_mask,
            "null_clip_emb": rng.standard_normal(clip.shape).astype(np.float32), "null_clip_mask": np.ones_like(clip_mask),
            "null_t5_emb": rng.standard_normal(t5.shape).astype(np.float32), "null_t5_mask": np.ones_like(t5_mask)}


def _inputs(seed=0, hw=(8, 8)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, *hw, 4)).astype(np.float32)
    clip = rng.standard_normal((B, 5, 32)).astype(np.float32)
    t5 = rng.standard_normal((B, 7, 48)).astype(np.float32)
    clip_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
    t5_mask = np.array([[1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]], np.int32)
    return x, np.array([999.0, 17.0], np.float32), clip, clip_mask, t5, t5_mask


def _torch_pass(ref, x, t, clip, clip_mask, t5, t5_mask, k=None, deep=None):
    """diffusers' forward unrolled from its modules, with the reference's Skip-Cache: on a
    full pass (deep None) also return the input of block D-k; on a cached pass run blocks
    0..k-1, then blocks D-k..D-1 from `deep`, each fusing the skip popped for it."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    d = len(ref.blocks)
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    h_img, w_img = x.shape[1:3]
    grid = (h_img // 2, w_img // 2)
    rope = get_2d_rotary_pos_embed(32, get_resize_crop_region_for_grid(grid, 512 // 8 // 2), grid)
    with torch.no_grad():
        hs = ref.pos_embed(tt(x.transpose(0, 3, 1, 2)))
        temb = ref.time_extra_emb(tt(t), tt(t5), None, None, hidden_dtype=torch.float32)
        ctx = torch.cat([tt(clip), ref.text_embedder(tt(t5))], dim=1)
        keep = torch.cat([tt(clip_mask), tt(t5_mask)], dim=-1).unsqueeze(2).bool()
        ctx = torch.where(keep, ctx, ref.text_embedding_padding)
        kw = dict(temb=temb, encoder_hidden_states=ctx, image_rotary_emb=rope)
        skips, cached = [], None
        layers = range(d) if deep is None else [*range(k), *range(d - k, d)]
        for layer in layers:
            if deep is not None and layer == d - k:
                hs = tt(deep)
            if deep is None and k is not None and layer == d - k:
                cached = hs.numpy().copy()
            if layer > d // 2:
                hs = ref.blocks[layer](hs, skip=skips.pop(), **kw)
            else:
                hs = ref.blocks[layer](hs, **kw)
            if layer < d // 2 - 1:
                skips.append(hs)
        hs = ref.proj_out(ref.norm_out(hs, temb))
        out = hs.reshape(B, *grid, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(B, h_img, w_img, 8)
    return out.numpy(), cached


def test_forward_parity_with_diffusers(model, passes):
    ref, _, config, params = model
    assert config == HunyuanConfig(**TINY)
    inputs = _inputs()
    with torch.no_grad():
        want = ref(torch.from_numpy(inputs[0].transpose(0, 3, 1, 2)), *[torch.from_numpy(a) for a in inputs[1:]],
                   image_rotary_emb=_rope((4, 4)), return_dict=False)[0].numpy().transpose(0, 2, 3, 1)
    got = passes[1]["apply"](params, *inputs[:2], _cond(inputs))
    assert got.shape == (B, 8, 8, 8) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(_torch_pass(ref, *inputs)[0], want, atol=1e-5, rtol=1e-5)  # the unrolled loop is diffusers'


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 2)])
def test_rope_tables_match_diffusers(grid):
    """Non-square grids sit in a centred crop of the 32x32 base frame."""
    cos, sin = rope_tables(32, *grid, patch_size=2)
    want_cos, want_sin = _rope(grid)
    np.testing.assert_allclose(cos, want_cos.numpy(), atol=1e-5)  # float32 positions
    np.testing.assert_allclose(sin, want_sin.numpy(), atol=1e-5)


def _rope(grid):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    return get_2d_rotary_pos_embed(32, get_resize_crop_region_for_grid(grid, 32), grid)


@pytest.mark.parametrize("k", [1, 3])  # a decoder block; D/2, the second middle block
def test_cached_passes_match_the_reference_semantics(model, passes, k):
    ref, _, config, params = model
    full, shallow = passes[1]["full"], passes[1]["shallow"]
    inputs = _inputs(2)
    out, deep = full(params, *inputs[:2], _cond(inputs), k)
    want, cached = _torch_pass(ref, *inputs, k=k)
    np.testing.assert_allclose(out, want, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(deep, cached, atol=2e-4, rtol=1e-4)
    # A cached step with another timestep and latent reuses the stale feature.
    step = _inputs(3)
    got = shallow(params, *step[:2], _cond(step), deep, k)
    np.testing.assert_allclose(got, _torch_pass(ref, *step, k=k, deep=np.array(deep))[0], atol=2e-4, rtol=1e-4)


def test_family_contract_and_round_trip(model, passes):
    _, state, config, params = model
    family, jitted = passes
    assert family.name == "hunyuan" and family.condition_kind == "text"
    assert (family.cache_units, family.depth_units, family.deep_feature_shape(2)) == (3, 6, (2, 16, 64))
    inputs = _inputs(4)
    x, t, t5 = inputs[0], inputs[1], inputs[4]
    cond = _cond(inputs)
    family.check_condition(cond, B)
    plain = jitted["apply"](params, x, t, cond)
    for k in (1, 3):  # the cache passes rebuild the plain forward; a stale feature does not
        out, deep = jitted["full"](params, x, t, cond, k)
        tol = dict(atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(out, plain, **tol)
        np.testing.assert_allclose(jitted["shallow"](params, x, t, cond, deep, k), plain, **tol)
        stale = deep + jnp.std(deep) * jax.random.normal(jax.random.key(k), deep.shape)
        assert float(jnp.abs(jitted["shallow"](params, x, t, cond, stale, k) - plain).max()) > 1e-2
    null = family.null_condition(cond)
    np.testing.assert_array_equal(null["t5_emb"], cond["null_t5_emb"])
    half = family.drop_condition(cond, jnp.array([True, False]))
    guided = jitted["apply"](params, x, t, half)
    assert float(jnp.abs(guided[0] - plain[0]).max()) > 1e-2
    np.testing.assert_allclose(guided[1], plain[1], atol=1e-4, rtol=1e-5)
    spec = family.batch_spec(3)
    assert spec["image"].shape == (3, 8, 8, 4) and spec["null_t5_mask"].shape == (3, 7)
    family.check_condition(family.example_condition(3), 3)
    with pytest.raises(UserError, match=r"t5_emb must have shape \(2, 7, 48\)"):
        family.check_condition({**cond, "t5_emb": t5[:, :3]}, B)
    with pytest.raises(UserError, match="lacks null_clip_emb"):
        family.check_condition({k: v for k, v in cond.items() if k != "null_clip_emb"}, B)
    # Registry, JSON config and the converter both ways.
    assert config_from_dict(config_to_dict(config)) == config
    assert family_for_state_dict(state) is type(family)
    back = hunyuan_to_torch(config, params)
    assert set(back) == set(state)
    for key in state:
        np.testing.assert_array_equal(back[key], state[key], err_msg=key)
    again = from_torch(back, input_size=8)[1]
    jax.tree.map(np.testing.assert_array_equal, again, params)
    assert jax.tree.structure(family.abstract_params()) == jax.tree.structure(params)
    assert family.count_params(params) == sum(v.size for v in state.values())


def _official_layout(state):
    """The diffusers state dict written in the official HunyuanDiT names (hydit/modules/
    models.py, attn_layers.py): fused Wqkv / kv_proj, norm2 and norm3 swapped, the final
    modulation as shift | scale."""
    top = {"pos_embed.proj": "x_embedder.proj", "time_extra_emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_extra_emb.timestep_embedder.linear_2": "t_embedder.mlp.2", "text_embedder.linear_1": "mlp_t5.0",
           "text_embedder.linear_2": "mlp_t5.2", "time_extra_emb.extra_embedder.linear_1": "extra_embedder.0",
           "time_extra_emb.extra_embedder.linear_2": "extra_embedder.2", "proj_out": "final_layer.linear",
           "time_extra_emb.style_embedder": "style_embedder"}
    block = {"norm1.linear": "default_modulation.1", "norm1.norm": "norm1", "norm2": "norm3", "norm3": "norm2",
             "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2", "attn1.to_out.0": "attn1.out_proj",
             "attn2.to_out.0": "attn2.out_proj", "attn2.to_q": "attn2.q_proj"}
    out = {"text_embedding_padding": state["text_embedding_padding"]}
    for key, value in state.items():
        if key == "text_embedding_padding":
            continue
        module, leaf = key.rsplit(".", 1)
        if module.startswith("time_extra_emb.pooler"):
            out[key.replace("time_extra_emb.", "")] = value
        elif module in top:
            out[f"{top[module]}.{leaf}"] = value
        elif module == "norm_out.linear":
            scale, shift = np.split(value, 2)
            out[f"final_layer.adaLN_modulation.1.{leaf}"] = np.concatenate([shift, scale])
        elif module.startswith("blocks."):
            _, i, rest = module.split(".", 2)
            a = rest.split(".")[0]
            if rest in ("attn1.to_q", "attn2.to_k"):
                names = ("to_q", "to_k", "to_v") if a == "attn1" else ("to_k", "to_v")
                fused = "Wqkv" if a == "attn1" else "kv_proj"
                out[f"blocks.{i}.{a}.{fused}.{leaf}"] = np.concatenate([state[f"blocks.{i}.{a}.{n}.{leaf}"] for n in names])
            elif rest.endswith(("norm_q", "norm_k")):
                out[f"blocks.{i}.{a}.{rest[-1]}_norm.{leaf}"] = value  # norm_q -> q_norm
            elif rest not in ("attn1.to_k", "attn1.to_v", "attn2.to_v"):
                out[f"blocks.{i}.{block.get(rest, rest)}.{leaf}"] = value
    return out


def test_official_layout_converts_to_the_same_parameters(model):
    _, state, config, params = model
    official = _official_layout(state)
    assert len(official) == len(state) - 6 * 6  # per block q|k|v and k|v fused (weights and biases)
    assert family_for_state_dict(official).name == "hunyuan"
    got_config, got = hunyuan_from_torch({k: torch.from_numpy(v) for k, v in official.items()}, input_size=8)
    assert got_config == config
    jax.tree.map(np.testing.assert_array_equal, got, params)


def test_presets_config_and_converter_errors(model):
    state = model[1]
    g = hunyuan_preset("DiT-g/2")
    assert (g.depth, g.hidden_size, g.num_heads, g.mlp_hidden, g.out_channels) == (40, 1408, 16, 6144, 8)
    assert hunyuan_preset("DiT-XL/2").depth == 28
    with pytest.raises(ConfigError, match="unknown Hunyuan-DiT preset"):
        hunyuan_preset("DiT-S/2")
    with pytest.raises(ConfigError, match="depth must be even"):
        HunyuanConfig(**{**TINY, "depth": 5})
    # A style table makes it v1.0/v1.1, whose extra embedder reads pooled + 6 * 256 + D features.
    with pytest.raises(CheckpointError, match=r"wrong shapes: time_extra_emb.extra_embedder.linear_1.weight \(256, 40\)"):
        hunyuan_from_torch({**state, "time_extra_emb.style_embedder.weight": np.ones((1, 64), np.float32)})
    bad = {**state, "blocks.4.skip_linear.weight": state["blocks.4.skip_linear.weight"][:, :-1]}
    with pytest.raises(CheckpointError, match=r"wrong shapes: blocks.4.skip_linear.weight \(64, 127\)"):
        hunyuan_from_torch(bad)
    with pytest.raises(CheckpointError, match="missing keys: blocks.5.skip_norm.bias"):
        hunyuan_from_torch({k: v for k, v in state.items() if k != "blocks.5.skip_norm.bias"})
    with pytest.raises(CheckpointError, match="unexpected keys: blocks.2.skip_linear.bias"):
        hunyuan_from_torch({**state, "blocks.2.skip_linear.bias": np.ones(64, np.float32)})
    from torch_reference import TorchDiT
    from torch_reference import numpy_state_dict as torch_numpy_state_dict

    dit_state = torch_numpy_state_dict(TorchDiT(8, 2, 4, 32, 4, 4, num_classes=5, long_skip=True))
    with pytest.raises(CheckpointError, match=r"not a hunyuan checkpoint \(it looks like a dit"):
        hunyuan_from_torch(dit_state)
    with pytest.raises(CheckpointError, match=r"not a dit checkpoint \(it looks like a hunyuan"):
        from_torch(state, family="dit")
    _, _, config, params = model
    inputs = _inputs()
    with pytest.raises(UserError, match=r"clip_emb must have shape \(2, 5, 32\)"):
        jax.eval_shape(lambda: HunyuanDiT(config).apply({"params": params}, *inputs[:2], np.zeros((B, 4, 32)), *inputs[3:]))
    with pytest.raises(UserError, match="sides divisible by 2"):
        jax.eval_shape(lambda: HunyuanDiT(config).apply({"params": params}, np.zeros((B, 7, 8, 4)), *inputs[1:]))


# ---- v1.0/v1.1: style and image-size conditions -------------------------------------------
META = np.array([[64, 64, 64, 64, 0, 0], [48, 80, 64, 96, 8, 3]], np.float32)  # (h, w, target h, target w, top, left)


@pytest.fixture(scope="module")
def model_v11():
    return _reference(v11=True)


def test_v11_style_and_size_conditions_match_diffusers_through_every_pass(model_v11):
    ref, state, config, params = model_v11
    assert config == HunyuanConfig(**TINY, use_style_cond_and_image_meta_size=True)
    assert params["style_embedder"]["embedding"].shape == (1, 64)
    assert params["extra_embedder"]["linear_1"]["kernel"].shape == (40 + 6 * 256 + 64, 256)
    family = family_of(config)
    inputs = _inputs(6)
    style = np.zeros(B, np.int32)
    cond = {**_cond(inputs), "image_meta_size": META, "style": style, "null_image_meta_size": META, "null_style": style}
    family.check_condition(cond, B)
    assert sorted(family.batch_spec(B)) == sorted(["image", *cond]) and family.batch_spec(B)["style"].dtype == jnp.int32
    family.check_condition(family.example_condition(3), 3)
    np.testing.assert_array_equal(family.example_condition(1)["null_image_meta_size"], [[64, 64, 64, 64, 0, 0]])

    @jax.jit
    def passes(params, x, t, cond):  # the plain forward and the unit pieces' embedding temb
        return family.apply(params, x, t, cond), family.embed(params, x, t, cond)[1][0]

    tt = [torch.from_numpy(a) for a in inputs[1:]]
    meta, style_t = torch.from_numpy(META), torch.from_numpy(style).long()
    with torch.no_grad():
        want = ref(torch.from_numpy(inputs[0].transpose(0, 3, 1, 2)), *tt, image_meta_size=meta, style=style_t,
                   image_rotary_emb=_rope((4, 4)), return_dict=False)[0].numpy().transpose(0, 2, 3, 1)
        want_temb = ref.time_extra_emb(tt[0], tt[3], meta, style_t, hidden_dtype=torch.float32).numpy()
    got = passes(params, *inputs[:2], cond)
    np.testing.assert_allclose(got[0], want, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1], want_temb, atol=2e-5, rtol=1e-5)  # diffusers' time_extra_emb
    resized = passes(params, *inputs[:2], {**cond, "image_meta_size": META[::-1].copy()})
    for a, b in zip(resized, got, strict=True):
        assert float(jnp.abs(a - b).max()) > 1e-3
    # Skip-Cache's passes build the same embedding from the keywords they pass on (their block
    # numerics are the v1.2 tests'): a mis-shaped size reaches the model's check from each.
    bad = {**cond, "image_meta_size": META[:, :5]}
    deep = np.zeros(family.deep_feature_shape(B), np.float32)
    for run in (lambda: family.forward_full(params, *inputs[:2], bad, 1),
                lambda: family.forward_shallow(params, *inputs[:2], bad, deep, 1)):
        with pytest.raises(UserError, match=r"image_meta_size must have shape \(2, 6\)"):
            jax.eval_shape(run)
    np.testing.assert_array_equal(family.drop_condition(cond, jnp.array([True, False]))["style"], style)


def test_v11_converter_round_trip_and_official_layout(model_v11):
    _, state, config, params = model_v11
    assert "time_extra_emb.style_embedder.weight" in state
    back = hunyuan_to_torch(config, params)
    assert set(back) == set(state)
    for key in state:
        np.testing.assert_array_equal(back[key], state[key], err_msg=key)
    official = _official_layout(state)
    assert official["style_embedder.weight"].shape == (1, 64)
    got_config, got = hunyuan_from_torch(official, input_size=8)
    assert got_config == config
    jax.tree.map(np.testing.assert_array_equal, got, params)
    with pytest.raises(CheckpointError, match=r"wrong shapes: time_extra_emb.style_embedder.weight \(2, 64\)"):
        hunyuan_from_torch({**state, "time_extra_emb.style_embedder.weight": np.ones((2, 64), np.float32)})
    no_style = {k: v for k, v in state.items() if "style_embedder" not in k}  # sizes without style: no model of ours
    with pytest.raises(CheckpointError, match="wrong shapes: time_extra_emb.extra_embedder.linear_1.weight"):
        hunyuan_from_torch(no_style)


def test_v11_keyword_conditions_are_checked(model, model_v11):
    config, params = model_v11[2:]
    inputs = _inputs()
    style = np.zeros(B, np.int32)
    run = lambda cfg, p, **kw: jax.eval_shape(lambda: HunyuanDiT(cfg).apply({"params": p}, *inputs, **kw))  # noqa: E731
    with pytest.raises(UserError, match=r"needs the keyword arguments image_meta_size \(2, 6\) float and style "
                                        r"\(2,\) int; missing image_meta_size, style"):
        run(config, params)
    with pytest.raises(UserError, match="missing style"):
        run(config, params, image_meta_size=META)
    with pytest.raises(UserError, match=r"image_meta_size must have shape \(2, 6\)"):
        run(config, params, image_meta_size=META[:, :4], style=style)
    with pytest.raises(UserError, match=r"style must be \(2,\) integers"):
        run(config, params, image_meta_size=META, style=np.zeros(B, np.float32))
    v12_config, v12_params = model[2:]
    with pytest.raises(UserError, match=r"use_style_cond_and_image_meta_size=False, v1.2\) takes no style"):
        run(v12_config, v12_params, style=style)
    family = family_of(config)
    cond = {**_cond(inputs), "image_meta_size": META, "style": style}
    with pytest.raises(UserError, match="lacks null_image_meta_size, null_style"):
        family.check_condition(cond, B)
    with pytest.raises(UserError, match=r"holds image_meta_size, style, which this Hunyuan-DiT"):
        family_of(v12_config).check_condition(cond, B)
    assert sorted(family_of(v12_config).batch_spec(1)) == sorted(["image", *_cond(inputs)])  # v1.2: the 8 keys
