"""The trainer: one readable function, top to bottom.

    config -> validate -> mesh -> data -> model + optimizer (created sharded) -> restore
    -> compile the step once -> evaluations left pending at the restored step
    -> loop (log, profile, checkpoint, evaluate, preemption) -> final save

Checkpoints (Orbax `CheckpointManager`, local or `gs://` workdirs) hold the train state
(params, EMA, optimizer state, step, skipped-update count), the base RNG key, the data
iterator's position and the config, so a restarted run continues exactly where the last
checkpoint left it. SIGTERM saves a checkpoint and stops; SIGKILL loses at most the steps
since the last one. Every stop (preemption, time budget, an exception) first writes the
metrics of the steps since the last logged row.

Evaluations (`config.evals`, `skipdit_jax.training.evaluators`) at step s run after the
checkpoint of step s is saved (a step with an evaluation due is always saved, and the save
is waited for), so a stop during a long evaluation loses no training. A restarted run first
runs the evaluations due at the restored step that have no row in metrics.jsonl (SIGTERM
during an evaluation aborts it between batches; SIGKILL or an error just ends the process),
then trains on; a completed evaluation is never repeated.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from skipdit_jax import data as data_lib
from skipdit_jax import paths, sharding
from skipdit_jax.errors import ConfigError
from skipdit_jax.models.families import config_to_dict, family_of
from skipdit_jax.training import checkpoints, evaluators, optim
from skipdit_jax.training import config as train_config
from skipdit_jax.training.metric_logging import MetricWriter
from skipdit_jax.training.train_step import TrainState, init_train_state, make_train_step


@dataclasses.dataclass
class TrainResult:
    model_config: Any
    state: TrainState
    steps_run: int
    final_step: int
    seconds: float
    compile_seconds: float
    last_metrics: dict
    preempted: bool = False


# ---- data -------------------------------------------------------------------------------------
def make_source(config: ml_collections.ConfigDict, split: str = "train", family=None):
    """The random-access source `config.data` names (records: see `skipdit_jax.data`).
    `family` (the model's) picks what text data holds: embeddings for a model whose
    batch has "text_emb", else word tokens (`skipdit_jax.data.text_video`)."""
    d = config.data
    wants_embeddings = family is not None and "text_emb" in family.batch_spec(1)
    if d.name == "text_moving_digits":
        from skipdit_jax.data.text_video import TextMovingDigitsSource, t5_encode_fn

        encode = t5_encode_fn(d.t5, d.tokenizer, d.text_len) if wants_embeddings else None
        return TextMovingDigitsSource(split=split, num_frames=d.num_frames, image_size=d.image_size, text_len=d.text_len, encode=encode)
    if d.name == "latents" and wants_embeddings:
        from skipdit_jax.data.text_video import TextLatentSource

        return TextLatentSource(d.path)
    if d.name == "mnist":
        return data_lib.mnist_source(image_size=d.image_size, split=split, resize=d.mnist_resize)
    if d.name == "folder":
        return data_lib.ImageFolderSource(d.path, d.image_size)
    if d.name == "moving_digits":
        from skipdit_jax.data.moving_digits import moving_digits_source

        return moving_digits_source(
            split=split, num_frames=d.num_frames, image_size=d.image_size, digit_size=d.digit_size or None, motion_grid=d.motion_grid
        )
    if d.name == "video_folder":
        return data_lib.VideoFolderSource(
            d.path, image_size=d.image_size, num_frames=d.num_frames, frame_interval=d.frame_interval,
            resize=d.video_resize, frame_sampling=d.frame_sampling, classes=d.num_classes > 0,
        )
    return data_lib.LatentSource(d.path)


# ---- initial parameters -----------------------------------------------------------------------
# What `train.init_from` must agree on with the model being trained.
_INIT_FROM_FIELDS = (
    "depth", "hidden_size", "patch_size", "input_size", "in_channels", "num_classes", "learn_sigma", "num_frames",
)


def load_init_from(family, config: ml_collections.ConfigDict, param_shardings):
    """The parameters of `train.init_from` (a model directory, an official checkpoint or a
    training workdir's raw weights), placed straight onto their shards (a device receives
    only its slice), or None when no source is set."""
    src = config.train.init_from
    if not src:
        return None
    from skipdit_jax.model_store import load_model

    mc = family.config
    src_cfg, src_params = load_model(src, num_heads=config.train.init_num_heads or mc.num_heads, use_ema=config.train.init_use_ema)
    if type(src_cfg).family != type(mc).family:
        raise ConfigError(f"train.init_from is a {type(src_cfg).family} model but the run trains a {type(mc).family} model")
    for name in _INIT_FROM_FIELDS:
        if getattr(src_cfg, name, None) != getattr(mc, name, None):
            raise ConfigError(f"train.init_from has {name}={getattr(src_cfg, name)} but the model has {getattr(mc, name)}")
    unknown = _module_diff(src_params, param_shardings)
    if unknown:
        raise ConfigError(f"train.init_from has modules the model lacks: {', '.join(unknown)}")
    put = lambda a, s: jax.device_put(np.asarray(a), s)  # noqa: E731
    placed = jax.tree.map(put, src_params, _like(param_shardings, src_params))
    fresh = _module_diff(param_shardings, src_params)
    logging.info("initialised from %s; fresh modules: %s", src, ", ".join(fresh) or "none")
    return placed


def _module_diff(tree, other, prefix: str = "") -> list[str]:
    """The modules ("/"-joined dict paths) of `tree` that `other` lacks, at any nesting
    (a composite model, e.g. {"text_encoder", "model"}, may lack a nested module)."""
    out = []
    for k in sorted(tree):
        if k not in other:
            out.append(prefix + k)
        elif isinstance(tree[k], dict) and isinstance(other[k], dict):
            out += _module_diff(tree[k], other[k], f"{prefix}{k}/")
    return out


def _like(tree, part):
    """The sub-tree of `tree` with the dict keys of `part` (a subset, at any nesting)."""
    if isinstance(part, dict):
        return {k: _like(tree[k], v) for k, v in part.items()}
    return tree


def _merge(params, loaded):
    """`params` with every module `loaded` holds replaced by it, at any nesting."""
    if not isinstance(loaded, dict) or not isinstance(params, dict):
        return loaded
    return {**params, **{k: _merge(params[k], v) if k in params else v for k, v in loaded.items()}}


def train_state_shardings(abstract_state: TrainState, mesh, min_shard_size: int, param_axes) -> TrainState:
    """Where every part of the train state lives: params, EMA and optimizer state by the
    family's `param_axes` rules (FSDP, `skipdit_jax.sharding`), the counters replicated."""
    shard = lambda tree: sharding.param_shardings(tree, mesh, param_axes=param_axes, min_shard_size=min_shard_size)  # noqa: E731
    return TrainState(
        step=sharding.replicated(mesh),
        params=shard(abstract_state.params),
        ema_params=shard(abstract_state.ema_params),
        opt_state=shard(abstract_state.opt_state),
        skipped_updates=sharding.replicated(mesh),
    )


def create_train_state(family, config, tx, init_rng, state_shardings: TrainState) -> TrainState:
    """A fresh train state, created already sharded: every array is born on its shards
    (`jax.jit(init, out_shardings=...)`), so no device ever holds a whole copy. With
    `train.init_from`, its weights replace the fresh ones (fresh skip modules stay)."""
    loaded = load_init_from(family, config, state_shardings.params)
    return sharded_initializer(family, tx, state_shardings, loaded)(init_rng, loaded)


def sharded_initializer(family, tx, state_shardings: TrainState, loaded=None):
    """The jitted `init(rng, loaded) -> TrainState` whose outputs are created on their
    shards; `loaded` (a sub-dict of parameters, already sharded) replaces fresh modules."""

    def init(rng, loaded):
        params = family.init_params(rng)
        if loaded is not None:
            params = _merge(params, loaded)
        return init_train_state(params, tx)

    loaded_shardings = None if loaded is None else _like(state_shardings.params, loaded)
    return jax.jit(init, in_shardings=(None, loaded_shardings), out_shardings=state_shardings)


# ---- loop helpers -----------------------------------------------------------------------------
class IntervalMetrics:
    """The step metrics of the current logging interval, kept on device until `flush`
    (one host sync per logged row) writes their means as the row of a step. Flushed at
    every `train.log_every` and at every stop, so no step's metrics are lost."""

    def __init__(self, writer: MetricWriter, schedule, global_batch_size: int):
        self.writer, self.schedule, self.global_batch_size = writer, schedule, global_batch_size
        self.pending: list[dict] = []
        self.t_start = time.perf_counter()
        self.last: dict = {}

    def add(self, metrics: dict) -> None:
        self.pending.append(metrics)

    def flush(self, step: int) -> dict:
        """Write the row of `step` (means over the pending steps; none pending: no row)."""
        if not self.pending:
            return self.last
        stacked = jax.device_get(self.pending)
        now = time.perf_counter()
        m = {k: float(np.mean([x[k] for x in stacked])) for k in stacked[0]}
        m["skipped_updates"] = float(stacked[-1]["skipped_updates"])
        m["lr"] = float(self.schedule(step - 1))
        m["steps_per_s"] = len(stacked) / (now - self.t_start)
        m["examples_per_s"] = m["steps_per_s"] * self.global_batch_size
        self.writer.write(step, m)
        self.pending, self.t_start, self.last = [], now, m
        return m


class StepProfiler:
    """A `jax.profiler` trace of `steps` steps (0 = off) into `logdir`, from `after` steps
    into this (re)started run, so compilation and warm-up stay out of it. Process 0 only:
    one trace, one writer. TensorBoard reads it from LOGDIR/plugins/profile."""

    def __init__(self, logdir, start_step: int, after: int, steps: int):
        self.logdir = logdir
        self.active = steps > 0 and jax.process_index() == 0
        self.first, self.end = start_step + after, start_step + after + steps
        self.tracing = False

    def before_step(self, step: int) -> None:
        """`step`: the steps done so far."""
        if self.active and not self.tracing and self.first <= step < self.end:
            paths.as_path(self.logdir).mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.logdir))
            self.tracing = True

    def after_step(self, step: int, state) -> None:
        if self.tracing and step >= self.end:
            self.stop(state)

    def stop(self, wait_for=None) -> None:
        if self.tracing:
            if wait_for is not None:
                jax.block_until_ready(wait_for)  # the traced steps' device work, not just their dispatch
            jax.profiler.stop_trace()
            self.tracing = False


