"""Conversion between Latte-T2V checkpoints (diffusers `LatteTransformer3DModel`, e.g. the
Latte-0 `transformer/` folder, and the official Skip-DiT `Latte-skip.pt`) and our parameters.

The PyTorch layout (diffusers names; the official `LatteT2V_skip` uses the same):
`pos_embed.proj` (patch conv), `adaln_single.emb.timestep_embedder.linear_{1,2}`,
`adaln_single.linear` (D -> 6D), `caption_projection.linear_{1,2}`,
`transformer_blocks.N.{attn1,attn2}.{to_q,to_k,to_v,to_out.0}`, `.ff.net.0.proj`, `.ff.net.2`,
`.scale_shift_table` (6, D); `temporal_transformer_blocks.N` the same without `attn2`;
`scale_shift_table` (2, D), `proj_out`; Latte-T2V-skip adds `skip_norms.{j}` and
`skip_linears.{j}.linear` (j < depth // 2). to_q|to_k|to_v become one fused `qkv` Dense
(cross-attention: `q` and a fused `kv`); pairs are stacked into `encoder_pairs` /
`decoder_pairs`.

The position and frame tables are recomputed buffers that diffusers does not save, so the
latent size and frame count come from the folder's config.json, the arguments, a preset,
or tables stored in the dict (`pos_embed.pos_embed`, `temp_pos_embed`: `latte_t2v_to_torch`
writes them), else Latte-0's 64 and 16. The heads come the same way, else head width 72.
Keys outside the model's modules are reported in a warning and ignored, as the official
loader (non-strict) does; unexpected keys inside its modules mean another architecture.
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

import numpy as np

from skipdit_jax import hub, paths
from skipdit_jax.convert.dit import _count, _dense, _stack
from skipdit_jax.convert.torch_io import check_keys_and_shapes, load_torch_checkpoint, read_diffusers_folder_state
from skipdit_jax.errors import CheckpointError
from skipdit_jax.models.latte import get_1d_sincos_temp_embed
from skipdit_jax.models.latte_t2v import LatteT2VConfig, latte_t2v_preset
from skipdit_jax.models.text_blocks import patch_pos_embed

DEFAULT_HEAD_DIM = 72  # Latte-0: 16 heads x 72 = 1152
_POS_TABLE, _TEMP_TABLE = "pos_embed.pos_embed", "temp_pos_embed"
_IGNORED = ("caption_projection.y_embedding",)  # the old CaptionProjection's unused null caption
_MODULE_PREFIXES = (
    "pos_embed.",
    "adaln_single.",
    "caption_projection.",
    "transformer_blocks.",
    "temporal_transformer_blocks.",
    "skip_norms.",
    "skip_linears.",
    "proj_out.",
    "scale_shift_table",
    "norm_out.",
)
_TOP = {  # torch Linear -> our path
    "pos_embed.proj": None,  # the conv, handled apart
    "adaln_single.emb.timestep_embedder.linear_1": ("t_embedder", "linear_1"),
    "adaln_single.emb.timestep_embedder.linear_2": ("t_embedder", "linear_2"),
    "adaln_single.linear": ("adaln_single",),
    "caption_projection.linear_1": ("caption_projection", "linear_1"),
    "caption_projection.linear_2": ("caption_projection", "linear_2"),
    "proj_out": ("final_layer", "proj_out"),
}


# ---- architecture --------------------------------------------------------------------------
def _not_this_family(state) -> str | None:
    if "temp_embed" in state:
        return "it looks like a class-to-video Latte checkpoint"
    if "blocks.0.attn.qkv.weight" in state:
        return "it looks like a DiT checkpoint"
    return None


def infer_latte_t2v_config(
    state: dict[str, np.ndarray],
    num_heads: int | None = None,
    preset: str | None = None,
    input_size: int | None = None,
    num_frames: int | None = None,
    norm_eps: float | None = None,
) -> LatteT2VConfig:
    """Architecture from key names and shapes; what the weights do not hold (heads, latent
    size, frames, norm epsilon) from the arguments, a preset, stored tables, or Latte-0."""
    for key in (
        "pos_embed.proj.weight",
        "caption_projection.linear_1.weight",
        "temporal_transformer_blocks.0.attn1.to_q.weight",
        "transformer_blocks.0.ff.net.0.proj.weight",
        "proj_out.weight",
    ):
        if key not in state:
            other = _not_this_family(state)
            raise CheckpointError(
                f"not a Latte-T2V checkpoint: {other}" if other else f"not a Latte-T2V checkpoint: missing key {key!r}"
            )
    if "adaln_single.emb.resolution_embedder.linear_1.weight" in state:
        raise CheckpointError(
            "this Latte-T2V checkpoint has resolution/aspect-ratio conditions (sample_size 128), which are not supported"
        )
    d, in_ch, p, _ = state["pos_embed.proj.weight"].shape
    depth = _count(state, "transformer_blocks.", ".attn1.to_q.weight")
    temporal = _count(state, "temporal_transformer_blocks.", ".attn1.to_q.weight")
    if depth != temporal:
        raise CheckpointError(f"a Latte-T2V checkpoint has as many temporal as spatial blocks, found {temporal} and {depth}")
    out_ch = state["proj_out.weight"].shape[0] // (p * p)
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"proj_out gives {out_ch} channels per pixel; expected {in_ch} or {2 * in_ch} (learned sigma)")
    ref = latte_t2v_preset(preset) if preset is not None else None
    if ref is not None:
        for name, got in (("depth", depth), ("hidden_size", d), ("patch_size", p)):
            if getattr(ref, name) != got:
                raise CheckpointError(
                    f"checkpoint does not match preset {preset}: {name} is {got} in the file, {getattr(ref, name)} in the preset"
                )
    if num_heads is None:
        num_heads = ref.num_heads if ref is not None else (d // DEFAULT_HEAD_DIM if d % DEFAULT_HEAD_DIM == 0 else None)
        if num_heads is None:
            raise CheckpointError(
                f"the number of attention heads cannot be read from the weights and width {d} is no multiple of "
                f"{DEFAULT_HEAD_DIM}: pass num_heads"
            )
    if d % num_heads:
        raise CheckpointError(f"hidden size {d} is not divisible by num_heads {num_heads}")
    if input_size is None:
        if _POS_TABLE in state:
            grid = int(round(np.sqrt(state[_POS_TABLE].shape[-2])))
            input_size = grid * p
        else:
            input_size = ref.input_size if ref is not None else 64
    if num_frames is None:
        num_frames = int(state[_TEMP_TABLE].shape[-2]) if _TEMP_TABLE in state else (ref.num_frames if ref is not None else 16)
    return LatteT2VConfig(
        input_size=int(input_size),
        patch_size=int(p),
        in_channels=int(in_ch),
        hidden_size=int(d),
        depth=depth,
        num_heads=int(num_heads),
        mlp_ratio=state["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / d,
        num_frames=int(num_frames),
        caption_channels=int(state["caption_projection.linear_1.weight"].shape[1]),
        learn_sigma=out_ch == 2 * in_ch,
        long_skip="skip_linears.0.linear.weight" in state,
        norm_eps=1e-6 if norm_eps is None else float(norm_eps),
    )


def latte_t2v_expected_shapes(config: LatteT2VConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the PyTorch state dict of `config` (diffusers names), with its shape."""
    d, p = config.hidden_size, config.patch_size
    h = int(d * config.mlp_ratio)
    linears = {
        "adaln_single.emb.timestep_embedder.linear_1": (d, 256),
        "adaln_single.emb.timestep_embedder.linear_2": (d, d),
        "adaln_single.linear": (6 * d, d),
        "caption_projection.linear_1": (d, config.caption_channels),
        "caption_projection.linear_2": (d, d),
        "proj_out": (p * p * config.out_channels, d),
    }
    attn = {f"attn1.{n}": (d, d) for n in ("to_q", "to_k", "to_v", "to_out.0")}
    ff = {"ff.net.0.proj": (h, d), "ff.net.2": (d, h)}
    for i in range(config.depth):
        for kind, extra in (
            ("transformer_blocks", {f"attn2.{n}": (d, d) for n in ("to_q", "to_k", "to_v", "to_out.0")}),
            ("temporal_transformer_blocks", {}),
        ):
            for name, shape in {**attn, **extra, **ff}.items():
                linears[f"{kind}.{i}.{name}"] = shape
    if config.long_skip:
        for j in range(config.num_encoder_pairs):
            linears[f"skip_linears.{j}.linear"] = (d, 2 * d)
    shapes = {"pos_embed.proj.weight": (d, config.in_channels, p, p), "pos_embed.proj.bias": (d,), "scale_shift_table": (2, d)}
    for name, (o, i) in linears.items():
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (o, i), (o,)
    for i in range(config.depth):
        shapes[f"transformer_blocks.{i}.scale_shift_table"] = (6, d)
        shapes[f"temporal_transformer_blocks.{i}.scale_shift_table"] = (6, d)
    if config.long_skip:
        for j in range(config.num_encoder_pairs):
            shapes[f"skip_norms.{j}.weight"] = shapes[f"skip_norms.{j}.bias"] = (2 * d,)
    return shapes


