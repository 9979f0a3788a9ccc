"""`skipdit train --config configs/NAME.py --workdir DIR [--config.key=value ...]`."""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from skipdit_jax import distributed
from skipdit_jax.errors import UserError

USAGE = "--config configs/NAME.py --workdir DIR [--config.train.steps=N ...] [--coordinator_address HOST:PORT --num_processes N --process_id I]"


def define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", flag_values=fv, lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and samples go (local path or gs://...)", flag_values=fv)
    distributed.define_flags(fv)


def main(args: list[str], fv: flags.FlagValues) -> int:
    if args:
        raise UserError(f"unexpected arguments {args}; usage: skipdit train {USAGE}")
    if fv.config is None:
        raise UserError("--config is required, e.g. --config configs/mnist_skipdit.py")
    if not fv.workdir:
        raise UserError("--workdir is required")
    distributed.initialize_from_flags(fv)
    from skipdit_jax.training.train import train_and_evaluate

    result = train_and_evaluate(fv.config, fv.workdir)
    m = result.last_metrics
    print(
        f"done: step {result.final_step} ({result.steps_run} this run, {result.seconds:.0f} s), "
        f"loss {m.get('loss', float('nan')):.4f}, skipped updates {int(m.get('skipped_updates', 0))}; workdir {fv.workdir}"
    )
    return 0
