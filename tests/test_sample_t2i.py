"""Hunyuan-DiT text-to-image sampling (skipdit_jax.pipelines.text_to_image, `skipdit sample`
on a Hunyuan-DiT): the jitted sampler against a loop around diffusers' DDPMScheduler
(v-prediction, Hunyuan's settings) with [uncond; text] guidance on diffusers'
HunyuanDiT2DModel, plain and with Skip-Cache (a loop written from the official
HunYuanDiT_cache counter), the folder layouts, the resolution list and the CLI.
Tiny model: 6 blocks of width 64, 8x8x4 latents, random non-zero weights, DDPM-10."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from skipdit_jax.errors import UserError
from skipdit_jax.pipelines import text_to_image as t2i

STEPS, SCALE = 10, 6.0
SEEDS = [3, 11]
HUNYUAN_DDPM = dict(
    beta_start=0.00085, beta_end=0.02, beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1,
    clip_sample=False,
)


def _tiny_diffusers(text_len=5, text_len_t5=7, clip_dim=32, t5_dim=48, seed=0):
    from diffusers import HunyuanDiT2DModel

    torch.manual_seed(seed)
    ref = HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, patch_size=2, sample_size=8, hidden_size=64,
        num_layers=6, mlp_ratio=2.5, cross_attention_dim=clip_dim, cross_attention_dim_t5=t5_dim, pooled_projection_dim=40,
        text_len=text_len, text_len_t5=text_len_t5, use_style_cond_and_image_meta_size=False,
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every weight non-zero; norm weights near 1
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.08 * noise)
    return ref.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny PyTorch references run ~30x faster on one thread of a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    from skipdit_jax.convert.hunyuan import hunyuan_from_torch

    ref = _tiny_diffusers()
    state = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    config, params = hunyuan_from_torch(state, input_size=8)
    rng = np.random.default_rng(7)
    b = len(SEEDS)
    cond = {"clip_emb": rng.standard_normal((b, 5, 32)), "t5_emb": rng.standard_normal((b, 7, 48)),
            "clip_mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), "t5_mask": np.array([[1, 1, 0, 0, 0, 0, 0], [1] * 6 + [0]])}
    cond |= {"null_clip_emb": rng.standard_normal((b, 5, 32)), "null_t5_emb": rng.standard_normal((b, 7, 48)),
             "null_clip_mask": np.array([[1, 1, 0, 0, 0]] * b), "null_t5_mask": np.array([[1, 1, 1, 0, 0, 0, 0]] * b)}
    cond = {k: v.astype(np.int32 if k.endswith("mask") else np.float32) for k, v in cond.items()}
    return ref, config, params, cond


def _rope(grid):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    return get_2d_rotary_pos_embed(32, get_resize_crop_region_for_grid(grid, 512 // 8 // 2), grid)


def _cached_forward(ref, x, t, clip, clip_mask, t5, t5_mask, rope, state, n, k):
    """HunYuanDiT_cache.forward (models_cache.py) on diffusers' modules: full when
    cont % n == 0 or t >= 700 (storing the input of block D-k), else blocks 0..k-1 and
    D-k..D-1 from the stored input; the counter advances per call and resets after t <= 50."""
    d = len(ref.blocks)
    hs = ref.pos_embed(x)
    temb = ref.time_extra_emb(t, t5, None, None, hidden_dtype=torch.float32)
    ctx = torch.cat([clip, ref.text_embedder(t5)], dim=1)
    keep = torch.cat([clip_mask, t5_mask], dim=-1).unsqueeze(2).bool()
    ctx = torch.where(keep, ctx, ref.text_embedding_padding)
    kw = dict(temb=temb, encoder_hidden_states=ctx, image_rotary_emb=rope)
    cur = int(t[0])
    full = state["cont"] % n == 0 or cur >= 700
    skips = []
    for layer, block in enumerate(ref.blocks):
        if not full and k <= layer < d - k:
            continue
        if layer == d - k:
            if full:
                state["val"] = hs
            else:
                hs = state["val"]
        hs = block(hs, skip=skips.pop(), **kw) if layer > d // 2 else block(hs, **kw)
        if layer < d // 2 - 1:
            skips.append(hs)
    state["cont"] += 1
    state["full"].append(full)
    if cur <= 50:
        state["cont"], state["val"] = 0, None
    hs = ref.proj_out(ref.norm_out(hs, temb))
    b, h, w = x.shape[0], x.shape[2] // 2, x.shape[3] // 2
    hs = hs.reshape(b, h, w, 2, 2, -1)
    return torch.einsum("nhwpqc->nchpwq", hs).reshape(b, -1, h * 2, w * 2)


def _step_noise(seeds, shape, steps):
    """The sampler's step noise: sample b at scan index i (counting down) is
    normal(fold_in(key(seed_b), i))."""
    keys = jax.vmap(jax.random.key)(np.asarray(seeds, np.uint32))
    return [np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, i), shape)) for k in keys]) for i in
            range(steps - 1, -1, -1)]


def _reference_latents(ref, cond, seeds, steps, scale, monkeypatch, cache=None):
    """The official pipeline's loop (hydit/diffusion/pipeline.py) on diffusers' pieces:
    [uncond; text] batch, learned-sigma half dropped, guidance, DDPMScheduler.step."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module
    from diffusers import DDPMScheduler

    _, noise = t2i.make_noise(seeds, (8, 8, 4))
    step_noise = _step_noise(seeds, (8, 8, 4), steps)
    sched = DDPMScheduler(**HUNYUAN_DDPM)
    sched.set_timesteps(steps)
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    nchw = lambda a: tt(np.asarray(a).transpose(0, 3, 1, 2))  # noqa: E731
    pair = {k: torch.cat([tt(cond[f"null_{k}"]), tt(cond[k])]) for k in ("clip_emb", "clip_mask", "t5_emb", "t5_mask")}
    rope = _rope((4, 4))
    lat = nchw(noise)
    state = {"cont": 0, "val": None, "full": []}
    current = {}
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda shape, **kw: current["z"])
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            inp = torch.cat([lat, lat])
            t_exp = torch.full((inp.shape[0],), float(t), dtype=torch.float32)
            args = (inp, t_exp, pair["clip_emb"], pair["clip_mask"], pair["t5_emb"], pair["t5_mask"])
            if cache is None:
                out = ref(*args[:2], encoder_hidden_states=args[2], text_embedding_mask=args[3], encoder_hidden_states_t5=args[4],
                          text_embedding_mask_t5=args[5], image_rotary_emb=rope, return_dict=False)[0]
            else:
                out = _cached_forward(ref, *args, rope, state, *cache)
            out = out.chunk(2, dim=1)[0]
            uncond, text = out.chunk(2)
            guided = uncond + scale * (text - uncond)
            current["z"] = nchw(step_noise[i])
            lat = sched.step(guided, t, lat).prev_sample
    return lat.numpy().transpose(0, 2, 3, 1), state["full"]


