"""The Skip-Cache schedule, validated against the official counter semantics."""

import pytest

from skipdit_jax.cache import ShallowCache, SkipCache, parse_cache_spec
from skipdit_jax.errors import ConfigError
from skipdit_jax.sampling import sampling_timesteps

from helpers import tiny_config


@pytest.mark.parametrize(
    "sampler,steps,interval,full,cached",
    [
        ("ddpm", 250, 2, 128, 122),
        ("ddpm", 250, 3, 87, 163),
        ("ddpm", 250, 4, 67, 183),
        ("ddpm", 250, 5, 54, 196),
        ("ddim", 50, 2, 26, 24),
        ("ddim", 50, 3, 18, 32),
        ("ddim", 50, 4, 14, 36),
    ],
)
def test_class_to_image_schedule_counts(sampler, steps, interval, full, cached):
    plan = SkipCache(interval).plan(sampling_timesteps(sampler, steps), depth=28)
    assert (plan.num_full, plan.num_cached) == (full, cached)


def test_schedule_shape_and_reset():
    ts = sampling_timesteps("ddim", 50)  # 980, 960, ..., 20, 0
    full = SkipCache(3).full_steps(ts)
    assert full[0]  # empty cache
    # Before the close threshold the pattern is full, cached, cached, ...
    assert list(full[:6]) == [True, False, False, True, False, False]
    # The step at t=20 closes the cache: the step after it (t=0) must be full.
    assert ts[-2] == 20 and full[-1]


def test_start_t_forces_full_steps():
    ts = sampling_timesteps("ddim", 50)
    full = SkipCache(2, start_t=700, close_t=50).full_steps(ts)
    assert full[ts >= 700].all()
    assert not full[(ts < 700) & (ts > 50)].all()


def test_interval_one_is_all_full():
    assert SkipCache(1).full_steps(sampling_timesteps("ddpm", 250)).all()


def test_predicted_speedup_is_block_count():
    plan = SkipCache(2).plan(sampling_timesteps("ddpm", 250), depth=28)
    assert plan.predicted_speedup == pytest.approx(250 * 28 / (128 * 28 + 122 * 8))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(interval=0), "interval"),
        (dict(interval=2, shallow_blocks=0), "shallow_blocks"),
        (dict(interval=2, start_t=100, close_t=200), "close_t"),
    ],
)
def test_bad_cache_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SkipCache(**kwargs)


def test_shallow_blocks_range_checked_against_model():
    cfg = tiny_config(depth=8)  # half = 4: k in 1..3
    SkipCache(2, shallow_blocks=3).check_model(cfg)
    with pytest.raises(ConfigError, match=r"1\.\.3"):
        SkipCache(2, shallow_blocks=4).check_model(cfg)


def test_skip_cache_on_vanilla_model_must_be_asked_for():
    cfg = tiny_config(long_skip=False)
    with pytest.raises(ConfigError, match="ShallowCache"):
        SkipCache(2, shallow_blocks=1).check_model(cfg)
    ShallowCache(2, shallow_blocks=1).check_model(cfg)


def test_parse_cache_spec():
    assert parse_cache_spec("3") == SkipCache(3)
    assert parse_cache_spec("2,1,700,50") == SkipCache(2, 1, 700, 50)
    assert parse_cache_spec("none") is None
    with pytest.raises(ConfigError):
        parse_cache_spec("2,x")
    with pytest.raises(ConfigError):
        parse_cache_spec("1,2,3")


def test_shallow_cache_on_dit_costs_only_the_last_blocks():
    # Without fusions the first k blocks' outputs are unused on a cached step: k blocks run.
    ts = sampling_timesteps("ddim", 50)
    plan = ShallowCache(2, 4).plan(ts, depth=28)
    assert (plan.num_full, plan.num_cached) == (26, 24)
    assert plan.predicted_speedup == pytest.approx(50 * 28 / (26 * 28 + 24 * 4))
    assert ShallowCache(2, 4).cached_blocks(has_long_skips=True) == 8  # on a Skip-DiT the fusions read them
    assert ShallowCache(2, 4).cached_blocks(has_long_skips=False) == 4
