"""`skipdit convert SRC OUT_DIR`: an official checkpoint -> an Orbax model directory.

SRC is a checkpoint file (.pt, .safetensors; local, gs:// or hf://org/repo/file) of any
family, or a model folder (local or hf://org/repo[/subfolder]): a diffusers folder holding a
Latte-T2V `transformer/` (e.g. hf://maxin-cn/Latte-0), or a HunyuanDiT-v1.2 download in either
layout (the -Diffusers repo, or the official one with `t2i/model/pytorch_model_ema.pt`). A
Hunyuan-DiT is stored for 1024x1024 images (128x128 latents); `skipdit sample --height/--width`
picks another resolution of the official list.
"""

from __future__ import annotations

import time

from absl import flags

from skipdit_jax import convert, model_store, paths
from skipdit_jax.errors import UserError
from skipdit_jax.models.families import family_names, family_of

USAGE = "SRC OUT_DIR [--num_heads H | --preset DiT-XL/2] [--overwrite]  (SRC: a checkpoint file or a diffusers folder)"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("num_heads", None, "attention heads (not stored in the weights)", flag_values=fv)
    flags.DEFINE_string("preset", None, "model preset giving num_heads, e.g. DiT-XL/2 (checked against the weights)", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace OUT_DIR if it exists (only once the new one is complete)", flag_values=fv)
    flags.DEFINE_enum("family", None, family_names(), "insist on a model family (default: detected from the keys)", flag_values=fv)


def main(args: list[str], fv: flags.FlagValues) -> int:
    if len(args) != 2:
        raise UserError(f"expected SRC and OUT_DIR, got {len(args)} positional argument(s); usage: skipdit convert {USAGE}")
    src, out_dir = args
    start = time.perf_counter()
    kwargs = {k: v for k, v in (("num_heads", fv.num_heads), ("preset", fv.preset)) if v is not None}
    if _is_hunyuan_folder(src):
        if fv.family not in (None, "hunyuan"):
            raise UserError(f"{src} is a HunyuanDiT-v1.2 folder, which holds a hunyuan model, not a {fv.family} one")
        from skipdit_jax.pipelines.text_to_image import load_transformer

        config, params = load_transformer(src)
    elif _is_folder(src):  # any other diffusers folder holds a text-to-video Latte
        if fv.family not in (None, "latte_t2v"):
            raise UserError(f"{src} is a diffusers model folder, which holds a latte_t2v model, not a {fv.family} one")
        config, params = convert.load_latte_t2v(src, **kwargs)
    else:
        state = convert.load_torch_checkpoint(src)
        config, params = convert.from_torch(state, family=fv.family, **kwargs)
    model_store.save_model(out_dir, config, params, overwrite=fv.overwrite, extra={"converted_from": str(src)})
    print(f"converted {src} -> {out_dir}: {family_of(config).describe()} ({time.perf_counter() - start:.1f} s)")
    return 0


def _is_hunyuan_folder(src: str) -> bool:
    from skipdit_jax.pipelines.text_to_image import is_hunyuan_folder

    try:
        return is_hunyuan_folder(src)
    except OSError:
        return False


def _is_folder(src: str) -> bool:
    """Whether SRC names a diffusers model folder (config.json, a transformer/ subfolder or
    diffusers weights inside); any other directory keeps the checkpoint-file error."""
    if src.startswith("hf://"):
        return not src.rstrip("/").endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
    try:
        p = paths.as_path(src)
        return p.is_dir() and (
            (p / "config.json").exists() or (p / "transformer").is_dir() or any(p.glob("diffusion_pytorch_model*"))
        )
    except OSError:
        return False
