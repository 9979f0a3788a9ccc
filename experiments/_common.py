"""Shared pieces of the experiments: the small models they need (trained through the
project's trainer unless given, cached in the output folder), the MNIST classifier that
judges samples, and timed sampling with any cache strategy."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
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
    done = workdir / DONE_FILE
    if not done.exists():
        print(f"training {kind} into {workdir} (at most {train_minutes:g} min; an interrupted run resumes)", flush=True)
        result = train_and_evaluate(config, str(workdir), progress=False)
        if not result.preempted:
            record = {
                "config": "skipdit_jax.demo.config.get_config(%s)" % ('"dit"' if kind == "dit" else ""),
                "overrides": overrides or {},
                "steps": config.train.steps,
                "final_step": result.final_step,
                "seconds": round(result.seconds, 1),
                "max_seconds": config.train.max_seconds,
                "machine": machine(),
            }
            done.write_text(json.dumps(record, indent=2))
    return load_trained(str(workdir))


DONE_FILE = "experiment_done.json"  # what trained a workdir that ensure_model trained


def model_sources(out_dir: Path, flag_values, models: dict | None = None) -> dict:
    """Per model kind, where its weights came from: the path given, or the workdir the
    experiment trained; with how it was trained when ensure_model trained it (config,
    overrides, steps done, seconds, machine) and, given the loaded `models`, their shape."""
    sources = {}
    for kind in MODEL_KINDS:
        given = getattr(flag_values, kind)
        path = Path(given) if given else out_dir / "models" / kind
        src = {"path": str(given or path)}
        if (path / DONE_FILE).is_file():
            src["trained"] = json.loads((path / DONE_FILE).read_text())
        if models is not None:
            mc, params = models[kind]
            src["architecture"] = {f: getattr(mc, f) for f in ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "long_skip")}
            src["architecture"]["parameters"] = int(sum(np.size(a) for a in jax.tree.leaves(params)))
        sources[kind] = src
    return sources


def machine() -> dict:
    """The machine and software the numbers were measured with."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    dev = jax.devices()[0]
    here = Path(__file__).resolve().parent
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, timeout=30).stdout.strip()  # noqa: E731
        commit = git("rev-parse", "--short=12", "HEAD") or None
        # The code only: the results and RESULTS.md that make_results.py copies in do not count.
        dirty = bool(commit and git("status", "--porcelain", "--untracked-files=no", "--", ":/skipdit_jax", ":/experiments/*.py", ":/configs"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, False
    return {
        "cpu": cpu,
        "cpu_cores": cores,
        "device": dev.platform if dev.device_kind.lower() == dev.platform else f"{dev.platform} ({dev.device_kind})",
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "git_commit": commit,
        "git_dirty": dirty,  # the library or experiments differed from that commit
    }


def settings(flag_values, models: dict | None = None, **resolved) -> dict:
    """The "settings" object of a results.json: the command line, every flag's value
    (flags the script resolves, e.g. 0 = the config's value, replaced by `resolved`),
    the model sources and the machine."""
    own = {"_common", "__main__", sys.argv[0], Path(sys.argv[0]).stem}  # not absl's or libraries' flags
    names = sorted({f.name for module, fs in flag_values.flags_by_module_dict().items() if module in own for f in fs})
    values = {n: flag_values[n].value for n in names}
    values.update(resolved)
    out = {
        "command": shlex.join(["python", f"experiments/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "flags": values,
    }
    if models is not None:
        out["models"] = models
    out["machine"] = machine()
    return out


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


def compiled_sampler(mc, params, cache, noise, labels, *, sampler="ddim", num_steps=50, cfg_scale=2.0, clip=True):
    """A compiled sampler `run() -> (samples, seconds, realised full/cached schedule)`
    (compiled before it returns, so `seconds` never includes compilation)."""
    respacing = resolve_respacing(sampler, num_steps, None)
    if cache is not None:
        cache.check_model(family_of(mc))
    fn = build_sampler(mc, sampler, respacing, cfg_scale != 1, None, cache, 0.0, clip, return_schedule=True)
    args = (params, noise, labels, jnp.float32(cfg_scale), jax.random.key(0))
    compiled = fn.lower(*args).compile()

    def run():
        start = time.perf_counter()
        x, full = jax.block_until_ready(compiled(*args))
        return np.asarray(x), time.perf_counter() - start, np.asarray(full)

    return run


def timed_sample(mc, params, cache, noise, labels, *, sampler="ddim", num_steps=50, cfg_scale=2.0, clip=True, repeats=1):
    """(samples, median seconds excluding compilation, realised full/cached schedule)."""
    run = compiled_sampler(mc, params, cache, noise, labels, sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale, clip=clip)
    runs = [run() for _ in range(max(1, repeats))]
    x, _, full = runs[-1]
    return x, float(np.median([r[1] for r in runs])), full


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
