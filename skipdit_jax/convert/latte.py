"""Conversion between the official PyTorch Latte / Latte-skip checkpoints and our parameters.

The official layout (`class-to-video/models/latte.py`; the vanilla releases of the Latte
project have the same keys minus `skip_*`): `x_embedder.proj` (patch conv), `pos_embed`
(1, T, D) and `temp_embed` (1, F, D) (frozen sin-cos tables, stored), `t_embedder.mlp.{0,2}`,
`y_embedder.embedding_table` (num_classes + 1 rows; absent for unconditional models),
`blocks.{0..depth-1}` (even = spatial, odd = temporal), `final_layer.*`, and for Latte-skip
`skip_norms.{j}` / `skip_linears.{j}.linear` for j < depth // 4. Blocks 2p and 2p+1 become
pair p of `encoder_pairs` / `decoder_pairs` ("spatial" / "temporal").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from skipdit_jax.convert.dit import _BLOCK_LINEARS, _TOP_LINEARS, _count, _dense, _stack, expected_shapes
from skipdit_jax.convert.torch_io import check_keys_and_shapes
from skipdit_jax.errors import CheckpointError
from skipdit_jax.models.latte import LatteConfig, get_1d_sincos_temp_embed, latte_preset
from skipdit_jax.models.layers import get_2d_sincos_pos_embed


def _looks_like_dit(state) -> bool:
    return "x_embedder.proj.weight" in state and "blocks.0.attn.qkv.weight" in state and "temp_embed" not in state


def infer_latte_config(state: dict[str, np.ndarray], num_heads: int | None = None, preset: str | None = None) -> LatteConfig:
    """Architecture from key names and shapes (frames from `temp_embed`); heads from the
    argument or a preset ("Latte-XL/2")."""
    if _looks_like_dit(state):
        raise CheckpointError(
            "not a Latte checkpoint: it has no temp_embed (it looks like a DiT checkpoint; load it as a DiT)"
        )
    for key in ("x_embedder.proj.weight", "pos_embed", "temp_embed", "final_layer.linear.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise CheckpointError(f"not a Latte checkpoint: missing key {key!r}")
    d, in_ch, p, _ = state["x_embedder.proj.weight"].shape
    depth = _count(state, "blocks.", ".attn.qkv.weight")
    if depth % 2 or depth < 4:
        raise CheckpointError(f"a Latte checkpoint has an even number (>= 4) of blocks, found {depth}")
    if len(state["pos_embed"].shape) != 3:
        raise CheckpointError(f"pos_embed must be (1, tokens, width), got {tuple(state['pos_embed'].shape)}")
    n_tokens = state["pos_embed"].shape[1]
    grid = math.isqrt(n_tokens)
    if grid * grid != n_tokens:
        raise CheckpointError(f"pos_embed has {n_tokens} tokens, not a square grid")
    if len(state["temp_embed"].shape) != 3:
        raise CheckpointError(f"temp_embed must be (1, frames, width), got {tuple(state['temp_embed'].shape)}")
    frames = state["temp_embed"].shape[1]
    out_ch = state["final_layer.linear.weight"].shape[0] // (p * p)
    table = "y_embedder.embedding_table.weight"
    num_classes = state[table].shape[0] - 1 if table in state else 0
    kw = dict(
        input_size=grid * p,
        patch_size=p,
        in_channels=in_ch,
        hidden_size=d,
        depth=depth,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / d,
        num_frames=frames,
        num_classes=num_classes,
        learn_sigma=out_ch == 2 * in_ch,
        long_skip="skip_linears.0.linear.weight" in state,
    )
    if preset is not None:
        ref = latte_preset(preset)
        for name in ("depth", "hidden_size", "patch_size"):
            if getattr(ref, name) != kw[name]:
                raise CheckpointError(
                    f"checkpoint does not match preset {preset}: "
                    f"{name} is {kw[name]} in the file, {getattr(ref, name)} in the preset"
                )
        heads = ref.num_heads if num_heads is None else num_heads
    elif num_heads is not None:
        heads = num_heads
    else:
        raise CheckpointError("the number of attention heads cannot be read from the weights: pass num_heads or a preset")
    if d % heads:
        raise CheckpointError(f"hidden size {d} is not divisible by num_heads {heads}")
    if kw["long_skip"] and (depth // 2) % 2:
        raise CheckpointError(f"a Latte-skip checkpoint needs an even number of pairs, found {depth // 2}")
    return LatteConfig(num_heads=int(heads), **kw)


def latte_expected_shapes(config: LatteConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the official state dict of `config`, with its PyTorch shape."""
    # The DiT layout (same embedders, blocks, final layer and skip modules) + the frame table.
    shapes = expected_shapes(config, num_skips=config.num_encoder_pairs)
    return {**shapes, "temp_embed": (1, config.num_frames, config.hidden_size)}