def test_sampler_matches_the_diffusers_ddpm_loop(model, monkeypatch):
    ref, config, params, cond = model
    want, _ = _reference_latents(ref, cond, SEEDS, STEPS, SCALE, monkeypatch)
    got = t2i.sample_latents(config, params, cond, SEEDS, num_steps=STEPS, cfg_scale=SCALE)
    assert got.shape == (2, 8, 8, 4)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-3, rtol=2e-3)
    assert float(np.abs(want).mean()) > 0.1


@pytest.mark.parametrize("n,k", [(2, 1)])
def test_skip_cache_matches_the_official_cached_loop(model, monkeypatch, n, k):
    ref, config, params, cond = model
    cache = t2i.hunyuan_skip_cache(n, k)
    assert cache == t2i.parse_t2i_cache(str(n), k) == t2i.parse_t2i_cache(f"{n},{k}")
    want, full = _reference_latents(ref, cond, SEEDS, STEPS, SCALE, monkeypatch, cache=(n, k))
    np.testing.assert_array_equal(cache.full_steps(t2i.load_scheduler().timesteps(STEPS)), full)
    assert 0 < sum(not f for f in full) < STEPS - 3
    got = t2i.sample_latents(config, params, cond, SEEDS, num_steps=STEPS, cfg_scale=SCALE, cache=cache)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-3, rtol=2e-3)
    plain, _ = _reference_latents(ref, cond, SEEDS, STEPS, SCALE, monkeypatch)
    assert float(np.abs(np.asarray(got) - plain).max()) > 1e-2  # the cache did change the result


def test_settings_resolutions_and_schedule():
    assert len(t2i.RESOLUTIONS) == 10 and (1024, 1024) in t2i.RESOLUTIONS and (768, 1280) in t2i.RESOLUTIONS
    assert t2i.check_resolution(768, 1280) == (768, 1280)
    assert t2i.latent_size(768, 1280) == {"input_size": 96, "input_width": 160}
    assert t2i.latent_size(1024, 1024) == {"input_size": 128, "input_width": 0}
    with pytest.raises(UserError, match=r"unsupported resolution 1000x1000 .* 1024x1024, 1280x1280"):
        t2i.check_resolution(1000, 1000)
    sched = t2i.load_scheduler()
    ts = sched.timesteps(100)
    assert ts[0] == 991 and ts[-1] == 1 and sched.prediction_type == "v_prediction"
    plans = {n: t2i.hunyuan_skip_cache(n).plan(ts, 40) for n in (2, 3, 4)}
    assert [(p.num_full, p.num_cached) for p in plans.values()] == [(67, 33), (56, 44), (50, 50)]
    assert t2i.parse_t2i_cache(None) is None and t2i.parse_t2i_cache("off") is None
    assert t2i.parse_t2i_cache("N3-700-50", 2) == t2i.hunyuan_skip_cache(3, 2)
    assert t2i.parse_t2i_cache("3,2,800,40").start_t == 800
    u8 = t2i.images_to_uint8(np.array([-1.0, -0.999, 0.0, 0.999, 2.0]))
    np.testing.assert_array_equal(u8, [0, 0, 128, 255, 255])  # diffusers' round(), not truncation
