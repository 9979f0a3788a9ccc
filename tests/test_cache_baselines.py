"""FORA, PAB, Delta-DiT and TeaCache as strategies of the one jitted sampler: exact when
caching is off, equal to an independent block-by-block oracle when on, their schedules
(counted by hand), TeaCache calibrated on the sampler's own settings, bad input refused.
Then the same baselines and PAB's video form (PABVideo) on a tiny vanilla Latte, whose
units are (spatial, temporal) pairs: exact when off, close when on, plans in pairs, the
published PAB-video schedule on DDIM-50."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params, tiny_config

from skipdit_jax.cache import (
    FORA,
    PAB,
    DeltaDiT,
    PABVideo,
    ShallowCache,
    SkipCache,
    TeaCache,
    calibrate_teacache,
    make_cache,
    plan_from_schedule,
)
from skipdit_jax.diffusion import Diffusion
from skipdit_jax.errors import ConfigError
from skipdit_jax.models import LatteConfig, family_of
from skipdit_jax.models.dit import DiT, DiTBlock
from skipdit_jax.sampling import build_sampler, sample, sampling_timesteps

DIT = tiny_config(depth=8, long_skip=False)
PARAMS = random_params(DIT)
NOISE = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
LABELS = jnp.array([1, 7])
STEPS = 10  # ddim10: t = 900, 800, ..., 0 (diffusion index i = 9 ... 0) -- crosses Delta-DiT's switch


def _run(cache, config=DIT, params=PARAMS):
    fn = build_sampler(config, "ddim", f"ddim{STEPS}", True, None, cache, 0.0, False, return_schedule=True)
    x, full = fn(params, NOISE, LABELS, jnp.float32(3.0), jax.random.key(0))
    return np.asarray(x), np.asarray(full)


UNCACHED = _run(None)[0]
OFF = [FORA(1), PAB(1), DeltaDiT(1), TeaCache(1e-9)]

# ---- the schedules on ddim10, counted by hand ------------------------------------------------
# step s:          0    1    2    3    4    5    6    7    8    9
# t:             900  800  700  600  500  400  300  200  100    0
# FORA's i:        9    8    7    6    5    4    3    2    1    0   (full: i == 9 or i % N == 0)
# PAB / Delta-DiT: cached iff s % N != 0 and s > 1 and 10 < t < 1000
F, C = True, False
SCHEDULES = {
    "fora2": (FORA(2), [F, F, C, F, C, F, C, F, C, F]),  # i = 9 (first), 8, 6, 4, 2, 0
    "fora3": (FORA(3), [F, C, C, F, C, C, F, C, C, F]),  # i = 9, 6, 3, 0
    "pab2": (PAB(2), [F, F, F, C, F, C, F, C, F, F]),  # cached s = 3, 5, 7 (s = 9 has t = 0)
    "pab3": (PAB(3), [F, F, C, F, C, C, F, C, C, F]),  # cached s = 2, 4, 5, 7, 8
    # switch at 500: cached t = 600 runs the early regime, t = 400, 200 the late one
    "delta2": (DeltaDiT(2, switch_t=500), [F, F, F, C, F, C, F, C, F, F]),
    # m = 1, default switch 600: cached t = 700 early; 500, 400, 200, 100 late
    "delta3m1": (DeltaDiT(3, blocks=1), [F, F, C, F, C, C, F, C, C, F]),
}


@pytest.mark.parametrize("cache", OFF, ids=lambda c: c.name)
def test_caching_off_reproduces_the_uncached_sampler(cache):
    x, full = _run(cache)
    assert full.all()
    np.testing.assert_allclose(x, UNCACHED, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_static_schedule_is_realised(name):
    cache, expected = SCHEDULES[name]
    cache.check_model(DIT)
    np.testing.assert_array_equal(cache.full_steps(sampling_timesteps("ddim", STEPS)), expected)
    np.testing.assert_array_equal(_run(cache)[1], expected)


# ---- an independent oracle: DiT block by block, caching by hand -----------------------------


class Oracle:
    """Runs the tiny DiT piece by piece with `DiT` / `DiTBlock` methods only, one block at a
    time (no scan, no strategy code), and samples with guided DDIM in a Python loop."""

    def __init__(self, config, params):
        self.config = config
        stacks = (params["encoder_blocks"], params["decoder_blocks"])
        self.blocks = [jax.tree.map(lambda a, j=j: a[j], s) for s in stacks for j in range(jax.tree.leaves(s)[0].shape[0])]
        assert len(self.blocks) == config.depth
        dit, block = DiT(config), DiTBlock(config)
        self.embed = jax.jit(lambda x, t, y: dit.apply({"params": params}, x, t, y, method=DiT.embed))
        self.head = jax.jit(lambda h, c: dit.apply({"params": params}, h, c, method=DiT.head))
        self.block = jax.jit(lambda p, h, c: block.apply({"params": p}, h, c, method=DiTBlock.forward_with_branches))
        self.modulation = jax.jit(lambda p, c: block.apply({"params": p}, c, method=DiTBlock.modulation))

    def run_blocks(self, h, c, lo, hi):
        for p in self.blocks[lo:hi]:
            h = self.block(p, h, c)[0]
        return h

    def sample(self, model, full, cfg_scale):
        """`model(x, t, y, is_full, state) -> raw output`; guided DDIM over `full`."""
        cfg = self.config
        diffusion = Diffusion(f"ddim{len(full)}", learn_sigma=cfg.learn_sigma)
        guided = cfg_scale != 1
        y = jnp.concatenate([LABELS, jnp.full_like(LABELS, cfg.null_label)]) if guided else LABELS
        x, state = NOISE, {}
        for s, is_full in enumerate(full):
            i = len(full) - 1 - s  # diffusion index, counting down
            x_in = jnp.concatenate([x, x]) if guided else x
            t = jnp.full((x_in.shape[0],), int(diffusion.timestep_map[i]), jnp.int32)
            out = model(x_in, t, y, is_full, state)
            if guided:  # guidance on every eps channel; the variance from the cond half
                cond, uncond = jnp.split(out, 2)
                g = cfg.in_channels
                out = jnp.concatenate([uncond[..., :g] + cfg_scale * (cond[..., :g] - uncond[..., :g]), cond[..., g:]], -1)
            x = diffusion.ddim_step(out, x, jnp.full((x.shape[0],), i, jnp.int32), None, 0.0, False)
        return np.asarray(x)

    def branch_cache(self, x, t, y, is_full, state):
        """PAB and FORA: full steps store each block's attention and MLP outputs before the
        gates; cached steps add them back under the current step's gates."""
        h, c = self.embed(x, t, y)
        if is_full:
            state["branches"] = []
            for p in self.blocks:
                h, (attn, mlp), _ = self.block(p, h, c)
                state["branches"].append((attn, mlp))
        else:
            for p, (attn, mlp) in zip(self.blocks, state["branches"], strict=True):
                _, _, gate_msa, _, _, gate_mlp = self.modulation(p, c)
                h = h + gate_msa[:, None] * attn
                h = h + gate_mlp[:, None] * mlp
        return self.head(h, c)

    def delta_dit(self, m, switch_t):
        """Delta-DiT: full steps store the change across blocks m..depth-1 and across blocks
        0..depth-m-1; cached steps with t > switch_t run blocks 0..m-1 and add the first,
        later ones add the second to the embedding and run the last m blocks."""
        depth = self.config.depth

        def model(x, t, y, is_full, state):
            h0, c = self.embed(x, t, y)
            if is_full:
                h1 = self.run_blocks(h0, c, 0, m)
                h3 = self.run_blocks(h1, c, m, depth - m)
                h = self.run_blocks(h3, c, depth - m, depth)
                state["rear"], state["front"] = h - h1, h3 - h0
            elif int(t[0]) > switch_t:
                h = self.run_blocks(h0, c, 0, m) + state["rear"]
            else:
                h = self.run_blocks(h0 + state["front"], c, depth - m, depth)
            return self.head(h, c)

        return model


