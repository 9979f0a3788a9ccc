"""The model-family contract: what the sampler, the caches and the trainer rely on.

`FamilyContract` is one test class that every family subclasses with a few tiny configs
(`make_configs`); it checks shapes and dtypes, the cache passes against the plain forward,
jit against eager, the condition's guidance and dropout semantics, the training batch
spec, the registry round trip and the PyTorch conversion round trip. A new family passes
these before anything else in the project can use it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params
from skipdit_jax.errors import UserError
from skipdit_jax.models import ModelConfig, family_of
from skipdit_jax.models.families import config_from_dict, config_to_dict, family_for_state_dict


def pytest_generate_tests(metafunc):
    """Every test of a FamilyContract subclass runs once per config of `make_configs()`."""
    if metafunc.cls is not None and issubclass(metafunc.cls, FamilyContract) and "config_id" in metafunc.fixturenames:
        metafunc.parametrize("config_id", list(metafunc.cls.make_configs()))


class FamilyContract:
    """Subclasses define `make_configs()` -> {id: model config} (tiny; random weights)."""

    @staticmethod
    def make_configs() -> dict:
        raise NotImplementedError

    @pytest.fixture
    def case(self, config_id):
        config = self.make_configs()[config_id]
        family = family_of(config)
        params = random_params(config, seed=3)
        batch = 2
        key = jax.random.key(0)
        x = jax.random.normal(key, (batch, *family.sample_shape))
        t = jnp.array([10, 900], jnp.int32)
        cond = family.example_condition(batch)
        cond = None if cond is None else jnp.asarray(cond)
        return family, params, x, t, cond

    def test_apply_shapes_and_dtype(self, case):
        family, params, x, t, cond = case
        out = family.apply(params, x, t, cond)
        out_channels = family.eps_channels * (2 if family.learn_sigma else 1)
        assert out.shape == (*x.shape[:-1], out_channels)
        assert out.dtype == jnp.float32
        assert np.isfinite(np.asarray(out)).all()

    def test_cache_passes_rebuild_the_plain_forward(self, case):
        family, params, x, t, cond = case
        plain = family.apply(params, x, t, cond)
        for k in range(1, family.cache_units):
            out, deep = family.forward_full(params, x, t, cond, k)
            np.testing.assert_allclose(out, plain, atol=1e-5)
            assert deep.shape == family.deep_feature_shape(x.shape[0])
            # A shallow pass from the fresh deep feature of the same input is the full pass.
            shallow = family.forward_shallow(params, x, t, cond, deep, k)
            np.testing.assert_allclose(shallow, plain, atol=1e-5)
            # ...and from another deep feature it is not (random: LayerNorms erase constant shifts).
            other = deep + jax.random.normal(jax.random.key(k), deep.shape, deep.dtype)
            stale = family.forward_shallow(params, x, t, cond, other, k)
            assert float(jnp.abs(stale - plain).max()) > 1e-3

    def test_jit_matches_eager(self, case):
        family, params, x, t, cond = case
        eager = family.apply(params, x, t, cond)
        jitted = jax.jit(family.apply)(params, x, t, cond)
        np.testing.assert_allclose(jitted, eager, atol=1e-5)

    def test_condition_semantics(self, case):
        family, params, x, t, cond = case
        if not family.is_conditional:
            assert family.null_condition(None) is None
            with pytest.raises(UserError):
                family.check_condition(jnp.zeros((2,), jnp.int32), 2)
            return
        family.check_condition(cond, x.shape[0])
        null = family.null_condition(cond)
        assert jax.tree.structure(null) == jax.tree.structure(cond)
        # Dropping every row gives the null condition; dropping none keeps the condition.
        all_dropped = family.drop_condition(cond, jnp.ones((x.shape[0],), bool))
        none_dropped = family.drop_condition(cond, jnp.zeros((x.shape[0],), bool))
        jax.tree.map(np.testing.assert_array_equal, all_dropped, null)
        jax.tree.map(np.testing.assert_array_equal, none_dropped, cond)
        # The null condition changes the output (guidance has something to work with).
        diff = family.apply(params, x, t, cond) - family.apply(params, x, t, null)
        assert float(jnp.abs(diff).max()) > 1e-4
        with pytest.raises(UserError):
            family.check_condition(None, x.shape[0])

    def test_batch_spec_feeds_the_model(self, case):
        family, params, x, t, cond = case
        spec = family.batch_spec(4)
        assert spec["image"].shape == (4, *family.sample_shape)
        batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in spec.items()}
        got = family.condition_from_batch(batch)
        assert (got is None) == (not family.is_conditional)
        out = family.apply(params, batch["image"], jnp.zeros((4,), jnp.int32), got)
        assert out.shape[0] == 4

    def test_registry_round_trip(self, case):
        family = case[0]
        d = config_to_dict(family.config)
        assert d["family"] == family.name
        assert config_from_dict(d) == family.config
        assert type(family_of(config_from_dict(d))) is type(family)

    def test_torch_conversion_round_trip(self, case):
        family, params = case[0], case[1]
        state = family.to_torch(params)
        assert family_for_state_dict(state) is type(family)
        config, back = type(family).from_torch(state, num_heads=family.config.num_heads)
        assert config == family.config.replace(**{k: getattr(config, k) for k in ("skip_init", "remat_policy", "scan_unroll", "dtype", "attention_impl")})
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)

    def test_params_are_float32_and_counted(self, case):
        family, params = case[0], case[1]
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
        assert family.count_params(params) == family.count_params() > 0


def _dit(**kw):
    base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=4, num_classes=10)
    return ModelConfig(**{**base, **kw})


class TestDiTFamily(FamilyContract):
    @staticmethod
    def make_configs():
        return {
            "skip-dit": _dit(long_skip=True),
            "dit": _dit(long_skip=False),
            "skip-dit-unconditional-no-sigma": _dit(long_skip=True, num_classes=0, learn_sigma=False),
        }