# ---- the trainer ------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> TrainResult:
    workdir = paths.as_path(workdir)  # Orbax needs absolute paths
    t_start = time.perf_counter()

    # -- validate (before anything compiles) -------------------------------------------------
    mc = train_config.validate(config, jax.device_count(), jax.process_count())
    family = family_of(mc)
    evals = [ev for ev in evaluators.build_evaluators(config, family) if ev.every > 0]
    t = config.train

    # -- mesh ---------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape), jax.device_count(), jax.process_count())

    # -- data: each process reads its slice of every global batch --------------------------------
    it = data_lib.make_train_iterator(
        make_source(config, family=family),
        global_batch_size=t.global_batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        flip=config.data.flip,
        fields={k: v.dtype for k, v in family.batch_spec(1).items()},  # what this family trains on
        images_per_video=config.data.images_per_video if type(mc).family in ("latte", "latte_t2v") else 0,
    )

    # -- model, optimizer and state, created already sharded --------------------------------------
    rng = jax.random.key(config.seed)
    init_rng, rng = jax.random.split(rng)
    abstract_params = family.abstract_params()
    tx = optim.make_optimizer(_opt_cfg(config), abstract_params, t.trainable)
    abstract_state = jax.eval_shape(lambda p: init_train_state(p, tx), abstract_params)
    state_shardings = train_state_shardings(abstract_state, mesh, config.mesh.min_shard_size, family.param_axes)
    with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    abstract_state = jax.tree.map(with_sharding, abstract_state, state_shardings)

    # -- restore or initialise -----------------------------------------------------------------
    mngr = checkpoints.checkpoint_manager(workdir, config)
    restored = checkpoints.restore_latest(mngr, abstract_state, it)
    if restored is not None:
        state, rng = restored
        logging.info("resumed from step %d", int(state.step))
    else:
        state = create_train_state(family, config, tx, init_rng, state_shardings)
    start_step = int(state.step)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        paths.atomic_write_text(workdir / checkpoints.MODEL_CONFIG_FILE, json.dumps(config_to_dict(mc), indent=2, sort_keys=True))
        paths.atomic_write_text(workdir / "config.json", json.dumps(config.to_dict(), indent=2, default=str))
    writer = MetricWriter(workdir, resume_step=start_step)

    # -- compile the step once -------------------------------------------------------------------
    step_fn = make_train_step(
        mc, tx, ema_decay=t.ema_decay, ema_warmup=t.ema_warmup, label_dropout=t.label_dropout,
        grad_skip_threshold=t.grad_skip_threshold, min_snr_gamma=t.min_snr_gamma, grad_accum_steps=t.grad_accum_steps,
        trainable=t.trainable,
    )
    batch_sharding = sharding.batch_sharding(mesh)
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding, sharding.replicated(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    abstract_batch = {
        k: with_sharding(v, batch_sharding) for k, v in family.batch_spec(t.global_batch_size).items()
    }
    t0 = time.perf_counter()
    compiled = jitted.lower(abstract_state, abstract_batch, rng).compile()
    compile_seconds = time.perf_counter() - t0
    if jax.process_index() == 0:
        print(
            f"{family.describe()}; train step compiled in {compile_seconds:.1f} s; "
            f"{'resuming at' if start_step else 'starting at'} step {start_step} of {t.steps}; {evaluators.describe(evals)}"
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
    eval_ctx = evaluators.EvalContext(workdir=workdir, mesh=mesh, writer=writer, should_stop=lambda: stop["requested"])
    interval = IntervalMetrics(writer, optim.learning_rate_schedule(_opt_cfg(config)), t.global_batch_size)
    profiler = StepProfiler(workdir / "profile", start_step, t.profile_after, t.profile_steps)
    bar = tqdm(total=t.steps, initial=start_step, desc="train", unit="step", disable=not progress or jax.process_index() > 0)
    t_loop, step, was_preempted = time.perf_counter(), start_step, False
    try:
        # Evaluators load their weights and references first (a bad file fails now, not at
        # the first evaluation), then finish the evaluations left pending at this step.
        for ev in evals:
            ev.prepare(eval_ctx)
        left = evaluators.pending(evals, start_step, workdir)
        if left and jax.process_index() == 0:
            print(f"step {start_step}: running the evaluations left unfinished: {', '.join(ev.name for ev in left)}")
        was_preempted = not _evaluate(left, state, start_step, eval_ctx)
        while step < t.steps and not was_preempted:
            profiler.before_step(step)
            batch = sharding.global_batch(mesh, next(it))
            state, metrics = compiled(state, batch, rng)
            interval.add(metrics)
            step += 1
            bar.update(1)
            profiler.after_step(step, state)
            if step % t.log_every == 0 or step == t.steps:
                bar.set_postfix(loss=f"{interval.flush(step)['loss']:.4f}")
            out_of_time = _out_of_time(t.max_seconds, t_start)
            # Asked every step (on several hosts it is a collective); a step is saved once
            # even when it is both a checkpoint step and where the stop is noticed.
            was_preempted = preempted(step)
            due = evaluators.due(evals, step)
            if step % config.checkpoint.every == 0 or step == t.steps or out_of_time or was_preempted or due:
                checkpoints.save(mngr, step, state, rng, it, config)
            if was_preempted:
                print(f"preempted: saved a checkpoint at step {step}")
                break
            if out_of_time:  # evaluations due now run when the run is resumed
                print(f"time budget of {t.max_seconds:.0f} s reached at step {step}")
                break
            if due:
                mngr.wait_until_finished()  # the checkpoint of this step is on disk before its evaluations
                interval.flush(step)  # and so are its training metrics (a kill during a long evaluation loses none)
                t_eval = time.perf_counter()
                was_preempted = not _evaluate(due, state, step, eval_ctx)
                interval.t_start += time.perf_counter() - t_eval  # throughput counts training only
    finally:
        bar.close()
        _flush_on_stop(interval, step)
        profiler.stop()
        mngr.wait_until_finished()
        writer.close()
        _restore_handler(previous_handler)
    return TrainResult(
        model_config=mc,
        state=state,
        steps_run=step - start_step,
        final_step=step,
        seconds=time.perf_counter() - t_loop,
        compile_seconds=compile_seconds,
        last_metrics=interval.last,
        preempted=was_preempted,
    )


def _out_of_time(max_seconds: float | None, t_start: float) -> bool:
    """Whether the time budget is spent, as process 0's clock says: every process must
    agree, or one would save and stop while the others wait in the next step's collectives."""
    if max_seconds is None:
        return False
    spent = time.perf_counter() - t_start > max_seconds
    if jax.process_count() == 1:
        return spent
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(spent)))


def _flush_on_stop(interval: IntervalMetrics, step: int) -> None:
    """Write the partial interval's row when the loop stops early (preemption, time
    budget, an exception). Never raises: it must not hide the exception that stopped it."""
    try:
        interval.flush(step)
    except Exception as e:  # noqa: BLE001 - e.g. the device error that stopped training
        logging.warning("could not write the metrics of the steps before step %d: %s", step, e)


def _evaluate(evals, state: TrainState, step: int, ctx) -> bool:
    """Run `evals` on the EMA weights at `step`; False when a stop request interrupted them
    (the checkpoint of `step` is saved: they rerun on restart)."""
    try:
        evaluators.run_evaluations(evals, state.ema_params, step, ctx)
        return True
    except evaluators.EvaluationInterrupted:
        print(f"preempted during the evaluations of step {step}: its checkpoint is saved; they rerun on restart")
        return False


def _restore_handler(previous_handler) -> None:
    if previous_handler is not None:
        signal.signal(signal.SIGTERM, previous_handler)


def _opt_cfg(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The optimizer section plus the run length (for decay schedules)."""
    cfg = ml_collections.ConfigDict(config.optimizer.to_dict())
    cfg.steps = config.train.steps
    return cfg
