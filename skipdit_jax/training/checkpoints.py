"""Training checkpoints: an Orbax `CheckpointManager` in WORKDIR/checkpoints (local or
`gs://`) holding the train state (params, EMA, optimizer state, step, skipped-update
count), the base RNG key, the data iterator's position and the config, so a restarted run
continues exactly; and `load_trained`, the parameters of a workdir's latest checkpoint.

Restoring tells two failures apart:
  * a *damaged* step (files missing, metadata that is not JSON, array data that is
    truncated or garbage): set aside as STEP.damaged (kept, never deleted) and the next
    older step is tried -- the run loses the steps since that one, and nothing else;
  * anything else (the config changed so the shapes or the tree no longer fit, out of
    memory, a transient I/O error): a `CheckpointError` and nothing is touched, since
    setting a good checkpoint aside would throw away training that a corrected restart
    could have kept.
"""

from __future__ import annotations

import json
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
from skipdit_jax.sharding import _path_str

MODEL_CONFIG_FILE = "model_config.json"
ITEMS = ("state", "rng", "data", "config")

# Status codes of TensorStore errors (raised as ValueError("CODE: ...")) that mean the
# bytes on storage are missing or undecodable. The others (UNAVAILABLE, DEADLINE_EXCEEDED,
# RESOURCE_EXHAUSTED, PERMISSION_DENIED, ...) say nothing about the checkpoint itself.
_UNREADABLE_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION")


def _item_handlers(state_handler=None) -> dict:
    # Registered up front so `item_metadata` can read a step before anything was restored.
    return {
        "state": state_handler or ocp.StandardCheckpointHandler(),
        "rng": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
    }


def checkpoint_manager(workdir: epath.Path, config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.keep,
        enable_async_checkpointing=config.checkpoint.async_save,
        create=True,
    )
    return ocp.CheckpointManager(paths.as_path(workdir) / "checkpoints", options=options, item_handlers=_item_handlers())


def save(mngr, step: int, state, rng: jax.Array, it, config) -> None:
    """Save `step` (the caller saves each step at most once: Orbax refuses a second save)."""
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


# ---- telling damage from other failures --------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _metadata_files(step_dir: epath.Path) -> list[epath.Path]:
    """The small JSON files without which a step cannot be read by this process: the tree
    metadata of the array items, the config, and this process's data-iterator state
    (Grain writes one `process_I-of-N.json` per process)."""
    data_file = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return [step_dir / "state" / "_METADATA", step_dir / "rng" / "_METADATA", step_dir / "config" / "metadata", step_dir / "data" / data_file]


def missing_or_unreadable(step_dir: epath.Path) -> str | None:
    """Why the files of a checkpoint step cannot be read (an item directory or a metadata
    file missing, metadata that is not JSON), or None when they look intact. Only metadata
    is read here; missing or corrupt array data shows when it is read (`is_unreadable`)."""
    for item in ITEMS:
        if not (step_dir / item).is_dir():
            return f"{item}/ is missing"
    for f in _metadata_files(step_dir):
        if not f.exists():
            return f"{f.parent.name}/{f.name} is missing"
        try:
            json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            return f"{f.parent.name}/{f.name} is not valid JSON ({_first_line(e)})"
    return None


def saved_process_count(step_dir: epath.Path) -> int | None:
    """How many processes saved a step (from Grain's `process_I-of-N.json` names), or None."""
    counts = {f.name.rsplit("-of-", 1)[1].removesuffix(".json") for f in (step_dir / "data").glob("process_*-of-*.json")}
    return int(counts.pop()) if len(counts) == 1 and next(iter(counts)).isdigit() else None


