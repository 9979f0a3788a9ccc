"""A BERT text encoder in Flax: Hunyuan-DiT's first text encoder (its `clip_text_encoder`, a
CLIP-trained Chinese BERT loaded as a transformers `BertModel`).

Hunyuan-DiT tokenizes to 77 tokens (padding="max_length", truncation), runs the model with the
attention mask and feeds the *last hidden state* (B, 77, 1024) plus that mask to the DiT; the
pooler is unused, so it is not modelled here.

The network, as transformers' BertModel: embeddings = word[ids] + position[0..L) +
token_type[token_type_ids, default 0], then LayerNorm; then per layer (post-LN, every Linear
with a bias): h = LN(h + O(attention(h))), h = LN(h + W2 gelu(W1 h)), with the scores scaled by
1/sqrt(head_dim). Padded tokens (mask 0) are masked out as attention *keys* only (float32's
minimum added to their scores, as transformers), so padded positions still get outputs, which
downstream masks ignore.

Parameters are a plain pytree, layers stacked on a leading axis (run by `lax.scan`):
  word_embeddings (vocab, D), position_embeddings (max_position, D), token_type_embeddings
  (type_vocab, D), embed_norm_scale / embed_norm_bias (D,),
  blocks/{q, k, v, o} (layers, D, D), blocks/ff_in (layers, D, F), blocks/ff_out (layers, F, D),
  blocks/<name>_bias for each of those, blocks/{attn_norm, ff_norm}_{scale, bias} (layers, D).
`dtype` is the compute dtype of the matmuls (residual stream, LayerNorms and softmax stay
float32); `param_dtype` the storage dtype. The transformers PyTorch layout and loading are at the
end: `bert_from_torch`, `bert_to_torch`, `load_bert`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from skipdit_jax import hub, paths
from skipdit_jax.config_utils import dataclass_from_hf_config
from skipdit_jax.convert.torch_io import check_keys_and_shapes
from skipdit_jax.errors import CheckpointError, ConfigError, UserError
from skipdit_jax.models.skip import check_remat_policy, remat

_DTYPES = ("float32", "bfloat16", "float16")
# transformers' ACT2FN names -> whether the GELU is the tanh approximation.
_GELUS = {"gelu": False, "gelu_python": False, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True}
PIPELINE_SUBFOLDER = "clip_text_encoder"  # Hunyuan-DiT's t2i/ folder name for this encoder
DIFFUSERS_SUBFOLDER = "text_encoder"  # its name in the diffusers HunyuanDiTPipeline layout


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Sizes of a BERT encoder (defaults: Hunyuan-DiT's clip_text_encoder) and how to run it."""

    vocab_size: int = 47020
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"  # exact (erf) GELU; the tanh variants are also accepted
    dtype: str = "float32"  # compute dtype of the matmuls
    param_dtype: str = "float32"  # storage dtype of the parameters
    remat_policy: str = "none"
    scan_unroll: int = 1

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"BERT {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"BERT hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in _GELUS:
            raise ConfigError(f"BERT hidden_act {self.hidden_act!r} is not supported: use one of {', '.join(_GELUS)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"BERT {name} must be one of {', '.join(_DTYPES)}, got {getattr(self, name)!r}")
        check_remat_policy(self.remat_policy)

    @classmethod
    def hunyuan_clip(cls, **overrides) -> BertConfig:
        """Hunyuan-DiT's clip_text_encoder: 1024 wide, 24 layers, 16 heads, FF 4096, 47020 tokens,
        512 positions, 2 token types, exact GELU, layer_norm_eps 1e-12 -- the values of its
        config.json (a BertModel fine-tuned from hfl/chinese-roberta-wwm-ext-large; the same
        file ships as ComfyUI's comfy/text_encoders/hydit_clip.json)."""
        return cls(**overrides)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], **overrides) -> BertConfig:
        """From a transformers BERT `config.json` dict (only absolute position embeddings)."""
        if config.get("model_type", "bert") != "bert":
            raise ConfigError(f"not a BERT config: model_type is {config.get('model_type')!r}")
        kind = config.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ConfigError(f"BERT position_embedding_type {kind!r} is not supported: only 'absolute'")
        return dataclass_from_hf_config(cls, config, overrides, "BERT")

    def replace(self, **changes) -> BertConfig:
        return dataclasses.replace(self, **changes)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def block_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the stacked per-layer parameters (layers first, inputs before outputs)."""
    n, d, f = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    shapes = {name: (n, d, d) for name in ("q", "k", "v", "o")}
    shapes.update(ff_in=(n, d, f), ff_out=(n, f, d))
    shapes.update({f"{name}_bias": (n, s[-1]) for name, s in list(shapes.items())})
    for norm in ("attn_norm", "ff_norm"):
        shapes.update({f"{norm}_scale": (n, d), f"{norm}_bias": (n, d)})
    return shapes


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def _block(cfg: BertConfig, p: dict, h: jax.Array, bias: jax.Array) -> jax.Array:
    """One post-LN layer on the float32 stream h (B, L, D); `bias` (B, 1, 1, L) masks keys."""
    dt = jnp.dtype(cfg.dtype)
    b, length, d = h.shape
    x = h.astype(dt)
    dense = lambda x, name: (x @ p[name].astype(dt)).astype(jnp.float32) + p[f"{name}_bias"].astype(jnp.float32)  # noqa: E731
    heads = lambda name: dense(x, name).astype(dt).reshape(b, length, cfg.num_attention_heads, cfg.head_dim)  # noqa: E731
    q, k, v = heads("q"), heads("k"), heads("v")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * cfg.head_dim**-0.5 + bias
    weights = jax.nn.softmax(scores, axis=-1).astype(dt)
    attn = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, d)
    h = _layer_norm(h + dense(attn, "o"), p["attn_norm_scale"], p["attn_norm_bias"], cfg.layer_norm_eps)
    mid = jax.nn.gelu(dense(h.astype(dt), "ff_in"), approximate=_GELUS[cfg.hidden_act]).astype(dt)
    return _layer_norm(h + dense(mid, "ff_out"), p["ff_norm_scale"], p["ff_norm_bias"], cfg.layer_norm_eps)


class BertEncoder(nn.Module):
    """`apply({"params": p}, ids (B, L) int, mask (B, L) int | None, token_type_ids=None)
    -> last hidden state (B, L, hidden_size) float32`; L must be <= max_position_embeddings."""

    config: BertConfig

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array | None = None, token_type_ids: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        d = cfg.hidden_size
        # BERT's initialisation: N(0, 0.02) matrices and embeddings, LayerNorms (1, 0), zero biases.
        normal = lambda key, shape, dtype: (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)  # noqa: E731
        ones = lambda key, shape, dtype: jnp.ones(shape, dtype)  # noqa: E731
        zeros = lambda key, shape, dtype: jnp.zeros(shape, dtype)  # noqa: E731
        params = {
            "word_embeddings": self.param("word_embeddings", normal, (cfg.vocab_size, d), pdt),
            "position_embeddings": self.param("position_embeddings", normal, (cfg.max_position_embeddings, d), pdt),
            "token_type_embeddings": self.param("token_type_embeddings", normal, (cfg.type_vocab_size, d), pdt),
            "embed_norm_scale": self.param("embed_norm_scale", ones, (d,), pdt),
            "embed_norm_bias": self.param("embed_norm_bias", zeros, (d,), pdt),
        }

        def init_blocks(key):
            shapes = block_shapes(cfg)
            keys = dict(zip(shapes, jax.random.split(key, len(shapes)), strict=True))
            return {
                name: (ones if name.endswith("_scale") else zeros if name.endswith("_bias") else normal)(keys[name], s, pdt)
                for name, s in shapes.items()
            }

        params["blocks"] = self.param("blocks", init_blocks)
        return encode(cfg, params, ids, mask, token_type_ids)


def encode(cfg: BertConfig, params: dict, ids: jax.Array, mask=None, token_type_ids=None) -> jax.Array:
    """The encoder as a function of the parameter tree (see the module docstring)."""
    b, length = ids.shape
    if length > cfg.max_position_embeddings:
        raise UserError(f"BERT input has {length} tokens but the model has only {cfg.max_position_embeddings} positions")
    f32 = lambda name: params[name].astype(jnp.float32)  # noqa: E731
    types = jnp.zeros_like(ids, jnp.int32) if token_type_ids is None else token_type_ids.astype(jnp.int32)
    h = jnp.take(f32("word_embeddings"), ids.astype(jnp.int32), axis=0) + f32("position_embeddings")[:length][None]
    h = _layer_norm(h + jnp.take(f32("token_type_embeddings"), types, axis=0), params["embed_norm_scale"],
                    params["embed_norm_bias"], cfg.layer_norm_eps)
    if mask is None:
        bias = jnp.zeros((1, 1, 1, length), jnp.float32)
    else:  # float32's minimum (not -inf): a row of only masked keys stays finite, as transformers
        bias = jnp.where(mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    block = remat(lambda p, h: _block(cfg, p, h, bias), cfg.remat_policy)
    unroll = True if cfg.scan_unroll == 0 else cfg.scan_unroll
    h, _ = jax.lax.scan(lambda h, p: (block(p, h), None), h, params["blocks"], unroll=unroll)
    return h


# ---- the transformers PyTorch layout -------------------------------------------------------------
_L = "encoder.layer.{i}."
# Our stacked block parameter -> (torch key template, transposed: torch Linear stores (out, in)).
_BLOCK_KEYS: dict[str, tuple[str, bool]] = {}
for _ours, _theirs in (("q", "attention.self.query"), ("k", "attention.self.key"), ("v", "attention.self.value"),
                       ("o", "attention.output.dense"), ("ff_in", "intermediate.dense"), ("ff_out", "output.dense")):
    _BLOCK_KEYS[_ours] = (_L + _theirs + ".weight", True)
    _BLOCK_KEYS[f"{_ours}_bias"] = (_L + _theirs + ".bias", False)
for _ours, _theirs in (("attn_norm", "attention.output.LayerNorm"), ("ff_norm", "output.LayerNorm")):
    _BLOCK_KEYS[f"{_ours}_scale"] = (_L + _theirs + ".weight", False)
    _BLOCK_KEYS[f"{_ours}_bias"] = (_L + _theirs + ".bias", False)
_TOP_KEYS = {
    "word_embeddings": "embeddings.word_embeddings.weight",
    "position_embeddings": "embeddings.position_embeddings.weight",
    "token_type_embeddings": "embeddings.token_type_embeddings.weight",
    "embed_norm_scale": "embeddings.LayerNorm.weight",
    "embed_norm_bias": "embeddings.LayerNorm.bias",
}
# Unused by the last hidden state: pooler, pre-training heads, position/type id buffers.
_IGNORED = re.compile(r"^(pooler\.|cls\.|embeddings\.(position_ids|token_type_ids)$)")


def bert_torch_key_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a transformers BertModel state dict (pooler excluded) and its shape."""
    d = cfg.hidden_size
    top = {"word_embeddings": (cfg.vocab_size, d), "position_embeddings": (cfg.max_position_embeddings, d),
           "token_type_embeddings": (cfg.type_vocab_size, d), "embed_norm_scale": (d,), "embed_norm_bias": (d,)}
    want = {_TOP_KEYS[k]: s for k, s in top.items()}
    for name, shape in block_shapes(cfg).items():
        template, transposed = _BLOCK_KEYS[name]
        for i in range(cfg.num_hidden_layers):
            want[template.format(i=i)] = tuple(reversed(shape[1:])) if transposed else shape[1:]
    return want


