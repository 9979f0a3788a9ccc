"""Conversion between Hunyuan-DiT checkpoints in the diffusers layout
(`HunyuanDiT2DModel`, e.g. the `transformer/` folder of HunyuanDiT-v1.2-Diffusers) and our
parameters.

The diffusers layout: `pos_embed.proj` (patch conv), `time_extra_emb.timestep_embedder.
linear_{1,2}`, `time_extra_emb.pooler.{positional_embedding,q_proj,k_proj,v_proj,c_proj}`,
`time_extra_emb.extra_embedder.linear_{1,2}`, `text_embedder.linear_{1,2}`,
`text_embedding_padding`, `blocks.N.{norm1.linear, norm1.norm, attn1, norm2, attn2, norm3,
ff.net.0.proj, ff.net.2}` (attention: to_q, to_k, to_v, norm_q, norm_k, to_out.0), blocks
N > depth/2 also `skip_norm`, `skip_linear`; `norm_out.linear` (scale | shift), `proj_out`;
v1.0/v1.1 (`use_style_cond_and_image_meta_size`, inferred from the key
`time_extra_emb.style_embedder.weight`) also the style table
`time_extra_emb.style_embedder.weight` (1, D) -> `style_embedder/embedding`, and their
extra embedder reads pooled + 6*256 + D features.
Blocks are stacked into `encoder_blocks` (0..D/2-2), `middle_blocks` (D/2-1, D/2) and
`decoder_blocks` (D/2+1..D-1).

The official HunyuanDiT / Skip-DiT layout (`hydit/modules/models.py`, e.g. the released
`t2i/model/pytorch_model_ema.pt`) is renamed to the diffusers one first
(`official_to_diffusers`): `x_embedder` -> `pos_embed`, `t_embedder.mlp.{0,2}`,
`mlp_t5.{0,2}`, `extra_embedder.{0,2}`, `pooler` -> `time_extra_emb.pooler`; per block
`default_modulation.1` -> `norm1.linear`, `norm1` -> `norm1.norm`, the fused `attn1.Wqkv`
(q | k | v) and `attn2.kv_proj` (k | v) split, `q_norm`/`k_norm`/`out_proj` renamed, the
official `norm3` (before the cross-attention) is diffusers' `norm2` and its `norm2` (before
the MLP) diffusers' `norm3`, `mlp.fc{1,2}` -> `ff.net.{0.proj,2}`; `final_layer.
adaLN_modulation.1` (shift | scale) -> `norm_out.linear` (scale | shift), and v1.0/v1.1's
`style_embedder.weight` -> `time_extra_emb.style_embedder.weight` (the official model may
enable the size and style conditions separately; this one takes both or neither, and the
extra embedder's shape check names a checkpoint with only one).
"""

from __future__ import annotations

import jax
import numpy as np

from skipdit_jax.convert.dit import _count
from skipdit_jax.convert.torch_io import check_keys_and_shapes
from skipdit_jax.errors import CheckpointError
from skipdit_jax.models.hunyuan import HunyuanConfig, init_hunyuan_params

