"""Text-to-video Skip-Cache: the official "N{N}-{start}-{close}" spec, its schedule at
Latte's DDIM-50 against a port of the official counter, and cached DDIM sampling of a tiny
Latte-T2V-skip against a reference loop that alternates the family's full and shallow
passes per the official schedule around diffusers' DDIMScheduler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipdit_jax.cache import SkipCache, parse_cache_spec
from skipdit_jax.diffusion import DiffusersDDIM
from skipdit_jax.errors import ConfigError
from skipdit_jax.sampling import build_sampler, sampling_timesteps

LATTE_DDIM = DiffusersDDIM.latte()


def official_full_steps(timesteps, gap, start, close):
    """A port of `LatteT2V_skip_cache.forward`'s module state (`cache_cont`, `cache_val`),
    written from the official code: True where the step computes every pair."""
    cache_cont, cache_val, full = 0, None, []
    for cur_time in timesteps:
        do_full = cache_cont % gap == 0 or cache_val is None or cur_time >= start
        full.append(bool(do_full))
        if do_full:
            cache_val = "deep feature"
        cache_cont += 1
        if cur_time <= close:
            cache_cont, cache_val = 0, None
    return np.asarray(full)


@pytest.mark.parametrize(
    "spec,want",
    [
        ("N2-700-50", SkipCache(2, 1, 700, 50)),
        ("N3", SkipCache(3, 1, 700, 50)),
        ("N4-600-0", SkipCache(4, 1, 600, 0)),
        ("_N2-700-50", SkipCache(2, 1, 700, 50)),  # the official --cache flag
        ("LatteT2V_skip_cache_N3-700-50", SkipCache(3, 1, 700, 50)),  # the official model name
        ("LatteT2V_skip_cache", SkipCache(2, 1, 700, 50)),  # the official default
        (" N2-700-50 ", SkipCache(2, 1, 700, 50)),
        ("3", SkipCache(3)),  # our numeric form is unchanged
        ("2,1,700,50", SkipCache(2, 1, 700, 50)),
        ("none", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_cache_spec(spec, want):
    assert parse_cache_spec(spec) == want


@pytest.mark.parametrize("spec", ["N2-700", "N", "N2-700-50-3", "N-700-50", "N2_700_50", "n2-700-50", "N2-a-50", "M2"])
def test_bad_specs_are_one_line_config_errors(spec):
    with pytest.raises(ConfigError) as e:
        parse_cache_spec(spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec,bad", [("N0-700-50", "interval"), ("N2-50-700", "close_t")])
def test_bad_values_are_config_errors(spec, bad):
    with pytest.raises(ConfigError, match=bad):
        parse_cache_spec(spec)


@pytest.mark.parametrize("n,full,cached,speedup", [(2, 33, 17, 1.46), (3, 28, 22, 1.69), (4, 25, 25, 1.87)])
def test_schedule_at_latte_ddim50(n, full, cached, speedup):
    ts = sampling_timesteps("ddim", 50, scheduler=LATTE_DDIM)
    assert ts[0] == 980 and ts[-1] == 0 and len(ts) == 50
    cache = parse_cache_spec(f"N{n}-700-50")
    plan = cache.plan(ts, depth=28)  # 28 pairs; a cached step runs pair 0 and pair 27
    assert (plan.num_full, plan.num_cached) == (full, cached)
    assert plan.predicted_speedup == pytest.approx(speedup, abs=0.005)
    np.testing.assert_array_equal(cache.full_steps(ts), official_full_steps(ts, n, 700, 50))
    # Full while t >= 700 (980..700: 15 steps); the cache is dropped after t = 40 (the first
    # t <= 50, which may itself be cached), so t = 20 and t = 0 are full.
    assert cache.full_steps(ts)[:15].all() and cache.full_steps(ts)[-2:].all()


@pytest.mark.parametrize("spec", ["N2-500-100", "N3-900-0", "N5-1000-200", "N2-0-0"])
@pytest.mark.parametrize("steps,spacing", [(50, "leading"), (37, "trailing"), (20, "linspace")])
def test_schedule_equals_the_official_counter(spec, steps, spacing):
    ts = DiffusersDDIM(timestep_spacing=spacing).timesteps(steps)
    c = parse_cache_spec(spec)
    np.testing.assert_array_equal(c.full_steps(ts), official_full_steps(ts, c.interval, c.start_t, c.close_t))


# ---- cached sampling of a tiny Latte-T2V-skip ----------------------------------------------
STEPS, SCALE, SPEC = 8, 4.0, "N2-700-50"  # DDIM-8 leading: 875, 750, ..., 0; 3 cached steps


@pytest.fixture(scope="module")
def tiny():
    latte_t2v = pytest.importorskip("skipdit_jax.models.latte_t2v")
    from skipdit_jax.models.families import family_of

    config = latte_t2v.LatteT2VConfig(
        input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_frames=3,
        caption_channels=16, text_len=5, long_skip=True,
    )
    family = family_of(config)
    # Random weights everywhere (no compiled init: the shapes are enough), so no gate,
    # projection or skip fusion is zero.
    rng = np.random.default_rng(0)
    leaves, treedef = jax.tree.flatten(family.abstract_params())
    params = jax.tree.unflatten(treedef, [0.2 * rng.standard_normal(a.shape).astype(np.float32) for a in leaves])
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
    cond = {
        "text_emb": rng.standard_normal((2, 5, 16)).astype(np.float32),
        "text_mask": mask,
        "null_emb": rng.standard_normal((2, 5, 16)).astype(np.float32),
        "null_mask": np.array([[1, 0, 0, 0, 0]] * 2, np.int32),
    }
    noise = rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32)
    passes = (
        jax.jit(lambda p, x, t, c: family.forward_full(p, x, t, c, 1)),
        jax.jit(lambda p, x, t, c, deep: family.forward_shallow(p, x, t, c, deep, 1)),
    )
    return config, family, params, cond, noise, passes


def _reference(family, params, cond, noise, cache, passes):
    """The official pipeline + LatteT2V_skip_cache, written from their code: batch
    [uncond; text], the module-held counter and deep feature, guidance on all 8 channels,
    the first 4 kept, diffusers' DDIMScheduler.step."""
    torch = pytest.importorskip("torch")
    from diffusers.schedulers import DDIMScheduler

    null = family.null_condition(cond)
    batch = {k: np.concatenate([null[k], cond[k]]) for k in cond}
    full_fn, shallow_fn = passes
    sched = DDIMScheduler(clip_sample=False)
    sched.set_timesteps(STEPS)
    x, cache_cont, cache_val, realised = torch.from_numpy(noise.copy()), 0, None, []
    for t in sched.timesteps:
        cur_time = int(t)
        xin, tt = np.concatenate([x.numpy()] * 2), np.full(4, cur_time, np.int32)
        if cache_cont % cache.interval == 0 or cache_val is None or cur_time >= cache.start_t:
            out, cache_val = full_fn(params, xin, tt, batch)
            realised.append(True)
        else:
            out = shallow_fn(params, xin, tt, batch, cache_val)
            realised.append(False)
        cache_cont += 1
        if cur_time <= cache.close_t:
            cache_cont, cache_val = 0, None
        uncond, text = torch.from_numpy(np.array(out)).chunk(2)
        guided = (uncond + SCALE * (text - uncond))[..., :4]
        x = sched.step(guided, t, x).prev_sample
    return x.numpy(), np.asarray(realised)


def test_cached_ddim_sampling_equals_the_official_loop(tiny):
    config, family, params, cond, noise, passes = tiny
    cache = parse_cache_spec(SPEC)
    fn = build_sampler(config, "ddim", str(STEPS), True, None, cache, 0.0, False, return_schedule=True, scheduler=LATTE_DDIM)
    got, realised = fn(params, jnp.asarray(noise), cond, jnp.float32(SCALE), jax.random.key(0))
    want, want_realised = _reference(family, params, cond, noise, cache, passes)
    np.testing.assert_array_equal(np.asarray(realised), want_realised)
    assert (~want_realised).sum() == 3
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
    plain, _ = _reference(family, params, cond, noise, SkipCache(1, 1, 700, 50), passes)
    assert float(np.abs(plain - want).max()) > 1e-3  # the cache changed the result
