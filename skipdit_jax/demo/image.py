"""The demo: train a small class-conditional Skip-DiT on the embedded MNIST digits, then
sample every class with and without Skip-Cache and measure the result honestly.

    skipdit demo [--out skipdit-demo] [--minutes 15]

1. A digit classifier is trained on the training split of the real digits and scored on
   the held-out split (its accuracy is reported; it must be >= 0.95 to be a fair judge).
2. The Skip-DiT of `skipdit_jax/demo/config.py` (= `configs/mnist_skipdit.py`) trains through the project's trainer (Orbax
   checkpoints in OUT/train, so an interrupted demo resumes), within the time budget.
3. Every class is sampled from the EMA weights with DDIM from the same noise: once in full,
   then with Skip-Cache N=2,3,4. Each run is compiled ahead of time and then timed.
4. `class_accuracy` = the fraction of samples the classifier assigns to their conditioning
   class; `psnr_db` compares cached samples with the full ones from the same noise.

Writes samples_full.png, samples_cache{N}.png (one row per class), loss.png and report.json.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax import data, images, paths
from skipdit_jax.cache import SkipCache
from skipdit_jax.config_utils import apply_overrides, load_config_file
from skipdit_jax.demo import config as demo_config
from skipdit_jax.errors import UserError
from skipdit_jax.evaluation import mnist_classifier as classifier
from skipdit_jax.evaluation.image_metrics import psnr
from skipdit_jax.sampling import build_sampler, resolve_respacing, sampling_timesteps
from skipdit_jax.training.metric_logging import read_metrics

CACHE_INTERVALS = (2, 3, 4)


def _time(fn, *args) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return np.asarray(out), time.perf_counter() - start


def plot_loss(workdir, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set(xlabel="step", ylabel="training loss (per log interval)", title="Skip-DiT on MNIST", yscale="log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    paths.atomic_write_bytes(path, buf.getvalue())


def run_demo(out, minutes: float = 15.0, config_path=None, samples_per_class: int | None = None, overrides: dict | None = None) -> dict:
    """Run the demo into `out` (local or remote). `config_path` (a config file, `path.py:arg`
    allowed) replaces the built-in settings of `skipdit_jax/demo/config.py`."""
    start = time.perf_counter()
    out_dir = paths.as_path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = load_config_file(config_path) if config_path else demo_config.get_config()
    apply_overrides(config, overrides or {})
    size, s = config.data.image_size, config.sample
    per_class = samples_per_class or config.demo.samples_per_class

    # 1. The judge: a classifier trained on the real training digits, scored on held-out ones.
    train_src = data.mnist_source(size, split="train", resize=config.data.mnist_resize)
    held_src = data.mnist_source(size, split="heldout", resize=config.data.mnist_resize)
    train_x, train_y = train_src.images, train_src.labels
    held_x, held_y = held_src.images, held_src.labels
    t0 = time.perf_counter()
    clf = classifier.train_classifier(train_x, train_y, seed=config.seed)
    clf_acc = classifier.accuracy(clf, held_x, held_y)
    print(f"classifier: held-out accuracy {clf_acc:.4f} on {len(held_y)} real digits ({time.perf_counter() - t0:.0f} s)")

    # 2. The model, within what is left of the budget (sampling is kept in reserve).
    from skipdit_jax.training.train import train_and_evaluate

    budget = minutes * 60 - (time.perf_counter() - start) - config.demo.reserve_seconds
    if budget <= 30:
        raise UserError(f"--minutes {minutes} leaves no time to train; give at least {config.demo.reserve_seconds / 60 + 1:.0f}")
    with config.unlocked():
        config.train.max_seconds = budget
    result = train_and_evaluate(config, str(out_dir / "train"))
    mc, params = result.model_config, result.state.ema_params
    train_seconds = result.seconds
    final_loss = result.last_metrics.get("loss", float("nan"))

    # 3. Sampling: every class, the same noise for every setting.
    labels = jnp.repeat(jnp.arange(10, dtype=jnp.int32), per_class)
    noise = jax.random.normal(jax.random.key(config.seed + 1), (labels.shape[0], mc.input_size, mc.input_size, mc.in_channels))
    respacing = resolve_respacing(s.sampler, s.num_steps, None)
    scale, rng = jnp.float32(s.cfg_scale), jax.random.key(0)
    timesteps = sampling_timesteps(s.sampler, s.num_steps)

    def run(cache):
        fn = build_sampler(mc, s.sampler, respacing, s.cfg_scale != 1, None, cache, 0.0, s.clip_denoised)
        compiled = fn.lower(params, noise, labels, scale, rng).compile()  # compile time is not timed
        return _time(compiled, params, noise, labels, scale, rng)

    def class_accuracy(x):
        return float(np.mean(classifier.predict(clf, x) == np.asarray(labels)))

    full, full_s = run(None)
    report = {
        "train": {"steps": result.final_step, "seconds": round(train_seconds, 1), "final_loss": final_loss},
        "classifier_test_accuracy": clf_acc,
        "full": {"seconds": round(full_s, 3), "class_accuracy": class_accuracy(full)},
        "cache": [],
    }
    images.save_grid(full, str(out_dir / "samples_full.png"), nrow=per_class, upscale=2)
    print(f"full sampling: {full_s:.2f} s, class accuracy {report['full']['class_accuracy']:.3f}")
    for n in CACHE_INTERVALS:
        cache = SkipCache(n, s.shallow_blocks)
        x, secs = run(cache)
        plan = cache.plan(timesteps, mc.depth)
        row = {
            "interval": n,
            "seconds": round(secs, 3),
            "speedup": round(full_s / secs, 3),
            "predicted_speedup": round(plan.predicted_speedup, 3),
            "psnr_db": round(psnr(x, full), 2),
            "class_accuracy": class_accuracy(x),
        }
        report["cache"].append(row)
        images.save_grid(x, str(out_dir / f"samples_cache{n}.png"), nrow=per_class, upscale=2)
        print(
            f"Skip-Cache N={n}: {secs:.2f} s, speedup {row['speedup']:.2f}x (predicted {row['predicted_speedup']:.2f}x), "
            f"PSNR vs full {row['psnr_db']:.1f} dB, class accuracy {row['class_accuracy']:.3f}"
        )
    plot_loss(out_dir / "train", out_dir / "loss.png")
    report["settings"] = {
        "image_size": size,
        "model": {k: getattr(mc, k) for k in ("depth", "hidden_size", "num_heads", "patch_size", "long_skip", "learn_sigma")},
        "sampler": respacing,
        "cfg_scale": s.cfg_scale,
        "shallow_blocks": s.shallow_blocks,
        "samples_per_class": per_class,
        "total_seconds": round(time.perf_counter() - start, 1),
        "device": jax.devices()[0].device_kind,
    }
    paths.atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))
    print(f"wrote {out_dir}/report.json, samples_full.png, samples_cache{{2,3,4}}.png, loss.png ({time.perf_counter() - start:.0f} s in all)")
    return report