def _infer_config(state: dict[str, Any], fields: dict) -> BertConfig:
    for key in (*_TOP_KEYS.values(), _BLOCK_KEYS["ff_in"][0].format(i=0)):
        if key not in state:
            raise CheckpointError(f"not a BERT checkpoint: {key} is missing")
        if len(state[key].shape) != (1 if "LayerNorm" in key else 2):
            raise CheckpointError(f"BERT checkpoint: {key} has shape {tuple(state[key].shape)}")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    vocab, d = state[_TOP_KEYS["word_embeddings"]].shape
    inferred = dict(
        vocab_size=int(vocab), hidden_size=int(d), num_hidden_layers=max(layers) + 1,
        max_position_embeddings=int(state[_TOP_KEYS["position_embeddings"]].shape[0]),
        type_vocab_size=int(state[_TOP_KEYS["token_type_embeddings"]].shape[0]),
        intermediate_size=int(state[_BLOCK_KEYS["ff_in"][0].format(i=0)].shape[0]),
    )
    for k, v in fields.items():
        if k in inferred and v != inferred[k]:
            raise CheckpointError(f"the BERT config says {k}={v} but the weights have {k}={inferred[k]}")
    try:  # the head count is not visible in the shapes: config.json's (default 16, Hunyuan's)
        return BertConfig(**{**fields, **inferred})
    except ConfigError as e:
        raise CheckpointError(f"BERT checkpoint: {e}") from None