def _tables(config: LatteT2VConfig) -> dict[str, np.ndarray]:
    d = config.hidden_size
    return {
        _POS_TABLE: patch_pos_embed(d, config.grid_size, config.interpolation_scale)[None].astype(np.float32),
        _TEMP_TABLE: get_1d_sincos_temp_embed(d, config.num_frames)[None].astype(np.float32),
    }


def validate_latte_t2v_state_dict(state: dict[str, np.ndarray], config: LatteT2VConfig, strict: bool = False) -> list[str]:
    """One CheckpointError for missing keys, wrong shapes, unexpected keys inside the model's
    modules (all unexpected keys when `strict`) or a stored table that does not fit `config`.
    Returns the ignored keys (outside the model's modules)."""
    want = latte_t2v_expected_shapes(config)
    tables = _tables(config)
    for key, ref in tables.items():
        if key in state:
            got = state[key]
            if tuple(got.shape) != ref.shape:
                raise CheckpointError(
                    f"{key} has shape {tuple(got.shape)}, expected {ref.shape} for the inferred {config.input_size}x"
                    f"{config.input_size} latents and {config.num_frames} frames"
                )
            err = float(np.abs(got - ref).max())
            if err > 1e-4:
                raise CheckpointError(f"{key} is not the standard sin-cos table (max deviation {err:.3g})")
    extra = [k for k in state if k not in want and k not in tables and k not in _IGNORED]
    ignored = [k for k in extra if not strict and not k.startswith(_MODULE_PREFIXES)]
    check_keys_and_shapes(
        {k: v for k, v in state.items() if k not in ignored and k not in tables and k not in _IGNORED},
        want,
        "Latte-T2V checkpoint",
    )
    return ignored


