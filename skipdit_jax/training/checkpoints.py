"""Training checkpoints: an Orbax `CheckpointManager` in WORKDIR/checkpoints (local or
`gs://`) holding the train state (params, EMA, optimizer state, step, skipped-update
count), the base RNG key, the data iterator's position and the config, so a restarted run
continues exactly; and `load_trained`, the parameters of a workdir's latest checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from skipdit_jax import data as data_lib
from skipdit_jax import paths
from skipdit_jax.errors import CheckpointError
from skipdit_jax.models.families import config_from_dict

MODEL_CONFIG_FILE = "model_config.json"


def checkpoint_manager(workdir: epath.Path, config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.keep,
        enable_async_checkpointing=config.checkpoint.async_save,
        create=True,
    )
    return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def save(mngr, step: int, state: TrainState, rng: jax.Array, it, config) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            rng=ocp.args.StandardSave({"key": np.asarray(jax.random.key_data(rng))}),
            data=data_lib.iterator_state_save_args(it),
            config=ocp.args.JsonSave(config.to_dict()),
        ),
        force=True,
    )


def _set_aside(mngr, step: int) -> None:
    """Rename a damaged step directory to STEP.damaged (kept for inspection, never deleted),
    so the run can save that step again."""
    if jax.process_index() == 0:
        src = epath.Path(mngr.directory) / str(step)
        dst = epath.Path(mngr.directory) / f"{step}.damaged"
        if dst.exists():
            dst = epath.Path(mngr.directory) / f"{step}.damaged.{int(time.time())}"
        src.rename(dst)
    mngr.reload()


def restore_latest(mngr, abstract_state, it):
    """Restore the newest readable checkpoint; a damaged one is skipped with a warning.
    Returns (state, rng) or None when there is no checkpoint."""
    steps = sorted(mngr.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        try:
            restored = mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    rng=ocp.args.StandardRestore(),
                    data=data_lib.iterator_state_restore_args(it),
                ),
            )
        except Exception as e:  # noqa: BLE001 - any failure to read means "damaged"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if i + 1 < len(steps):
                logging.warning("checkpoint at step %d is unreadable (%s); falling back to step %d", step, first, steps[i + 1])
                print(f"warning: checkpoint at step {step} is unreadable ({first}); falling back to step {steps[i + 1]}")
                _set_aside(mngr, step)
                continue
            raise CheckpointError(f"no readable checkpoint in {mngr.directory}: step {step} failed with {first}") from None
        return restored["state"], jax.random.wrap_key_data(jnp.asarray(restored["rng"]["key"]))
    return None


def load_trained(workdir, use_ema: bool = True) -> tuple[Any, Any]:
    """(model_config, params) of the latest checkpoint in a training workdir (EMA by default)."""
    import json

    workdir = paths.as_path(workdir)
    cfg_file = workdir / MODEL_CONFIG_FILE
    if not cfg_file.exists():
        raise CheckpointError(f"{workdir} is not a training workdir (no {MODEL_CONFIG_FILE})")
    mc = config_from_dict(json.loads(cfg_file.read_text()))
    mngr = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "rng": ocp.StandardCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
        },
    )
    step = mngr.latest_step()
    if step is None:
        raise CheckpointError(f"no checkpoint in {workdir / 'checkpoints'}")
    # Restore onto one local device whatever the mesh that saved it.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    meta = mngr.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    params = state["ema_params"] if use_ema else state["params"]
    return mc, params