# Larger random weights than PARAMS, so that the blocks (and so caching) move the sample by
# a few percent of its magnitude; the samples reach |x| ~ 350 (no clipping), so agreement is
# measured relative to that: float32 differences of one loop vs the scan are ~5e-7 of it.
ORACLE_PARAMS = random_params(DIT, scale=0.2)
ORACLE = Oracle(DIT, ORACLE_PARAMS)
REL_TOL = 1e-5


def _strategy_sample(cache, cfg_scale):
    kw = dict(noise=NOISE, labels=LABELS, sampler="ddim", num_steps=STEPS, cfg_scale=cfg_scale, cache=cache)
    return np.asarray(sample(DIT, ORACLE_PARAMS, **kw))


def _assert_close(x, ref):
    x, ref = np.asarray(x), np.asarray(ref)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(x / scale, ref / scale, atol=REL_TOL, rtol=0)


def test_oracle_without_caching_is_the_uncached_sampler():
    for cfg_scale in (1.0, 2.0):
        _assert_close(ORACLE.sample(ORACLE.branch_cache, [True] * STEPS, cfg_scale), _strategy_sample(None, cfg_scale))


@pytest.mark.parametrize(
    "name,cfg_scale", [("fora2", 2.0), ("fora3", 1.0), ("pab2", 2.0), ("pab3", 1.0), ("delta2", 2.0), ("delta3m1", 2.0)]
)
def test_strategy_matches_the_oracle(name, cfg_scale):
    cache, full = SCHEDULES[name]
    if isinstance(cache, DeltaDiT):
        m = cache.blocks or DIT.depth // 4  # depth 8: m = 2
        model = ORACLE.delta_dit(m, cache.switch_t)
    else:
        model = ORACLE.branch_cache
    expected = ORACLE.sample(model, full, cfg_scale)
    uncached = ORACLE.sample(model, [True] * STEPS, cfg_scale)
    _assert_close(_strategy_sample(cache, cfg_scale), expected)
    # The comparison has power: caching moves the sample by >= 1e-2 of its magnitude
    # (measured 0.03-0.12 here), 1000 times the tolerance.
    assert float(np.abs(expected - uncached).max()) > 1e-2 * float(np.abs(uncached).max())