# ---- torch -> flax -----------------------------------------------------------------------------
def _cat_dense(state, names):
    return {
        "kernel": np.concatenate([state[f"{n}.weight"].T for n in names], axis=1),
        "bias": np.concatenate([state[f"{n}.bias"] for n in names]),
    }


def _block(state, prefix: str, cross: bool) -> dict:
    tree = {
        "scale_shift_table": state[f"{prefix}.scale_shift_table"],
        "attn": {
            "qkv": _cat_dense(state, [f"{prefix}.attn1.to_{n}" for n in "qkv"]),
            "proj": _dense(state, f"{prefix}.attn1.to_out.0"),
        },
        "mlp": {"fc1": _dense(state, f"{prefix}.ff.net.0.proj"), "fc2": _dense(state, f"{prefix}.ff.net.2")},
    }
    if cross:
        tree["cross_attn"] = {
            "q": _dense(state, f"{prefix}.attn2.to_q"),
            "kv": _cat_dense(state, [f"{prefix}.attn2.to_k", f"{prefix}.attn2.to_v"]),
            "proj": _dense(state, f"{prefix}.attn2.to_out.0"),
        }
    return tree


def _pair(state, i):
    return {
        "spatial": _block(state, f"transformer_blocks.{i}", True),
        "temporal": _block(state, f"temporal_transformer_blocks.{i}", False),
    }


