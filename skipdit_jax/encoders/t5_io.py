"""T5 v1.1 encoder weights: the Hugging Face PyTorch layout <-> our parameter tree, and loading.

`t5_from_torch` takes a transformers `T5EncoderModel` or `T5ForConditionalGeneration` state
dict, or their mT5 twins (`MT5EncoderModel`, e.g. Hunyuan-DiT's mT5-XL; same keys), with
decoder and lm_head keys ignored; it infers the sizes from the shapes (the head count
from `relative_attention_bias`) and checks every shape, with one CheckpointError line listing
what does not fit. `load_t5` reads a transformers folder (config.json + model.safetensors, a
sharded `model.safetensors.index.json`, or pytorch_model*.bin read without running code), a
Latte/PixArt pipeline folder with a `text_encoder/` subfolder, a single weight file, or an
`hf://org/repo[/subfolder]` spec. Safetensors shards are memory-mapped and converted one
stacked tensor at a time, so with a mesh XXL goes straight onto the devices' shards.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from skipdit_jax import hub, paths
from skipdit_jax.convert.torch_io import check_keys_and_shapes
from skipdit_jax.encoders.t5 import T5Config, block_shapes, param_shardings
from skipdit_jax.errors import CheckpointError, ConfigError

_ATTN = "encoder.block.{i}.layer.0.SelfAttention.{name}.weight"
_FF = "encoder.block.{i}.layer.1.DenseReluDense.{name}.weight"
# Our stacked block parameter -> (torch key template, transposed: torch Linear stores (out, in)).
_BLOCK_KEYS = {
    "attn_norm": ("encoder.block.{i}.layer.0.layer_norm.weight", False),
    "q": (_ATTN.replace("{name}", "q"), True),
    "k": (_ATTN.replace("{name}", "k"), True),
    "v": (_ATTN.replace("{name}", "v"), True),
    "o": (_ATTN.replace("{name}", "o"), True),
    "ff_norm": ("encoder.block.{i}.layer.1.layer_norm.weight", False),
    "wi_0": (_FF.replace("{name}", "wi_0"), True),
    "wi_1": (_FF.replace("{name}", "wi_1"), True),
    "wo": (_FF.replace("{name}", "wo"), True),
}
_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
_EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
_FINAL = "encoder.final_layer_norm.weight"
_IGNORED = re.compile(r"^(decoder\.|lm_head\.)")


def t5_torch_key_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """Every encoder key of the transformers layout and its shape (embedding as shared.weight)."""
    want = {"shared.weight": (cfg.vocab_size, cfg.d_model), _BIAS: (cfg.relative_attention_num_buckets, cfg.num_heads)}
    want[_FINAL] = (cfg.d_model,)
    for name, shape in block_shapes(cfg).items():
        template, transposed = _BLOCK_KEYS[name]
        for i in range(cfg.num_layers):
            want[template.format(i=i)] = tuple(reversed(shape[1:])) if transposed else shape[1:]
    return want


def _infer_config(state: dict[str, Any], overrides: dict) -> T5Config:
    embed = next((state[k] for k in _EMBED_KEYS if k in state), None)
    if embed is None:
        raise CheckpointError("not a T5 checkpoint: no shared.weight or encoder.embed_tokens.weight")
    if any(k.endswith("DenseReluDense.wi.weight") for k in state):
        raise CheckpointError(
            "an original-T5 checkpoint (ReLU feed-forward 'DenseReluDense.wi'): only T5 v1.1 (gated-GELU wi_0/wi_1) is supported"
        )
    for key in (_BIAS, _ATTN.format(i=0, name="q"), _FF.format(i=0, name="wi_0")):
        if key not in state:
            raise CheckpointError(f"not a T5 v1.1 encoder checkpoint: {key} is missing")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    if len(embed.shape) != 2 or len(state[_BIAS].shape) != 2 or len(state[_ATTN.format(i=0, name="q")].shape) != 2:
        raise CheckpointError("T5 checkpoint: shared.weight, relative_attention_bias and q must be matrices")
    buckets, heads = state[_BIAS].shape
    inner = state[_ATTN.format(i=0, name="q")].shape[0]
    if inner % heads:
        raise CheckpointError(
            f"T5 checkpoint: q has {inner} outputs, not a multiple of the {heads} heads of relative_attention_bias"
        )
    inferred = dict(
        vocab_size=int(embed.shape[0]),
        d_model=int(embed.shape[1]),
        num_heads=int(heads),
        d_kv=int(inner // heads),
        relative_attention_num_buckets=int(buckets),
        d_ff=int(state[_FF.format(i=0, name="wi_0")].shape[0]),
        num_layers=max(layers) + 1,
    )
    for k, v in overrides.items():
        if k in inferred and v != inferred[k]:
            raise CheckpointError(f"the T5 config says {k}={v} but the weights have {k}={inferred[k]}")
    try:
        return T5Config(**{**overrides, **inferred})
    except ConfigError as e:
        raise CheckpointError(f"T5 checkpoint: {e}") from None


def _convert(state: dict[str, Any], cfg: T5Config, put: Callable[[tuple[str, ...], np.ndarray], Any]) -> dict:
    """Builds each parameter (stacked over layers, cast to cfg.param_dtype) and hands it to `put`."""
    pdt = jnp.dtype(cfg.param_dtype)
    cast = lambda a: np.asarray(a).astype(pdt, copy=False)  # noqa: E731
    embed = state["shared.weight"] if "shared.weight" in state else state["encoder.embed_tokens.weight"]
    params: dict[str, Any] = {"blocks": {}}
    params["shared"] = put(("shared",), cast(embed))
    params["relative_attention_bias"] = put(("relative_attention_bias",), cast(state[_BIAS]))
    for name in block_shapes(cfg):
        template, transposed = _BLOCK_KEYS[name]
        layers = [cast(state[template.format(i=i)]) for i in range(cfg.num_layers)]
        stacked = np.stack([a.T for a in layers] if transposed else layers)
        del layers
        params["blocks"][name] = put(("blocks", name), stacked)
    params["final_norm"] = put(("final_norm",), cast(state[_FINAL]))
    return params


def t5_from_torch(
    state_dict: dict[str, Any], *, param_dtype: str = "float32", mesh=None, **config_fields
) -> tuple[T5Config, dict]:
    """A transformers T5 v1.1 state dict (numpy or torch tensors) -> (T5Config, params).

    Sizes come from the shapes; `config_fields` (e.g. from config.json: layer_norm_epsilon,
    relative_attention_max_distance, dtype) fill in the rest and must agree with the shapes.
    Decoder and lm_head keys are ignored; any other missing, unexpected or misshapen key is
    one CheckpointError. With `mesh`, each parameter is placed straight onto its sharding.
    """
    state = {
        k: (v.detach().cpu().float().numpy() if hasattr(v, "detach") else v)
        for k, v in state_dict.items()
        if not _IGNORED.match(k)
    }
    cfg = _infer_config(state, {**config_fields, "param_dtype": param_dtype})
    got = {k: tuple(v.shape) for k, v in state.items() if k != "encoder.embed_tokens.weight" or "shared.weight" not in state}
    if "shared.weight" not in got:
        got["shared.weight"] = got.pop("encoder.embed_tokens.weight")
    check_keys_and_shapes({k: _Shape(s) for k, s in got.items()}, t5_torch_key_shapes(cfg), "T5 encoder checkpoint")
    if mesh is None:
        put = lambda path, a: jnp.asarray(a)  # noqa: E731
    else:
        shardings = param_shardings(cfg, mesh)

        def put(path, a):
            s = shardings
            for p in path:
                s = s[p]
            return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])

    return cfg, _convert(state, cfg, put)


class _Shape:
    """A stand-in with only `.shape`, so shape checks never touch the (memory-mapped) data."""

    def __init__(self, shape):
        self.shape = shape


def t5_to_torch(cfg: T5Config, params: dict) -> dict[str, np.ndarray]:
    """Our parameters -> a transformers `T5EncoderModel` state dict (float32 numpy), with the
    tied embedding under both shared.weight and encoder.embed_tokens.weight."""
    f32 = lambda a: np.asarray(jnp.asarray(a, jnp.float32))  # noqa: E731
    out = {"shared.weight": f32(params["shared"])}
    out["encoder.embed_tokens.weight"] = out["shared.weight"]
    out[_BIAS] = f32(params["relative_attention_bias"])
    for name, (template, transposed) in _BLOCK_KEYS.items():
        stacked = f32(params["blocks"][name])
        for i in range(cfg.num_layers):
            out[template.format(i=i)] = np.ascontiguousarray(stacked[i].T if transposed else stacked[i])
    out[_FINAL] = f32(params["final_norm"])
    return out


# ---- reading files -------------------------------------------------------------------------
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def read_safetensors_lazily(path: paths.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as read-only memory-mapped numpy arrays (bfloat16 through
    ml_dtypes): nothing is read until used. A safetensors file holds no code."""
    import ml_dtypes

    dtypes = {**_ST_DTYPES, "BF16": ml_dtypes.bfloat16}
    path = paths.as_path(path)
    try:
        with paths.local_copy(path) as local:  # remote files: a temporary copy, kept alive by the mmap
            data = np.memmap(local, dtype=np.uint8, mode="r")
        size = int(np.frombuffer(data[:8].tobytes(), "<u8")[0])
        header = json.loads(data[8 : 8 + size].tobytes())
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in dtypes:
                raise ValueError(f"tensor {name} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            raw = data[8 + size + start : 8 + size + end]
            out[name] = raw.view(dtypes[info["dtype"]]).reshape(info["shape"])
        return out
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def _read_weights(files: list[epath.Path]) -> dict[str, Any]:
    from skipdit_jax.convert.torch_io import load_torch_checkpoint

    state: dict[str, Any] = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"T5 weight file {f} does not exist")
        state.update(read_safetensors_lazily(f) if f.name.endswith(".safetensors") else load_torch_checkpoint(f))
    return state