def test_delta_dit_regimes_both_matter():
    # With the switch at 500 (cached t = 600 early, 400 and 200 late), forcing every cached
    # step into one regime moves the sample by far more than the oracle's tolerance, so the
    # oracle comparison above checks which regime each cached step takes.
    x_default = _strategy_sample(DeltaDiT(2, switch_t=500), 2.0)
    scale = float(np.abs(x_default).max())
    for other in (DeltaDiT(2, switch_t=0), DeltaDiT(2, switch_t=1000)):
        assert float(np.abs(x_default - _strategy_sample(other, 2.0)).max()) > 100 * REL_TOL * scale


def test_schedules_and_predicted_speedups_counted_by_hand():
    # ddim50: t = 980, 960, ..., 20, 0 (step s has t = 980 - 20 s; FORA's i = 49 - s).
    ts = sampling_timesteps("ddim", 50)
    # FORA(3): i = 49 (first), 48, 45, 42, ...: [F, F, C, C, F, C, C]; full i: 49 and the
    # 17 multiples of 3 in 0..48 -> 18 full, 32 cached.
    assert list(FORA(3).full_steps(ts)[:7]) == [F, F, C, C, F, C, C]
    plan = FORA(3).plan(ts, 28)
    assert (plan.num_full, plan.num_cached) == (18, 32)
    # FORA(2): i = 49 and the 25 even i in 0..48 -> 26 full; a cached step runs no block:
    # 50 * 28 / (26 * 28) = 50 / 26.
    plan = FORA(2).plan(ts, 28)
    assert (plan.num_full, plan.num_cached) == (26, 24)
    assert plan.predicted_speedup == pytest.approx(50 / 26)
    # PAB(2): cached at odd s in 3..47 (s = 49 has t = 0 <= 10) -> 23 cached, 27 full.
    pab = PAB(2).full_steps(ts)
    assert list(pab[:7]) == [F, F, F, C, F, C, F] and pab[-1]
    plan = PAB(2).plan(ts, 28)
    assert (plan.num_full, plan.num_cached) == (27, 23)
    assert plan.predicted_speedup == pytest.approx(50 / 27)
    # Delta-DiT(2): PAB's cadence; a cached step runs m = 28 // 4 = 7 blocks:
    # 50 * 28 / (27 * 28 + 23 * 7) = 1400 / 917.
    assert DeltaDiT(2).blocks_per_cached_step(28) == 7
    plan = DeltaDiT(2).plan(ts, 28)
    assert (plan.num_full, plan.num_cached) == (27, 23)
    assert plan.predicted_speedup == pytest.approx(1400 / 917)


