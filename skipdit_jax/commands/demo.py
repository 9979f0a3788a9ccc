"""`skipdit demo [--task image|video] [--out DIR] [--minutes 15] [--compare-dit]`: the main
job on the embedded default. `--task image` (the default): class-conditional Skip-DiT on
MNIST digits (`skipdit_jax/demo/image.py`); `--compare-dit` also trains the same model
without long skips, for the same seconds (the training time is split evenly), and plots
both classifier-FID curves. `--task video`: class-conditional Latte-skip on moving MNIST
digits (`skipdit_jax/demo/video.py`), into skipdit-demo-video unless --out is given."""

from __future__ import annotations

from absl import flags

from skipdit_jax.errors import UserError

TASKS = ("image", "video")
DEFAULT_OUT = {"image": "skipdit-demo", "video": "skipdit-demo-video"}
USAGE = "[--task image|video] [--out DIR] [--minutes 15] [--config CONFIG.py[:arg]] [--compare-dit]"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("task", "image", "image: Skip-DiT on MNIST digits; video: Latte-skip on moving digits", flag_values=fv)
    flags.DEFINE_string("out", None, "output directory (default: skipdit-demo; --task video: skipdit-demo-video)", flag_values=fv)
    flags.DEFINE_float("minutes", 15.0, "total time budget (training gets what the rest leaves)", flag_values=fv)
    flags.DEFINE_string(
        "config", None,
        "training config file (default: the built-in settings, = configs/mnist_skipdit.py; "
        "--task video: skipdit_jax/demo/video_config.py)",
        flag_values=fv,
    )
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
    if fv.task not in TASKS:
        raise UserError(f"unknown demo task {fv.task!r}; expected one of: {', '.join(TASKS)}")
    out = fv.out or DEFAULT_OUT[fv.task]
    if fv.task == "video":
        if fv.compare_dit:
            raise UserError("--compare-dit is for --task image (the video demo trains one Latte-skip)")
        from skipdit_jax.demo.video import run_video_demo

        run_video_demo(out, fv.minutes, fv.config)
        return 0
    from skipdit_jax.demo.image import run_demo

    run_demo(out, fv.minutes, fv.config, compare_dit=fv.compare_dit)
    return 0