_TOP = [  # (torch module, our path, kind)
    ("pos_embed.proj", ("patch_embed",), "conv"),
    ("time_extra_emb.timestep_embedder.linear_1", ("timestep_embedder", "linear_1"), "dense"),
    ("time_extra_emb.timestep_embedder.linear_2", ("timestep_embedder", "linear_2"), "dense"),
    ("time_extra_emb.pooler.q_proj", ("pooler", "q_proj"), "dense"),
    ("time_extra_emb.pooler.k_proj", ("pooler", "k_proj"), "dense"),
    ("time_extra_emb.pooler.v_proj", ("pooler", "v_proj"), "dense"),
    ("time_extra_emb.pooler.c_proj", ("pooler", "c_proj"), "dense"),
    ("time_extra_emb.pooler.positional_embedding", ("pooler", "positional_embedding"), "raw"),
    ("time_extra_emb.extra_embedder.linear_1", ("extra_embedder", "linear_1"), "dense"),
    ("time_extra_emb.extra_embedder.linear_2", ("extra_embedder", "linear_2"), "dense"),
    ("text_embedder.linear_1", ("text_embedder", "linear_1"), "dense"),
    ("text_embedder.linear_2", ("text_embedder", "linear_2"), "dense"),
    ("text_embedding_padding", ("text_embedding_padding",), "raw"),
    ("norm_out.linear", ("norm_out",), "dense"),
    ("proj_out", ("proj_out",), "dense"),
]
_BLOCK = [
    ("norm1.linear", ("shift",), "dense"),
    ("norm1.norm", ("norm1",), "norm"),
    ("norm2", ("norm2",), "norm"),
    ("norm3", ("norm3",), "norm"),
    ("ff.net.0.proj", ("fc1",), "dense"),
    ("ff.net.2", ("fc2",), "dense"),
] + [
    (f"{a}.{t}", (a, o), kind)
    for a in ("attn1", "attn2")
    for t, o, kind in (
        ("to_q", "to_q", "dense"),
        ("to_k", "to_k", "dense"),
        ("to_v", "to_v", "dense"),
        ("to_out.0", "to_out", "dense"),
        ("norm_q", "norm_q", "norm"),
        ("norm_k", "norm_k", "norm"),
    )
]
_SKIP = [("skip_norm", ("skip_norm",), "norm"), ("skip_linear", ("skip_linear",), "dense")]
_STYLE = [("time_extra_emb.style_embedder.weight", ("style_embedder", "embedding"), "raw")]
_V11_KEY = _STYLE[0][0]


def _leaves(kind: str):
    """(torch suffix, our leaf name, to-ours transform) of one module kind."""
    if kind == "dense":
        return [(".weight", "kernel", lambda a: a.T), (".bias", "bias", None)]
    if kind == "conv":  # (out, in, p, p) -> (p, p, in, out)
        return [(".weight", "kernel", lambda a: a.transpose(2, 3, 1, 0)), (".bias", "bias", None)]
    if kind == "norm":
        return [(".weight", "scale", None), (".bias", "bias", None)]
    return [("", None, None)]


def _entries(config: HunyuanConfig):
    """(torch key, our path, stack index or None, transform to ours, transform back)."""
    back = {"dense": lambda a: a.T, "conv": lambda a: a.transpose(3, 2, 0, 1)}
    d, n_enc = config.depth, config.num_encoder_blocks
    groups = [((), None, _TOP + (_STYLE if config.use_style_cond_and_image_meta_size else []))]
    for layer in range(d):
        if layer < n_enc:
            stack, i, table = "encoder_blocks", layer, _BLOCK
        elif layer <= d // 2:
            stack, i, table = "middle_blocks", layer - n_enc, _BLOCK
        else:
            stack, i, table = "decoder_blocks", layer - d // 2 - 1, _BLOCK + _SKIP
        groups.append(((f"blocks.{layer}.", stack, i), i, table))
    for where, index, table in groups:
        prefix, stack = (where[0], (where[1],)) if where else ("", ())
        for module, path, kind in table:
            for suffix, leaf, fwd in _leaves(kind):
                rev = back.get(kind) if leaf == "kernel" else None
                yield prefix + module + suffix, stack + path + ((leaf,) if leaf else ()), index, fwd, rev


_OFFICIAL_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_extra_emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_extra_emb.timestep_embedder.linear_2",
    "mlp_t5.0": "text_embedder.linear_1",
    "mlp_t5.2": "text_embedder.linear_2",
    "extra_embedder.0": "time_extra_emb.extra_embedder.linear_1",
    "extra_embedder.2": "time_extra_emb.extra_embedder.linear_2",
    "pooler": "time_extra_emb.pooler",
    "final_layer.linear": "proj_out",
    "style_embedder": "time_extra_emb.style_embedder",
}
_OFFICIAL_BLOCK = {
    "default_modulation.1": "norm1.linear",
    "norm1": "norm1.norm",
    "norm3": "norm2",  # the official norm3 feeds the cross-attention
    "norm2": "norm3",  # and its norm2 the MLP
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "attn1.q_norm": "attn1.norm_q",
    "attn1.k_norm": "attn1.norm_k",
    "attn1.out_proj": "attn1.to_out.0",
    "attn2.q_proj": "attn2.to_q",
    "attn2.q_norm": "attn2.norm_q",
    "attn2.k_norm": "attn2.norm_k",
    "attn2.out_proj": "attn2.to_out.0",
    "skip_norm": "skip_norm",
    "skip_linear": "skip_linear",
}