def test_teacache_decides_on_device_monotonically():
    counts = []
    for th in (1e-9, 0.3, 1.0, 100.0):
        x, full = _run(TeaCache(th))
        assert full[0] and full[-1]  # forced
        counts.append(int(full.sum()))
    assert counts[0] == STEPS
    assert counts == sorted(counts, reverse=True) and counts[-1] < STEPS
    assert counts[-1] == 2  # a huge threshold caches everything but the forced steps
    x, full = _run(TeaCache(100.0))
    assert float(np.abs(x - UNCACHED).max()) > 1e-3
    # 10 steps, 2 full of depth 8, 8 cached running no block: 10 * 8 / (2 * 8) = 5.
    assert plan_from_schedule(full, DIT.depth, 0).predicted_speedup == pytest.approx(5.0)


def test_teacache_rescaling_polynomial_matters():
    a = _run(TeaCache(0.5, (1.0, 0.0)))[1]
    b = _run(TeaCache(0.5, (10.0, 0.0)))[1]
    assert b.sum() > a.sum()


def test_teacache_calibration_runs_the_sampler_it_calibrates(monkeypatch):
    import skipdit_jax.sampling as sampling

    real, seen = sampling.build_sampler, []

    def spy(*args, **kwargs):
        fn = real(*args, **kwargs)

        def run(*a):
            result = fn(*a)
            seen.append(result)
            return result

        return run

    params = ORACLE_PARAMS  # weights under which guidance and clipping visibly matter
    settings = dict(sampler="ddim", num_steps=8, cfg_scale=2.0)
    monkeypatch.setattr(sampling, "build_sampler", spy)
    coeffs = calibrate_teacache(DIT, params, NOISE, LABELS, cfg_channels=3, clip_denoised=False, **settings)
    monkeypatch.undo()
    assert len(seen) == 1
    x, full, (count, mods, outs) = seen[0]
    assert full.all() and int(count) == 8
    assert mods.shape[:2] == (8, 2 * NOISE.shape[0]) and outs.shape[:2] == (8, 2 * NOISE.shape[0])  # the guidance batch
    # The recorded trajectory is the sampler's: its final x is the plain uncached sample
    # with the same settings, and not the one with another guidance or clipping setting.
    ref = np.asarray(sample(DIT, params, noise=NOISE, labels=LABELS, cfg_channels=3, clip_denoised=False, **settings))
    np.testing.assert_allclose(np.asarray(x), ref, atol=1e-5, rtol=0)
    for other in (dict(cfg_channels=None, clip_denoised=False), dict(cfg_channels=3, clip_denoised=True)):
        alt = np.asarray(sample(DIT, params, noise=NOISE, labels=LABELS, **other, **settings))
        assert float(np.abs(alt - ref).max()) > 1e-3 * float(np.abs(ref).max())
        # ... and calibrating with it fits other coefficients (measured: the slope moves by
        # 2.5% with all channels guided, by 15% with clipping).
        other_coeffs = calibrate_teacache(DIT, params, NOISE, LABELS, **other, **settings)
        assert float(np.abs(np.subtract(other_coeffs, coeffs)).max()) > 1e-2 * float(np.abs(coeffs).max())


