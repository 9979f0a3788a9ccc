"""Spectral norms, DiT vs Skip-DiT: the largest singular value of every block's weight
matrices, and of the whole network's input-output Jacobian at several timesteps (the
paper's "spectral constraints" argument: long skips bound the Lipschitz growth).

    python experiments/spectral.py --out runs/spectral                    # trains the MNIST models if needed
    python experiments/spectral.py --out runs/spectral --skipdit A --dit B --timesteps 50,250,500,750,950

The Jacobian norm is ||d eps_theta(x_t, t, y) / d x_t||_2 for one sample, by power
iteration on J^T J with `jax.jvp` / `jax.vjp` (--iters iterations, float32), averaged over
--samples inputs x_t = q_sample(x_0, t) of real held-out digits. Writes results.json
(with its "settings": flags, models, machine) and spectral.png.
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

define_model_flags("runs/spectral")
flags.DEFINE_list("timesteps", ["50", "250", "500", "750", "950"], "timesteps of the Jacobian estimate")
flags.DEFINE_integer("samples", 4, "inputs per timestep")
flags.DEFINE_integer("iters", 20, "power iterations")
FLAGS = flags.FLAGS


def weight_spectra(params) -> dict[str, list[float]]:
    """Largest singular value of each block's 2-D kernels, per kernel name, in block order
    (encoder blocks then decoder blocks)."""
    out: dict[str, list[float]] = {}
    blocks = [params["encoder_blocks"], params["decoder_blocks"]]
    for stack in blocks:
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in __import__("jax").tree_util.tree_flatten_with_path(stack)[0]}
        for name, arr in flat.items():
            if not name.endswith("kernel") or arr.ndim != 3:
                continue
            out.setdefault(name, []).extend(float(np.linalg.svd(w, compute_uv=False)[0]) for w in arr)
    if "skip_fusions" in params:
        k = np.asarray(params["skip_fusions"]["linear"]["kernel"])
        out["skip_fusion/linear/kernel"] = [float(np.linalg.svd(w, compute_uv=False)[0]) for w in k]
    return out


def jacobian_norm_fn(mc, iters: int):
    """jitted `(params, x, t, y, v0) -> ||d eps / d x||_2` by power iteration on J^T J
    (one compilation per model config)."""
    import jax
    import jax.numpy as jnp

    from skipdit_jax.models import DiT

    @jax.jit
    def power(params, x, t, y, v):
        def f(x_in):
            return DiT(mc).apply({"params": params}, x_in, t, y)[..., : mc.in_channels]

        def body(_, v):
            _, jv = jax.jvp(f, (x,), (v,))
            (jtjv,) = jax.vjp(f, x)[1](jv)
            return jtjv / jnp.linalg.norm(jtjv)

        v = jax.lax.fori_loop(0, iters, body, v / jnp.linalg.norm(v))
        return jnp.linalg.norm(jax.jvp(f, (x,), (v,))[1])

    return power


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

    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        ts = [int(t) for t in FLAGS.timesteps]
    except ValueError:
        raise UserError(f"--timesteps must be integers in 0..999, got {FLAGS.timesteps}") from None
    if not all(0 <= t <= 999 for t in ts) or FLAGS.iters < 1 or FLAGS.samples < 1:
        raise UserError("--timesteps must lie in 0..999, --iters and --samples must be >= 1")
    models = load_models(out, FLAGS)
    base = demo_config()
    mc0 = models["skipdit"][0]
    if mc0.in_channels == 1:
        src = data.mnist_source(mc0.input_size, split="heldout", resize=base.data.mnist_resize)
        x0 = jnp.asarray(src.images[: FLAGS.samples]).reshape(FLAGS.samples, mc0.input_size, mc0.input_size, 1)
        y0 = jnp.asarray(src.labels[: FLAGS.samples], jnp.int32)
    else:  # latent models: unit-variance stand-ins for latents
        x0 = jax.random.normal(jax.random.key(3), (FLAGS.samples, mc0.input_size, mc0.input_size, mc0.in_channels))
        y0 = jnp.zeros((FLAGS.samples,), jnp.int32)
    diffusion = Diffusion(None, learn_sigma=mc0.learn_sigma)

    result = {"settings": run_settings(FLAGS, model_sources(out, FLAGS, models)), "timesteps": ts, "models": {}}
    for kind, (mc, params) in models.items():
        power = jacobian_norm_fn(mc, FLAGS.iters)
        jac = []
        for t in ts:
            norms = []
            for i in range(FLAGS.samples):
                noise = jax.random.normal(jax.random.key(100 + i), x0[i : i + 1].shape)
                tt = jnp.array([t], jnp.int32)
                xt = diffusion.q_sample(x0[i : i + 1], tt, noise)
                v0 = jax.random.normal(jax.random.key(i), xt.shape)
                norms.append(float(power(params, xt, tt, y0[i : i + 1], v0)))
            jac.append(float(np.mean(norms)))
        result["models"][kind] = {"jacobian_spectral_norm": jac, "weight_spectral_norms": weight_spectra(params), "long_skip": mc.long_skip}
        print(f"{kind}: Jacobian spectral norm by timestep {dict(zip(ts, np.round(jac, 3).tolist()))}", flush=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "spectral.png")
    print(f"wrote {out / 'results.json'} and {out / 'spectral.png'}")


def plot(result, path: Path) -> None:
    from _common import figure, save_figure

    plt, fig, axes = figure(2)
    for kind, r in result["models"].items():
        axes[0].plot(result["timesteps"], r["jacobian_spectral_norm"], "o-", label=kind)
        for name in ("mlp/fc2/kernel", "attn/proj/kernel"):
            if name in r["weight_spectral_norms"]:
                axes[1].plot(r["weight_spectral_norms"][name], "o-", ms=3, label=f"{kind} {name}")
    axes[0].set(xlabel="timestep t", ylabel="||d eps / d x_t||_2", title="input-output Jacobian spectral norm")
    axes[1].set(xlabel="block", ylabel="largest singular value", title="per-block weight spectral norms")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(plt, fig, path)


if __name__ == "__main__":
    from _common import run_experiment

    run_experiment(main, "spectral")
