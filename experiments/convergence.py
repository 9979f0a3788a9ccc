"""Training convergence, DiT vs Skip-DiT of the same size, same data, same seed (the
paper's "4.4x faster training" claim, here at MNIST scale).

    python experiments/convergence.py --out runs/convergence                        # ~20 min on 2 CPU cores
    python experiments/convergence.py --out runs/conv --total_steps 4000 --eval_every 500

Both models train with configs/mnist_skipdit.py's settings but a constant learning rate
after warm-up (so a run can be evaluated part-way without its schedule depending on the
total), through the project's trainer, resumed segment by segment. Every --eval_every
steps, on the EMA weights (kept in OUT/runs/KIND/evaluations.jsonl, so an interrupted
run resumes where it stopped):
  * held-out diffusion loss: eps-MSE on held-out digits with fixed noise and timesteps;
  * classifier FID: Fréchet distance between the demo classifier's features of generated
    samples (guided DDIM, every class) and of held-out real digits. It is *not* FID
    (no Inception network); it only ranks models on this data.
The "steps ratio" is DiT's final step divided by the (interpolated) step at which
Skip-DiT first reaches DiT's final value -- the paper's 4.4x is this ratio for FID at
ImageNet scale. Writes results.json (with its "settings": flags, how each model was
trained, machine) and convergence.png.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("out", "runs/convergence", "output folder")
flags.DEFINE_integer("total_steps", 1500, "training steps per model")
flags.DEFINE_integer("eval_every", 250, "evaluation interval (steps)")
flags.DEFINE_integer("per_class", 20, "generated samples per class for the classifier FID")
flags.DEFINE_integer("sample_steps", 25, "DDIM steps of the generated samples")
flags.DEFINE_integer("heldout", 500, "held-out digits for the loss and the reference statistics")
flags.DEFINE_integer("classifier_steps", 800, "training steps of the MNIST classifier")
flags.DEFINE_string("overrides", "", "training config overrides key=value,... (JSON values)")
FLAGS = flags.FLAGS


def steps_to_reach(steps, values, target) -> float | None:
    """First (linearly interpolated) step at which a decreasing-ish curve reaches target."""
    for i, v in enumerate(values):
        if v <= target:
            if i == 0:
                return float(steps[0])
            s0, s1, v0 = steps[i - 1], steps[i], values[i - 1]
            return float(s0 + (s1 - s0) * (v0 - target) / (v0 - v))
    return None


def latest_step(workdir: Path) -> int:
    """The step of a training workdir's newest checkpoint (0: none)."""
    d = workdir / "checkpoints"
    return max((int(p.name) for p in d.iterdir() if p.name.isdigit()), default=0) if d.is_dir() else 0