def test_lowered_programs_hold_conditionals():
    for cache in (FORA(2), TeaCache(0.5)):
        fn = build_sampler(DIT, "ddim", "ddim10", True, None, cache, 0.0, False)
        hlo = fn.lower(PARAMS, NOISE, LABELS, jnp.float32(3.0), jax.random.key(0)).compile().as_text()
        assert " conditional(" in hlo


@pytest.mark.parametrize(
    "method,setting,match",
    [
        ("tomesd", 2, "unknown cache method"),
        ("fora", 0, "interval"),
        ("pab", 1.5, "integer"),
        ("teacache", 0, "threshold"),
        ("teacache", -1, "threshold"),
        ("delta-dit", -2, "interval"),
    ],
)
def test_bad_settings(method, setting, match):
    with pytest.raises(ConfigError, match=match):
        make_cache(method, setting)


def test_methods_refuse_the_wrong_model():
    skip = tiny_config(depth=8, long_skip=True)
    for cache in (FORA(2), PAB(2), DeltaDiT(2), TeaCache(0.1)):
        with pytest.raises(ConfigError, match="without long skips"):
            cache.check_model(skip)
    with pytest.raises(ConfigError, match="ShallowCache"):
        SkipCache(2, 1).check_model(DIT)
    ShallowCache(2, 1).check_model(DIT)  # the ablation, asked for by name
    with pytest.raises(ConfigError, match="blocks"):
        DeltaDiT(2, blocks=5).check_model(DIT)
    assert isinstance(make_cache("shallow-cache", 2, shallow_blocks=1), ShallowCache)


def test_stored_branches_rebuild_the_hidden_states():
    # The branch cache (FORA, PAB) stores pre-gate outputs: re-gated with the same step's
    # gates they give back the hidden state after any number of blocks, and a cached pass
    # right after the full pass on the same input reproduces its output.
    from skipdit_jax.models import family_of

    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
    t, y = jnp.array([300, 700]), jnp.array([2, 10])
    fam, fora = family_of(DIT), FORA(1)
    params = ORACLE_PARAMS  # ORACLE's pieces use these
    out, stored = fora.full_pass(fam, params, x, t, y, fora.init_carry(fam, 2))
    _assert_close(out, DiT(DIT).apply({"params": params}, x, t, y))
    _assert_close(fora.cached_pass(fam, params, x, t, y, stored)[0], out)
    branches = jnp.concatenate(stored)  # (depth, 2, B, N, D)
    h, c = ORACLE.embed(x, t, y)
    for j in range(DIT.depth - 1):
        _, _, gate_msa, _, _, gate_mlp = ORACLE.modulation(ORACLE.blocks[j], c)
        h = h + gate_msa[:, None] * branches[j, 0] + gate_mlp[:, None] * branches[j, 1]
        k = DIT.depth - 1 - j  # the state after block j is the deep feature for k shallow blocks
        if k <= DIT.num_encoder_blocks:
            _, deep = DiT(DIT).apply({"params": params}, x, t, y, k, method=DiT.forward_full)
            _assert_close(h, deep)


def test_teacache_negative_polynomial_values_do_not_shrink_the_accumulator():
    # A polynomial that is negative everywhere must behave like "no change": cache all
    # but the forced steps, never reset by a shrinking sum.
    _, full = _run(TeaCache(0.5, (-1.0, -1.0)))
    assert full.sum() == 2 and full[0] and full[-1]


# ---- the baselines on a tiny vanilla Latte (units = (spatial, temporal) pairs) ---------------
# PAB shares FORA's passes (BranchCache) and differs only in its family-independent schedule,
# so FORA stands for both here.

