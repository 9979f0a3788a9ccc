"""`skipdit demo [--out skipdit-demo] [--minutes 15] [--compare-dit]`: the main job on the
embedded default. `--compare-dit` also trains the same model without long skips, for the
same seconds (the training time is split evenly), and plots both classifier-FID curves."""

from __future__ import annotations

from absl import flags

from skipdit_jax.errors import UserError

USAGE = "[--out skipdit-demo] [--minutes 15] [--config CONFIG.py[:arg]] [--compare-dit]"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", "skipdit-demo", "output directory", flag_values=fv)
    flags.DEFINE_float("minutes", 15.0, "total time budget (training gets what the rest leaves)", flag_values=fv)
    flags.DEFINE_string("config", None, "training config file (default: the built-in settings, = configs/mnist_skipdit.py)", flag_values=fv)
    flags.DEFINE_bool(
        "compare_dit", False,
        "also train a DiT without long skips for the same seconds (the training time is split evenly) and plot both "
        "classifier-FID curves, with the steps each needs to reach the DiT's final value",
        flag_values=fv,
    )


def main(args: list[str], fv: flags.FlagValues) -> int:
    if args:
        raise UserError(f"unexpected arguments {args}; usage: skipdit demo {USAGE}")
    if fv.minutes <= 0:
        raise UserError(f"--minutes must be > 0, got {fv.minutes}")
    from skipdit_jax.demo.image import run_demo

    run_demo(fv.out, fv.minutes, fv.config, compare_dit=fv.compare_dit)
    return 0
