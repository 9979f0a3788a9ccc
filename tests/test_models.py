"""DiT / Skip-DiT model: pass decomposition, presets, dtypes, config validation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipdit_jax.errors import ConfigError
from skipdit_jax.models.config import ModelConfig, preset
from skipdit_jax.models import DiT, count_params, get_2d_sincos_pos_embed, init_params

from helpers import random_params, tiny_config


def _inputs(cfg, b=3, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (b, cfg.input_size, cfg.input_size, cfg.in_channels))
    t = jnp.array([0, 500, 999][:b])
    y = jnp.array([1, cfg.num_classes, 3][:b])  # includes the null label
    return x, t, y


class ShallowPassTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shallow_pass_with_fresh_deep_feature_equals_full_pass(self):
        for long_skip in (True, False):
            cfg = tiny_config(depth=8, long_skip=long_skip)
            params = random_params(cfg)
            x, t, y = _inputs(cfg)
            model = DiT(cfg)
            full = self.variant(lambda p, x, t, y: model.apply({"params": p}, x, t, y))(params, x, t, y)
            for k in (1, 3):
                fwd = self.variant(lambda p, x, t, y, k=k: model.apply({"params": p}, x, t, y, k, method=DiT.forward_full))
                out, deep = fwd(params, x, t, y)
                chex.assert_trees_all_close(out, full, atol=1e-5)
                chex.assert_shape(deep, (3, cfg.num_patches, cfg.hidden_size))
                shallow = self.variant(
                    lambda p, x, t, y, d, k=k: model.apply({"params": p}, x, t, y, d, k, method=DiT.forward_shallow)
                )(params, x, t, y, deep)
                chex.assert_trees_all_close(shallow, full, atol=1e-5)


def test_shallow_pass_depends_on_deep_feature_and_fresh_skips():
    cfg = tiny_config(depth=8)
    params = random_params(cfg)
    x, t, y = _inputs(cfg)
    model = DiT(cfg)
    _, deep = model.apply({"params": params}, x, t, y, 2, method=DiT.forward_full)
    a = model.apply({"params": params}, x, t, y, deep, 2, method=DiT.forward_shallow)
    b = model.apply({"params": params}, x, t, y, deep * 0.5, 2, method=DiT.forward_shallow)
    c = model.apply({"params": params}, x * 0.5, t, y, deep, 2, method=DiT.forward_shallow)
    assert float(jnp.abs(a - b).max()) > 1e-3  # the cached deep feature is used
    assert float(jnp.abs(a - c).max()) > 1e-3  # the shallow skips are recomputed


def test_output_shape_and_dtype():
    cfg = tiny_config(learn_sigma=True)
    out = DiT(cfg).apply({"params": random_params(cfg)}, *_inputs(cfg))
    chex.assert_shape(out, (3, 8, 8, 8))
    chex.assert_type(out, jnp.float32)


def test_official_parameter_counts():
    count = lambda name: count_params(jax.eval_shape(lambda: init_params(preset(name))))  # noqa: E731
    assert count("DiT-XL/2") == 674_834_720  # DiT paper (without the pos_embed buffer)
    assert count("Skip-DiT-XL/2") == 712_074_272  # + 14 skip modules of 2,659,968


def test_init_matches_dit():
    cfg = tiny_config(depth=4)
    p = init_params(cfg)
    for path in (("final_layer", "linear", "kernel"), ("final_layer", "adaLN_modulation", "kernel")):
        node = p
        for k in path:
            node = node[k]
        assert not np.any(np.asarray(node))  # adaLN-Zero and zero final layer
    assert not np.any(np.asarray(p["encoder_blocks"]["adaLN_modulation"]["kernel"]))
    assert np.std(np.asarray(p["y_embedder"]["embedding"])) == pytest.approx(0.02, rel=0.2)
    # Default skip init = PyTorch's Linear default, U(+-1/sqrt(2D)) for weight and bias.
    bound = 1 / np.sqrt(2 * cfg.hidden_size)
    lin = p["skip_fusions"]["linear"]
    assert np.abs(lin["kernel"]).max() <= bound and np.abs(lin["bias"]).max() <= bound
    assert np.abs(lin["bias"]).max() > bound / 4
    xav = init_params(cfg.replace(skip_init="xavier"))["skip_fusions"]["linear"]
    assert not np.any(np.asarray(xav["bias"]))
    assert np.abs(xav["kernel"]).max() > bound  # xavier's bound sqrt(6/(3D)) is wider


def test_pos_embed_layout():
    pe = get_2d_sincos_pos_embed(8, 3)  # 9 tokens, row-major
    # Token (row 0, col 1) vs (row 0, col 0): only the first half (column code) changes.
    assert not np.allclose(pe[1, :4], pe[0, :4]) and np.allclose(pe[1, 4:], pe[0, 4:])
    # [sin, cos] order: at position 0 the sin part is 0 and the cos part is 1.
    np.testing.assert_allclose(pe[0], [0, 0, 1, 1, 0, 0, 1, 1])


def test_bfloat16_compute_close_to_float32():
    cfg = tiny_config()
    params = random_params(cfg)
    x, t, y = _inputs(cfg)
    f32 = DiT(cfg).apply({"params": params}, x, t, y)
    bf16 = DiT(cfg.replace(dtype="bfloat16")).apply({"params": params}, x, t, y)
    chex.assert_type(bf16, jnp.float32)
    assert float(jnp.abs(bf16 - f32).max()) < 0.05 * float(jnp.abs(f32).max())
    assert float(jnp.abs(bf16 - f32).max()) > 0  # it really ran in bfloat16


class _ExecutionOptionCase:
    """A depth-4 model, its inputs and its reference results (value, grads, cached passes),
    computed once for every execution option compared against them."""

    def __init__(self):
        self.cfg = tiny_config(depth=4)
        self.params = random_params(self.cfg)
        self.x, self.t, self.y = _inputs(self.cfg)
        self.reference = self.results(self.cfg)

    def results(self, c):
        x, t, y, params = self.x, self.t, self.y, self.params
        loss = lambda p: jnp.mean(DiT(c).apply({"params": p}, x, t, y) ** 2)  # noqa: E731
        out, deep = DiT(c).apply({"params": params}, x, t, y, 1, method=DiT.forward_full)
        shallow = DiT(c).apply({"params": params}, x, t, y, deep * 0.9, 1, method=DiT.forward_shallow)  # partial block ranges
        return jax.value_and_grad(loss)(params), (out, deep, shallow)


@pytest.fixture(scope="module")
def execution_option_case():
    return _ExecutionOptionCase()


@pytest.mark.parametrize("change", [dict(remat_policy="nothing_saveable"), dict(remat_policy="dots_saveable"), dict(scan_unroll=0), dict(scan_unroll=2)], ids=str)
def test_execution_options_keep_values_and_grads(change, execution_option_case):
    """Rematerialisation and unrolled block loops change how, not what, is computed."""
    case = execution_option_case
    chex.assert_trees_all_close(case.reference, case.results(case.cfg.replace(**change)), atol=1e-6)


def test_unconditional_model():
    cfg = tiny_config(num_classes=0)
    params = random_params(cfg)
    assert "y_embedder" not in params
    x, t, _ = _inputs(cfg)
    chex.assert_shape(DiT(cfg).apply({"params": params}, x, t, None), (3, 8, 8, 8))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(depth=7, long_skip=True), "even"),
        (dict(input_size=10, patch_size=4), "divisible by patch_size"),
        (dict(hidden_size=30, num_heads=4), "num_heads"),
        (dict(skip_init="ones"), "skip_init"),
        (dict(dtype="float16"), "dtype"),
        (dict(scan_unroll=-1), "scan_unroll"),
    ],
)
def test_bad_model_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(**kwargs)


def test_presets():
    cfg = preset("Skip-DiT-S/4")
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.long_skip) == (12, 384, 6, 4, True)
    assert not preset("DiT-XL/2").long_skip
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("DiT-XXL/2")
    assert ModelConfig.from_json(cfg.to_json()) == cfg