LATTE = LatteConfig(
    input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=4, num_frames=3, num_classes=5, long_skip=False
)
LATTE_STEPS = 5  # ddim5: t = 800, 600, 400, 200, 0


def _latte_params(config=LATTE, scale=0.2):
    params = family_of(config).init_params(3)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(4)
    return jax.tree.unflatten(treedef, [np.asarray(a) + scale * rng.standard_normal(a.shape).astype(np.float32) for a in leaves])


LATTE_PARAMS = _latte_params()
LATTE_NOISE = jax.random.normal(jax.random.key(1), (1, 3, 4, 4, 4))


def _latte_run(cache):
    """(sample, realised schedule, the cache's final carry)."""
    kw = dict(return_schedule=True, return_carry=cache is not None)
    fn = build_sampler(LATTE, "ddim", f"ddim{LATTE_STEPS}", True, None, cache, 0.0, False, **kw)
    x, full, *carry = fn(LATTE_PARAMS, LATTE_NOISE, jnp.array([2]), jnp.float32(3.0), jax.random.key(0))
    return np.asarray(x), np.asarray(full), (carry[0] if carry else None)


@pytest.fixture(scope="module")
def latte_uncached():
    return _latte_run(None)[0]


LATTE_OFF = (FORA(1), DeltaDiT(1), TeaCache(1e-9), PABVideo(1, 1, mlp_timesteps=()))


def test_baselines_off_on_latte_are_the_plain_forward():
    """With caching off (interval / ranges 1, no MLP broadcast) every step of these
    strategies is a full pass (the host schedule is all-full; TeaCache's threshold resets
    at every step), and each full pass, run through the family's unit pieces, is the plain
    forward bit for bit -- so the sampler equals the uncached one. One jit holds all four."""
    family = family_of(LATTE)
    ts = sampling_timesteps("ddim", LATTE_STEPS)
    for cache in LATTE_OFF:
        cache.check_model(family)
        assert cache is LATTE_OFF[2] or cache.full_steps(ts).all()
    x = jax.random.normal(jax.random.key(5), (2, 3, 4, 4, 4))
    t, y = jnp.array([600, 600]), jnp.array([1, 5])

    @jax.jit
    def outputs(params):
        plain = family.apply(params, x, t, y)
        return plain, [c.full_pass(family, params, x, t, y, c.init_carry(family, 2))[0] for c in LATTE_OFF]

    plain, got = outputs(LATTE_PARAMS)
    for cache, out in zip(LATTE_OFF, got, strict=True):
        np.testing.assert_array_equal(np.asarray(out), np.asarray(plain), err_msg=cache.name)


@pytest.mark.parametrize(
    "cache,expected_full",
    [
        (FORA(2), [F, C, F, C, F]),  # full: i = 4 (first), 2, 0
        (DeltaDiT(2), [F, F, F, C, F]),  # s = 3 (t = 200): the late regime
        (TeaCache(100.0), [F, C, C, C, F]),  # decided on the device: all but the forced steps cached
        # spatial reused at s = 1, 3, temporal at s = 1, 2 (inside 100 < t < 800); the MLP key
        # t = 400 (s = 2) lends its MLP outputs to s = 3, 4
        (PABVideo(2, 3), [F, C, C, C, C]),
    ],
    ids=lambda v: getattr(v, "name", None),
)
def test_cached_baselines_on_latte_stay_close(cache, expected_full, latte_uncached):
    """Each baseline samples a tiny Latte through the family's unit pieces: caching moves
    the sample a little and it stays close to the uncached one."""
    cache.check_model(LATTE)
    x, full, carry = _latte_run(cache)
    np.testing.assert_array_equal(full, expected_full)
    if not cache.adaptive:
        np.testing.assert_array_equal(cache.full_steps(sampling_timesteps("ddim", LATTE_STEPS)), expected_full)
    assert full[0] and (~full).sum() > 0
    scale = float(np.abs(latte_uncached).max())
    moved = float(np.abs(x - latte_uncached).max()) / scale
    assert 1e-3 < moved < 0.3, moved
    if isinstance(cache, PABVideo):  # both passes advance the step counter; the MLP countdown ran out
        assert (int(carry[0]), int(carry[1])) == (LATTE_STEPS, 0)


