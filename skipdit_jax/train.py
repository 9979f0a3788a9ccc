"""The trainer: one readable function, top to bottom.

    config -> validate -> mesh -> data -> model + optimizer (created sharded) -> restore
    -> compile the step once -> loop (log, sample, checkpoint, preemption) -> final save

Checkpoints (Orbax `CheckpointManager`, local or `gs://` workdirs) hold the train state
(params, EMA, optimizer state, step, skipped-update count), the base RNG key, the data
iterator's position and the config, so a restarted run continues exactly where the last
checkpoint left it. SIGTERM saves a checkpoint and stops; SIGKILL loses at most the steps
since the last one.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from tqdm import tqdm

from skipdit_jax import data as data_lib
from skipdit_jax import checkpoints, images, optim, sharding, train_config
from skipdit_jax.cache import SkipCache
from skipdit_jax.errors import CheckpointError, ConfigError
from skipdit_jax.metric_logging import MetricWriter
from skipdit_jax.model_config import ModelConfig
from skipdit_jax.models import count_params, init_params
from skipdit_jax.sampling import sample
from skipdit_jax.train_step import TrainState, init_train_state, make_train_step


@dataclasses.dataclass
class TrainResult:
    model_config: ModelConfig
    state: TrainState
    steps_run: int
    final_step: int
    seconds: float
    compile_seconds: float
    last_metrics: dict
    preempted: bool = False


# ---- data -------------------------------------------------------------------------------------
def make_source(config: ml_collections.ConfigDict, split: str = "train"):
    d = config.data
    if d.name == "mnist":
        return data_lib.mnist_source(image_size=d.image_size, split=split, resize=d.mnist_resize)
    if d.name == "folder":
        return data_lib.ImageFolderSource(d.path, d.image_size)
    return data_lib.LatentSource(d.path)


# ---- initial parameters -----------------------------------------------------------------------
def initial_params(mc: ModelConfig, config: ml_collections.ConfigDict, rng: jax.Array):
    """Fresh parameters, or those of `train.init_from` where it has them: a vanilla DiT
    checkpoint starts a Skip-DiT with fresh skip modules (stage 1 of the fine-tune)."""
    params = init_params(mc, rng)
    src = config.train.init_from
    if not src:
        return params
    from skipdit_jax.checkpoints import load_model

    # A training workdir hands over its raw parameters (stage 2 continues stage 1's weights).
    src_cfg, src_params = load_model(src, num_heads=config.train.init_num_heads or mc.num_heads, use_ema=False)
    for name in ("depth", "hidden_size", "patch_size", "input_size", "in_channels", "num_classes", "learn_sigma"):
        if getattr(src_cfg, name) != getattr(mc, name):
            raise ConfigError(f"train.init_from has {name}={getattr(src_cfg, name)} but the model has {getattr(mc, name)}")
    merged = dict(params)
    for key, value in src_params.items():
        merged[key] = jax.tree.map(jnp.asarray, value)
    fresh = sorted(set(params) - set(src_params))
    logging.info("initialised from %s; fresh modules: %s", src, ", ".join(fresh) or "none")
    return merged


# ---- checkpoints ------------------------------------------------------------------------------
def _checkpoint_manager(workdir: epath.Path, config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.keep,
        enable_async_checkpointing=config.checkpoint.async_save,
        create=True,
    )
    return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def _save(mngr, step: int, state: TrainState, rng: jax.Array, it, config) -> None:
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


def _restore_latest(mngr, abstract_state, it):
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


# ---- sample grids -----------------------------------------------------------------------------
def sample_grid(mc: ModelConfig, params, config, path: epath.Path, step: int, writer: MetricWriter | None = None):
    s = config.sample
    labels = jnp.repeat(jnp.arange(mc.num_classes or 1, dtype=jnp.int32), s.num_per_class)
    noise = jax.random.normal(jax.random.key(1234), (labels.shape[0], mc.input_size, mc.input_size, mc.in_channels))
    half = mc.num_encoder_blocks
    cache = SkipCache(s.cache_interval, s.shallow_blocks) if mc.long_skip and s.cache_interval > 1 and 1 <= s.shallow_blocks < half else None
    x = sample(
        mc, params, noise=noise, labels=labels, sampler=s.sampler, num_steps=s.num_steps,
        cfg_scale=s.cfg_scale if mc.num_classes else 1.0, cache=cache, clip_denoised=s.clip_denoised,
    )
    x = np.asarray(x)
    if mc.in_channels == 4:
        x = images.latents_for_display(x)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        images.save_grid(x, str(path), nrow=mc.num_classes or None, upscale=max(1, 64 // mc.input_size))
        if writer is not None:
            writer.write_image(step, "samples", images.make_grid(images.to_uint8(x)))


# ---- the trainer ------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> TrainResult:
    workdir = checkpoints.absolute_path(workdir)  # Orbax needs absolute paths
    t_start = time.perf_counter()

    # -- validate (before anything compiles) -------------------------------------------------
    mc = train_config.validate(config, jax.device_count(), jax.process_count())
    t = config.train

    # -- mesh ---------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape), jax.device_count(), jax.process_count())

    # -- data: each process reads its slice of every global batch --------------------------------
    it = data_lib.make_train_iterator(
        make_source(config),
        global_batch_size=t.global_batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        flip=config.data.flip,
    )

    # -- model, optimizer and state, created already sharded --------------------------------------
    rng = jax.random.key(config.seed)
    init_rng, rng = jax.random.split(rng)
    abstract_params = jax.eval_shape(lambda: init_params(mc, init_rng))
    tx = optim.make_optimizer(_opt_cfg(config), abstract_params, t.trainable)
    abstract_state = jax.eval_shape(lambda p: init_train_state(p, tx), abstract_params)
    shard = lambda tree: sharding.param_shardings(tree, mesh, min_shard_size=config.mesh.min_shard_size)  # noqa: E731
    state_shardings = TrainState(
        step=sharding.replicated(mesh),
        params=shard(abstract_state.params),
        ema_params=shard(abstract_state.ema_params),
        opt_state=shard(abstract_state.opt_state),
        skipped_updates=sharding.replicated(mesh),
    )
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings)

    # -- restore or initialise -----------------------------------------------------------------
    mngr = _checkpoint_manager(workdir, config)
    restored = _restore_latest(mngr, abstract_state, it)
    if restored is not None:
        state, rng = restored
        logging.info("resumed from step %d", int(state.step))
    else:
        params = initial_params(mc, config, init_rng)
        state = jax.jit(lambda p: init_train_state(p, tx), out_shardings=state_shardings)(params)
    start_step = int(state.step)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "model_config.json").write_text(mc.to_json())
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    writer = MetricWriter(workdir, resume_step=start_step)

    # -- compile the step once -------------------------------------------------------------------
    step_fn = make_train_step(
        mc, tx, ema_decay=t.ema_decay, ema_warmup=t.ema_warmup, label_dropout=t.label_dropout,
        grad_skip_threshold=t.grad_skip_threshold, min_snr_gamma=t.min_snr_gamma,
    )
    batch_sharding = sharding.batch_sharding(mesh)
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding, sharding.replicated(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    abstract_batch = {
        "image": jax.ShapeDtypeStruct((t.global_batch_size, mc.input_size, mc.input_size, mc.in_channels), jnp.float32, sharding=batch_sharding),
        "label": jax.ShapeDtypeStruct((t.global_batch_size,), jnp.int32, sharding=batch_sharding),
    }
    t0 = time.perf_counter()
    compiled = jitted.lower(abstract_state, abstract_batch, rng).compile()
    compile_seconds = time.perf_counter() - t0
    if jax.process_index() == 0:
        print(
            f"{'Skip-DiT' if mc.long_skip else 'DiT'} depth {mc.depth} width {mc.hidden_size}: "
            f"{count_params(abstract_params):,} parameters; train step compiled in {compile_seconds:.1f} s; "
            f"{'resuming at' if start_step else 'starting at'} step {start_step} of {t.steps}"
        )

    # -- preemption: SIGTERM -> save and stop --------------------------------------------------
    stop = {"requested": False}
    previous_handler = None
    if jax.process_count() == 1:
        def on_sigterm(signum, frame):
            stop["requested"] = True
        try:
            previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            previous_handler = None

    def preempted(step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return stop["requested"]

    # -- loop ----------------------------------------------------------------------------------
    schedule = optim.learning_rate_schedule(_opt_cfg(config))
    pending: list[dict] = []
    last_metrics: dict = {}
    bar = tqdm(total=t.steps, initial=start_step, desc="train", unit="step", disable=not progress or jax.process_index() > 0)
    t_loop, t_log, step = time.perf_counter(), time.perf_counter(), start_step
    steps_since_log, was_preempted = 0, False
    try:
        while step < t.steps:
            batch = sharding.global_batch(mesh, next(it))
            state, metrics = compiled(state, batch, rng)
            pending.append(metrics)
            step += 1
            steps_since_log += 1
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                stacked = jax.device_get(pending)  # the one host sync per logging interval
                now = time.perf_counter()
                last_metrics = {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}
                last_metrics["skipped_updates"] = float(stacked[-1]["skipped_updates"])
                last_metrics["lr"] = float(schedule(step - 1))
                last_metrics["steps_per_s"] = steps_since_log / (now - t_log)
                last_metrics["examples_per_s"] = last_metrics["steps_per_s"] * t.global_batch_size
                writer.write(step, last_metrics)
                bar.set_postfix(loss=f"{last_metrics['loss']:.4f}")
                pending, t_log, steps_since_log = [], now, 0
            if config.sample.every and step % config.sample.every == 0:
                sample_grid(mc, state.ema_params, config, workdir / "samples" / f"step_{step:07d}.png", step, writer)
            out_of_time = t.max_seconds is not None and time.perf_counter() - t_start > t.max_seconds
            if step % config.checkpoint.every == 0 or step == t.steps or out_of_time:
                _save(mngr, step, state, rng, it, config)
            if preempted(step):
                _save(mngr, step, state, rng, it, config)
                was_preempted = True
                print(f"preempted: saved a checkpoint at step {step}")
                break
            if out_of_time:
                print(f"time budget of {t.max_seconds:.0f} s reached at step {step}")
                break
    finally:
        bar.close()
        mngr.wait_until_finished()
        writer.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return TrainResult(
        model_config=mc,
        state=state,
        steps_run=step - start_step,
        final_step=step,
        seconds=time.perf_counter() - t_loop,
        compile_seconds=compile_seconds,
        last_metrics=last_metrics,
        preempted=was_preempted,
    )


def _opt_cfg(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The optimizer section plus the run length (for decay schedules)."""
    cfg = ml_collections.ConfigDict(config.optimizer.to_dict())
    cfg.steps = config.train.steps
    return cfg


def load_trained(workdir, use_ema: bool = True) -> tuple[ModelConfig, Any]:
    """(model_config, params) of the latest checkpoint in a training workdir (EMA by default)."""
    workdir = checkpoints.absolute_path(workdir)
    cfg_file = workdir / "model_config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{workdir} is not a training workdir (no model_config.json)")
    mc = ModelConfig.from_json(cfg_file.read_text())
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
