"""Per-timestep similarity of cached and freshly computed deep features (the paper's
Fig. 1a): Skip-DiT with Skip-Cache vs DiT with the shallow cache and with FORA.

    python experiments/feature_similarity.py --out runs/feature_similarity      # trains the MNIST models if needed
    python experiments/feature_similarity.py --skipdit A --dit B --interval 3

Along each model's uncached DDIM trajectory (same noise and labels), at every step the
deep feature -- the hidden state entering decoder block depth-k -- is computed fresh and
compared (cosine along channels, mean over tokens and samples) with what the cache would
use there: for Skip-Cache and the shallow cache, the feature stored at the last full step
of the method's schedule. FORA stores no hidden state: on a cached step it rebuilds the
residual stream from the fresh embedding, adding each block's stored attention and MLP
outputs (from its last full step, before the gates) under the *current* step's adaLN gates
(`skipdit_jax.cache.FORA`). Its "cached feature" is that rebuilt stream entering block
depth-k -- the fresh embedding plus, for each of the depth-k blocks before it,
gate_msa(now) * attn(stored) + gate_mlp(now) * mlp(stored) -- which is what FORA's cached
step feeds forward to the remaining blocks; it is computed along the uncached trajectory
with FORA's own schedule (the DiT only). Also reported: the
similarity of the deep feature between consecutive steps, per model. Full steps are
1.0 by definition and are left out of the means. Writes results.json (with its
"settings": flags, models, machine) and feature_similarity.png.
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

define_model_flags("runs/feature_similarity")
flags.DEFINE_integer("interval", 2, "cache interval N of all three methods")
flags.DEFINE_integer("shallow_blocks", 0, "k (0: the config's sample.shallow_blocks)")
flags.DEFINE_integer("steps", 50, "DDIM steps")
flags.DEFINE_float("cfg_scale", 4.0, "guidance scale (the demo's, as in cache_tradeoff.py)")
flags.DEFINE_integer("per_class", 2, "samples per class")
FLAGS = flags.FLAGS


def trajectory_features(mc, params, noise, labels, steps: int, cfg_scale: float, k: int, fora_interval: int | None = None):
    """Along the uncached guided DDIM trajectory, per step: the deep feature (the input of
    decoder block depth-k) and, with `fora_interval` (a model without long skips), the
    feature FORA(fora_interval)'s cached step would feed forward at that point (see the
    module docstring; equal to the deep feature on FORA's full steps). Returns
    (timesteps, deep, fora or None), arrays with a leading step axis."""
    import jax
    import jax.numpy as jnp

    from skipdit_jax.cache import FORA
    from skipdit_jax.diffusion import Diffusion
    from skipdit_jax.models import family_of
    from skipdit_jax.sampling import guide

    diffusion = Diffusion(f"ddim{steps}", learn_sigma=mc.learn_sigma)
    indices = np.arange(diffusion.num_steps, dtype=np.int32)[::-1]
    timesteps = diffusion.timestep_map[indices]
    y = jnp.concatenate([labels, jnp.full_like(labels, mc.null_label)])
    family = family_of(mc)
    fora = FORA(fora_interval) if fora_interval else None
    fora_full = fora.full_steps(timesteps) if fora else np.ones(len(indices), bool)
    before = mc.depth - k  # blocks in front of the deep feature

    def fora_feature(params, x_in, t, stored):
        # FORA's cached residual stream over the first `before` blocks: fresh embedding,
        # stored pre-gate branches, this step's gates.
        h, c = family.embed(params, x_in, t, y)
        blocks = jax.tree.map(lambda *a: jnp.concatenate(a), *family.block_stacks(params))
        branches = jnp.concatenate(stored)  # (depth, 2, B, N, D)

        def body(h, xs):
            p, (attn, mlp) = xs
            gate_msa, gate_mlp = family.block_modulation(p, c)[2::3]
            h = h + gate_msa[:, None] * attn
            return h + gate_mlp[:, None] * mlp, None

        front = jax.tree.map(lambda a: a[:before], (blocks, (branches[:, 0], branches[:, 1])))
        return jax.lax.scan(body, h, front)[0]

    @jax.jit
    def run(params, noise):
        def step(state, xs):
            x, stored = state
            i, t_orig, is_full = xs
            x_in = jnp.concatenate([x, x])
            t = jnp.full((x_in.shape[0],), t_orig, jnp.int32)
            out, deep = family.forward_full(params, x_in, t, y, k)
            feat = None
            if fora is not None:
                # FORA's full pass records this step's branches (its output is the plain
                # forward's); the cache keeps them only on FORA's full steps.
                _, fresh = fora.full_pass(family, params, x_in, t, y, stored)
                stored = jax.tree.map(lambda f, s: jnp.where(is_full, f, s), fresh, stored)
                feat = fora_feature(params, x_in, t, stored)
            eps = guide(out, cfg_scale, mc.in_channels, None)
            x = diffusion.ddim_step(eps, x, jnp.full((x.shape[0],), i, jnp.int32), None, 0.0, True)
            return (x, stored), (deep, feat)

        stored = fora.init_carry(family, 2 * noise.shape[0]) if fora is not None else None
        xs = (jnp.asarray(indices), jnp.asarray(timesteps, jnp.int32), jnp.asarray(fora_full))
        return jax.lax.scan(step, (noise, stored), xs)[1]

    deep, feat = run(params, noise)
    return timesteps, np.asarray(deep), (None if feat is None else np.asarray(feat))


def _cos(a, b) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def cached_vs_fresh(full: np.ndarray, fresh: np.ndarray, cached_at) -> list[float]:
    """Per step: cosine between the fresh feature and the one the cache holds (the value
    `cached_at(j, i)` built from the last full step j <= i)."""
    sims, last = [], None
    for i, is_full in enumerate(full):
        if is_full:
            last = i
        sims.append(1.0 if is_full else _cos(cached_at(last, i), fresh[i]))
    return sims


def main(_):
    from skipdit_jax.xla_tuning import tune_xla_cpu_flags

    tune_xla_cpu_flags()
    from _common import class_noise, load_models, model_sources
    from _common import settings as run_settings
    from skipdit_jax.cache import ShallowCache, SkipCache
    from skipdit_jax.cache import FORA
    from skipdit_jax.models import family_of
    from skipdit_jax.demo.config import get_config as demo_config
    from skipdit_jax.errors import UserError

    if FLAGS.interval < 2 or FLAGS.steps < 2:
        raise UserError("--interval must be >= 2 (1 caches nothing) and --steps >= 2")
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    models = load_models(out, FLAGS)
    k = FLAGS.shallow_blocks or demo_config().sample.shallow_blocks
    n = FLAGS.interval
    feats = {}
    for kind, (mc, params) in models.items():
        SkipCache(n, k).check_model(family_of(mc.replace(long_skip=True)))  # k in range for this depth
        noise, labels = class_noise(mc, FLAGS.per_class)
        feats[kind] = trajectory_features(mc, params, noise, labels, FLAGS.steps, FLAGS.cfg_scale, k, None if mc.long_skip else n)
    ts = feats["skipdit"][0]
    series = {}
    _, deep_s, _ = feats["skipdit"]
    series["Skip-DiT, Skip-Cache"] = cached_vs_fresh(SkipCache(n, k).full_steps(ts), deep_s, lambda j, i: deep_s[j])
    _, deep_d, fora_d = feats["dit"]
    series["DiT, shallow cache"] = cached_vs_fresh(ShallowCache(n, k).full_steps(ts), deep_d, lambda j, i: deep_d[j])
    # fora_d[i] already holds FORA's rebuilt feature at step i (branches of its last full step j).
    series["DiT, FORA"] = cached_vs_fresh(FORA(n).full_steps(ts), deep_d, lambda j, i: fora_d[i])
    consecutive = {kind: [_cos(f[1][i - 1], f[1][i]) for i in range(1, len(ts))] for kind, f in feats.items()}

    def cached_mean(name, full):
        vals = [s for s, f in zip(series[name], full) if not f]
        return float(np.mean(vals)) if vals else None

    schedules = {"Skip-DiT, Skip-Cache": SkipCache(n, k).full_steps(ts), "DiT, shallow cache": ShallowCache(n, k).full_steps(ts), "DiT, FORA": FORA(n).full_steps(ts)}
    result = {
        "settings": run_settings(FLAGS, model_sources(out, FLAGS, models), shallow_blocks=k, samples=10 * FLAGS.per_class, sampler=f"ddim{FLAGS.steps}", clip_denoised=True),
        "timesteps": [int(t) for t in ts],
        "interval": n,
        "shallow_blocks": k,
        "cached_vs_fresh": series,
        "mean_over_cached_steps": {name: cached_mean(name, full) for name, full in schedules.items()},
        "consecutive_step_similarity": consecutive,
        "mean_consecutive_step_similarity": {kind: float(np.mean(v)) for kind, v in consecutive.items()},
    }
    for name, v in result["mean_over_cached_steps"].items():
        print(f"{name}: mean cosine similarity of cached vs fresh deep features over cached steps {v:.5f}")
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "feature_similarity.png")
    print(f"wrote {out / 'results.json'} and {out / 'feature_similarity.png'}")


def plot(result, path: Path) -> None:
    from _common import figure, save_figure

    ts = result["timesteps"]
    plt, fig, axes = figure(2)
    for name, s in result["cached_vs_fresh"].items():
        axes[0].plot(ts, s, "o-", ms=3, label=name)
    for kind, s in result["consecutive_step_similarity"].items():
        axes[1].plot(ts[1:], s, "o-", ms=3, label=kind)
    axes[0].set(xlabel="timestep", ylabel="cosine similarity", title=f"cached vs fresh deep feature (N={result['interval']})")
    axes[1].set(xlabel="timestep", ylabel="cosine similarity", title="deep feature, consecutive steps")
    for ax in axes:
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(plt, fig, path)


if __name__ == "__main__":
    from _common import run_experiment

    run_experiment(main, "feature_similarity")