def test_latte_plans_count_pairs():
    family = family_of(LATTE)
    assert family.depth_units == 2 and family.hidden_shape(2) == (6, 4, 32)  # 4 blocks = 2 pairs
    # Delta-DiT's m = max(1, depth // 4) counts pairs: one pair per cached step.
    assert DeltaDiT(2).units_per_cached_step(family) == 1
    ts = sampling_timesteps("ddim", LATTE_STEPS)
    plan = DeltaDiT(2).plan(ts, family.depth_units)
    assert (plan.num_full, plan.num_cached) == (4, 1)
    assert plan.predicted_speedup == pytest.approx(5 * 2 / (4 * 2 + 1))
    assert FORA(2).plan(ts, family.depth_units).predicted_speedup == pytest.approx(5 / 3)  # 3 full, 2 free
    # Latte-XL/2: 14 pairs, m = 3.
    assert DeltaDiT(2).units_per_cached_step(family_of(LATTE.replace(depth=28, hidden_size=64))) == 3


def test_baselines_refuse_latte_skip_and_pab_video_refuses_images():
    skip = LATTE.replace(long_skip=True)
    for cache in (FORA(2), PAB(2), DeltaDiT(2), TeaCache(0.1), PABVideo()):
        with pytest.raises(ConfigError, match="without long skips"):
            cache.check_model(skip)
    SkipCache(2, 1).check_model(skip.replace(depth=8))  # Skip-Cache is Latte-skip's (tests/test_latte.py samples with it)
    with pytest.raises(ConfigError, match="temporal attention"):
        PABVideo().check_model(DIT)
    assert make_cache("pab-video", 2) == PABVideo()  # N = 2: the published Latte setting


def test_pab_video_schedule_on_ddim50_is_the_published_one():
    # ddim50: step s has t = 980 - 20 s. The window 100 < t < 800 holds s = 10..43.
    ts = sampling_timesteps("ddim", 50)
    pab = PABVideo()  # spatial 2, temporal 3, MLP keys 720, 640, 560, 480, 400 (s = 13, 17, 21, 25, 29), skip 2
    s = pab.schedule(ts)
    steps = np.arange(50)
    inside = (steps >= 10) & (steps <= 43)
    np.testing.assert_array_equal(~s["spatial"], inside & (steps % 2 == 1))  # 17 reused
    np.testing.assert_array_equal(~s["temporal"], inside & (steps % 3 != 0))  # 23 reused
    assert list(np.flatnonzero(~s["mlp"])) == [14, 15, 18, 19, 22, 23, 26, 27, 30, 31]
    # All computed: the 16 steps outside the window and s = 12, 24, 36, 42 (multiples of 6
    # inside it, less 18 and 30, which reuse MLPs).
    assert list(np.flatnonzero(pab.full_steps(ts))) == [*range(10), 12, 24, 36, 42, *range(44, 50)]
    # The device rule (step counter + MLP countdown in the carry) realises the same pattern.
    left = jnp.int32(0)
    for i, t in enumerate(ts):
        sp, tp, mlp, left = pab.step_flags(jnp.int32(t), jnp.int32(i), left)
        assert (bool(sp), bool(tp), bool(mlp)) == (s["spatial"][i], s["temporal"][i], s["mlp"][i]), i
    # Cost: attention 1/3 and MLP 2/3 of each block without a model; ranges of 1 and no
    # MLP broadcast cost a full pass every step.
    assert PABVideo(1, 1, mlp_timesteps=()).plan(ts, 14).predicted_speedup == pytest.approx(1.0)
    cost = pab.step_costs(ts, 14)
    assert cost[0] == pytest.approx(14) and cost[11] == pytest.approx(14 - 14 / 6 - 14 / 6)  # s = 11: both reused
    assert cost[14] == pytest.approx(14 - 14 / 6 - 5 * 2 / 3)  # temporal attention + 5 pairs' MLPs reused
    # With a model the attention shares grow by the score terms (2 L D per token).
    assert 1.1 < pab.plan(ts, 14).predicted_speedup < pab.plan(ts, 14, LATTE).predicted_speedup < 2


