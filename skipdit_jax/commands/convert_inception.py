"""`skipdit convert-inception SRC OUT.safetensors`: pytorch-fid's FID Inception weights ->
a safetensors copy (same key layout) that `skipdit evaluate --inception` and
$SKIPDIT_INCEPTION accept without torch.

SRC is the pytorch-fid file `pt_inception-2015-12-05-6726825d.pth` (local, gs:// or
hf://; read safely, no code runs) or its https URL (downloaded once into the cache and
checked against the sha256 prefix in its name). The weights are validated key by key and
shape by shape before anything is written; OUT is written atomically and never replaced
unless --overwrite is given.
"""

from __future__ import annotations

from absl import flags

from skipdit_jax import paths
from skipdit_jax.errors import UserError

USAGE = "SRC(.pth | https URL | .safetensors) OUT.safetensors [--overwrite]"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("overwrite", False, "replace OUT if it exists", flag_values=fv)


def main(args: list[str], fv: flags.FlagValues) -> int:
    from skipdit_jax.evaluation.inception import INCEPTION_WEIGHTS_URL, load_inception, save_inception

    if len(args) != 2 or not args[1].endswith(".safetensors"):
        raise UserError(f"usage: skipdit convert-inception {USAGE} (the weights: {INCEPTION_WEIGHTS_URL})")
    src, out = args
    if paths.as_path(out).exists() and not fv.overwrite:
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    params = load_inception(src)  # every check happens here, before OUT is touched
    save_inception(params, out)
    print(f"converted {src} -> {out} (pytorch-fid key layout; use it with --inception {out} or SKIPDIT_INCEPTION={out})")
    return 0