def validate_latte_state_dict(state: dict[str, np.ndarray], config: LatteConfig) -> None:
    check_keys_and_shapes(state, latte_expected_shapes(config), "Latte checkpoint")
    for key, ref in (
        ("pos_embed", get_2d_sincos_pos_embed(config.hidden_size, config.grid_size)),
        ("temp_embed", get_1d_sincos_temp_embed(config.hidden_size, config.num_frames)),
    ):
        err = float(np.abs(state[key][0] - ref).max())
        if err > 1e-4:
            raise CheckpointError(f"{key} is not the standard sin-cos table (max deviation {err:.3g})")


def _block(state, i):
    tree: dict = {}
    for torch_name, path in _BLOCK_LINEARS.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _dense(state, f"blocks.{i}.{torch_name}")
    return tree


def _pair(state, p):
    return {"spatial": _block(state, 2 * p), "temporal": _block(state, 2 * p + 1)}


def latte_from_torch(state_dict: dict, num_heads: int | None = None, preset: str | None = None):
    """(model_config, params) of an official Latte / Latte-skip state dict (the "ema" entry
    of a `*-skip.pt` file, or a vanilla Latte release). Every shape is validated."""
    if isinstance(state_dict.get("ema"), dict):
        state_dict = state_dict["ema"]
    state = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    config = infer_latte_config(state, num_heads, preset)
    validate_latte_state_dict(state, config)
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
    half = config.num_encoder_pairs
    params["encoder_pairs"] = _stack([_pair(state, p) for p in range(half)])
    params["decoder_pairs"] = _stack([_pair(state, p) for p in range(half, config.num_pairs)])
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


def latte_to_torch(config: LatteConfig, params) -> dict[str, np.ndarray]:
    """The official PyTorch state dict (numpy) of our parameters: loads with
    `load_state_dict` into the official Latte / Latte_skip of the same size."""
    import jax

    p = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    d = config.hidden_size
    out = {
        "x_embedder.proj.weight": p["x_embedder"]["kernel"].transpose(3, 2, 0, 1),
        "x_embedder.proj.bias": p["x_embedder"]["bias"],
        "pos_embed": get_2d_sincos_pos_embed(d, config.grid_size)[None].astype(np.float32),
        "temp_embed": get_1d_sincos_temp_embed(d, config.num_frames)[None].astype(np.float32),
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
    half = config.num_encoder_pairs
    for i in range(config.depth):
        pair, kind = i // 2, ("spatial", "temporal")[i % 2]
        stack, idx = (p["encoder_pairs"], pair) if pair < half else (p["decoder_pairs"], pair - half)
        for torch_name, path in _BLOCK_LINEARS.items():
            node = stack[kind]
            for part in path:
                node = node[part]
            put(f"blocks.{i}.{torch_name}", jax.tree.map(lambda a, idx=idx: a[idx], node))
    if config.long_skip:
        sf = p["skip_fusions"]
        for j in range(half):
            out[f"skip_norms.{j}.weight"] = sf["norm"]["scale"][j]
            out[f"skip_norms.{j}.bias"] = sf["norm"]["bias"][j]
            put(f"skip_linears.{j}.linear", jax.tree.map(lambda a, j=j: a[j], sf["linear"]))
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