def is_official_layout(state: dict) -> bool:
    return "x_embedder.proj.weight" in state and "blocks.0.attn1.Wqkv.weight" in state


def official_to_diffusers(state: dict) -> dict:
    """The official HunyuanDiT state dict renamed (and its fused projections split) into
    the diffusers layout; keys it does not know are kept, so validation names them."""
    out = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if key == "text_embedding_padding":
            out[key] = value
        elif module == "final_layer.adaLN_modulation.1":  # shift | scale -> scale | shift
            shift, scale = np.split(np.asarray(value), 2, axis=0)
            out[f"norm_out.linear.{leaf}"] = np.concatenate([scale, shift], axis=0)
        elif module.startswith("blocks."):
            _, index, rest = module.split(".", 2)
            prefix = f"blocks.{index}."
            fused = {"attn1.Wqkv": ("to_q", "to_k", "to_v"), "attn2.kv_proj": ("to_k", "to_v")}.get(rest)
            if fused:
                value = np.asarray(value)
                if value.shape[0] % len(fused):
                    raise CheckpointError(f"{key} has {value.shape[0]} rows, no multiple of {len(fused)} ({' | '.join(fused)})")
                for name, part in zip(fused, np.split(value, len(fused), axis=0), strict=True):
                    out[f"{prefix}{rest.split('.')[0]}.{name}.{leaf}"] = part
            else:
                out[f"{prefix}{_OFFICIAL_BLOCK.get(rest, rest)}.{leaf}"] = value
        else:
            top = next((k for k in _OFFICIAL_TOP if module == k or module.startswith(k + ".")), None)
            out[key if top is None else _OFFICIAL_TOP[top] + key[len(top) :]] = value
    return out


def infer_hunyuan_config(state: dict, input_size: int = 128, **overrides) -> HunyuanConfig:
    """Architecture from a diffusers-layout state dict's key names and shapes; the latent
    side (not stored in the weights) from `input_size` (128: 1024 px). A style table
    (`time_extra_emb.style_embedder.weight`) means v1.0/v1.1: use_style_cond_and_image_meta_size."""
    from skipdit_jax.models.families import family_for_state_dict

    family_for_state_dict(state, "hunyuan")  # another family's checkpoint: say which
    need = ("pos_embed.proj.weight", "blocks.0.attn1.norm_q.weight", "text_embedding_padding", "proj_out.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"not a diffusers-layout Hunyuan-DiT state dict: it lacks {', '.join(missing)}")
    d, in_ch, p = state["pos_embed.proj.weight"].shape[:3]
    head_dim = state["blocks.0.attn1.norm_q.weight"].shape[0]
    out_ch = state["proj_out.weight"].shape[0] // (p * p)
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"proj_out gives {out_ch} channels per pixel; expected {in_ch} or {2 * in_ch} (learned sigma)")
    mlp = state["blocks.0.ff.net.0.proj.weight"].shape[0] if "blocks.0.ff.net.0.proj.weight" in state else 4 * d
    # int(D * ratio) must give the MLP width back; the released ratio 4.3637 first.
    ratio = next(r for r in (4.3637, 4.0, mlp / d, (mlp + 0.5) / d) if int(d * r) == mlp)
    pad = state["text_embedding_padding"].shape
    len_t5 = state["time_extra_emb.pooler.positional_embedding"].shape[0] - 1
    sizes = dict(
        input_size=input_size,
        patch_size=p,
        in_channels=in_ch,
        hidden_size=d,
        depth=_count(state, "blocks.", ".norm1.linear.weight"),
        num_heads=d // head_dim,
        mlp_ratio=ratio,
        text_len=pad[0] - len_t5,
        text_len_t5=len_t5,
        cross_attention_dim=pad[1],
        cross_attention_dim_t5=state["text_embedder.linear_1.weight"].shape[1],
        pooled_projection_dim=state["time_extra_emb.pooler.c_proj.weight"].shape[0],
        learn_sigma=out_ch == 2 * in_ch,
        use_style_cond_and_image_meta_size=_V11_KEY in state,
    )
    return HunyuanConfig(**{**sizes, **overrides})


