"""FORA, PAB, Delta-DiT and TeaCache as strategies of the one jitted sampler: exact when
caching is off, their schedules when on, the cache really used, bad input refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipdit_jax.cache import ShallowCache, SkipCache
from skipdit_jax.cache import FORA, PAB, DeltaDiT, TeaCache, make_cache, plan_from_schedule
from skipdit_jax.errors import ConfigError
from skipdit_jax.sampling import build_sampler, sampling_timesteps

from helpers import random_params, tiny_config

DIT = tiny_config(depth=8, long_skip=False)
PARAMS = random_params(DIT)
NOISE = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
LABELS = jnp.array([1, 7])
STEPS = 10  # ddim10: t = 900, 800, ..., 0 -- crosses Delta-DiT's switch at 600


def _run(cache, config=DIT, params=PARAMS):
    fn = build_sampler(config, "ddim", f"ddim{STEPS}", True, None, cache, 0.0, False, return_schedule=True)
    x, full = fn(params, NOISE, LABELS, jnp.float32(3.0), jax.random.key(0))
    return np.asarray(x), np.asarray(full)


UNCACHED = _run(None)[0]
OFF = [FORA(1), PAB(1), DeltaDiT(1), TeaCache(1e-9)]
ON = [FORA(2), FORA(3), PAB(2), DeltaDiT(2), DeltaDiT(3, blocks=1)]


@pytest.mark.parametrize("cache", OFF, ids=lambda c: c.name)
def test_caching_off_reproduces_the_uncached_sampler(cache):
    x, full = _run(cache)
    assert full.all()
    np.testing.assert_allclose(x, UNCACHED, atol=2e-5, rtol=0)


@pytest.mark.parametrize("cache", ON, ids=lambda c: f"{c.name}{c.interval}")
def test_static_schedule_is_realised_and_the_cache_is_used(cache):
    cache.check_model(DIT)
    ts = sampling_timesteps("ddim", STEPS)
    x, full = _run(cache)
    expected = cache.full_steps(ts)
    np.testing.assert_array_equal(full, expected)
    assert 0 < (~full).sum() < len(full)
    diff = float(np.abs(x - UNCACHED).max())
    assert 1e-4 < diff < float(np.abs(UNCACHED).max())


def test_schedules_follow_their_definitions():
    ts = sampling_timesteps("ddim", 50)
    assert list(FORA(3).full_steps(ts)[:7]) == [True, False, False, True, False, False, True]
    pab = PAB(2).full_steps(ts)
    assert pab[:3].all()  # steps 0 and 1 always full, 2 is even
    assert list(pab[3:7]) == [False, True, False, True]
    assert pab[ts <= 10].all()
    # Block-count plans: FORA's cached steps run no block, Delta-DiT's m = depth // 4.
    assert FORA(2).plan(ts, 28).predicted_speedup == pytest.approx(50 / 25)
    d = DeltaDiT(2)
    full = d.full_steps(ts)
    assert d.blocks_per_cached_step(28) == 7
    assert d.plan(ts, 28).predicted_speedup == pytest.approx(50 * 28 / (full.sum() * 28 + (~full).sum() * 7))


def test_delta_dit_uses_both_regimes():
    # ddim10 caches steps at t = 600, 400, 200: with the switch at 500 the first uses the
    # early regime (front blocks run), the others the late one; each must matter.
    ts = sampling_timesteps("ddim", STEPS)
    cached_t = ts[~DeltaDiT(2).full_steps(ts)]
    assert (cached_t > 500).any() and (cached_t <= 500).any()
    early_only, late_only = DeltaDiT(2, switch_t=0), DeltaDiT(2, switch_t=1000)
    x_default, x_early, x_late = _run(DeltaDiT(2, switch_t=500))[0], _run(early_only)[0], _run(late_only)[0]
    assert float(np.abs(x_default - x_early).max()) > 1e-5
    assert float(np.abs(x_default - x_late).max()) > 1e-5


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
    assert float(np.abs(x - UNCACHED).max()) > 1e-4
    plan = plan_from_schedule(full, DIT.depth, 0)
    assert plan.predicted_speedup == pytest.approx(STEPS / 2)


def test_teacache_rescaling_polynomial_matters():
    a = _run(TeaCache(0.5, (1.0, 0.0)))[1]
    b = _run(TeaCache(0.5, (10.0, 0.0)))[1]
    assert b.sum() > a.sum()


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


def test_block_branches_rebuild_the_hidden_states():
    # FORA's stored gated branch outputs, summed onto the embedding, give the hidden state
    # after any number of blocks: the plumbing FORA and PAB rely on.
    from skipdit_jax.models import DiT, family_of

    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
    t, y = jnp.array([300, 700]), jnp.array([2, 10])
    fam = family_of(DIT)
    out, stored = FORA(1).full_pass(fam, PARAMS, x, t, y, FORA(1).init_carry(fam, 2))
    full = DiT(DIT).apply({"params": PARAMS}, x, t, y)
    np.testing.assert_allclose(out, full, atol=1e-5)
    h0, _ = DiT(DIT).apply({"params": PARAMS}, x, t, y, method=DiT.embed)
    branches = jnp.concatenate(stored)
    for k in (1, 3):
        _, deep = DiT(DIT).apply({"params": PARAMS}, x, t, y, k, method=DiT.forward_full)
        np.testing.assert_allclose(h0 + branches[: DIT.depth - k].sum(0), deep, atol=1e-5)


def test_teacache_negative_polynomial_values_do_not_shrink_the_accumulator():
    # A polynomial that is negative everywhere must behave like "no change": cache all
    # but the forced steps, never reset by a shrinking sum.
    _, full = _run(TeaCache(0.5, (-1.0, -1.0)))
    assert full.sum() == 2 and full[0] and full[-1]