def test_pab_video_reuses_the_right_branches():
    """A cached PAB-video pass against a pair-by-pair oracle (Python branches, the blocks'
    own attention and MLP): at step 2 inside the window with the MLP countdown running,
    spatial attention is computed, temporal attention reused, and the MLPs of pair 0 (the
    only pair in mlp_units) reused while pair 1's are computed."""
    from skipdit_jax.models.latte import get_1d_sincos_temp_embed
    from skipdit_jax.models.layers import layer_norm, modulate

    family, cfg = family_of(LATTE), LATTE
    pab = PABVideo(2, 3, mlp_units=(0,))
    x1, x2 = jax.random.normal(jax.random.key(6), (2, 2, 3, 4, 4, 4))
    t, y = jnp.array([600, 600]), jnp.array([1, 3])
    assert [bool(v) for v in pab.step_flags(jnp.int32(600), jnp.int32(2), jnp.int32(1))[:3]] == [True, False, False]
    full = jax.jit(lambda x: pab.full_pass(family, LATTE_PARAMS, x, t, y, pab.init_carry(family, 2)))
    stored = full(x1)[1][2]
    got = jax.jit(lambda x, s: pab.cached_pass(family, LATTE_PARAMS, x, t, y, (jnp.int32(2), jnp.int32(1), s))[0])(x2, stored)

    @jax.jit
    def oracle(x, stored):
        block = DiTBlock(cfg)
        f, n = cfg.num_frames, cfg.num_patches
        h, c = family.embed(LATTE_PARAMS, x, t, y)
        conds = {"spatial": jnp.repeat(c, f, axis=0), "temporal": jnp.repeat(c, n, axis=0)}
        pairs = [
            (jax.tree.map(lambda a, j=j: a[j], p), jax.tree.map(lambda a, j=j: a[j], s))
            for p, s in zip(family.unit_stacks(LATTE_PARAMS), stored, strict=True)
            for j in range(jax.tree.leaves(s)[0].shape[0])
        ]
        attn = lambda bp, v: block.apply(bp, v, method=lambda m, v: m.attn(v))  # noqa: E731
        mlp = lambda bp, v: block.apply(bp, v, method=lambda m, v: m.mlp(v))  # noqa: E731
        for u, (p, record) in enumerate(pairs):
            for kind in ("spatial", "temporal"):
                if kind == "temporal":
                    h = h.reshape(-1, f, n, cfg.hidden_size).transpose(0, 2, 1, 3).reshape(-1, f, cfg.hidden_size)
                    h = h + get_1d_sincos_temp_embed(cfg.hidden_size, f).astype(np.float32) if u == 0 else h
                bp = {"params": p[kind]}
                shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = block.apply(bp, conds[kind], method=DiTBlock.modulation)
                if kind == "temporal":
                    h = h + record[kind][0]
                else:
                    h = h + gate_a[:, None] * attn(bp, modulate(layer_norm(h), shift_a, scale_a))
                if u == 0:
                    h = h + record[kind][1]
                else:
                    h = h + gate_m[:, None] * mlp(bp, modulate(layer_norm(h), shift_m, scale_m))
                if kind == "temporal":
                    h = h.reshape(-1, n, f, cfg.hidden_size).transpose(0, 2, 1, 3).reshape(-1, n, cfg.hidden_size)
        return family.head(LATTE_PARAMS, h, c)

    want = oracle(x2, stored)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * float(jnp.abs(want).max()), rtol=0)
    # The comparison has power: computing everything gives another output.
    fresh = full(x2)[0]
    assert float(jnp.abs(fresh - want).max()) > 1e-3 * float(jnp.abs(want).max())
