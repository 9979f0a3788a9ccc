"""`skipdit convert SRC OUT_DIR`: an official checkpoint -> an Orbax model directory."""

from __future__ import annotations

import time

from absl import flags

from skipdit_jax import checkpoints, convert
from skipdit_jax.errors import UserError
from skipdit_jax.models import count_params

USAGE = "SRC OUT_DIR [--num_heads H | --preset DiT-XL/2] [--overwrite]"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("num_heads", None, "attention heads (not stored in the weights)", flag_values=fv)
    flags.DEFINE_string("preset", None, "model preset giving num_heads, e.g. DiT-XL/2 (checked against the weights)", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace OUT_DIR if it exists", flag_values=fv)


def main(args: list[str], fv: flags.FlagValues) -> int:
    if len(args) != 2:
        raise UserError(f"expected SRC and OUT_DIR, got {len(args)} positional argument(s); usage: skipdit convert {USAGE}")
    src, out_dir = args
    start = time.perf_counter()
    state = convert.load_torch_checkpoint(src)
    config, params = convert.dit_from_torch(state, num_heads=fv.num_heads, preset=fv.preset)
    checkpoints.save_model(out_dir, config, params, overwrite=fv.overwrite, extra={"converted_from": str(src)})
    kind = "Skip-DiT" if config.long_skip else "DiT"
    print(
        f"converted {src} -> {out_dir}: {kind} depth {config.depth}, width {config.hidden_size}, "
        f"{config.num_heads} heads, patch {config.patch_size}, input {config.input_size}x{config.input_size}x"
        f"{config.in_channels}, {config.num_classes} classes, {count_params(params):,} parameters "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0
