"""The `skipdit` command line: `skipdit COMMAND [ARGS] [--flags]`.

Each command lives in `skipdit_jax/commands/` and declares its own absl flags, so
`skipdit COMMAND --help` lists only its flags. `--foo-bar` is accepted for `--foo_bar`.
Errors the user can cause print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import importlib
import sys

from absl import flags

from skipdit_jax.errors import UserError

COMMANDS = {
    "demo": "train a small Skip-DiT (or, --task video, Latte-skip) on the embedded MNIST digits and compare sampling with and without Skip-Cache",
    "convert": "convert an official PyTorch (Skip-)DiT checkpoint into a model directory",
    "extract-latents": "encode an image (or, --video, video) folder into VAE latent ArrayRecord shards for training",
    "train": "train a DiT / Skip-DiT from a config file (skipdit train --config configs/NAME.py --workdir DIR)",
    "export": "export a model directory to an official-layout PyTorch .safetensors file",
    "sample": "sample images (or latents) from a model, optionally with Skip-Cache",
    "sample-vbench": "sample VBench's prompts_per_dimension videos (<dimension>/<prompt>-<i>.mp4) from a text-to-video model",
    "sample-many": "draw a large, resumable, sharded sample set (ADM .npz) for FID evaluation",
    "evaluate": "FID, sFID, Inception Score, precision and recall of a sample .npz (FVD for videos) against a reference",
    "convert-i3d": "convert the I3D (Kinetics-400) weight file used for FVD into a safetensors copy for evaluation",
    "convert-inception": "convert the pytorch-fid Inception weight file into a safetensors copy for evaluation",
    "plot-curves": "plot a logged metric (e.g. FID) against training steps for one or more runs",
    "encode-text": "encode prompts into an embedding file: T5 v1.1 for text-to-video models, or Hunyuan-DiT's CLIP + mT5 (--family hunyuan)",
    "calibrate": "fit TeaCache's rescaling polynomial for a DiT (a cache baseline)",
}


def _usage() -> str:
    lines = ["usage: skipdit COMMAND [ARGS] [--flags]   (skipdit COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<16} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def _normalise(argv: list[str]) -> list[str]:
    """--foo-bar[=v] -> --foo_bar[=v] (absl flag names use underscores)."""
    out = []
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    return " ".join(part.strip().strip("'\"") for part in text.splitlines() if part.strip()) or type(e).__name__


def fail(message: str, code: int = 2) -> "None":
    print(f"skipdit: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name = argv[1]
    if name not in COMMANDS:
        fail(f"unknown command {name!r}; commands: {', '.join(COMMANDS)}")
    module = importlib.import_module(f"skipdit_jax.commands.{name.replace('-', '_')}")
    fv = flags.FlagValues()
    flags.DEFINE_bool("help", False, "show this command's flags", flag_values=fv)
    module.define_flags(fv)
    try:
        positional = fv([f"skipdit {name}"] + _normalise(argv[2:]))[1:]
    except flags.Error as e:
        fail(str(e).splitlines()[0])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections config overrides (--config.a.b=v) report unknown keys and bad values this way.
        fail(f"bad config override: {_one_line(e)}")
    if fv.help:
        print(f"usage: skipdit {name} {module.USAGE}\n\n{fv.get_help(include_special_flags=False)}")
        return 0
    # Libraries (e.g. grain's worker processes) expect the global absl flags to be parsed.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS([argv[0]], known_only=True)
    try:
        return module.main(positional, fv) or 0
    except UserError as e:
        fail(_one_line(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)


def run() -> None:
    from skipdit_jax.xla_tuning import tune_xla_cpu_flags

    tune_xla_cpu_flags()  # before any JAX backend starts
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()