def bert_from_torch(state_dict: dict[str, Any], *, param_dtype: str = "float32", **config_fields) -> tuple[BertConfig, dict]:
    """A transformers BertModel (or BertFor* with a `bert.` prefix) state dict, numpy or torch
    tensors -> (BertConfig, params). Sizes come from the shapes; `config_fields` (from config.json:
    num_attention_heads, layer_norm_eps, hidden_act, dtype, ...) fill in the rest and must agree
    with the shapes. Pooler, `cls.` heads and id buffers are ignored; any other missing,
    unexpected or misshapen key is one CheckpointError."""
    state = {}
    for k, v in state_dict.items():
        k = k.removeprefix("bert.")
        if not _IGNORED.match(k):
            state[k] = v.detach().cpu().float().numpy() if hasattr(v, "detach") else v
    cfg = _infer_config(state, {**config_fields, "param_dtype": param_dtype})
    check_keys_and_shapes(state, bert_torch_key_shapes(cfg), "BERT encoder checkpoint")
    pdt = jnp.dtype(cfg.param_dtype)
    cast = lambda a: jnp.asarray(np.asarray(a).astype(pdt, copy=False))  # noqa: E731
    params: dict[str, Any] = {name: cast(state[key]) for name, key in _TOP_KEYS.items()}
    params["blocks"] = {}
    for name, (template, transposed) in _BLOCK_KEYS.items():
        layers = [np.asarray(state[template.format(i=i)]) for i in range(cfg.num_hidden_layers)]
        params["blocks"][name] = cast(np.stack([a.T for a in layers] if transposed else layers))
    return cfg, params


