"""Quality vs measured speedup of every cache method, against the uncached samples from the
same noise (the paper's comparative claim).

    python experiments/cache_tradeoff.py --out runs/cache_tradeoff                # MNIST, CPU, ~30 min with training
    python experiments/cache_tradeoff.py --out runs/ct --skipdit runs/mnist_skipdit --dit runs/mnist_dit

The defaults are the settings RESULTS.md reports (`experiments/make_results.py` runs this
with the demo's models and no other flag): the demo's sampler (guided DDIM-50, guidance 4,
x0 clipped), every method at the listed settings, all in one run.

Models: a Skip-DiT for Skip-Cache, and a DiT of the same size for the baselines (FORA,
PAB, Delta-DiT, TeaCache) and for the shallow cache without skips (the ablation). Without
--skipdit/--dit the two are trained with configs/mnist_skipdit.py's settings for
--train_minutes each and kept in OUT/models (a second run reuses them).

Every class is sampled --per_class times with DDIM from one fixed noise; each method's
samples are compared with its own model's uncached samples: PSNR, SSIM (LPIPS on RGB
images only, so null on MNIST), and class accuracy under the MNIST classifier. Speedup is
measured beside the block-count prediction of the realised schedule: every sampler is
compiled ahead of time, and each cached setting is timed --repeats times alternating with
its model's uncached sampler, so each speedup is the ratio of two medians taken
side by side in the same run (robust to load that drifts over the run). TeaCache accumulates the relative change of block 0's
modulated input as is (identity polynomial); --teacache_calibrate first fits the polynomial
to the DiT (`calibrate_teacache`, on the same sampler settings the rows are sampled with),
which on the small MNIST DiT proved fragile (RESULTS.md).

Writes OUT/results.json ({"settings": {...}, "rows": [{"method", "setting",
"predicted_speedup", "seconds", "reference_seconds", "speedup", "psnr_db", "ssim", "lpips",
"class_accuracy"}], ...}) and OUT/tradeoff.png.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import define_model_flags  # noqa: E402

define_model_flags("runs/cache_tradeoff")
flags.DEFINE_integer("per_class", 10, "samples per class")
flags.DEFINE_integer("steps", 50, "DDIM steps")
flags.DEFINE_float("cfg_scale", 4.0, "guidance scale (the demo's)")
flags.DEFINE_integer("repeats", 3, "timed runs per setting, each beside one of its uncached reference (medians)")
flags.DEFINE_list("skip_cache", ["2", "3", "4", "5"], "Skip-Cache intervals N")
flags.DEFINE_list("shallow_cache", ["2", "3", "4"], "shallow cache on DiT (ablation) intervals N")
flags.DEFINE_list("fora", ["2", "3", "4"], "FORA intervals N")
flags.DEFINE_list("pab", ["2", "3"], "PAB intervals N")
flags.DEFINE_list("delta_dit", ["2", "3"], "Delta-DiT intervals N")
flags.DEFINE_list("teacache", ["0.02", "0.05", "0.1", "0.2"], "TeaCache thresholds")
flags.DEFINE_bool("teacache_calibrate", False, "fit TeaCache's polynomial to the DiT first (default: the identity)")
flags.DEFINE_integer("shallow_blocks", 0, "k for the static caches (0: the model config's sample.shallow_blocks, 2 for the MNIST models)")
flags.DEFINE_integer("classifier_steps", 800, "training steps of the MNIST classifier")
FLAGS = flags.FLAGS


def plot(rows, path: Path) -> None:
    from _common import figure, save_figure

    plt, fig, axes = figure(2)
    methods = sorted({r["method"] for r in rows if r["method"] != "none"})
    for method in methods:
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["speedup"])
        sp = [r["speedup"] for r in pts]
        axes[0].plot(sp, [min(r["psnr_db"], 60) for r in pts], "o-", label=method)
        axes[1].plot(sp, [r["class_accuracy"] for r in pts], "o-", label=method)
    full = [r for r in rows if r["method"] == "none"]
    for r in full:
        axes[1].axhline(r["class_accuracy"], ls=":", c="gray")
    axes[0].set(xlabel="measured speedup", ylabel="PSNR vs uncached (dB)", title="fidelity to the uncached samples")
    axes[1].set(xlabel="measured speedup", ylabel="class accuracy", title="sample quality (dotted: uncached)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(plt, fig, path)


def main(_):
    from skipdit_jax.xla_tuning import tune_xla_cpu_flags

    tune_xla_cpu_flags()

    from _common import class_noise, compiled_sampler, ensure_classifier, load_models, model_sources
    from _common import settings as run_settings
    from skipdit_jax.evaluation import image_metrics as metrics, mnist_classifier as classifier
    from skipdit_jax.cache import calibrate_teacache, make_cache, plan_from_schedule
    from skipdit_jax.models import family_of
    from skipdit_jax.demo.config import get_config as demo_config
    from skipdit_jax.errors import UserError

    try:
        settings = {name: [float(v) for v in getattr(FLAGS, name)] for name in ("skip_cache", "shallow_cache", "fora", "pab", "delta_dit", "teacache")}
    except ValueError as e:
        raise UserError(f"bad setting list: {e}") from None
    base = demo_config()
    k = FLAGS.shallow_blocks or base.sample.shallow_blocks
    # Every (model, method, setting) is built -- and so validated -- before anything trains.
    plan = [("skipdit", "none", None), ("dit", "none", None)]
    plan += [("skipdit", "skip-cache", n) for n in settings["skip_cache"]]
    plan += [("dit", "shallow-cache", n) for n in settings["shallow_cache"]]
    plan += [("dit", m.replace("_", "-"), n) for m in ("fora", "pab", "delta_dit") for n in settings[m]]
    for kind, method, setting in plan:
        if setting is not None:
            make_cache(method, setting, shallow_blocks=k)
    for th in settings["teacache"]:
        make_cache("teacache", th)

    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    models = load_models(out, FLAGS)
    mc_skip = models["skipdit"][0]
    for kind, method, setting in plan:
        if setting is not None:
            make_cache(method, setting, shallow_blocks=k).check_model(family_of(models[kind][0]))
    clf, clf_meta = ensure_classifier(out, mc_skip.input_size, base.data.mnist_resize, FLAGS.classifier_steps) if mc_skip.in_channels == 1 else (None, None)
    rgb = mc_skip.in_channels == 3

    sample_kw = dict(sampler="ddim", num_steps=FLAGS.steps, cfg_scale=FLAGS.cfg_scale, clip=True)
    repeats = max(1, FLAGS.repeats)
    rows, references = [], {}

    def score(kind, method, setting, cache):
        mc, params = models[kind]
        noise, labels = class_noise(mc, FLAGS.per_class)
        if cache is None:
            run = compiled_sampler(mc, params, None, noise, labels, **sample_kw)
            timed = [run() for _ in range(repeats)]
            x, _, full = timed[-1]
            references[kind] = (run, x)
            secs = ref_secs = float(np.median([t[1] for t in timed]))
        else:
            ref_run, _ = references[kind]
            run = compiled_sampler(mc, params, cache, noise, labels, **sample_kw)
            ref_times, times = [], []
            for _ in range(repeats):  # alternating, so both medians see the same load
                ref_times.append(ref_run()[1])
                x, t, full = run()
                times.append(t)
            secs, ref_secs = float(np.median(times)), float(np.median(ref_times))
        ref = references[kind][1]
        cached_blocks = 0 if cache is None else cache.units_per_cached_step(mc)
        row = {
            "method": method,
            "model": kind,
            "setting": setting,
            "full_steps": int(full.sum()),
            "cached_steps": int((~full).sum()),
            "predicted_speedup": round(plan_from_schedule(full, mc.depth, cached_blocks).predicted_speedup, 3),
            "seconds": round(secs, 3),
            "reference_seconds": round(ref_secs, 3),
            "speedup": round(ref_secs / secs, 3),
            "psnr_db": None if cache is None else round(metrics.psnr(x, ref), 2),
            "ssim": None if cache is None else round(metrics.ssim(x, ref), 4),
            "lpips": round(float(metrics.lpips(x, ref).mean()), 4) if rgb and cache is not None else None,
            "class_accuracy": None if clf is None else float(np.mean(classifier.predict(clf, x) == np.asarray(labels))),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    for kind, method, setting in plan:
        score(kind, method, setting, None if setting is None else make_cache(method, setting, shallow_blocks=k))
    coeffs = None
    if settings["teacache"] and FLAGS.teacache_calibrate:
        mc, params = models["dit"]
        noise, labels = class_noise(mc, 2, seed=7)  # calibration noise differs from the test noise
        # Exactly the sampler the rows are timed with: the same sampler, steps, guidance
        # scale and clipping, guidance on every eps channel (cfg_channels None) and eta 0.
        coeffs = calibrate_teacache(
            mc, params, noise, labels, sampler=sample_kw["sampler"], num_steps=sample_kw["num_steps"],
            cfg_scale=sample_kw["cfg_scale"], cfg_channels=None, clip_denoised=sample_kw["clip"], eta=0.0,
        )
        print(f"TeaCache polynomial fitted to the DiT: {coeffs}")
    for th in settings["teacache"]:
        score("dit", "teacache", th, make_cache("teacache", th, coefficients=coeffs))

    result = {
        "settings": run_settings(
            FLAGS, model_sources(out, FLAGS, models), shallow_blocks=k, sampler=f"ddim{FLAGS.steps}", clip_denoised=True,
            samples=10 * FLAGS.per_class, classifier=clf_meta and {"steps": FLAGS.classifier_steps, "heldout_accuracy": clf_meta["heldout_accuracy"]},
            teacache_polynomial=list(coeffs) if coeffs is not None else "identity",
        ),
        "rows": rows,
        "teacache_coefficients": coeffs,
        "classifier_heldout_accuracy": clf_meta and clf_meta["heldout_accuracy"],
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / "tradeoff.png")
    print(f"wrote {out / 'results.json'} and {out / 'tradeoff.png'}")


if __name__ == "__main__":
    from _common import run_experiment

    run_experiment(main, "cache_tradeoff")
