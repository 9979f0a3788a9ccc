"""Conversion between the official PyTorch (Skip-)DiT checkpoints and our parameters.

PyTorch layouts exist only here: Linear weights (out, in) become Dense kernels (in, out),
the OIHW patch conv becomes an HWIO kernel, and per-block tensors `blocks.N.*` are stacked
into `encoder_blocks` / `decoder_blocks` (and `skip_*.j` into `skip_fusions`).
Files are read by `skipdit_jax.convert.torch_io` (safely: no code runs).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from skipdit_jax.convert.torch_io import check_keys_and_shapes
from skipdit_jax.errors import CheckpointError
from skipdit_jax.models.config import ModelConfig
from skipdit_jax.models.config import preset as model_preset
from skipdit_jax.models.layers import get_2d_sincos_pos_embed

# Per-block Linear layers: (torch name, flax path inside a block).
_BLOCK_LINEARS = {
    "attn.qkv": ("attn", "qkv"),
    "attn.proj": ("attn", "proj"),
    "mlp.fc1": ("mlp", "fc1"),
    "mlp.fc2": ("mlp", "fc2"),
    "adaLN_modulation.1": ("adaLN_modulation",),
}
_TOP_LINEARS = {
    "t_embedder.mlp.0": ("t_embedder_mlp_0",),
    "t_embedder.mlp.2": ("t_embedder_mlp_2",),
    "final_layer.linear": ("final_layer", "linear"),
    "final_layer.adaLN_modulation.1": ("final_layer", "adaLN_modulation"),
}


# ---- architecture inference ------------------------------------------------------------------
def _count(state: dict, prefix: str, suffix: str) -> int:
    n = 0
    while f"{prefix}{n}{suffix}" in state:
        n += 1
    return n


def infer_config(state: dict[str, np.ndarray], num_heads: int | None = None, preset: str | None = None) -> ModelConfig:
    """Architecture from key names and shapes; num_heads from the argument or the preset."""
    for key in ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight"):
        if key not in state:
            raise CheckpointError(f"not a DiT checkpoint: missing key {key!r}")
    if "temp_embed" in state:  # the video family's temporal embedding: a Latte checkpoint
        raise CheckpointError("this is a Latte (video) checkpoint, not a DiT one: use latte_from_torch or --family latte")
    d, in_ch, p, _ = state["x_embedder.proj.weight"].shape
    depth = _count(state, "blocks.", ".attn.qkv.weight")
    n_tokens = state["pos_embed"].shape[1]
    grid = math.isqrt(n_tokens)
    if grid * grid != n_tokens:
        raise CheckpointError(f"pos_embed has {n_tokens} tokens, not a square grid")
    out_ch = state["final_layer.linear.weight"].shape[0] // (p * p)
    num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1 if "y_embedder.embedding_table.weight" in state else 0
    mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state else 4 * d
    kw = dict(
        input_size=grid * p,
        patch_size=p,
        in_channels=in_ch,
        hidden_size=d,
        depth=depth,
        mlp_ratio=mlp_hidden / d,
        num_classes=num_classes,
        learn_sigma=out_ch == 2 * in_ch,
        long_skip="skip_linears.0.linear.weight" in state,
    )
    if preset is not None:
        ref = model_preset(preset)
        for name in ("depth", "hidden_size", "patch_size"):
            if getattr(ref, name) != kw[name]:
                raise CheckpointError(
                    f"checkpoint does not match preset {preset}: {name} is {kw[name]} in the file, {getattr(ref, name)} in the preset"
                )
        heads = ref.num_heads if num_heads is None else num_heads
    elif num_heads is not None:
        heads = num_heads
    else:
        raise CheckpointError("the number of attention heads cannot be read from the weights: pass num_heads or a preset")
    if d % heads:
        raise CheckpointError(f"hidden size {d} is not divisible by num_heads {heads}")
    return ModelConfig(num_heads=int(heads), **kw)


def expected_shapes(config: ModelConfig, num_skips: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every key of the official state dict of `config`, with its PyTorch shape. Latte's
    layout is this one plus `temp_embed`, with one skip module per encoder *pair*
    (`num_skips`; default one per encoder block)."""
    d, p = config.hidden_size, config.patch_size
    h = int(d * config.mlp_ratio)
    shapes = {
        "x_embedder.proj.weight": (d, config.in_channels, p, p),
        "x_embedder.proj.bias": (d,),
        "pos_embed": (1, config.num_patches, d),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "final_layer.linear.weight": (p * p * config.out_channels, d),
        "final_layer.linear.bias": (p * p * config.out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    if config.num_classes:
        shapes["y_embedder.embedding_table.weight"] = (config.num_classes + 1, d)
    block = {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (h, d), "mlp.fc2": (d, h), "adaLN_modulation.1": (6 * d, d)}
    for i in range(config.depth):
        for name, (o, n_in) in block.items():
            shapes[f"blocks.{i}.{name}.weight"] = (o, n_in)
            shapes[f"blocks.{i}.{name}.bias"] = (o,)
    if config.long_skip:
        for j in range(config.num_encoder_blocks if num_skips is None else num_skips):
            shapes[f"skip_norms.{j}.weight"] = (2 * d,)
            shapes[f"skip_norms.{j}.bias"] = (2 * d,)
            shapes[f"skip_linears.{j}.linear.weight"] = (d, 2 * d)
            shapes[f"skip_linears.{j}.linear.bias"] = (d,)
    return shapes


def validate_state_dict(state: dict[str, np.ndarray], config: ModelConfig) -> None:
    check_keys_and_shapes(state, expected_shapes(config), "checkpoint")
    ref = get_2d_sincos_pos_embed(config.hidden_size, config.grid_size)
    err = float(np.abs(state["pos_embed"][0] - ref).max())
    if err > 1e-4:
        raise CheckpointError(f"pos_embed is not the standard 2-D sin-cos table (max deviation {err:.3g})")


# ---- torch -> flax ---------------------------------------------------------------------------
def _dense(state, name):
    return {"kernel": state[f"{name}.weight"].T, "bias": state[f"{name}.bias"]}


def _stack(trees: list) -> Any:
    import jax

    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def _block(state, i):
    tree: dict = {}
    for torch_name, path in _BLOCK_LINEARS.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _dense(state, f"blocks.{i}.{torch_name}")
    return tree


def dit_from_torch(state_dict: dict[str, np.ndarray], num_heads: int | None = None, preset: str | None = None):
    """(model_config, params) of an official (Skip-)DiT state dict (numpy arrays).

    The architecture is inferred from the keys and shapes; num_heads comes from the
    argument or a preset name ("DiT-XL/2"). Every shape is validated.
    """
    state = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    config = infer_config(state, num_heads, preset)
    validate_state_dict(state, config)
    params: dict[str, Any] = {
        "x_embedder": {"kernel": state["x_embedder.proj.weight"].transpose(2, 3, 1, 0), "bias": state["x_embedder.proj.bias"]},
        "final_layer": {},
    }
    for torch_name, path in _TOP_LINEARS.items():
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _dense(state, torch_name)
    if config.num_classes:
        params["y_embedder"] = {"embedding": state["y_embedder.embedding_table.weight"]}
    half = config.num_encoder_blocks
    params["encoder_blocks"] = _stack([_block(state, i) for i in range(half)])
    params["decoder_blocks"] = _stack([_block(state, i) for i in range(half, config.depth)])
    if config.long_skip:
        params["skip_fusions"] = _stack(
            [
                {
                    "norm": {"scale": state[f"skip_norms.{j}.weight"], "bias": state[f"skip_norms.{j}.bias"]},
                    "linear": _dense(state, f"skip_linears.{j}.linear"),
                }
                for j in range(half)
            ]
        )
    return config, params


# ---- flax -> torch ---------------------------------------------------------------------------
def dit_to_torch(config: ModelConfig, params) -> dict[str, np.ndarray]:
    """The official PyTorch state dict (numpy arrays) of our parameters: loads with
    `load_state_dict` into the official DiT / DiT_skip of the same size."""
    import jax

    p = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    out = {
        "x_embedder.proj.weight": p["x_embedder"]["kernel"].transpose(3, 2, 0, 1),
        "x_embedder.proj.bias": p["x_embedder"]["bias"],
        "pos_embed": get_2d_sincos_pos_embed(config.hidden_size, config.grid_size)[None].astype(np.float32),
    }

    def put(name, dense):
        out[f"{name}.weight"] = np.ascontiguousarray(dense["kernel"].T)
        out[f"{name}.bias"] = dense["bias"]

    for torch_name, path in _TOP_LINEARS.items():
        node = p
        for part in path:
            node = node[part]
        put(torch_name, node)
    if config.num_classes:
        out["y_embedder.embedding_table.weight"] = p["y_embedder"]["embedding"]
    half = config.num_encoder_blocks
    for i in range(config.depth):
        stack, idx = (p["encoder_blocks"], i) if i < half else (p["decoder_blocks"], i - half)
        for torch_name, path in _BLOCK_LINEARS.items():
            node = stack
            for part in path:
                node = node[part]
            put(f"blocks.{i}.{torch_name}", jax.tree.map(lambda a: a[idx], node))
    if config.long_skip:
        sf = p["skip_fusions"]
        for j in range(half):
            out[f"skip_norms.{j}.weight"] = sf["norm"]["scale"][j]
            out[f"skip_norms.{j}.bias"] = sf["norm"]["bias"][j]
            put(f"skip_linears.{j}.linear", jax.tree.map(lambda a: a[j], sf["linear"]))
    return {k: np.ascontiguousarray(v) for k, v in out.items()}