def main(_):
    from skipdit_jax.xla_tuning import tune_xla_cpu_flags

    tune_xla_cpu_flags()
    import jax
    import jax.numpy as jnp

    from _common import apply_overrides, class_noise, ensure_classifier, parse_overrides, timed_sample
    from _common import settings as run_settings
    from skipdit_jax import data
    from skipdit_jax.evaluation import image_metrics as metrics, mnist_classifier as classifier
    from skipdit_jax.demo.config import get_config as demo_config
    from skipdit_jax.diffusion import Diffusion
    from skipdit_jax.errors import UserError
    from skipdit_jax.models import DiT
    from skipdit_jax.training.checkpoints import load_trained
    from skipdit_jax.training.train import train_and_evaluate

    if FLAGS.eval_every < 1 or FLAGS.total_steps < FLAGS.eval_every:
        raise UserError("need 1 <= --eval_every <= --total_steps")
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = parse_overrides(FLAGS.overrides)

    def config_for(kind, steps):
        c = demo_config("dit" if kind == "dit" else None)
        with c.unlocked():
            apply_overrides(c, overrides)
            # The experiment's own settings win over --overrides: segments end at the evaluations.
            c.train.steps = steps
            c.optimizer.decay = "constant"
            c.sample.every = 0
            c.checkpoint.every = FLAGS.eval_every
        return c

    base = config_for("skipdit", FLAGS.total_steps)
    size, resize = base.data.image_size, base.data.mnist_resize
    clf, clf_meta = ensure_classifier(out, size, resize, FLAGS.classifier_steps)
    held = data.mnist_source(size, split="heldout", resize=resize)
    n = min(FLAGS.heldout, len(held.labels))
    x0 = jnp.asarray(held.images[:n]).reshape(n, size, size, 1)
    y0 = jnp.asarray(held.labels[:n], jnp.int32)
    real_features = classifier.features(clf, np.asarray(x0))
    t_fixed = jax.random.randint(jax.random.key(11), (n,), 0, 1000)
    noise_fixed = jax.random.normal(jax.random.key(12), x0.shape)

    def heldout_loss(mc, params):
        diffusion = Diffusion(None, learn_sigma=mc.learn_sigma)
        fn = jax.jit(lambda p: diffusion.training_losses(lambda xt, tt: DiT(mc).apply({"params": p}, xt, tt, y0), x0, t_fixed, noise_fixed)["mse"].mean())
        return float(fn(params))

    # What shapes an evaluation row besides the step (a resumed run must match it).
    eval_settings = {
        "per_class": FLAGS.per_class, "sample_steps": FLAGS.sample_steps, "heldout": FLAGS.heldout,
        "classifier_steps": FLAGS.classifier_steps, "eval_every": FLAGS.eval_every, "overrides": FLAGS.overrides,
    }
    curves, trained = {}, {}
    for kind in ("dit", "skipdit"):
        workdir = out / "runs" / kind
        rows = []
        trained[kind] = {
            "path": str(workdir),
            "trained": {
                "config": "skipdit_jax.demo.config.get_config(%s)" % ('"dit"' if kind == "dit" else ""),
                "overrides": {**overrides, "train.steps": FLAGS.total_steps, "optimizer.decay": "constant"},
            },
        }
        # Evaluations already made in OUT (a resumed run) are reused: a workdir holds only
        # its latest checkpoints, so a segment trained past cannot be evaluated again.
        log = workdir / "evaluations.jsonl"
        done = {}
        if log.exists():
            for line in log.read_text().splitlines():
                r = json.loads(line)
                if r.pop("settings") != eval_settings:
                    raise UserError(f"{log} holds evaluations made with other settings; use a fresh --out")
                done[r["step"]] = r
        for end in range(FLAGS.eval_every, FLAGS.total_steps + 1, FLAGS.eval_every):
            if end in done:
                rows.append(done[end])
                print(json.dumps({"model": kind, "reused": True, **done[end]}), flush=True)
                continue
            if latest_step(workdir) > end:
                raise UserError(f"{workdir} is trained past step {end} but holds no evaluation there; use a fresh --out")
            result = train_and_evaluate(config_for(kind, end), str(workdir), progress=False)
            if result.preempted:
                raise UserError("training was interrupted; run the experiment again to resume")
            mc, params = load_trained(str(workdir))
            noise, labels = class_noise(mc, FLAGS.per_class, seed=21)
            x, _, _ = timed_sample(mc, params, None, noise, labels, num_steps=FLAGS.sample_steps, cfg_scale=base.sample.cfg_scale)
            row = {
                "step": end,
                "heldout_loss": heldout_loss(mc, params),
                "classifier_fid": metrics.frechet_distance_of_features(classifier.features(clf, x), real_features),
                "class_accuracy": float(np.mean(classifier.predict(clf, x) == np.asarray(labels))),
                "train_seconds": round(result.seconds, 1),  # of this segment
            }
            rows.append(row)
            with log.open("a") as f:
                f.write(json.dumps({**row, "settings": eval_settings}) + "\n")
            print(json.dumps({"model": kind, **row}), flush=True)
        curves[kind] = rows
        trained[kind]["trained"].update(final_step=rows[-1]["step"], seconds=round(sum(r["train_seconds"] for r in rows), 1))

    summary = {}
    for metric in ("heldout_loss", "classifier_fid"):
        dit_steps = [r["step"] for r in curves["dit"]]
        dit_final = curves["dit"][-1][metric]
        reach = steps_to_reach([r["step"] for r in curves["skipdit"]], [r[metric] for r in curves["skipdit"]], dit_final)
        summary[metric] = {
            "dit_final": dit_final,
            "skipdit_final": curves["skipdit"][-1][metric],
            "skipdit_steps_to_dit_final": reach,
            "steps_ratio": None if reach is None else dit_steps[-1] / reach,
        }
        print(f"{metric}: DiT final {dit_final:.4f}; Skip-DiT reaches it at step {reach}; ratio {summary[metric]['steps_ratio']}")
    settings = run_settings(FLAGS, trained, classifier={"steps": FLAGS.classifier_steps, "heldout_accuracy": clf_meta["heldout_accuracy"]}, cfg_scale=base.sample.cfg_scale)
    result = {"settings": settings, "curves": curves, "summary": summary, "classifier_heldout_accuracy": clf_meta["heldout_accuracy"], "total_steps": FLAGS.total_steps, "eval_every": FLAGS.eval_every}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "convergence.png")
    print(f"wrote {out / 'results.json'} and {out / 'convergence.png'}")


def plot(result, path: Path) -> None:
    from _common import figure, save_figure

    plt, fig, axes = figure(2)
    for kind, rows in result["curves"].items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["heldout_loss"] for r in rows], "o-", label=kind)
        axes[1].plot(steps, [r["classifier_fid"] for r in rows], "o-", label=kind)
    axes[0].set(xlabel="training step", ylabel="held-out eps-MSE", title="held-out diffusion loss")
    axes[1].set(xlabel="training step", ylabel="classifier FID (not FID)", title="sample quality", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(plt, fig, path)


if __name__ == "__main__":
    from _common import run_experiment

    run_experiment(main, "convergence")
