"""`skipdit export MODEL_DIR OUT.safetensors`: our parameters -> the official PyTorch layout."""

from __future__ import annotations

from absl import flags

from skipdit_jax import convert, model_store, paths
from skipdit_jax.errors import UserError

USAGE = "MODEL_DIR OUT.safetensors"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("overwrite", False, "replace OUT if it exists", flag_values=fv)


def main(args: list[str], fv: flags.FlagValues) -> int:
    if len(args) != 2 or not args[1].endswith(".safetensors"):
        raise UserError(f"usage: skipdit export {USAGE}")
    src, out = args
    if paths.as_path(out).exists() and not fv.overwrite:
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    config, params = model_store.load_model(src)
    convert.save_torch_safetensors(config, params, out)  # atomic: a temporary file, then a rename
    print(f"exported {src} -> {out} (PyTorch state-dict layout; load with model.load_state_dict(safetensors.torch.load_file(...)))")
    return 0