def latte_t2v_from_torch(
    state_dict: dict,
    num_heads: int | None = None,
    preset: str | None = None,
    *,
    input_size: int | None = None,
    num_frames: int | None = None,
    norm_eps: float | None = None,
    strict: bool = False,
):
    """(model_config, params) of a Latte-T2V / -skip state dict (diffusers layout, or the
    "ema" entry of the official `Latte-skip.pt`). Every shape is validated; keys outside the
    model are ignored with a warning (an error when `strict`)."""
    if isinstance(state_dict.get("ema"), dict):
        state_dict = state_dict["ema"]
    state = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    config = infer_latte_t2v_config(state, num_heads, preset, input_size, num_frames, norm_eps)
    ignored = validate_latte_t2v_state_dict(state, config, strict)
    if ignored:
        shown = ", ".join(ignored[:5]) + (f", ... ({len(ignored)} in all)" if len(ignored) > 5 else "")
        warnings.warn(f"ignored {len(ignored)} key(s) that are not part of the Latte-T2V model: {shown}", stacklevel=2)
    params: dict[str, Any] = {
        "x_embedder": {"kernel": state["pos_embed.proj.weight"].transpose(2, 3, 1, 0), "bias": state["pos_embed.proj.bias"]},
        "final_layer": {"scale_shift_table": state["scale_shift_table"]},
    }
    for torch_name, path in _TOP.items():
        if path is None:
            continue
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _dense(state, torch_name)
    half = config.num_encoder_pairs
    params["encoder_pairs"] = _stack([_pair(state, i) for i in range(half)])
    params["decoder_pairs"] = _stack([_pair(state, i) for i in range(half, config.depth)])
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


# ---- flax -> torch -----------------------------------------------------------------------------
def latte_t2v_to_torch(config: LatteT2VConfig, params, tables: bool = True) -> dict[str, np.ndarray]:
    """The PyTorch state dict (numpy, diffusers names) of our parameters. With `tables` it
    also holds the position and frame tables (`pos_embed.pos_embed`, `temp_pos_embed`), which
    record the latent size and frame count; diffusers does not save them, so load the dict
    with `strict=False` or pass tables=False."""
    import jax

    p = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    d = config.hidden_size
    out = {
        "pos_embed.proj.weight": p["x_embedder"]["kernel"].transpose(3, 2, 0, 1),
        "pos_embed.proj.bias": p["x_embedder"]["bias"],
        "scale_shift_table": p["final_layer"]["scale_shift_table"],
    }

    def put(name, dense):
        out[f"{name}.weight"] = dense["kernel"].T
        out[f"{name}.bias"] = dense["bias"]

    def put_split(names, dense):
        for j, name in enumerate(names):
            put(name, {"kernel": dense["kernel"][:, j * d : (j + 1) * d], "bias": dense["bias"][j * d : (j + 1) * d]})

    for torch_name, path in _TOP.items():
        if path is not None:
            node = p
            for part in path:
                node = node[part]
            put(torch_name, node)
    half = config.num_encoder_pairs
    for i in range(config.depth):
        stack, idx = (p["encoder_pairs"], i) if i < half else (p["decoder_pairs"], i - half)
        for kind, prefix in (("spatial", f"transformer_blocks.{i}"), ("temporal", f"temporal_transformer_blocks.{i}")):
            b = jax.tree.map(lambda a, idx=idx: a[idx], stack[kind])
            out[f"{prefix}.scale_shift_table"] = b["scale_shift_table"]
            put_split([f"{prefix}.attn1.to_{n}" for n in "qkv"], b["attn"]["qkv"])
            put(f"{prefix}.attn1.to_out.0", b["attn"]["proj"])
            put(f"{prefix}.ff.net.0.proj", b["mlp"]["fc1"])
            put(f"{prefix}.ff.net.2", b["mlp"]["fc2"])
            if kind == "spatial":
                put(f"{prefix}.attn2.to_q", b["cross_attn"]["q"])
                put_split([f"{prefix}.attn2.to_k", f"{prefix}.attn2.to_v"], b["cross_attn"]["kv"])
                put(f"{prefix}.attn2.to_out.0", b["cross_attn"]["proj"])
    if config.long_skip:
        sf = p["skip_fusions"]
        for j in range(half):
            out[f"skip_norms.{j}.weight"] = sf["norm"]["scale"][j]
            out[f"skip_norms.{j}.bias"] = sf["norm"]["bias"][j]
            put(f"skip_linears.{j}.linear", jax.tree.map(lambda a, j=j: a[j], sf["linear"]))
    if tables:
        out.update(_tables(config))
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ---- files: diffusers folders, Latte-skip.pt ----------------------------------------------------
def diffusers_config(config: LatteT2VConfig) -> dict:
    """The diffusers `LatteTransformer3DModel` config.json of `config`."""
    return {
        "_class_name": "LatteTransformer3DModel",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "caption_channels": config.caption_channels,
        "cross_attention_dim": config.hidden_size,
        "in_channels": config.in_channels,
        "norm_elementwise_affine": False,
        "norm_eps": config.norm_eps,
        "norm_type": "ada_norm_single",
        "num_attention_heads": config.num_heads,
        "num_layers": config.depth,
        "out_channels": config.out_channels,
        "patch_size": config.patch_size,
        "sample_size": config.input_size,
        "video_length": config.num_frames,
    }