def hunyuan_expected_shapes(config: HunyuanConfig) -> dict[str, tuple[int, ...]]:
    """Every diffusers key of `config` and its shape."""
    abstract = jax.eval_shape(lambda: init_hunyuan_params(config, jax.random.key(0)))
    shapes = {}
    for key, path, index, _, rev in _entries(config):
        node = abstract
        for part in path:
            node = node[part]
        shape = node.shape[1:] if index is not None else node.shape
        shapes[key] = tuple(rev(np.empty(shape, np.bool_)).shape) if rev else tuple(shape)
    return shapes


def hunyuan_from_torch(state_dict: dict, input_size: int = 128, *, mesh=None, **overrides) -> tuple[HunyuanConfig, dict]:
    """(config, params) of a Hunyuan-DiT state dict in the diffusers or the official layout
    (numpy or torch arrays); every key and shape is checked first (one CheckpointError).
    `input_size` is the latent side (not stored in the weights); overrides replace config fields.

    With `mesh`, each parameter goes straight onto its FSDP sharding
    (`models.hunyuan_sharding.PARAM_AXES`) as soon as it is built: a device only ever receives
    its shard, and the host never holds a second whole copy of the converted weights."""
    state = {k: np.asarray(v.detach().float().numpy() if hasattr(v, "detach") else v) for k, v in state_dict.items()}
    if is_official_layout(state):
        state = official_to_diffusers(state)
    config = infer_hunyuan_config(state, input_size, **overrides)
    check_keys_and_shapes(state, hunyuan_expected_shapes(config), "the Hunyuan-DiT checkpoint")
    put = _placer(config, mesh)
    params: dict = {}
    stacks: dict = {}
    for key, path, index, fwd, _ in _entries(config):
        value = fwd(state[key]) if fwd else state[key]
        if index is None:
            _put(params, path, put(path, np.ascontiguousarray(value, np.float32)))
        else:
            stacks.setdefault(path, []).append(value)
    for path in list(stacks):  # pop: each stack's layers are freed once it is placed
        _put(params, path, put(path, np.stack(stacks.pop(path)).astype(np.float32)))
    return config, params


def _placer(config: HunyuanConfig, mesh):
    """path, numpy array -> the array itself (no mesh) or a jax.Array on its FSDP sharding
    (built shard by shard, so it also works across processes)."""
    if mesh is None:
        return lambda path, a: a
    from skipdit_jax import sharding
    from skipdit_jax.models.hunyuan_sharding import PARAM_AXES

    abstract = jax.eval_shape(lambda: init_hunyuan_params(config, jax.random.key(0)))
    shardings = sharding.param_shardings(abstract, mesh, param_axes=PARAM_AXES)

    def put(path, a):
        s = shardings
        for part in path:
            s = s[part]
        return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])

    return put


def hunyuan_to_torch(config: HunyuanConfig, params) -> dict[str, np.ndarray]:
    """The diffusers `HunyuanDiT2DModel` state dict (numpy float32) of our parameters."""
    out = {}
    for key, path, index, _, rev in _entries(config):
        node = params
        for part in path:
            node = node[part]
        value = np.asarray(node if index is None else node[index], np.float32)
        out[key] = np.ascontiguousarray(rev(value) if rev else value)
    return out


def _put(tree: dict, path: tuple, value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value