def _weight_files(folder: epath.Path) -> list[epath.Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).exists():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{folder / index} is not a weight index (no weight_map): {e}") from None
            return [folder / name for name in sorted(set(weight_map.values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return [folder / name]
    raise CheckpointError(
        f"no T5 weights in {folder}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _read_hf_config(path: epath.Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    fields = T5Config.from_hf_config(config)  # validates feed_forward_proj and the values
    return {
        k: getattr(fields, k)
        for k in (
            "relative_attention_max_distance",
            "layer_norm_epsilon",
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "num_layers",
            "num_heads",
        )
    }


def load_t5(
    path_or_spec: paths.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    mesh=None,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> tuple[T5Config, dict]:
    """Loads a T5 v1.1 encoder -> (T5Config, params).

    `path_or_spec`: a transformers T5 v1.1 or mT5 folder (config.json + model.safetensors /
    sharded model.safetensors.index.json / pytorch_model*.bin; Hunyuan-DiT's `mt5/` and
    `text_encoder_2/` are such folders), a pipeline folder with `text_encoder/` (Latte-1, PixArt), one weight file, or "hf://org/repo[/subfolder]" (e.g.
    "hf://maxin-cn/Latte-1/text_encoder"; HubUnavailableError when offline and not cached).
    `dtype` / `param_dtype`: compute and storage dtypes; `mesh`: load onto its shardings.
    """
    spec = str(path_or_spec) if isinstance(path_or_spec, epath.Path) else os.fspath(path_or_spec)
    if hub.is_hub_spec(spec):
        repo, sub = hub.parse_hub_spec(spec, "hf://maxin-cn/Latte-1/text_encoder")
        # Safetensors first; the .bin files only for repos without them (never both).
        weights = [["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"], ["pytorch_model*.bin*"]]
        path = hub.fetch_folder(
            repo, sub, weights, revision=revision, cache_dir=cache_dir,
            instead="a local path (download the text_encoder/ folder elsewhere)",
        )
    else:
        path = paths.as_path(spec)
        if not path.exists():
            raise CheckpointError(f"T5 checkpoint {path} does not exist")
    if path.is_dir():
        if not (path / "config.json").exists() and (path / "text_encoder" / "config.json").exists():
            path = path / "text_encoder"
        if not (path / "config.json").exists():
            raise CheckpointError(f"no config.json in T5 folder {path} (nor in a text_encoder/ subfolder)")
        fields, files = _read_hf_config(path / "config.json"), _weight_files(path)
    else:
        beside = path.parent / "config.json"
        fields, files = (_read_hf_config(beside) if beside.exists() else {}), [path]
    return t5_from_torch(_read_weights(files), param_dtype=param_dtype, mesh=mesh, dtype=dtype, **fields)