def _hints_from_diffusers_config(cfg: dict, where: str) -> dict:
    """What config.json adds to the weights (heads, size, frames, eps); unsupported settings fail."""
    for key, want in (
        ("norm_type", "ada_norm_single"),
        ("norm_elementwise_affine", False),
        ("activation_fn", "gelu-approximate"),
    ):
        if key in cfg and cfg[key] != want:
            raise CheckpointError(f"{where}: {key} is {cfg[key]!r}; only {want!r} (Latte-0 / Latte-1) is supported")
    hints = {
        "num_heads": cfg.get("num_attention_heads"),
        "input_size": cfg.get("sample_size"),
        "num_frames": cfg.get("video_length"),
        "norm_eps": cfg.get("norm_eps"),
    }
    return {k: v for k, v in hints.items() if v is not None}


def load_latte_t2v(spec, num_heads: int | None = None, preset: str | None = None, strict: bool = False, **sizes):
    """(config, params) of a Latte-T2V checkpoint: a diffusers folder (a pipeline root with a
    `transformer/` subfolder, or the transformer folder: config.json + weights, sharded or
    not; local, gs:// or hf://org/repo[/subfolder], e.g. hf://maxin-cn/Latte-0), or a file
    (`Latte-skip.pt`, .safetensors; local, gs:// or hf://org/repo/file). `sizes`
    (input_size, num_frames, norm_eps) override what config.json says (a file has none:
    Latte-0's 64x64 latents and 16 frames unless given)."""
    spec = str(spec)
    is_file = re.search(r"\.(pt|pth|bin|safetensors|ckpt)$", spec) is not None
    if spec.startswith("hf://") and not is_file:
        repo, sub = hub.parse_hub_spec(spec, "hf://maxin-cn/Latte-0")
        # A pipeline repo keeps the model in transformer/; fetch only configs and weights.
        spec = str(hub.fetch_folder(
            repo, sub, [["diffusion_pytorch_model*", "transformer/diffusion_pytorch_model*"]],
            extra_patterns=("config.json", "transformer/config.json"), instead="the local folder (download it elsewhere)",
        ))
    p = paths.as_path(spec) if not spec.startswith("hf://") else None
    hints: dict = {}
    if p is not None and p.is_dir():
        if not (p / "config.json").exists() and (p / "transformer" / "config.json").exists():
            p = p / "transformer"
        cfg_file = p / "config.json"
        if cfg_file.exists():
            try:
                cfg = json.loads(cfg_file.read_text())
            except ValueError:
                raise CheckpointError(f"{cfg_file} is not valid JSON") from None
            hints = _hints_from_diffusers_config(cfg if isinstance(cfg, dict) else {}, str(cfg_file))
        state = read_diffusers_folder_state(p)
    else:
        state = load_torch_checkpoint(spec)  # a file: local, gs:// or hf://org/repo/file
    if num_heads is not None:
        hints["num_heads"] = num_heads
    hints.update({k: v for k, v in sizes.items() if v is not None})
    return latte_t2v_from_torch(state, preset=preset, strict=strict, **hints)


def save_latte_t2v_diffusers(config: LatteT2VConfig, params, folder) -> None:
    """Write a diffusers model folder (config.json + diffusion_pytorch_model.safetensors) that
    `LatteTransformer3DModel.from_pretrained` loads (the skip modules of a -skip model are
    extra keys there), each file written atomically."""
    from safetensors.numpy import save

    out = paths.as_path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths.atomic_write_bytes(out / "diffusion_pytorch_model.safetensors", save(latte_t2v_to_torch(config, params, tables=False)))
    paths.atomic_write_text(out / "config.json", json.dumps(diffusers_config(config), indent=2, sort_keys=True))
