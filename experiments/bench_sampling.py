"""Benchmark: full vs Skip-Cache DDIM-50 sampling with CFG, JAX beside PyTorch.

    python experiments/bench_sampling.py                       # depth 28, width 256, 4 heads (~10 min on 2 CPU cores)
    python experiments/bench_sampling.py --width 1152 --heads 16 --batch 8   # DiT-XL/2 scale, for a GPU

Times DDIM-50 (ADM "ddim50", eta 0), guidance scale 4 (batch doubled), batch 1, 32x32x4
latents, patch 2, for a Skip-DiT of the given depth/width, without cache and with
Skip-Cache N=2,3,4 (k=4, start 1000, close 20: the class-to-image settings), and prints
the measured speedup beside the block-count prediction. With --baselines (default) it then
times the other cache methods (shallow cache, FORA, PAB, Delta-DiT, TeaCache) on a DiT of
the same size without long skips, each beside the block-count prediction of its realised
schedule: a method that computed both branches or synced with the host would fall short.

The PyTorch column runs the tests' reference implementation of the official DiT_skip /
DiT_cache (`tests/torch_reference.py`: same modules, module-held cache counter, timm-style
fused-SDPA attention as current timm uses) with a float32 torch DDIM loop: the code path of
the official release, rewritten from its description. JAX times exclude compilation
(ahead-of-time compiled once per setting); every number is the median of --repeats runs.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from skipdit_jax.cache import ShallowCache, SkipCache
from skipdit_jax.cache import FORA, PAB, DeltaDiT, TeaCache, plan_from_schedule
from skipdit_jax.models.config import ModelConfig
from skipdit_jax.models import init_params
from skipdit_jax.xla_tuning import tune_xla_cpu_flags
from skipdit_jax.sampling import build_sampler, sampling_timesteps

flags.DEFINE_integer("depth", 28, "transformer blocks")
flags.DEFINE_integer("width", 256, "hidden size")
flags.DEFINE_integer("heads", 4, "attention heads")
flags.DEFINE_integer("batch", 1, "images per call (the guidance batch is twice this)")
flags.DEFINE_integer("steps", 50, "DDIM steps")
flags.DEFINE_float("cfg_scale", 4.0, "guidance scale")
flags.DEFINE_list("intervals", ["2", "3", "4"], "Skip-Cache intervals N")
flags.DEFINE_integer("shallow_blocks", 4, "k")
flags.DEFINE_integer("repeats", 3, "timed runs per setting (median reported)")
flags.DEFINE_bool("torch", True, "also time the PyTorch reference")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "JAX compute dtype")
flags.DEFINE_string("json_out", None, "write the results as JSON here")
flags.DEFINE_integer("scan_unroll", 1, "model.scan_unroll: blocks per loop iteration (0 = unrolled)")
flags.DEFINE_bool("baselines", True, "also time FORA, PAB, Delta-DiT, TeaCache and the shallow cache on a DiT")
flags.DEFINE_list("teacache", ["0.1", "0.3"], "TeaCache thresholds (identity polynomial) for --baselines")
flags.DEFINE_bool("xla_tuning", True, "set skipdit_jax.xla_tuning's XLA CPU flags (as the skipdit command does)")
FLAGS = flags.FLAGS


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_jax(config, caches, noise, labels, with_schedule=False):
    params = init_params(config, 0)
    # Non-zero adaLN/final weights so the computation is not trivially sparse.
    params = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(1), a.shape, a.dtype), params)
    respacing = f"ddim{FLAGS.steps}"
    scale, rng = jnp.float32(FLAGS.cfg_scale), jax.random.key(0)
    out = {}
    for name, cache in caches.items():
        fn = build_sampler(config, "ddim", respacing, FLAGS.cfg_scale != 1, None, cache, 0.0, False, return_schedule=True)
        t0 = time.perf_counter()
        compiled = fn.lower(params, noise, labels, scale, rng).compile()
        compile_s = time.perf_counter() - t0
        _, full = jax.block_until_ready(compiled(params, noise, labels, scale, rng))  # warm-up
        out[name] = dict(
            seconds=_median_time(lambda: jax.block_until_ready(compiled(params, noise, labels, scale, rng)), FLAGS.repeats),
            compile_seconds=compile_s,
            full=np.asarray(full),
        )
    return out


def bench_baselines(config, noise, labels):
    """The other cache methods on a DiT of the same size without long skips (JAX only)."""
    dit = config.replace(long_skip=False)
    caches = {"full": None} | {f"shallow N={n}": ShallowCache(int(n), FLAGS.shallow_blocks) for n in FLAGS.intervals}
    caches |= {f"FORA N={n}": FORA(int(n)) for n in FLAGS.intervals}
    caches |= {"PAB N=2": PAB(2), "PAB N=3": PAB(3), "Delta-DiT N=2": DeltaDiT(2), "Delta-DiT N=3": DeltaDiT(3)}
    caches |= {f"TeaCache {th}": TeaCache(float(th)) for th in FLAGS.teacache}
    res = bench_jax(dit, caches, noise, labels)
    print("\nCache baselines on a DiT without long skips (same size), JAX; predicted = block count of the realised schedule")
    print("| method | full/cached steps | predicted | JAX s | speedup | speedup / predicted |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, cache in caches.items():
        r = res[name]
        full = r["full"]
        pred = 1.0 if cache is None else plan_from_schedule(full, dit.depth, cache.units_per_cached_step(dit)).predicted_speedup
        sp = res["full"]["seconds"] / r["seconds"]
        print(f"| {name} | {int(full.sum())}/{int((~full).sum())} | {pred:.2f}x | {r['seconds']:.2f} | {sp:.2f}x | {sp / pred:.3f} |")
        rows.append(dict(method=name, full_steps=int(full.sum()), predicted_speedup=pred, jax_seconds=r["seconds"], jax_speedup=sp))
    return rows


def bench_torch(config, caches, noise, labels):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import torch_reference as ref

    def sdpa_forward(self, x):  # timm's fused path: F.scaled_dot_product_attention
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, d))

    ref.Attention.forward = sdpa_forward
    model = ref.TorchDiT(
        input_size=config.input_size,
        patch_size=config.patch_size,
        in_channels=config.in_channels,
        hidden_size=config.hidden_size,
        depth=config.depth,
        num_heads=config.num_heads,
        num_classes=config.num_classes,
        long_skip=True,
    ).eval()
    diffusion = ref.create_diffusion(f"ddim{FLAGS.steps}")
    abar = torch.tensor(diffusion.alphas_cumprod, dtype=torch.float32)
    abar_prev = torch.tensor(diffusion.alphas_cumprod_prev, dtype=torch.float32)
    x0 = torch.from_numpy(np.asarray(noise)).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.asarray(labels)).long()
    y = torch.cat([y, torch.full_like(y, config.num_classes)])
    c = config.in_channels

    @torch.no_grad()
    def run():
        model.reset_cache_state()
        x = torch.cat([x0, x0])
        for i in reversed(range(diffusion.num_timesteps)):
            t = torch.full((x.shape[0],), int(diffusion.timestep_map[i]), dtype=torch.long)
            eps = model.forward_with_cfg(x, t, y, FLAGS.cfg_scale, None)[:, :c]
            x_start = (x - torch.sqrt(1 - abar[i]) * eps) / torch.sqrt(abar[i])
            x = x_start * torch.sqrt(abar_prev[i]) + torch.sqrt(1 - abar_prev[i]) * eps
        return x

    out = {}
    for name, cache in caches.items():
        if cache is None:
            model.disable_cache()
        else:
            model.enable_cache(cache.interval, cache.shallow_blocks, cache.start_t, cache.close_t)
        run()  # warm-up
        out[name] = dict(seconds=_median_time(run, FLAGS.repeats))
    return out


def main(_):
    if FLAGS.xla_tuning:
        tune_xla_cpu_flags()  # before the first JAX computation starts the backend
    config = ModelConfig(
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=FLAGS.width,
        depth=FLAGS.depth,
        num_heads=FLAGS.heads,
        num_classes=1000,
        long_skip=True,
        dtype=FLAGS.dtype,
        scan_unroll=FLAGS.scan_unroll,
    )
    caches = {"full": None} | {f"N={n}": SkipCache(int(n), FLAGS.shallow_blocks) for n in FLAGS.intervals}
    timesteps = sampling_timesteps("ddim", FLAGS.steps)
    predicted = {name: (1.0 if c is None else c.plan(timesteps, config.depth).predicted_speedup) for name, c in caches.items()}
    noise = jax.random.normal(jax.random.key(42), (FLAGS.batch, 32, 32, 4))
    labels = jnp.arange(FLAGS.batch, dtype=jnp.int32) % 1000

    results = {"jax": bench_jax(config, caches, noise, labels)}
    if FLAGS.torch:
        import torch

        results["torch"] = bench_torch(config, caches, noise, labels)
        torch_threads = torch.get_num_threads()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, JAX backend {jax.default_backend()} ({jax.devices()[0].device_kind})"
    print(f"\nDDIM-{FLAGS.steps}, cfg {FLAGS.cfg_scale}, batch {FLAGS.batch}, Skip-DiT depth {config.depth} width {config.hidden_size} "
          f"{config.num_heads} heads, {FLAGS.dtype}, scan_unroll {config.scan_unroll}; {machine}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
          + (f"; torch threads {torch_threads}" if FLAGS.torch else ""))
    header = "| setting | predicted | JAX s | JAX speedup |" + (" PyTorch s | PyTorch speedup | JAX speedup / PyTorch speedup |" if FLAGS.torch else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for name in caches:
        j = results["jax"][name]["seconds"]
        js = results["jax"]["full"]["seconds"] / j
        row = dict(setting=name, predicted_speedup=predicted[name], jax_seconds=j, jax_speedup=js, jax_compile_seconds=results["jax"][name]["compile_seconds"])
        line = f"| {name} | {predicted[name]:.2f}x | {j:.2f} | {js:.2f}x |"
        if FLAGS.torch:
            tt = results["torch"][name]["seconds"]
            ts = results["torch"]["full"]["seconds"] / tt
            row.update(torch_seconds=tt, torch_speedup=ts)
            line += f" {tt:.2f} | {ts:.2f}x | {js / ts:.3f} |"
        rows.append(row)
        print(line)
    baseline_rows = bench_baselines(config, noise, labels) if FLAGS.baselines else []
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"machine": machine, "xla_flags": os.environ.get("XLA_FLAGS", ""), "config": config.to_dict(), "steps": FLAGS.steps,
                       "batch": FLAGS.batch, "rows": rows, "baselines": baseline_rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