def is_unreadable(e: BaseException) -> bool:
    """Whether an exception raised while reading a checkpoint means its bytes are missing or
    corrupt (a file not found, undecodable JSON, a TensorStore data error), anywhere in
    its chain of causes (Orbax wraps TensorStore's errors in a bare Exception)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)):
            return True
        if isinstance(e, ValueError) and str(e).split(":", 1)[0].strip() in _UNREADABLE_CODES:
            return True
        e = e.__cause__ or e.__context__
    return False


def _leaf_table(tree) -> dict[str, Any]:
    tree = getattr(tree, "tree", tree)  # Orbax's TreeMetadata wraps the nested dict
    return {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def describe_mismatch(saved_metadata, abstract_state) -> str | None:
    """The first difference between a saved train state (Orbax metadata) and this run's
    (tree paths, shapes, dtypes), as a phrase, or None when they fit. Shardings may
    differ: Orbax reshards on restore."""
    saved, wanted = _leaf_table(saved_metadata), _leaf_table(abstract_state)
    problems = [f"{k} is in the checkpoint but not in this run" for k in sorted(saved.keys() - wanted.keys())]
    problems += [f"{k} is in this run but not in the checkpoint" for k in sorted(wanted.keys() - saved.keys())]
    for k in sorted(saved.keys() & wanted.keys(), key=lambda k: (not k.startswith("params/"), k)):  # name a parameter first
        (a, b) = saved[k], wanted[k]
        if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
            problems.append(f"{k} is {np.dtype(a.dtype).name}{list(a.shape)} in the checkpoint but {np.dtype(b.dtype).name}{list(b.shape)} in this run")
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else "")


# ---- restore -----------------------------------------------------------------------------------
_OK, _DAMAGED, _FAILED = 0, 1, 2


def _check_step(mngr, step: int, abstract_state) -> tuple[int, str | None]:
    """(code, reason) from the step's files and metadata alone, before any array is read:
    _DAMAGED (files missing or unreadable), _FAILED (saved by another process count, or
    shapes, dtypes or tree that no longer fit this run's config) or _OK."""
    step_dir = epath.Path(mngr.directory) / str(step)
    saved = saved_process_count(step_dir)
    if saved not in (None, jax.process_count()):
        # Not damage: the data iterator's position is saved per process.
        return _FAILED, (
            f"checkpoint step {step} in {mngr.directory} was saved by {saved} processes but this run has "
            f"{jax.process_count()}; resume with {saved}, or use a new --workdir"
        )
    damage = missing_or_unreadable(step_dir)
    if damage:
        return _DAMAGED, damage
    try:
        mismatch = describe_mismatch(mngr.item_metadata(step)["state"], abstract_state)
    except Exception as e:  # noqa: BLE001 - sorted by _classify
        return _classify(e, step, mngr)
    if mismatch:
        return _FAILED, (
            f"checkpoint step {step} in {mngr.directory} does not fit this run's config: {mismatch}; "
            "resume with the config it was saved with, or use a new --workdir"
        )
    return _OK, None


def _read_step(mngr, step: int, abstract_state, it):
    """(code, restored items, reason): the arrays, the RNG key and the iterator position."""
    try:
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                rng=ocp.args.StandardRestore(),
                data=data_lib.iterator_state_restore_args(it),
            ),
        )
    except Exception as e:  # noqa: BLE001 - sorted by _classify
        code, reason = _classify(e, step, mngr)
        return code, None, reason
    return _OK, restored, None


def _classify(e: Exception, step: int, mngr) -> tuple[int, str]:
    """_DAMAGED for an error that says the bytes are missing or corrupt, else _FAILED."""
    if is_unreadable(e):
        return _DAMAGED, _first_line(e)
    return _FAILED, f"restoring checkpoint step {step} in {mngr.directory} failed ({type(e).__name__}: {_first_line(e)}); nothing was changed"


