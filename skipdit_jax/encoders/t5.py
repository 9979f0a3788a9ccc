"""The T5 v1.1 text encoder (Latte-T2V's `text_encoder`: t5-v1_1-xxl) in Flax.

One pre-norm block per layer: RMS norm -> self-attention with T5's relative position bias ->
residual; RMS norm -> gated-GELU feed-forward (tanh GELU of wi_0 times wi_1, then wo) ->
residual; a final RMS norm. No biases anywhere and no 1/sqrt(d_kv) attention scaling (T5
folds it into the initialisation). The position bias comes from the first layer's
`relative_attention_bias` table and is shared by every layer, so here it is one top-level
parameter. Padded tokens (mask 0) are masked out as attention *keys* only, as in
transformers: padded positions still get outputs, which downstream masks ignore.

Parameters are a plain pytree with the layers stacked on a leading axis (run by `lax.scan`):
  shared (vocab, d_model), relative_attention_bias (buckets, heads), final_norm (d_model),
  blocks/{attn_norm, ff_norm} (layers, d_model), blocks/{q, k, v} (layers, d_model, heads*d_kv),
  blocks/o (layers, heads*d_kv, d_model), blocks/{wi_0, wi_1} (layers, d_model, d_ff),
  blocks/wo (layers, d_ff, d_model).
`dtype` is the compute dtype of the matmuls (the residual stream, norms and softmax stay in
float32); `param_dtype` is the storage dtype (bfloat16 halves XXL's 4.7B parameters to 9.5 GB).
The Hugging Face PyTorch layout and loading live in `skipdit_jax.encoders.t5_io` (re-exported here:
`t5_from_torch`, `t5_to_torch`, `load_t5`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.config_utils import dataclass_from_hf_config
from skipdit_jax.errors import ConfigError
from skipdit_jax.models.skip import check_remat_policy, remat

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Sizes of a T5 v1.1 encoder (defaults: t5-v1_1-xxl) and how to run it."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"  # compute dtype of the matmuls
    param_dtype: str = "float32"  # storage dtype of the parameters
    remat_policy: str = "none"  # a jax.checkpoint_policies name, for training through the encoder
    scan_unroll: int = 1

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"T5 {name} must be a positive integer, got {value!r}")
        if (
            self.relative_attention_num_buckets < 4
            or self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4
        ):
            raise ConfigError(
                f"T5 relative_attention_num_buckets={self.relative_attention_num_buckets} / max_distance="
                f"{self.relative_attention_max_distance}: need at least 4 buckets and max_distance > buckets/4"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"T5 {name} must be one of {', '.join(_DTYPES)}, got {getattr(self, name)!r}")
        check_remat_policy(self.remat_policy)

    @classmethod
    def t5_v1_1_xxl(cls, **overrides) -> T5Config:
        """google/t5-v1_1-xxl, the encoder of PixArt-alpha and Latte (4.76B encoder parameters)."""
        return cls(**overrides)

    @classmethod
    def mt5_xl(cls, **overrides) -> T5Config:
        """google/mt5-xl's encoder, Hunyuan-DiT's second text encoder (its `mt5/` folder): 2048
        wide, 24 layers, 32 heads of 64, FF 5120, 250112 tokens (1.67B encoder parameters)."""
        return cls(**{**dict(vocab_size=250112, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32), **overrides})

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], **overrides) -> T5Config:
        """From a transformers T5 or mT5 `config.json` dict (model_type "t5" / "mt5": mT5 is the T5
        v1.1 architecture with a 250k vocabulary). Only T5 v1.1's gated-GELU feed-forward is
        supported (original T5's ReLU layers have other weights); umT5 (a position bias per
        layer) is not."""
        kind = config.get("model_type", "t5")
        if kind not in ("t5", "mt5"):
            raise ConfigError(f"not a T5 v1.1 / mT5 config: model_type is {kind!r}")
        ff = str(config.get("feed_forward_proj", "gated-gelu"))
        if ff not in ("gated-gelu", "gated-gelu_new", "gated-gelu_pytorch_tanh"):
            raise ConfigError(f"T5 feed_forward_proj {ff!r} is not supported: only T5 v1.1's 'gated-gelu' (t5-v1_1-*, flan-t5-*)")
        return dataclass_from_hf_config(cls, config, overrides, "T5")

    def replace(self, **changes) -> T5Config:
        return dataclasses.replace(self, **changes)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def num_params(self) -> int:
        d, inner, ff = self.d_model, self.inner_dim, self.d_ff
        per_layer = 4 * d * inner + 3 * d * ff + 2 * d
        return self.vocab_size * d + self.relative_attention_num_buckets * self.num_heads + d + self.num_layers * per_layer

    def hf_config(self) -> dict[str, Any]:
        """The transformers `config.json` fields of this encoder."""
        return {
            "model_type": "t5",
            "architectures": ["T5EncoderModel"],
            "feed_forward_proj": "gated-gelu",
            "is_encoder_decoder": False,
            "tie_word_embeddings": False,
            "dropout_rate": 0.0,
            **{
                k: getattr(self, k)
                for k in (
                    "vocab_size",
                    "d_model",
                    "d_kv",
                    "d_ff",
                    "num_layers",
                    "num_heads",
                    "relative_attention_num_buckets",
                    "relative_attention_max_distance",
                    "layer_norm_epsilon",
                )
            },
        }


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) bidirectional bucket ids of (key - query) positions, as T5's encoder:
    half the buckets per direction; in each half, exact buckets below num_buckets/4 and
    log-spaced ones up to max_distance. Computed in float32 like the reference so the
    boundaries round identically."""
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    out = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    # max(dist, 1): log(0) on the exact buckets would be -inf (discarded by the where anyway).
    scaled = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact)) / np.float32(np.log(max_distance / max_exact))
    large = max_exact + (scaled * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (out + np.where(dist < max_exact, dist, large)).astype(np.int32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """T5's norm: scale by the root mean square (variance in float32), no mean, no bias."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return x32 * jax.lax.rsqrt(var + eps) * weight.astype(jnp.float32)


def _block(cfg: T5Config, p: dict, h: jax.Array, bias: jax.Array) -> jax.Array:
    """One encoder layer on the float32 residual stream h (B, L, D); `bias` (B|1, H, L, L)
    float32 holds the position bias plus the key mask."""
    dt = jnp.dtype(cfg.dtype)
    b, length, _ = h.shape
    x = rms_norm(h, p["attn_norm"], cfg.layer_norm_epsilon).astype(dt)
    heads = lambda w: (x @ w.astype(dt)).reshape(b, length, cfg.num_heads, cfg.d_kv)  # noqa: E731
    q, k, v = heads(p["q"]), heads(p["k"]), heads(p["v"])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
    weights = jax.nn.softmax(scores, axis=-1).astype(dt)
    attn = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, cfg.inner_dim)
    h = h + (attn @ p["o"].astype(dt)).astype(jnp.float32)
    x = rms_norm(h, p["ff_norm"], cfg.layer_norm_epsilon).astype(dt)
    gated = jax.nn.gelu(x @ p["wi_0"].astype(dt), approximate=True) * (x @ p["wi_1"].astype(dt))
    return h + (gated @ p["wo"].astype(dt)).astype(jnp.float32)


def block_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """Shapes of the stacked per-layer parameters (layers first, inputs before outputs)."""
    n, d, inner, ff = cfg.num_layers, cfg.d_model, cfg.inner_dim, cfg.d_ff
    return {
        "attn_norm": (n, d),
        "q": (n, d, inner),
        "k": (n, d, inner),
        "v": (n, d, inner),
        "o": (n, inner, d),
        "ff_norm": (n, d),
        "wi_0": (n, d, ff),
        "wi_1": (n, d, ff),
        "wo": (n, ff, d),
    }


def _stacked_normal(std: float):
    return lambda key, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class T5Encoder(nn.Module):
    """`apply({"params": p}, ids (B, L) int, mask (B, L) int) -> (B, L, d_model) float32`."""

    config: T5Config

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        d, inner, ff = cfg.d_model, cfg.inner_dim, cfg.d_ff
        # T5's own initialisation (transformers' _init_weights with factor 1): the attention
        # scale lives in q's std, which is why the scores are not scaled.
        shared = self.param("shared", _stacked_normal(1.0), (cfg.vocab_size, d), pdt)
        table = self.param(
            "relative_attention_bias", _stacked_normal(d**-0.5), (cfg.relative_attention_num_buckets, cfg.num_heads), pdt
        )
        ones = lambda key, shape, dtype: jnp.ones(shape, dtype)  # noqa: E731
        stds = {
            "q": (d * cfg.d_kv) ** -0.5,
            "k": d**-0.5,
            "v": d**-0.5,
            "o": inner**-0.5,
            "wi_0": d**-0.5,
            "wi_1": d**-0.5,
            "wo": ff**-0.5,
        }

        def init_blocks(key):
            shapes = block_shapes(cfg)
            out = {name: jnp.ones(shapes[name], pdt) for name in ("attn_norm", "ff_norm")}
            for k, name in zip(jax.random.split(key, len(stds)), stds, strict=True):
                out[name] = _stacked_normal(stds[name])(k, shapes[name], pdt)
            return out

        blocks = self.param("blocks", init_blocks)
        final_norm = self.param("final_norm", ones, (d,), pdt)
        return encode(
            cfg, {"shared": shared, "relative_attention_bias": table, "blocks": blocks, "final_norm": final_norm}, ids, mask
        )


def encode(cfg: T5Config, params: dict, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """The encoder as a function of the nested parameter tree (see the module docstring)."""
    b, length = ids.shape
    h = jnp.take(params["shared"], ids.astype(jnp.int32), axis=0).astype(jnp.float32)
    buckets = relative_position_buckets(length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
    bias = jnp.take(params["relative_attention_bias"].astype(jnp.float32), jnp.asarray(buckets), axis=0)  # (L, L, H)
    bias = bias.transpose(2, 0, 1)[None]
    if mask is not None:
        # transformers adds float32's minimum to masked keys (not -inf: a row of only
        # masked keys stays finite and uniform instead of NaN).
        bias = bias + jnp.where(mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    block = remat(lambda p, h: _block(cfg, p, h, bias), cfg.remat_policy)
    unroll = True if cfg.scan_unroll == 0 else cfg.scan_unroll
    h, _ = jax.lax.scan(lambda h, p: (block(p, h), None), h, params["blocks"], unroll=unroll)
    return rms_norm(h, params["final_norm"], cfg.layer_norm_epsilon)


# ---- parameters on a mesh ----------------------------------------------------------------------
# `skipdit_jax.sharding` rules: every matrix's d_model ("embed") dimension is sharded over the
# mesh's 'fsdp' axis (XXL: 4096 divides by any power of two), the rest replicated.
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"shared", ("vocab", "embed")),
    (r"blocks/(q|k|v|wi_0|wi_1)", ("layers", "embed", "hidden")),
    (r"blocks/(o|wo)", ("layers", "hidden", "embed")),
    (r"blocks/(attn_norm|ff_norm)", ("layers", None)),
]


def param_shapes(cfg: T5Config) -> dict:
    """The parameter tree as `jax.ShapeDtypeStruct`s (nothing is allocated)."""
    ids = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(lambda k: T5Encoder(cfg).init(k, ids, ids)["params"], jax.random.key(0))


def param_shardings(cfg: T5Config, mesh, *, min_shard_size: int = 2**14):
    """NamedSharding tree of the parameters on `mesh` (by `PARAM_AXES`)."""
    from skipdit_jax import sharding

    return sharding.param_shardings(param_shapes(cfg), mesh, param_axes=PARAM_AXES, min_shard_size=min_shard_size)


def init_params(cfg: T5Config, rng: jax.Array, mesh=None, *, min_shard_size: int = 2**14) -> dict:
    """Randomly initialised parameters; with a mesh, each device creates only its shards."""
    ids = jnp.zeros((1, 8), jnp.int32)
    init = lambda k: T5Encoder(cfg).init(k, ids, ids)["params"]  # noqa: E731
    if mesh is None:
        return jax.jit(init)(rng)
    return jax.jit(init, out_shardings=param_shardings(cfg, mesh, min_shard_size=min_shard_size))(rng)


def place_params(host_params: dict, cfg: T5Config, mesh=None, *, min_shard_size: int = 2**14) -> dict:
    """Host (numpy) parameters -> device arrays in `cfg.param_dtype`; with a mesh, each
    device receives only its own slice of every array (`jax.make_array_from_callback`), so a
    model larger than one device's memory loads straight onto the mesh."""
    pdt = jnp.dtype(cfg.param_dtype)
    if mesh is None:
        return jax.tree.map(lambda a: jnp.asarray(np.asarray(a), pdt), host_params)
    shardings = param_shardings(cfg, mesh, min_shard_size=min_shard_size)

    def put(a, s):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, s, lambda idx: np.asarray(a[idx], pdt))

    return jax.tree.map(put, host_params, shardings)


def __getattr__(name):  # the converter and loader live in t5_io (they need this module first)
    if name in ("t5_from_torch", "t5_to_torch", "load_t5", "t5_torch_key_shapes"):
        from skipdit_jax.encoders import t5_io

        return getattr(t5_io, name)
    raise AttributeError(name)
