"""Caches on Hunyuan-DiT (text-to-image). Skip-Cache: the full/cached schedule at Hunyuan's
DDPM-100 against a port of the official counter, the block-count speedups, and the cached
DDPM sampler with guidance (k = 1 and 2) against a PyTorch loop written from the official
`HunYuanDiT_cache.forward` and pipeline (module-held counter and deep feature, batch
[uncond; text], learned-sigma half dropped, diffusers' DDPMScheduler.step). The unit
pieces the other caches use: block ranges and per-block branches rebuild the plain
forward, and one cached step of FORA/PAB, Delta-DiT (both regimes) and TeaCache equals a
hand-built step over diffusers' blocks (branch outputs caught with forward hooks).
Tiny model: the diffusers HunyuanDiT2DModel of tests/test_hunyuan.py (6 blocks, width 64,
8x8x4 latents), random non-zero weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from skipdit_jax.cache import FORA, PAB, DeltaDiT, SkipCache, TeaCache
from skipdit_jax.cache.baselines.common import BranchCache
from skipdit_jax.convert import hunyuan_from_torch
from skipdit_jax.diffusion import DiffusersDDPM
from skipdit_jax.errors import ConfigError
from skipdit_jax.models import family_of, hunyuan_preset
from skipdit_jax.sampling import build_sampler, sampling_timesteps

HUNYUAN_DDPM = DiffusersDDPM.hunyuan()
B, SCALE = 2, 6.0


def official_full_steps(timesteps, cache_step):
    """A port of `HunYuanDiT_cache.forward`'s module state: full when `cache_cont %
    cache_step == 0 or cur_time >= 700`; after the forward the counter advances and, when
    cur_time <= 50, it and the cache are reset. (No empty-cache guard: t = 991 >= 700.)"""
    cache_cont, full = 0, []
    for cur_time in (int(t) for t in timesteps):
        full.append(cache_cont % cache_step == 0 or cur_time >= 700)
        cache_cont += 1
        if cur_time <= 50:
            cache_cont = 0
    return np.asarray(full)


# ---- the schedule at DDPM-100 ---------------------------------------------------------------
# Block-count speedups 100 * 40 / (40 full + 2 cached): 1.457, 1.718, 1.905 (1.90; "1.91" in
# write-ups of the paper's t2i numbers is that value rounded up).
@pytest.mark.parametrize("n,full,cached,speedup", [(2, 67, 33, 1.457), (3, 56, 44, 1.718), (4, 50, 50, 1.905)])
def test_skip_cache_schedule_at_ddpm100(n, full, cached, speedup):
    from diffusers import DDPMScheduler

    ts = sampling_timesteps("ddpm", 100, scheduler=HUNYUAN_DDPM)
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.02, beta_schedule="scaled_linear", steps_offset=1)
    ref.set_timesteps(100)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())  # 991, 981, ..., 1
    cache = SkipCache(n, 1, 700, 50)
    np.testing.assert_array_equal(cache.full_steps(ts), official_full_steps(ts, n))
    dit_g = family_of(hunyuan_preset("DiT-g/2"))
    cache.check_model(dit_g)
    assert cache.units_per_cached_step(dit_g) == 2  # blocks 0 and 39
    plan = cache.plan(ts, dit_g.depth_units)
    assert (plan.num_full, plan.num_cached) == (full, cached)
    assert plan.predicted_speedup == pytest.approx(4000 / (40 * full + 2 * cached)) == pytest.approx(speedup, abs=5e-4)
    # Full for t >= 700 (991..701: 30 steps) and after t = 41 (the first t <= 50) resets.
    assert cache.full_steps(ts)[:30].all() and cache.full_steps(ts)[-4:].all()
    # k = 2 (the authors' COCO setting with N = 4): 4 blocks per cached step.
    assert SkipCache(n, 2, 700, 50).plan(ts, 40).predicted_speedup == pytest.approx(4000 / (40 * full + 4 * cached))


# ---- the tiny model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    from test_hunyuan import tiny_diffusers

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend (10x slower on a busy machine)
    ref = tiny_diffusers()
    config, params = hunyuan_from_torch({k: v.detach().numpy() for k, v in ref.state_dict().items()}, input_size=8)
    rng = np.random.default_rng(7)
    cond = {
        "clip_emb": rng.standard_normal((B, 5, 32)).astype(np.float32),
        "clip_mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32),
        "t5_emb": rng.standard_normal((B, 7, 48)).astype(np.float32),
        "t5_mask": np.array([[1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]], np.int32),
        "null_clip_emb": rng.standard_normal((B, 5, 32)).astype(np.float32),
        "null_clip_mask": np.array([[1, 0, 0, 0, 0]] * B, np.int32),
        "null_t5_emb": rng.standard_normal((B, 7, 48)).astype(np.float32),
        "null_t5_mask": np.array([[1, 1, 0, 0, 0, 0, 0]] * B, np.int32),
    }
    yield ref.eval(), config, family_of(config), params, cond
    torch.set_num_threads(threads)


def _tt(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a)))


def _torch_embed(ref, x, t, cond, null=False):
    """diffusers' embedders (the official ones, renamed): tokens and the blocks' kwargs."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    p = "null_" if null else ""
    rope = get_2d_rotary_pos_embed(32, get_resize_crop_region_for_grid((4, 4), 512 // 8 // 2), (4, 4))
    hs = ref.pos_embed(_tt(np.asarray(x).transpose(0, 3, 1, 2)))
    temb = ref.time_extra_emb(_tt(t), _tt(cond[p + "t5_emb"]), None, None, hidden_dtype=torch.float32)
    ctx = torch.cat([_tt(cond[p + "clip_emb"]), ref.text_embedder(_tt(cond[p + "t5_emb"]))], dim=1)
    keep = torch.cat([_tt(cond[p + "clip_mask"]), _tt(cond[p + "t5_mask"])], dim=-1).unsqueeze(2).bool()
    ctx = torch.where(keep, ctx, ref.text_embedding_padding)
    return hs, dict(temb=temb, encoder_hidden_states=ctx, image_rotary_emb=rope)


def _torch_head(ref, hs, temb):
    out = ref.proj_out(ref.norm_out(hs, temb))
    return out.reshape(-1, 4, 4, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(-1, 8, 8, 8)


def _fuse(block, hs, skip):
    return block.skip_linear(block.skip_norm(torch.cat([hs, skip], dim=-1)))


# ---- guided DDPM sampling: ours against PyTorch loops ---------------------------------------
class OfficialCachedModel:
    """`HunYuanDiT_cache.forward` written from the official code over diffusers' blocks:
    the counter `cache_cont` and the deep feature `cache_val` live on the model."""

    def __init__(self, ref, cache_step, cache_at_branch):
        self.ref, self.cache_step, self.cache_at_branch = ref, cache_step, cache_at_branch
        self.cache_val, self.cache_cont, self.realised = None, 0, []

    def __call__(self, hs, kw, cur_time, step):
        ref, k, d = self.ref, self.cache_at_branch, len(self.ref.blocks)
        skips, full = [], self.cache_cont % self.cache_step == 0 or cur_time >= 700
        self.realised.append(full)
        for layer, block in enumerate(ref.blocks):
            if not full and not (layer < k or layer >= d - k):
                continue
            if layer == d - k:
                if full:
                    self.cache_val = hs
                else:
                    hs = self.cache_val
            hs = block(hs, skip=skips.pop(), **kw) if layer > d // 2 else block(hs, **kw)
            if layer < d // 2 - 1:
                skips.append(hs)
        self.cache_cont += 1
        if cur_time <= 50:
            self.cache_cont, self.cache_val = 0, None
        return hs


class ForaModel:
    """FORA on diffusers' blocks, per our FORA docstring (the authors' DiT code): full when
    the step index counted from the end is n-1 or a multiple of N, storing each block's
    branch outputs (forward hooks); a cached step fuses each decoder block's skip from the
    rebuilt stream and adds the stored outputs (no gates in Hunyuan-DiT)."""

    def __init__(self, ref, interval, num_steps):
        self.ref, self.interval, self.n, self.stored, self.realised = ref, interval, num_steps, {}, []

    def __call__(self, hs, kw, cur_time, step):
        i, d = self.n - 1 - step, len(self.ref.blocks)
        full = i == self.n - 1 or i % self.interval == 0
        self.realised.append(full)
        skips = []
        for layer, block in enumerate(self.ref.blocks):
            if full:
                handles = [getattr(block, name).register_forward_hook(
                    lambda m, a, out, key=(layer, name): self.stored.__setitem__(key, out)) for name in ("attn1", "attn2", "ff")]
                hs = block(hs, skip=skips.pop(), **kw) if layer > d // 2 else block(hs, **kw)
                for h in handles:
                    h.remove()
            else:
                if layer > d // 2:
                    hs = _fuse(block, hs, skips.pop())
                for name in ("attn1", "attn2", "ff"):
                    hs = hs + self.stored[(layer, name)]
            if layer < d // 2 - 1:
                skips.append(hs)
        return hs


def _torch_sampling(ref, cond, noise, step_noise, net):
    """The official pipeline loop: batch [uncond; text], the learned-sigma half dropped,
    guidance, diffusers' DDPMScheduler.step with our step noise fed in (so the two agree)."""
    import diffusers.schedulers.scheduling_ddpm as ddpm

    sched = ddpm.DDPMScheduler(
        beta_start=0.00085, beta_end=0.02, beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1,
        clip_sample=False,
    )
    sched.set_timesteps(len(step_noise))
    original, x = ddpm.randn_tensor, _tt(noise).permute(0, 3, 1, 2)
    try:
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                xin = torch.cat([x, x]).permute(0, 2, 3, 1).numpy()
                tt = np.full(B, int(t), np.float32)
                (hu, kwu), (hc, kwc) = _torch_embed(ref, xin[:B], tt, cond, null=True), _torch_embed(ref, xin[B:], tt, cond)
                kw = {k: (v if k == "image_rotary_emb" else torch.cat([kwu[k], v])) for k, v in kwc.items()}
                hs = net(torch.cat([hu, hc]), kw, int(t), i)
                eps = _torch_head(ref, hs, kw["temb"]).permute(0, 3, 1, 2).chunk(2, dim=1)[0]
                uncond, text = eps.chunk(2)
                z = _tt(step_noise[i]).permute(0, 3, 1, 2)
                ddpm.randn_tensor = lambda *a, z=z, **k: z
                x = sched.step(uncond + SCALE * (text - uncond), t, x).prev_sample
    finally:
        ddpm.randn_tensor = original
    return x.permute(0, 2, 3, 1).numpy(), np.asarray(net.realised)


def _ours(config, params, cond, noise, cache, steps):
    """Our one jitted sampler; per-sample keys make its step noise known: at step s (index
    steps-1-s, as the scan counts) sample b draws normal(fold_in(key_b, steps-1-s))."""
    keys = jax.random.split(jax.random.key(11), B)
    step_noise = np.stack([np.asarray(jax.vmap(lambda key, i=i: jax.random.normal(jax.random.fold_in(key, i), (8, 8, 4)))(keys))
                           for i in range(steps - 1, -1, -1)])
    fn = build_sampler(config, "ddpm", str(steps), True, None, cache, 0.0, False, return_schedule=True, scheduler=HUNYUAN_DDPM)
    x, realised = fn(params, jnp.asarray(noise), cond, jnp.float32(SCALE), keys)
    return np.asarray(x), np.asarray(realised), step_noise


def _close(got, want):
    """Trajectories of random weights under guidance 6 grow to |x| ~ 1e2: compare relative to that."""
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * float(np.abs(want).max()) + 1e-4)


# DDPM-25 walks 961, 921, ..., 1: full while t >= 700 (7 steps), reset after t = 41 (so t = 1 is full).
@pytest.mark.parametrize("n,k,num_cached", [(2, 1, 9), (3, 2, 12)])
def test_cached_ddpm_sampler_equals_the_official_loop(model, n, k, num_cached):
    ref, config, _, params, cond = model
    noise = np.random.default_rng(3).standard_normal((B, 8, 8, 4)).astype(np.float32)
    cache = SkipCache(n, k, 700, 50)
    got, realised, step_noise = _ours(config, params, cond, noise, cache, 25)
    want, want_realised = _torch_sampling(ref, cond, noise, step_noise, OfficialCachedModel(ref, n, k))
    np.testing.assert_array_equal(realised, want_realised)
    np.testing.assert_array_equal(realised, official_full_steps(sampling_timesteps("ddpm", 25, scheduler=HUNYUAN_DDPM), n))
    assert (~want_realised).sum() == num_cached
    _close(got, want)
    plain, _ = _torch_sampling(ref, cond, noise, step_noise, OfficialCachedModel(ref, 1, k))
    assert float(np.abs(plain - want).max()) > 10 * float(np.abs(got - want).max())  # the cache changed the result


def test_fora_sampler_equals_a_fora_loop_over_diffusers_blocks(model):
    """FORA(2) at DDPM-10 (901, ..., 1): cached where the index from the end (8..0) is odd.
    PAB shares the cached pass (only the schedule differs, checked below). At interval 1
    every step is full, and the full passes are the plain forward (here and below)."""
    ref, config, _, params, cond = model
    noise = np.random.default_rng(4).standard_normal((B, 8, 8, 4)).astype(np.float32)
    got, realised, step_noise = _ours(config, params, cond, noise, FORA(2), 10)
    want, want_realised = _torch_sampling(ref, cond, noise, step_noise, ForaModel(ref, 2, 10))
    np.testing.assert_array_equal(realised, want_realised)
    np.testing.assert_array_equal(realised, [True, True, False, True, False, True, False, True, False, True])
    _close(got, want)
    plain, _ = _torch_sampling(ref, cond, noise, step_noise, OfficialCachedModel(ref, 1, 1))
    assert float(np.abs(plain - want).max()) > 100 * float(np.abs(got - want).max())
    assert FORA.cached_pass is PAB.cached_pass is BranchCache.cached_pass
    ts = sampling_timesteps("ddpm", 10, scheduler=HUNYUAN_DDPM)
    # PAB counts from the start: steps 0, 1, multiples of N and t <= 10 full.
    np.testing.assert_array_equal(PAB(2).full_steps(ts), [True, True, True, False, True, False, True, False, True, True])
    for cache in (FORA(1), PAB(1), DeltaDiT(1)):  # interval 1: every step full, i.e. the plain sampler
        assert cache.full_steps(ts).all()


# ---- one step of Delta-DiT and TeaCache against hand-built steps ----------------------------------
def _full_step(ref, x, t, cond):
    """A full diffusers forward: the embedding, every block's output, the output."""
    hs, kw = _torch_embed(ref, x, t, cond)
    d, skips, outs = len(ref.blocks), [], []
    for layer in range(d):
        outs.append(_run_blocks(ref, outs[-1] if outs else hs, kw, [layer], skips))
    return dict(h0=hs, outs=outs, out=_torch_head(ref, outs[-1], kw["temb"]).numpy())


def _run_blocks(ref, hs, kw, layers, skips):
    """diffusers' blocks `layers` in order; encoder blocks push to `skips`, decoder blocks pop."""
    d = len(ref.blocks)
    for layer in layers:
        block = ref.blocks[layer]
        hs = block(hs, skip=skips.pop(), **kw) if layer > d // 2 else block(hs, **kw)
        if layer < d // 2 - 1:
            skips.append(hs)
    return hs


def _unit_state(hidden, encoder_outputs):
    """The family's unit state (E + 1, B, T, D): the hidden state, then encoder outputs."""
    return np.stack([np.asarray(hidden), *(np.asarray(e) for e in encoder_outputs)])


@pytest.fixture(scope="module")
def one_step(model):
    """A full diffusers step at t = 900 (x1) and the inputs of a later step (x2; t = 750,
    and t = 400 for Delta-DiT's late regime)."""
    ref, _, _, _, cond = model
    rng = np.random.default_rng(9)
    x1, x2 = (rng.standard_normal((B, 8, 8, 4)).astype(np.float32) for _ in range(2))
    t1, t2, t3 = (np.full(B, v, np.int32) for v in (900, 750, 400))
    with torch.no_grad():
        return _full_step(ref, x1, t1, cond), (x1, x2, t1, t2, t3)


TOL = dict(rtol=2e-4, atol=2e-4)


def test_delta_dit_full_and_cached_steps_equal_hand_built_ones(model, one_step):
    """m = 2 of 6 blocks (encoders 0, 1; middle 2, 3; decoders 4, 5). The full pass runs
    blocks 0..1, 2..3, 4..5 as three ranges (the skips carried across) and keeps the changes
    of the unit state. Early (t > 600): blocks 0, 1 run, the change of the rest is added.
    Late: the change of blocks 0..3 is added to the embedding and blocks 4, 5 run, fusing
    the encoder outputs of the full step (the change carries them)."""
    ref, _, family, params, cond = model
    full, (x1, x2, t1, t2, t3) = one_step
    delta = DeltaDiT(2, blocks=2)
    got_full, carry = jax.jit(lambda p, x, t, c: delta.full_pass(family, p, x, t, c, delta.init_carry(family, B)))(
        params, x1, t1, cond)
    outs, zeros = [o.numpy() for o in full["outs"]], np.zeros_like(full["h0"].numpy())
    want_carry = (_unit_state(outs[5], outs[:2]) - _unit_state(outs[1], outs[:2]),  # rear: h4 - h1
                  _unit_state(outs[3], outs[:2]) - _unit_state(full["h0"], [zeros, zeros]))  # front: h3 - h0
    np.testing.assert_allclose(got_full, full["out"], **TOL)
    for got, want in zip(carry, want_carry, strict=True):
        np.testing.assert_allclose(got, want, **TOL)
    cached = jax.jit(lambda p, x, t, c, carry: delta.cached_pass(family, p, x, t, c, carry)[0])
    with torch.no_grad():
        hs, kw = _torch_embed(ref, x2, t2, cond)
        early = _run_blocks(ref, hs, kw, [0, 1], []) + (full["outs"][5] - full["outs"][1])
        hs, kw3 = _torch_embed(ref, x2, t3, cond)
        late = _run_blocks(ref, hs + (full["outs"][3] - full["h0"]), kw3, [4, 5], full["outs"][:2])
        want_early, want_late = _torch_head(ref, early, kw["temb"]).numpy(), _torch_head(ref, late, kw3["temb"]).numpy()
    np.testing.assert_allclose(cached(params, x2, t2, cond, want_carry), want_early, **TOL)
    np.testing.assert_allclose(cached(params, x2, t3, cond, want_carry), want_late, **TOL)


def test_teacache_step_and_probe_equal_hand_built_ones(model, one_step):
    """The cached step adds the full step's residual of the block stack to the embedding
    (row 0 of the unit state; the other rows feed no block); the probe is block 0's
    self-attention input LN(h) + shift(temb)."""
    ref, _, family, params, cond = model
    full, (x1, x2, t1, t2, _) = one_step
    tea = TeaCache(0.1)
    outs = [o.numpy() for o in full["outs"]]
    residual = _unit_state(outs[-1] - full["h0"].numpy(), outs[:2])
    carry = (jnp.float32(0.05), jnp.zeros(family.probe_shape(B)), residual)

    def step(p, x, t, c, carry):
        h, cc = family.embed(p, x, t, c)
        return tea.cached_pass(family, p, x, t, c, carry)[0], family.probe(p, h, cc), family.run_units(p, h, cc, 0, 6)

    got, probe, ran = jax.jit(step)(params, x2, t2, cond, carry)
    with torch.no_grad():
        hs, kw = _torch_embed(ref, x2, t2, cond)
        want = _torch_head(ref, hs + (full["outs"][-1] - full["h0"]), kw["temb"]).numpy()
        want_probe = ref.blocks[0].norm1(hs, kw["temb"]).numpy()
        fresh = _full_step(ref, x2, t2, cond)["outs"]
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_allclose(probe, want_probe, **TOL)
    # TeaCache's full pass runs all blocks as one range: its unit state holds every encoder output.
    np.testing.assert_allclose(ran, _unit_state(fresh[-1], fresh[:2]), **TOL)


def test_check_model_accepts_the_baselines_on_hunyuan(model):
    """`sample()` and the CLI validate a cache with check_model before sampling."""
    family = model[2]
    for cache in (FORA(2), PAB(2), DeltaDiT(2), TeaCache(0.1)):
        cache.check_model(family)
    assert DeltaDiT(2).units_per_cached_step(family) == 1 and FORA(2).units_per_cached_step(family) == 0
    from skipdit_jax.cache import PABVideo

    with pytest.raises(ConfigError, match="temporal attention"):
        PABVideo().check_model(family)
