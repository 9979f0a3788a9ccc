"""In-loop evaluators, declared as data: `config.evals` maps a name to a dict with a `type`,
an interval `every` (steps; 0 = off) and the type's own keys, e.g.

    c.evals.fid = dict(type="fid", every=50_000, num_samples=10_000, ref="gs://b/VIRTUAL_imagenet256_labeled.npz",
                       sampler="ddpm", num_steps=250, cfg_scale=1.0)

Types (`REGISTRY`; a new type is one `Evaluator` subclass with `@register`):

  * "grid": a preview PNG of at most 64 EMA samples (WORKDIR/samples/step_NNNNNNN.png and a
    TensorBoard image);
  * "fid": Inception FID of `num_samples` EMA samples against a reference (an ADM reference
    batch .npz, any image .npz or an image folder), optionally sFID, Inception Score,
    precision and recall (`metrics`);
  * "classifier_fid": on MNIST, the Fréchet distance between the penultimate features of a
    small digit classifier on EMA samples and on the real training digits, and the
    fraction of samples it assigns to their conditioning class.

Sampler settings (every key of `config.sample` but `every`) are inherited from
`config.sample`; an evaluator's entry may override any of them. Keys an entry leaves out
take the type's defaults (`Evaluator.defaults`). An unknown type or key, or a bad value,
is one `ConfigError` line from `build_evaluators`, which `config.validate` calls before
anything compiles.

`config.sample.every` is the old spelling of `evals.grid.every` and is still honoured
(None = unset): it sets the grid's interval (0 = off) unless `evals.grid.every` is
non-zero, which wins (so a command-line `--config.evals.grid.every=N` works on a config
file that still writes `sample.every`).

Running: every process takes part (sampling and feature extraction are sharded over the
mesh); process 0 writes one metrics.jsonl row per evaluation, `{"step": s,
"<name>/<metric>": v, ..., "<name>/seconds": t}`, and the scalars to TensorBoard. The
trainer runs the evaluations of step s after the checkpoint of step s is saved, and on
resume runs those due at the restored step that have no row yet (`pending`): an
interrupted evaluation is redone once, a completed one never.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import time
from typing import Any, Callable, ClassVar

import jax
import numpy as np
from absl import logging

from skipdit_jax import images, paths, sharding
from skipdit_jax.errors import ConfigError

# ---- the registry -----------------------------------------------------------------------------
REGISTRY: dict[str, type["Evaluator"]] = {}


def register(cls: type["Evaluator"]) -> type["Evaluator"]:
    REGISTRY[cls.type_name] = cls
    return cls


class EvaluationInterrupted(Exception):
    """A stop was requested (SIGTERM) in the middle of an evaluation: the checkpoint of its
    step is saved and it has no metrics row, so the next run redoes it."""


@dataclasses.dataclass
class EvalContext:
    """What an evaluation may use: the workdir, the mesh, the metric writer and a
    `should_stop()` poll (True once a stop was requested; checked between batches)."""

    workdir: Any
    mesh: Any
    writer: Any = None
    should_stop: Callable[[], bool] = lambda: False

    def check_stop(self) -> None:
        if self.should_stop():
            raise EvaluationInterrupted()


class Evaluator(abc.ABC):
    """One named evaluator. `settings` holds every key: the entry's, the type's `defaults`
    for the rest and, for sampler keys, `config.sample`'s values."""

    type_name: ClassVar[str] = ""
    defaults: ClassVar[dict] = {}  # the type's own keys (besides type, every and sampler keys)

    def __init__(self, name: str, settings: dict, config, family):
        self.name, self.settings, self.config, self.family = name, settings, config, family
        self.every = int(settings["every"])

    # ---- validation (cheap: no weights, no compiling) ----------------------------------
    def check(self) -> None:
        """Raise ConfigError (one line) for a setting that cannot work; called only when
        the evaluator is on (`every > 0`)."""

    def err(self, message: str) -> ConfigError:
        return ConfigError(f"evals.{self.name} ({self.type_name}): {message}")

    def positive(self, *keys: str) -> None:
        for k in keys:
            v = self.settings[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise self.err(f"{k} must be an integer >= 1, got {v!r}")

    # ---- running ---------------------------------------------------------------------------
    def prepare(self, ctx: EvalContext) -> None:
        """Load what every evaluation needs (weights, reference statistics) once, before
        training starts, so a bad file is found at once rather than at the first evaluation."""

    @abc.abstractmethod
    def run(self, params, step: int, ctx: EvalContext) -> dict[str, float]:
        """The metrics of the EMA `params` at `step` (every process calls this; process 0's
        values are written)."""

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0


# ---- building from the config ------------------------------------------------------------------
def sampler_keys(config) -> tuple[str, ...]:
    return tuple(k for k in config.sample.keys() if k != "every")


def _entries(config) -> dict[str, dict]:
    """config.evals as plain dicts, with `sample.every` (the old spelling of
    `evals.grid.every`) folded in: it sets the grid's interval unless `evals.grid.every`
    is set (non-zero), which wins."""
    entries = {}
    for name, entry in config.get("evals", {}).items():
        if not hasattr(entry, "keys"):
            raise ConfigError(f"evals.{name} must be a dict with a type and every, got {entry!r}")
        entries[name] = dict(entry)
    old = config.sample.get("every")
    if old is None:
        return entries
    grid = entries.setdefault("grid", {"type": "grid", "every": 0})
    if grid.get("type") != "grid":
        raise ConfigError("sample.every is the old spelling of evals.grid.every, but evals.grid is not a 'grid' evaluator")
    if not grid.get("every"):
        grid["every"] = old
        if old and old not in _WARNED:
            _WARNED.add(old)
            logging.info("sample.every is the old spelling of evals.grid.every (=%d)", old)
    return entries


_WARNED: set[int] = set()  # logged once per process, not per validation


def build_evaluators(config, family) -> list[Evaluator]:
    """The evaluators of `config.evals`, checked: one ConfigError line for an unknown type,
    an unknown key or a setting that cannot work. Loads and compiles nothing."""
    out = []
    inherited = sampler_keys(config)
    for name, entry in _entries(config).items():
        kind = entry.get("type")
        if kind not in REGISTRY:
            raise ConfigError(f"evals.{name}: unknown type {kind!r}; known types: {', '.join(sorted(REGISTRY))}")
        cls = REGISTRY[kind]
        unknown = sorted(set(entry) - {"type", "every"} - set(cls.defaults) - set(inherited))
        if unknown:
            allowed = ", ".join(["every", *cls.defaults, *inherited])
            raise ConfigError(f"evals.{name} ({kind}): unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}; allowed: {allowed}")
        every = entry.get("every", 0)
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ConfigError(f"evals.{name}.every must be an integer >= 0 (0 = off), got {every!r}")
        settings = {**{k: config.sample[k] for k in inherited}, **cls.defaults, **entry, "every": every}
        ev = cls(name, settings, config, family)
        if ev.every > 0:
            _check_sampler_settings(ev)
            ev.check()
        out.append(ev)
    return out


def _check_sampler_settings(ev: Evaluator) -> None:
    from skipdit_jax.sampling import resolve_respacing

    s = ev.settings
    try:
        resolve_respacing(s["sampler"], s["num_steps"], None)
    except ConfigError as e:
        raise ev.err(str(e)) from None
    ev.positive("batch_size")
    if isinstance(s["cfg_scale"], bool) or not isinstance(s["cfg_scale"], (int, float)):
        raise ev.err(f"cfg_scale must be a number (1 = no guidance), got {s['cfg_scale']!r}")


# ---- when to run ------------------------------------------------------------------------------
def due(evaluators: list[Evaluator], step: int) -> list[Evaluator]:
    return [ev for ev in evaluators if ev.due(step)]


def pending(evaluators: list[Evaluator], step: int, workdir) -> list[Evaluator]:
    """The evaluators due at `step` (the restored step) whose row is not in metrics.jsonl:
    the evaluation was interrupted (or never started) after the checkpoint of `step`.
    Process 0 reads the file; every process gets its answer."""
    candidates = due(evaluators, step)
    if not candidates:
        return []
    from skipdit_jax.training.metric_logging import read_metrics

    mask = np.zeros(len(candidates), np.int32)
    if jax.process_index() == 0:
        done = {k for r in read_metrics(workdir) if r.get("step") == step for k in r}
        mask[:] = [f"{ev.name}/seconds" not in done for ev in candidates]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
    return [ev for ev, m in zip(candidates, mask, strict=True) if m]


def run_evaluations(evaluators: list[Evaluator], params, step: int, ctx: EvalContext) -> None:
    """Run `evaluators` at `step` in order, each row written as soon as it is done.
    Raises EvaluationInterrupted when a stop is requested (between batches)."""
    for ev in evaluators:
        ctx.check_stop()
        t0 = time.perf_counter()
        metrics = ev.run(params, step, ctx)
        seconds = time.perf_counter() - t0
        row = {f"{ev.name}/{k}": v for k, v in metrics.items()}
        row[f"{ev.name}/seconds"] = seconds
        if ctx.writer is not None:
            ctx.writer.write(step, row, tensorboard_prefix="eval")
        if jax.process_index() == 0:
            shown = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
            print(f"step {step}: {ev.name} ({ev.type_name}) {shown + ', ' if shown else ''}{seconds:.1f} s")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---- sharded sampling, shared by the evaluators -----------------------------------------------
def make_cache(family, s: dict):
    """The Skip-Cache of the sampler settings `s` (cache_interval, shallow_blocks), or None
    when the model has no long skips or the settings turn it off."""
    from skipdit_jax.cache import SkipCache

    if family.has_long_skips and s["cache_interval"] > 1 and 1 <= s["shallow_blocks"] < family.cache_units:
        return SkipCache(s["cache_interval"], s["shallow_blocks"])
    return None


def per_call(batch_size: int) -> int:
    """`batch_size` rounded down to a multiple of the device count (at least one per device)."""
    n_dev = jax.device_count()
    return max(n_dev, batch_size // n_dev * n_dev)


def sample_in_batches(family, params, s: dict, noise: np.ndarray, cond, mesh, cache, ctx: EvalContext | None = None) -> np.ndarray:
    """Samples for `noise` and `cond` (numpy, the same on every process) in calls of
    `s["batch_size"]` rounded down to a multiple of the device count (the last call
    padded), sharded over the mesh's batch axes. Returns all samples, as numpy, on every
    process. Polls `ctx` for a stop between calls."""
    from skipdit_jax.sampling import sample

    n = per_call(s["batch_size"])
    batch_sharding, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    outs = []
    for lo in range(0, len(noise), n):
        if ctx is not None:
            ctx.check_stop()
        k = min(n, len(noise) - lo)
        z = to_global(pad_rows(noise[lo : lo + k], n), batch_sharding)
        # The condition (small) is replicated: the sampler checks its values on the host,
        # which a process can only do for an array it holds whole.
        y = jax.tree.map(lambda a: to_global(pad_rows(a[lo : lo + k], n), rep), cond)
        x = sample(
            family.config, params, noise=z, condition=y, sampler=s["sampler"], num_steps=s["num_steps"],
            cfg_scale=s["cfg_scale"] if family.is_conditional else 1.0, cache=cache, clip_denoised=s["clip_denoised"],
        )
        outs.append(gather(x)[:k])
    return np.concatenate(outs)


def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([a, np.zeros((rows - len(a), *a.shape[1:]), a.dtype)])


def to_global(a: np.ndarray, array_sharding) -> jax.Array:
    """A global array from a host array every process holds whole: each process fills
    only its addressable shards (works across hosts, unlike `jax.device_put`)."""
    return jax.make_array_from_callback(a.shape, array_sharding, lambda idx: a[idx])


def gather(x) -> np.ndarray:
    """The whole of a batch-sharded array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---- "grid" -----------------------------------------------------------------------------------
MAX_GRID_SAMPLES = 64  # a preview, not an evaluation: at most this many cells


@register
class GridEvaluator(Evaluator):
    """A preview grid from the EMA weights with the (cached) sampler: at most
    MAX_GRID_SAMPLES samples, `num_per_class` per class with the family's example
    conditions (every class in turn), drawn in sharded batches of `batch_size`. Writes
    WORKDIR/<dir>/step_NNNNNNN.png (for a video model an animated .gif of one grid per
    frame, 8 fps) and a TensorBoard image (a video's first frame); its row has only seconds."""

    type_name = "grid"
    defaults = {"dir": "samples"}

    def check(self) -> None:
        self.positive("num_per_class")

    def run(self, params, step, ctx):
        s, family = self.settings, self.family
        classes = getattr(family.config, "num_classes", 0) or 1
        num = min(classes * s["num_per_class"], MAX_GRID_SAMPLES)
        cond = family.example_condition(num)  # None for an unconditional model
        # The same key on every process: all hold the same full noise, each places its shards.
        noise = np.asarray(jax.random.normal(jax.random.key(1234), (num, *family.sample_shape)))
        x = sample_in_batches(family, params, s, noise, cond, ctx.mesh, make_cache(family, s), ctx)
        if x.shape[-1] not in (1, 3):
            x = images.latents_for_display(x)
        if jax.process_index() == 0:
            # One column per class when every class fits in the grid, else a square grid.
            nrow = classes if cond is not None and 1 < classes * s["num_per_class"] <= MAX_GRID_SAMPLES else None
            path = paths.as_path(ctx.workdir) / s["dir"] / f"step_{step:07d}.png"
            if x.ndim == 5:  # videos: an animated GIF of grids, one grid per frame
                path = path.with_suffix(".gif")
                self._save_video_grid(x, path, nrow)
                first = images.make_grid(images.to_uint8(x[:, 0]), nrow)
            else:
                images.save_grid(x, path, nrow=nrow, upscale=max(1, 64 // x.shape[1]))
                first = images.make_grid(images.to_uint8(x), nrow)
            if ctx.writer is not None:
                ctx.writer.write_image(step, self.name, first)  # a video's first frame
            print(f"step {step}: sample grid of {len(x)} written to {path}")
        return {}

    @staticmethod
    def _save_video_grid(x: np.ndarray, path, nrow) -> None:
        from skipdit_jax import videos

        frames = images.make_video_grid(images.to_uint8(x), nrow)
        up = max(1, 64 // x.shape[2])
        frames = frames.repeat(up, axis=1).repeat(up, axis=2)  # nearest-neighbour, for small frames
        videos.write_gif(path, frames, fps=8)


# ---- "classifier_fid" -------------------------------------------------------------------------
@register
class ClassifierFIDEvaluator(Evaluator):
    """MNIST only: `num_samples` EMA samples (classes in turn, noise from `seed`) scored by
    a small digit classifier (`skipdit_jax.evaluation.mnist_classifier`): `fid`, the
    Fréchet distance between its penultimate features on the samples and on the real
    training digits, and `class_accuracy`, the fraction of samples it labels as their
    conditioning class. `classifier`: a directory written by `save_classifier`; "" trains
    one on the training digits (`classifier_steps` steps, `seed`) and caches it under
    $SKIPDIT_CACHE/mnist_classifier, so it is trained once per setting."""

    type_name = "classifier_fid"
    defaults = {"num_samples": 1000, "classifier": "", "classifier_steps": 800, "seed": 0}

    def check(self) -> None:
        self.positive("num_samples", "classifier_steps")
        if self.config.data.name != "mnist":
            raise self.err(f"needs data.name='mnist', got {self.config.data.name!r}")
        if self.settings["num_samples"] < 2:
            raise self.err("num_samples must be >= 2 for a Fréchet distance")
        spec = self.settings["classifier"]
        if spec:
            from skipdit_jax.evaluation import mnist_classifier as clf

            meta = paths.as_path(spec) / clf.META_FILE
            if not meta.exists():
                raise self.err(f"classifier {spec} is not a classifier directory (no {clf.META_FILE}); leave it '' to train one")
            size = json.loads(meta.read_text()).get("image_size")
            if size != self.config.data.image_size:
                raise self.err(f"classifier {spec} was trained on {size}x{size} digits but data.image_size is {self.config.data.image_size}")

    def cache_path(self):
        d, s = self.config.data, self.settings
        return paths.cache_dir("mnist_classifier") / f"{d.image_size}px-{d.mnist_resize}-seed{s['seed']}-{s['classifier_steps']}steps"

    def prepare(self, ctx):
        from skipdit_jax import data as data_lib
        from skipdit_jax.errors import CheckpointError
        from skipdit_jax.evaluation import mnist_classifier as clf

        d, s = self.config.data, self.settings
        if s["classifier"]:
            self.params, _ = clf.load_classifier(s["classifier"])
        else:
            path = self.cache_path()
            try:
                self.params, _ = clf.load_classifier(path)
            except CheckpointError:
                t0 = time.perf_counter()
                self.params, meta = clf.fit_mnist_classifier(d.image_size, steps=s["classifier_steps"], seed=s["seed"], resize=d.mnist_resize)
                if jax.process_index() == 0:  # one writer per (shared) cache directory
                    clf.save_classifier(path, self.params, meta)
                    print(
                        f"{self.name}: trained a digit classifier in {time.perf_counter() - t0:.0f} s "
                        f"(held-out accuracy {meta['heldout_accuracy']:.3f}), cached in {path}"
                    )
        real = data_lib.mnist_source(d.image_size, split="train", resize=d.mnist_resize)
        self.real_features = clf.features(self.params, real.images)

    def generate(self, params, ctx) -> tuple[np.ndarray, np.ndarray]:
        """(samples in [-1, 1], their labels), the same at every evaluation."""
        s, family = self.settings, self.family
        num, classes = s["num_samples"], family.config.num_classes
        labels = (np.arange(num) % classes).astype(np.int32)
        noise = np.asarray(jax.random.normal(jax.random.key(s["seed"]), (num, *family.sample_shape)))
        x = sample_in_batches(family, params, s, noise, labels, ctx.mesh, make_cache(family, s), ctx)
        return np.clip(x, -1, 1), labels

    def run(self, params, step, ctx):
        from skipdit_jax.evaluation import mnist_classifier as clf
        from skipdit_jax.evaluation.image_metrics import frechet_distance_of_features

        x, labels = self.generate(params, ctx)
        if jax.process_index() != 0:
            return {}
        fid = frechet_distance_of_features(clf.features(self.params, x), self.real_features)
        return {"fid": fid, "class_accuracy": float(np.mean(clf.predict(self.params, x) == labels))}


# ---- "fid" ------------------------------------------------------------------------------------
@register
class FIDEvaluator(Evaluator):
    """Inception FID of `num_samples` EMA samples against `ref` (an ADM reference batch
    .npz, with or without precomputed statistics, any image .npz or an image folder; local
    or gs://), with ADM's semantics (`skipdit_jax.evaluation.inception_metrics`).

    Samples are drawn in global batches of `batch_size` (rounded down to a multiple of the
    device count) by `sampling.many.make_batch_fn`: sample i's noise, label (uniform over
    the classes, as official DiT's sample_ddp.py) and sampler noise follow from (`seed`, i)
    alone, so every evaluation sees the same inputs. Latent models are decoded with `vae`;
    the uint8 batch goes through the FID Inception while still sharded and only features
    are gathered. `inception`: a `load_inception` spec ("" = $SKIPDIT_INCEPTION or the
    pytorch-fid weights). `cache`: a Skip-Cache spec "N[,k[,start,close]]" ("" = none).
    `cfg_channels`: guide only the first C eps channels (0 = all; 3 = official DiT).
    `metrics`: a comma-separated subset of fid, sfid, is, precision, recall (logged as
    fid, sfid, inception_score, precision, recall). Reference features, when needed (no
    precomputed statistics, or precision/recall), are cached on disk across runs."""

    type_name = "fid"
    defaults = {
        "num_samples": 10_000, "ref": "", "inception": "", "cache": "", "cfg_channels": 0, "seed": 0,
        "metrics": "fid", "ref_batch_size": 200,
    }

    def check(self) -> None:
        from skipdit_jax.cache import parse_cache_spec
        from skipdit_jax.errors import UserError
        from skipdit_jax.evaluation import inception_metrics as im

        s = self.settings
        self.positive("num_samples", "ref_batch_size")
        try:
            self.metric_names = im.parse_metrics(s["metrics"])
        except UserError as e:
            raise self.err(f"metrics: {e}") from None
        if s["num_samples"] < 2:
            raise self.err("num_samples must be >= 2 for a Fréchet distance")
        if not s["ref"]:
            raise self.err(f"ref (the reference batch .npz or image folder, local or gs://) is required; or set evals.{self.name}.every=0")
        if not paths.as_path(s["ref"]).exists():
            raise self.err(f"reference {s['ref']} not found: set evals.{self.name}.ref, or evals.{self.name}.every=0 to turn it off")
        if s["inception"] and not s["inception"].startswith(("http://", "https://", "hf://")) and not paths.as_path(s["inception"]).exists():
            raise self.err(f"inception weights {s['inception']} not found")
        cache = parse_cache_spec(s["cache"] or None)
        channels = self.family.sample_shape[-1]
        if channels not in (1, 3) and not s["vae"]:
            raise self.err(f"the model samples {channels}-channel latents: set vae (e.g. hf://stabilityai/sd-vae-ft-ema) to decode them")
        if self.family.is_conditional and self.family.condition_kind != "class":
            raise self.err(f"draws class labels, but the {self.family.name} family is conditioned on {self.family.condition_kind}")
        from skipdit_jax.sampling import check_settings

        try:
            check_settings(self.family.config, cache=cache, cfg_scale=s["cfg_scale"], cfg_channels=s["cfg_channels"] or None)
        except ConfigError as e:
            raise self.err(str(e)) from None
        self.cache = cache

    def prepare(self, ctx):
        from skipdit_jax.evaluation import inception, inception_metrics as im
        from skipdit_jax.sampling import many, resolve_respacing

        s, family = self.settings, self.family
        self.reference = im.load_reference(s["ref"])
        im.check_inputs(s["num_samples"], self.reference, self.metric_names)
        self.inception = inception.load_inception(s["inception"] or None)
        self.feature_fn = inception.make_feature_fn(self.inception, ctx.mesh)
        need_ref = bool(
            {"precision", "recall"} & set(self.metric_names)
            or ("fid" in self.metric_names and self.reference.stats is None)
            or ("sfid" in self.metric_names and self.reference.spatial_stats is None)
        )
        self.reference_features = None
        if need_ref:
            self.reference_features, _ = im.reference_features(self.reference, self.inception, batch_size=s["ref_batch_size"], mesh=ctx.mesh)
        self.vae = (None, None)
        if family.sample_shape[-1] not in (1, 3):  # latents: decoded for the Inception
            from skipdit_jax.encoders import vae as vae_lib

            self.vae = vae_lib.load_vae(s["vae"])
        self.batch_fn = many.make_batch_fn(
            family.config, ctx.mesh, seed=s["seed"], sampler=s["sampler"], respacing=resolve_respacing(s["sampler"], s["num_steps"], None),
            cfg_scale=float(s["cfg_scale"]), cfg_channels=s["cfg_channels"] or None, cache=self.cache,
            clip_denoised=bool(s["clip_denoised"]), vae_config=self.vae[0],
        )

    def uint8_batches(self, params, ctx):
        """(first index, rows to keep, the batch-sharded uint8 images) of every global batch;
        past `num_samples` the indices go on, so every batch has the compiled shape."""
        num, n = self.settings["num_samples"], per_call(self.settings["batch_size"])
        batch_sharding = sharding.batch_sharding(ctx.mesh)
        for lo in range(0, num, n):
            ctx.check_stop()
            images_u8, _ = self.batch_fn(params, self.vae[1], to_global(np.arange(lo, lo + n, dtype=np.int32), batch_sharding))
            yield lo, min(n, num - lo), images_u8

    def features(self, params, ctx) -> dict[str, np.ndarray]:
        """The gathered Inception features of the samples: "pool", plus "spatial" for sFID
        and "logits" for the Inception Score."""
        wanted = ["pool"] + ["spatial"] * ("sfid" in self.metric_names) + ["logits"] * ("is" in self.metric_names)
        out = {k: [] for k in wanted}
        for _, k, images_u8 in self.uint8_batches(params, ctx):
            feats = self.feature_fn(images_u8)
            for key in wanted:
                out[key].append(gather(feats[key])[:k])
        return {k: np.concatenate(v) for k, v in out.items()}

    def run(self, params, step, ctx):
        from skipdit_jax.evaluation import inception_metrics as im

        feats = self.features(params, ctx)
        if jax.process_index() != 0:
            return {}
        return im.compute_metrics(feats, self.reference, self.reference_features, self.metric_names)


def describe(evaluators: list[Evaluator]) -> str:
    on = [f"{ev.name} ({ev.type_name}) every {ev.every}" for ev in evaluators if ev.every > 0]
    return "evaluations: " + (", ".join(on) if on else "none")


__all__ = [
    "REGISTRY", "Evaluator", "EvalContext", "EvaluationInterrupted", "build_evaluators", "due", "pending",
    "run_evaluations", "register", "describe", "MAX_GRID_SAMPLES",
]
