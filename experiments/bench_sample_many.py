"""Benchmark: how much of a sample-many run is spent outside the jitted sampler.

    python experiments/bench_sample_many.py                     # depth 4, width 128, 16x16x4, DDIM 10, batch 32 (CPU, ~2 min)
    python experiments/bench_sample_many.py --depth 28 --width 1152 --heads 16 --size 32 --num 1024 --steps 250 --sampler ddpm

Draws --num samples with `skipdit_jax.sampling.sample_many` (the code of `skipdit
sample-many`) from a randomly initialised Skip-DiT, without a cache and with Skip-Cache,
into fresh temporary directories, and prints one markdown section: the settings beside
images/s, compile seconds, the seconds inside the jitted batch function (sampling and the
uint8 conversion, fused), the fraction of the loop's wall time outside it (index
arrays, gathering the uint8 batch, writing the shards, the progress bar), the final
.npz assembly, and the cache's speedup timed on one batch beside the uncached one.
No VAE: the uint8 images are latent channels 0-2.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

flags.DEFINE_integer("depth", 4, "transformer blocks")
flags.DEFINE_integer("width", 128, "hidden size")
flags.DEFINE_integer("heads", 4, "attention heads")
flags.DEFINE_integer("size", 16, "latent side (16 = 128x128 images' latents)")
flags.DEFINE_integer("num", 128, "samples per setting")
flags.DEFINE_integer("batch", 32, "global batch")
flags.DEFINE_enum("sampler", "ddim", ["ddim", "ddpm"], "sampler")
flags.DEFINE_integer("steps", 10, "sampling steps")
flags.DEFINE_float("cfg_scale", 1.5, "guidance scale (the FID setting)")
flags.DEFINE_integer("cfg_channels", 3, "guided channels (the FID setting)")
flags.DEFINE_string("cache", "2,1", "Skip-Cache spec N,k")
flags.DEFINE_string("json_out", None, "also write the results as JSON here")
FLAGS = flags.FLAGS


def main(_):
    from skipdit_jax.xla_tuning import tune_xla_cpu_flags

    tune_xla_cpu_flags()  # as the skipdit command does, before the backend starts
    import jax
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from _common import machine

    from skipdit_jax.cache import parse_cache_spec
    from skipdit_jax.models import init_params
    from skipdit_jax.models.config import ModelConfig
    from skipdit_jax.sampling import sample_many

    config = ModelConfig(
        input_size=FLAGS.size, patch_size=2, in_channels=4, hidden_size=FLAGS.width, depth=FLAGS.depth,
        num_heads=FLAGS.heads, num_classes=1000, long_skip=True,
    )
    params = init_params(config, 0)
    # Non-zero adaLN/final weights, so the computation is not trivially sparse.
    params = jax.tree.map(lambda a: np.asarray(a) + 0.01 * np.random.default_rng(1).standard_normal(a.shape).astype(a.dtype), params)
    settings = {
        "model": f"Skip-DiT depth {FLAGS.depth}, width {FLAGS.width}, {FLAGS.heads} heads, patch 2, {FLAGS.size}x{FLAGS.size}x4 latents, 1000 classes (random weights)",
        "sampling": f"{FLAGS.sampler.upper()} {FLAGS.steps} steps, guidance {FLAGS.cfg_scale} on {FLAGS.cfg_channels} channels, no VAE",
        "num": FLAGS.num,
        "global batch": FLAGS.batch,
        "cache": f"Skip-Cache {FLAGS.cache} (N,k)",
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "machine": machine(),
        # The machine may be shared: timings of the two settings are then noisy.
        "load average at start (1 min)": round(os.getloadavg()[0], 2),
    }
    rows = {}
    for name, spec in (("uncached", None), ("Skip-Cache", FLAGS.cache)):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            s = sample_many(
                config, params, Path(tmp) / "out", num=FLAGS.num, seed=0, sampler=FLAGS.sampler, num_steps=FLAGS.steps,
                cfg_scale=FLAGS.cfg_scale, cfg_channels=FLAGS.cfg_channels, cache=parse_cache_spec(spec), batch_size=FLAGS.batch,
                progress=False, compare=True,
            )
            s["total_seconds"] = round(time.perf_counter() - t0, 3)
        rows[name] = s

    print("### sample-many: time outside the jitted sampler\n")
    for k, v in settings.items():
        print(f"- {k}: {v if not isinstance(v, dict) else ', '.join(f'{a} {b}' for a, b in v.items())}")
    print("- command: `" + " ".join(["python experiments/bench_sample_many.py", *sys.argv[1:]]) + "`\n")
    print(
        "| setting | images/s | loop s | inside jit s | outside jit | compile s | .npz assembly s "
        "| cache speedup, one batch: measured (median of 3) / predicted from block counts |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, s in rows.items():
        speedup = "-"
        if "measured_speedup" in s:
            speedup = (
                f"{s['measured_speedup']:.2f}x ({s['full_seconds_batch']:.2f} s vs {s['cached_seconds_batch']:.2f} s)"
                f" / {s['predicted_speedup']:.2f}x"
            )
        print(
            f"| {name} | {s['images_per_s']:.1f} | {s['seconds']:.2f} | {s['inside_seconds']:.2f} | {100 * s['outside_fraction']:.2f}% "
            f"| {s['compile_seconds']:.1f} | {s['assemble_seconds']:.3f} | {speedup} |"
        )
    if FLAGS.json_out:
        Path(FLAGS.json_out).write_text(json.dumps({"settings": settings, "results": rows}, indent=2, default=str))


if __name__ == "__main__":
    app.run(main)
