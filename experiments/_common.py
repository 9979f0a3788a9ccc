"""Shared pieces of the experiments: the small models they need (trained through the
project's trainer unless given, cached in the output folder), the MNIST classifier that
judges samples, and timed sampling with any cache strategy."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax import model_store
from skipdit_jax.evaluation import mnist_classifier as classifier
from skipdit_jax.config_utils import apply_overrides, parse_overrides  # noqa: F401 (re-exported to the scripts)
from skipdit_jax.demo.config import get_config as demo_config
from skipdit_jax.models import family_of
from skipdit_jax.sampling import build_sampler, resolve_respacing

MODEL_KINDS = ("skipdit", "dit")


def ensure_model(kind: str, out_dir: Path, model_path: str | None = None, train_minutes: float = 10.0, overrides: dict | None = None):
    """(model_config, EMA params) of `kind` ("skipdit" or "dit"): loaded from `model_path`
    (model dir, training workdir or official checkpoint), else trained with the settings
    of configs/mnist_skipdit.py (its "dit" variant for DiT) into OUT/models/KIND, where a
    finished or interrupted run is resumed rather than repeated."""
    if model_path:
        return model_store.load_model(model_path)
    from skipdit_jax.training.checkpoints import load_trained
    from skipdit_jax.training.train import train_and_evaluate

    workdir = out_dir / "models" / kind
    config = demo_config("dit" if kind == "dit" else None)
    with config.unlocked():
        config.train.max_seconds = train_minutes * 60
        config.sample.every = 0  # no sample grids: the experiment samples itself
        apply_overrides(config, overrides or {})
    done = workdir / "experiment_done.json"
    if not done.exists():
        print(f"training {kind} into {workdir} (at most {train_minutes:g} min; an interrupted run resumes)")
        result = train_and_evaluate(config, str(workdir), progress=False)
        if not result.preempted:
            done.write_text(json.dumps({"final_step": result.final_step, "seconds": round(result.seconds, 1)}))
    return load_trained(str(workdir))


def ensure_classifier(out_dir: Path, image_size: int, resize: str, steps: int = classifier.DEFAULT_STEPS):
    """The digit classifier (trained on the training split, cached in OUT/classifier)."""
    path = out_dir / "classifier"
    if path.exists():
        params, meta = classifier.load_classifier(str(path))
        if meta.get("image_size") == image_size and meta.get("resize") == resize and meta.get("steps") == steps:
            return params, meta
    params, meta = classifier.fit_mnist_classifier(image_size, resize=resize, steps=steps)
    classifier.save_classifier(str(path), params, meta)
    return params, meta


def class_noise(mc, per_class: int, seed: int = 1):
    labels = jnp.repeat(jnp.arange(10, dtype=jnp.int32), per_class)
    noise = jax.random.normal(jax.random.key(seed), (labels.shape[0], mc.input_size, mc.input_size, mc.in_channels))
    return noise, labels


def timed_sample(mc, params, cache, noise, labels, *, sampler="ddim", num_steps=50, cfg_scale=2.0, clip=True, repeats=1):
    """(samples, median seconds excluding compilation, realised full/cached schedule)."""
    respacing = resolve_respacing(sampler, num_steps, None)
    if cache is not None:
        cache.check_model(family_of(mc))
    fn = build_sampler(mc, sampler, respacing, cfg_scale != 1, None, cache, 0.0, clip, return_schedule=True)
    args = (params, noise, labels, jnp.float32(cfg_scale), jax.random.key(0))
    compiled = fn.lower(*args).compile()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        x, full = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return np.asarray(x), float(np.median(times)), np.asarray(full)


def define_model_flags(default_out: str) -> None:
    """The flags every model-comparing experiment takes."""
    from absl import flags

    flags.DEFINE_string("out", default_out, "output folder (trained models are cached under OUT/models)")
    flags.DEFINE_string("skipdit", None, "Skip-DiT: model dir, training workdir or official checkpoint (default: train one)")
    flags.DEFINE_string("dit", None, "DiT without long skips (default: train one)")
    flags.DEFINE_float("train_minutes", 10.0, "training budget per model when training (the MNIST schedule needs ~9 min on 2 cores)")
    flags.DEFINE_string("overrides", "", "training config overrides key=JSON,... (e.g. for tiny test models)")


def load_models(out_dir: Path, flag_values) -> dict:
    """{"skipdit": (config, params), "dit": (config, params)}, checked to be what they say."""
    from skipdit_jax.errors import UserError

    overrides = parse_overrides(flag_values.overrides)
    models = {kind: ensure_model(kind, out_dir, getattr(flag_values, kind), flag_values.train_minutes, overrides) for kind in MODEL_KINDS}
    if not models["skipdit"][0].long_skip or models["dit"][0].long_skip:
        raise UserError("--skipdit must be a model with long skips and --dit one without")
    return models


def figure(ncols: int = 2, **kw):
    """(plt, fig, axes) with the non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), dpi=120, **kw)
    return plt, fig, axes


def save_figure(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_experiment(main, name: str) -> None:
    """absl `app.run(main)`, with user errors as one line on stderr and exit status 2."""
    import sys

    from absl import app

    from skipdit_jax.errors import UserError

    try:
        app.run(main)
    except UserError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