def _agree(code: int, reason: str | None) -> tuple[int, str | None]:
    """The worst outcome over all processes, so that every process takes the same branch
    (a file can be unreadable from one host only); the reason is this process's, if it
    saw that outcome itself."""
    worst = code
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        worst = int(np.max(multihost_utils.process_allgather(np.int32(code))))
    return worst, reason if code == worst else None


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _set_aside(mngr, step: int) -> None:
    """Rename a damaged step directory to STEP.damaged (kept for inspection, never deleted),
    so the run can save that step again. Process 0 renames; every process waits before
    (nobody is still reading it) and after (nobody lists the directory mid-rename)."""
    _barrier(f"skipdit_set_aside_{step}_before")
    if jax.process_index() == 0:
        src = epath.Path(mngr.directory) / str(step)
        dst = epath.Path(mngr.directory) / f"{step}.damaged"
        if dst.exists():
            dst = epath.Path(mngr.directory) / f"{step}.damaged.{int(time.time())}"
        src.rename(dst)
    _barrier(f"skipdit_set_aside_{step}_after")
    mngr.reload()


def restore_latest(mngr, abstract_state, it):
    """Restore the newest checkpoint into `abstract_state`'s shapes and shardings (and `it`,
    in place). Returns (state, rng), or None when there is no checkpoint.

    A damaged newest step (files missing or unreadable) is set aside with a warning and the
    next older one is tried; a damaged oldest step, or any other failure (a shape, dtype or
    tree mismatch because the config changed, out of memory, a transient I/O error), raises
    `CheckpointError` with one line and leaves every file as it was."""
    steps = sorted(mngr.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        # Agree after the checks and again after the read: no process may enter Orbax's
        # collective restore while another has already given the step up.
        code, reason = _agree(*_check_step(mngr, step, abstract_state))
        if code == _OK:
            code, restored, reason = _read_step(mngr, step, abstract_state, it)
            code, reason = _agree(code, reason)
        if code == _OK:
            return restored["state"], jax.random.wrap_key_data(jnp.asarray(restored["rng"]["key"]))
        if code == _FAILED:
            raise CheckpointError(reason or f"restoring checkpoint step {step} failed on another process; nothing was changed")
        reason = reason or "unreadable on another process"
        if i + 1 == len(steps):
            raise CheckpointError(f"no readable checkpoint in {mngr.directory}: step {step} is damaged ({reason})")
        logging.warning("checkpoint at step %d is unreadable (%s); falling back to step %d", step, reason, steps[i + 1])
        if jax.process_index() == 0:
            print(f"warning: checkpoint at step {step} is unreadable ({reason}); falling back to step {steps[i + 1]}")
        _set_aside(mngr, step)
    return None


# ---- trained parameters ------------------------------------------------------------------------
def load_trained(workdir, use_ema: bool = True) -> tuple[Any, Any]:
    """(model_config, params) of the latest checkpoint in a training workdir: the EMA
    parameters by default, else the raw ones, on this process's first device.

    Only that one subtree is read (an Orbax partial restore): the other parameter copy and
    the two Adam moments, three quarters of the state (11 GB for XL/2), stay on storage."""
    workdir = paths.as_path(workdir)
    cfg_file = workdir / MODEL_CONFIG_FILE
    if not cfg_file.exists():
        raise CheckpointError(f"{workdir} is not a training workdir (no {MODEL_CONFIG_FILE})")
    mc = config_from_dict(json.loads(cfg_file.read_text()))
    mngr = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(create=False, read_only=True),
        # PyTreeCheckpointHandler reads what StandardCheckpointHandler wrote and, unlike
        # it, accepts `partial_restore`.
        item_handlers=_item_handlers(ocp.PyTreeCheckpointHandler()),
    )
    step = mngr.latest_step()
    if step is None:
        raise CheckpointError(f"no checkpoint in {workdir / 'checkpoints'}")
    key = "ema_params" if use_ema else "params"
    # Onto one local device whatever the mesh that saved it.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    meta = mngr.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta[key])
    restore_args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=device, dtype=m.dtype), meta[key])
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeRestore(item={key: target}, restore_args={key: restore_args}, partial_restore=True)),
    )
    return mc, restored["state"][key]