def bert_to_torch(cfg: BertConfig, params: dict) -> dict[str, np.ndarray]:
    """Our parameters -> a transformers BertModel state dict (float32 numpy, no pooler: load it
    with strict=False or add the pooler's own weights)."""
    f32 = lambda a: np.asarray(jnp.asarray(a, jnp.float32))  # noqa: E731
    out = {key: f32(params[name]) for name, key in _TOP_KEYS.items()}
    for name, (template, transposed) in _BLOCK_KEYS.items():
        stacked = f32(params["blocks"][name])
        for i in range(cfg.num_hidden_layers):
            out[template.format(i=i)] = np.ascontiguousarray(stacked[i].T if transposed else stacked[i])
    return out


# ---- loading ---------------------------------------------------------------------------------------
def _weights(folder: epath.Path) -> dict[str, Any]:
    from skipdit_jax.convert.torch_io import load_torch_checkpoint
    from skipdit_jax.encoders.t5_io import read_safetensors_lazily

    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).exists():
            try:
                names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{folder / index} is not a weight index (no weight_map): {e}") from None
            break
    else:
        names = [n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).exists()][:1]
    if not names:
        raise CheckpointError(f"no BERT weights in {folder}: expected model.safetensors, an index or pytorch_model.bin")
    state: dict[str, Any] = {}
    for name in names:  # safetensors memory-mapped; .bin read without running code
        f = folder / name
        if not f.exists():
            raise CheckpointError(f"BERT weight file {f} does not exist")
        state.update(read_safetensors_lazily(f) if name.endswith(".safetensors") else load_torch_checkpoint(f))
    return state


def load_bert(path_or_spec: paths.PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
              revision: str | None = None, cache_dir: str | None = None) -> tuple[BertConfig, dict]:
    """Loads a BERT encoder -> (BertConfig, params).

    `path_or_spec`: a transformers folder (config.json + model.safetensors / a sharded index /
    pytorch_model.bin), a Hunyuan-DiT folder holding `clip_text_encoder/` (its `t2i/` folder or
    the one above), a diffusers HunyuanDiTPipeline folder (the BERT is its `text_encoder/`),
    or "hf://org/repo[/subfolder]" (e.g. "hf://Tencent-Hunyuan/HunyuanDiT/t2i/clip_text_encoder";
    HubUnavailableError when offline and not cached). `dtype` / `param_dtype`: compute and
    storage dtypes.
    """
    spec = str(path_or_spec) if isinstance(path_or_spec, epath.Path) else os.fspath(path_or_spec)
    if hub.is_hub_spec(spec):
        repo, sub = hub.parse_hub_spec(spec, "hf://Tencent-Hunyuan/HunyuanDiT/t2i/clip_text_encoder")
        weights = [["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"], ["pytorch_model*.bin*"]]
        path = hub.fetch_folder(repo, sub, weights, revision=revision, cache_dir=cache_dir,
                                instead="a local path (download the clip_text_encoder/ folder elsewhere)")
    else:
        path = paths.as_path(spec)
        if not path.is_dir():
            raise CheckpointError(f"BERT checkpoint folder {path} does not exist")
    for candidate in (path, path / PIPELINE_SUBFOLDER, path / "t2i" / PIPELINE_SUBFOLDER, path / DIFFUSERS_SUBFOLDER):
        if (candidate / "config.json").exists():
            path = candidate
            break
    else:
        raise CheckpointError(f"no config.json in BERT folder {path} (nor in a {PIPELINE_SUBFOLDER}/ subfolder)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path / 'config.json'} does not hold a JSON object")
    cfg = BertConfig.from_hf_config(config)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)} | {"dtype": dtype}
    fields.pop("param_dtype")
    return bert_from_torch(_weights(path), param_dtype=param_dtype, **fields)
