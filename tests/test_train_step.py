"""The train step, optimizer pieces and sharding rules, in-process."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from skipdit_jax import sharding
from skipdit_jax.training import optim
from skipdit_jax.errors import ConfigError
from skipdit_jax.models.config import preset
from skipdit_jax.models import init_params
from skipdit_jax.training.train_step import init_train_state, make_train_step

from helpers import random_params, tiny_config

CFG = tiny_config(input_size=8, in_channels=1, depth=4, hidden_size=16, num_heads=2)


def _opt(**kw):
    c = ml_collections.ConfigDict(dict(name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, decay="constant", end_lr_factor=0.0, grad_clip=0.0, steps=100))
    c.update(kw)
    return c


def _batch(seed=0, nan=False):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
    if nan:
        image[0, 0, 0, 0] = np.nan
    return {"image": jnp.asarray(image), "label": jnp.asarray([0, 1, 2, 3])}


def _setup(trainable="all", threshold=None):
    # Random non-zero weights: from DiT's zero-initialised head no gradient would reach the
    # skip modules, which is not the situation of a fine-tune from a trained DiT.
    params = jax.tree.map(jnp.asarray, random_params(CFG))
    tx = optim.make_optimizer(_opt(), params, trainable)
    state = init_train_state(params, tx)
    step = jax.jit(make_train_step(CFG, tx, ema_decay=0.9, grad_skip_threshold=threshold))
    return params, state, step


def _changed(a, b):
    return {path: not np.array_equal(x, y) for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b))}


def test_skip_only_changes_only_skip_modules():
    params, state, step = _setup("skip_only")
    for i in range(3):
        state, _ = step(state, _batch(i), jax.random.key(0))
    changed = _changed(params, state.params)
    for path, did in changed.items():
        is_skip = jax.tree_util.keystr(path).startswith("['skip_fusions']")
        assert did == is_skip, jax.tree_util.keystr(path)


def test_full_training_changes_everything_trainable():
    params, state, step = _setup("all")
    for i in range(3):
        state, metrics = step(state, _batch(i), jax.random.key(0))
    assert all(_changed(params, state.params).values())
    assert int(metrics["skipped_updates"]) == 0 and int(state.step) == 3


def test_non_finite_update_is_skipped_and_counted():
    params, state, step = _setup()
    state, metrics = step(state, _batch(0, nan=True), jax.random.key(0))
    assert not np.isfinite(float(metrics["loss"]))
    assert int(state.skipped_updates) == 1 and int(state.step) == 1
    assert not any(_changed(params, state.params).values())
    assert not any(_changed(params, state.ema_params).values())
    state, metrics = step(state, _batch(1), jax.random.key(0))  # training goes on
    assert int(state.skipped_updates) == 1 and any(_changed(params, state.params).values())


def test_grad_norm_threshold_skips_updates():
    params, state, step = _setup(threshold=1e-9)
    state, metrics = step(state, _batch(0), jax.random.key(0))
    assert float(metrics["grad_norm"]) > 1e-9 and int(state.skipped_updates) == 1
    assert not any(_changed(params, state.params).values())


def test_ema_follows_params():
    params, state, step = _setup()
    state, _ = step(state, _batch(0), jax.random.key(0))
    for p0, p1, e in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
        np.testing.assert_allclose(e, 0.9 * p0 + 0.1 * p1, rtol=1e-5, atol=1e-7)


def test_ema_warmup_forgets_the_initialisation():
    params = jax.tree.map(jnp.asarray, random_params(CFG))
    tx = optim.make_optimizer(_opt(), params)
    step = jax.jit(make_train_step(CFG, tx, ema_decay=0.999, ema_warmup=True))
    state, _ = step(init_train_state(params, tx), _batch(0), jax.random.key(0))  # n = 0: decay 1/10
    for p0, p1, e in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
        np.testing.assert_allclose(e, 0.1 * p0 + 0.9 * p1, rtol=1e-5, atol=1e-7)
    ema1 = state.ema_params
    state, _ = step(state, _batch(1), jax.random.key(0))  # n = 1: decay 2/11
    for e1, p2, e2 in zip(jax.tree.leaves(ema1), jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
        np.testing.assert_allclose(e2, 2 / 11 * e1 + 9 / 11 * p2, rtol=1e-5, atol=1e-7)


def test_skip_only_without_skips_is_an_error():
    with pytest.raises(ConfigError, match="no skip modules"):
        optim.make_optimizer(_opt(), init_params(CFG.replace(long_skip=False)), "skip_only")


def test_schedules():
    s = optim.learning_rate_schedule(_opt(warmup_steps=10, decay="cosine", end_lr_factor=0.1))
    assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1e-3) and float(s(100)) == pytest.approx(1e-4, rel=1e-3)
    assert float(optim.learning_rate_schedule(_opt())(50)) == pytest.approx(1e-3)
    with pytest.raises(ConfigError):
        optim.learning_rate_schedule(_opt(decay="exp"))


def test_logical_axes_rules():
    from skipdit_jax.models.dit import PARAM_AXES

    assert sharding.logical_axes("encoder_blocks/attn/qkv/kernel", 3, PARAM_AXES) == ("layers", "embed", "hidden")
    assert sharding.logical_axes("decoder_blocks/mlp/fc2/kernel", 3, PARAM_AXES) == ("layers", "hidden", "embed")
    # Optimizer state shards like its parameter.
    assert sharding.logical_axes("0/mu/decoder_blocks/mlp/fc2/kernel", 3, PARAM_AXES) == ("layers", "hidden", "embed")
    assert sharding.logical_axes("something/else", 2, PARAM_AXES) == (None, None)
    assert sharding.logical_axes("encoder_blocks/attn/qkv/kernel", 3) == (None, None, None)  # no rules: replicated
    with pytest.raises(ConfigError, match="names 3 axes"):
        sharding.logical_axes("encoder_blocks/attn/qkv/kernel", 2, PARAM_AXES)


def test_fsdp_specs_shard_the_width_of_big_tensors():
    from jax.sharding import PartitionSpec as P

    from skipdit_jax.models import family_of

    family = family_of(preset("Skip-DiT-S/2"))
    mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 4})  # the rules read only the axis sizes
    specs = sharding.param_partition_specs(family.abstract_params(), mesh, param_axes=family.param_axes, min_shard_size=2**14)
    # Width 384: the "embed" dimension of every big kernel is split 4 ways over fsdp...
    assert specs["encoder_blocks"]["attn"]["qkv"]["kernel"] == P(None, "fsdp", None)
    assert specs["decoder_blocks"]["mlp"]["fc2"]["kernel"] == P(None, None, "fsdp")
    assert specs["skip_fusions"]["linear"]["kernel"] == P(None, None, "fsdp")
    assert specs["y_embedder"]["embedding"] == P(None, "fsdp")
    # ...small tensors stay whole, and a dimension fsdp does not divide is not split.
    assert specs["encoder_blocks"]["attn"]["qkv"]["bias"] == P()
    assert specs["final_layer"]["linear"]["kernel"] == P()  # 384 x 32 < min_shard_size
    odd = sharding.param_partition_specs({"y_embedder": {"embedding": jax.ShapeDtypeStruct((1001, 390), np.float32)}}, mesh, param_axes=family.param_axes)
    assert odd["y_embedder"]["embedding"] == P(None, None)


def test_mesh_validation():
    with pytest.raises(ConfigError):
        sharding.make_mesh(data=2, fsdp=1)  # one CPU device here
    mesh = sharding.make_mesh(-1, 1)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}


def test_optax_frozen_params_carry_no_moments():
    params = init_params(CFG, 0)
    tx = optim.make_optimizer(_opt(), params, "skip_only")
    n_state = sum(x.size for x in jax.tree.leaves(tx.init(params)))
    n_skip = sum(x.size for x in jax.tree.leaves(params["skip_fusions"]))
    assert n_state < 3 * n_skip + 10  # mu and nu for the skip modules only (+ counters)


def test_min_snr_weighting_downweights_low_noise_steps():
    from skipdit_jax.diffusion import Diffusion

    d = Diffusion(None, learn_sigma=False)
    snr = np.asarray(d.snr(jnp.array([0, 100, 500, 999])))
    assert (np.diff(snr) < 0).all() and snr[0] > 1000 and snr[-1] < 1e-3
    # Same data and randomness: the weighted loss is smaller (weights <= 1), the mse metric equal.
    params = jax.tree.map(jnp.asarray, random_params(CFG))
    tx = optim.make_optimizer(_opt(), params)
    out = {}
    for gamma in (None, 5.0):
        step = jax.jit(make_train_step(CFG, tx, ema_decay=0.9, min_snr_gamma=gamma))
        out[gamma] = step(init_train_state(params, tx), _batch(0), jax.random.key(3))[1]
    assert float(out[5.0]["mse"]) == pytest.approx(float(out[None]["mse"]))
    assert float(out[5.0]["loss"]) <= float(out[None]["loss"]) + 1e-7
    from skipdit_jax.training.train_step import min_snr_weight

    np.testing.assert_allclose(min_snr_weight(jnp.array([100.0, 5.0, 0.5]), 5.0), [0.05, 1.0, 1.0], rtol=1e-6)


def test_gradient_accumulation_equals_the_big_batch_step():
    """grad_accum_steps=4 on a batch of 8 (four micro-batches of 2) takes the same step as
    one batch of 8 -- same t, noise and dropout, mean of the micro-batch gradients -- and
    not the step of one micro-batch alone."""
    params = jax.tree.map(jnp.asarray, random_params(CFG))
    tx = optim.make_optimizer(_opt(), params)
    rng = np.random.default_rng(5)
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)), "label": jnp.arange(8) % 10}
    out = {}
    for n in (1, 4):
        step = jax.jit(make_train_step(CFG, tx, ema_decay=0.9, label_dropout=0.5, grad_accum_steps=n))
        out[n] = step(init_train_state(params, tx), batch, jax.random.key(7))
    (big, m1), (acc, m4) = out[1], out[4]
    for a, b in zip(jax.tree.leaves(big.params), jax.tree.leaves(acc.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Adam's first step is ~lr * sign(g): the moments (linear in g) check the gradients.
    for a, b in zip(jax.tree.leaves(big.opt_state), jax.tree.leaves(acc.opt_state)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)
    for k in ("loss", "mse", "vb", "grad_norm"):
        assert float(m4[k]) == pytest.approx(float(m1[k]), rel=1e-5, abs=1e-7), k
    step1 = jax.jit(make_train_step(CFG, tx, ema_decay=0.9, label_dropout=0.5))
    micro = {k: v[0::4] for k, v in batch.items()}  # the rows of micro-batch 0
    one, _ = step1(init_train_state(params, tx), micro, jax.random.key(7))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(acc.params)))
    assert diff > 1e-4, diff
