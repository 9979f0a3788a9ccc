"""Perturbation sensitivity ("feature smoothness"), DiT vs Skip-DiT: how similar the
output features stay when the input latent, or the weights, move along two random
normalised directions scaled by alpha and beta (the paper's surface plot).

    python experiments/perturbation.py --out runs/perturbation             # trains the MNIST models if needed
    python experiments/perturbation.py --skipdit A --dit B --target weights --radius 0.05

Directions: two Gaussian directions, each rescaled to the norm of what it perturbs (per
sample for the input; per parameter tensor for the weights, "filter normalisation" as in
loss-landscape plots), so alpha = 0.01 means a 1% move. Output features: the model's eps
prediction; the similarity is the cosine along channels, averaged over pixels and samples.
Writes results.json (the grid, both surfaces and the "settings": flags, models, machine)
and perturbation.png.
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

define_model_flags("runs/perturbation")
flags.DEFINE_enum("target", "input", ["input", "weights"], "what is perturbed")
flags.DEFINE_float("radius", 0.2, "alpha and beta range over [-radius, radius]")
flags.DEFINE_integer("grid", 9, "points per axis")
flags.DEFINE_integer("timestep", 500, "timestep of the evaluated inputs x_t")
flags.DEFINE_integer("samples", 8, "inputs (held-out digits, noised to --timestep)")
FLAGS = flags.FLAGS


def surface(mc, params, x, t, y, target: str, alphas, seed: int = 0) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    from skipdit_jax.evaluation.image_metrics import cosine_similarity
    from skipdit_jax.models import DiT

    def apply(p, xin):
        return DiT(mc).apply({"params": p}, xin, t, y)[..., : mc.in_channels]

    k1, k2 = jax.random.split(jax.random.key(seed))
    if target == "input":
        def direction(key):
            d = jax.random.normal(key, x.shape)
            scale = jnp.linalg.norm(x.reshape(x.shape[0], -1), axis=1) / jnp.linalg.norm(d.reshape(d.shape[0], -1), axis=1)
            return d * scale[:, None, None, None]

        d1, d2 = direction(k1), direction(k2)
        fn = jax.jit(lambda a, b: apply(params, x + a * d1 + b * d2))
    else:
        leaves, treedef = jax.tree.flatten(params)

        def direction(key):
            keys = jax.random.split(key, len(leaves))
            ds = [jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)]
            return [d * (jnp.linalg.norm(l) / jnp.maximum(jnp.linalg.norm(d), 1e-12)) for d, l in zip(ds, leaves)]

        d1, d2 = direction(k1), direction(k2)
        fn = jax.jit(lambda a, b: apply(jax.tree.unflatten(treedef, [l + a * u + b * v for l, u, v in zip(leaves, d1, d2)]), x))
    ref = fn(0.0, 0.0)
    grid = np.zeros((len(alphas), len(alphas)))
    for i, a in enumerate(alphas):
        for j, b in enumerate(alphas):
            grid[i, j] = float(cosine_similarity(fn(float(a), float(b)), ref).mean())
    return grid


def main(_):
    from skipdit_jax.xla_tuning import tune_xla_cpu_flags

    tune_xla_cpu_flags()
    import jax
    import jax.numpy as jnp

    from _common import load_models, model_sources
    from _common import settings as run_settings
    from skipdit_jax import data
    from skipdit_jax.demo.config import get_config as demo_config
    from skipdit_jax.diffusion import Diffusion
    from skipdit_jax.errors import UserError

    if not FLAGS.radius > 0 or FLAGS.grid < 2 or not 0 <= FLAGS.timestep <= 999 or FLAGS.samples < 1:
        raise UserError("need --radius > 0, --grid >= 2, --timestep in 0..999 and --samples >= 1")
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    models = load_models(out, FLAGS)
    base = demo_config()
    mc0 = models["skipdit"][0]
    src = data.mnist_source(mc0.input_size, split="heldout", resize=base.data.mnist_resize)
    n = FLAGS.samples
    x0 = jnp.asarray(src.images[:n]).reshape(n, mc0.input_size, mc0.input_size, mc0.in_channels)
    y = jnp.asarray(src.labels[:n], jnp.int32)
    t = jnp.full((n,), FLAGS.timestep, jnp.int32)
    xt = Diffusion(None, learn_sigma=mc0.learn_sigma).q_sample(x0, t, jax.random.normal(jax.random.key(5), x0.shape))
    alphas = np.linspace(-FLAGS.radius, FLAGS.radius, FLAGS.grid)
    result = {
        "settings": run_settings(FLAGS, model_sources(out, FLAGS, models)),
        "target": FLAGS.target,
        "timestep": FLAGS.timestep,
        "alphas": alphas.tolist(),
        "surfaces": {},
        "min_similarity": {},
        "mean_similarity": {},
    }
    for kind, (mc, params) in models.items():
        grid = surface(mc, params, xt, t, y, FLAGS.target, alphas)
        result["surfaces"][kind] = grid.tolist()
        result["min_similarity"][kind] = float(grid.min())
        result["mean_similarity"][kind] = float(grid.mean())
        print(f"{kind}: cosine similarity over the {FLAGS.target} surface: min {grid.min():.4f}, mean {grid.mean():.4f}", flush=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "perturbation.png")
    print(f"wrote {out / 'results.json'} and {out / 'perturbation.png'}")


def plot(result, path: Path) -> None:
    from _common import figure, save_figure

    a = np.asarray(result["alphas"])
    A, B = np.meshgrid(a, a, indexing="ij")
    plt, fig, axes = figure(2, subplot_kw={"projection": "3d"})
    lo = min(np.min(s) for s in result["surfaces"].values())
    for ax, (kind, s) in zip(axes, result["surfaces"].items()):
        ax.plot_surface(A, B, np.asarray(s), cmap="viridis", vmin=lo, vmax=1.0)
        ax.set(xlabel="alpha", ylabel="beta", zlabel="cosine similarity", title=f"{kind}: {result['target']} perturbation", zlim=(lo, 1.0))
    save_figure(plt, fig, path)


if __name__ == "__main__":
    from _common import run_experiment

    run_experiment(main, "perturbation")
