"""Benchmark: Latte-skip video sampling, full vs Skip-Cache, JAX beside PyTorch.

    python experiments/bench_latte.py --out latte_bench.md     # depth 28, width 256: long on a small CPU
    python experiments/bench_latte.py --steps 10 --width 64 --frames 4 --repeats 1   # a quick check

Times class-to-video sampling of a Latte-skip (depth blocks = depth/2 (spatial, temporal)
pairs, long skips between pairs) on --frames frames of --size x --size x 4 latents, patch 2,
101 classes (UCF-101), batch 1 with classifier-free guidance (scale 7 on all 4 eps channels,
as the official c2v `forward_with_cfg`; the model batch is 2), DDIM (ADM "ddimS", eta 0, no
clipping): the full pass and Skip-Cache N = --intervals with the official c2v setting
(`SkipCache(N, 1, 900, 49)`: one shallow pair on each side, full while t >= 900, the cache
dropped after a step with t < 50). Beside each measured speedup it prints the block-count
prediction of the cache plan (pairs: 14 per full step at depth 28, 2 per cached step); at
DDIM-50 it checks the plan's full/cached counts against the official ones (N=2 28/22, N=3
21/29).

The PyTorch column runs the tests' independent reference (`tests/torch_reference.py`
`TorchLatte`, the official `Latte_skip` layout with the module-held `Latte_skip_cache`
counter, attention through `F.scaled_dot_product_attention`) on the same weights, converted
with `skipdit_jax.convert.latte_to_torch`, in a float32 torch DDIM loop. Both see the same
noise and labels; the table gives the largest difference of their samples (relative to the
largest sample value) as a check that they computed the same thing.

Weights: `LatteFamily(config).init_params` plus small Gaussian noise on every parameter, so
no adaLN gate, skip module or final layer is zero. JAX is compiled ahead of time; every
setting of both implementations then runs --warmup untimed rounds and --repeats timed
rounds, interleaved (each round runs every setting once, in a rotated order, so load changes
hit all of them); the table gives medians of wall time and of CPU time (every thread of the
process: the work done, which other programs sharing the cores change far less). The markdown section is printed and, with --out,
written atomically.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

flags.DEFINE_integer("depth", 28, "transformer blocks (two per pair; the number of pairs must be even)")
flags.DEFINE_integer("width", 256, "hidden size")
flags.DEFINE_integer("heads", 4, "attention heads")
flags.DEFINE_integer("frames", 16, "video frames")
flags.DEFINE_integer("size", 32, "latent height and width (4 channels, patch 2)")
flags.DEFINE_integer("steps", 50, "DDIM steps")
flags.DEFINE_float("cfg_scale", 7.0, "guidance scale (the official UCF-101 setting)")
flags.DEFINE_list("intervals", ["2", "3", "4"], "Skip-Cache intervals N")
flags.DEFINE_integer("repeats", 3, "timed rounds (median reported)")
flags.DEFINE_integer("warmup", 1, "untimed rounds before the timed ones")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: the CPU cores this process may use)")
flags.DEFINE_bool("torch", True, "also time the PyTorch reference")
flags.DEFINE_bool("xla_tuning", True, "set skipdit_jax.xla_tuning's XLA CPU flags (as the skipdit command does)")
flags.DEFINE_string("out", None, "also write the markdown section here (atomically)")
FLAGS = flags.FLAGS

NUM_CLASSES = 101  # UCF-101
START_T, CLOSE_T, SHALLOW_PAIRS = 900, 49, 1  # c2v: full for t >= 900, dropped after t < 50 (<= 49)
OFFICIAL_DDIM50 = {2: (28, 22), 3: (21, 29)}  # full/cached steps of the official c2v cache at DDIM-50


def check_flags():
    from skipdit_jax.errors import UserError

    for name in ("depth", "width", "heads", "frames", "size", "steps", "repeats"):
        if FLAGS[name].value < 1:
            raise UserError(f"--{name} must be >= 1, got {FLAGS[name].value}")
    if FLAGS.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {FLAGS.warmup}")
    if FLAGS.depth % 4:
        raise UserError(f"--depth must be a multiple of 4 (an even number of (spatial, temporal) pairs), got {FLAGS.depth}")
    if FLAGS.size % 2:
        raise UserError(f"--size must be even (patch 2), got {FLAGS.size}")
    if FLAGS.cfg_scale == 1.0:
        raise UserError("--cfg_scale must not be 1: the benchmark times guided sampling (model batch 2)")
    try:
        intervals = [int(n) for n in FLAGS.intervals]
    except ValueError:
        raise UserError(f"--intervals must be integers, got {','.join(FLAGS.intervals)}") from None
    if any(n < 2 for n in intervals):
        raise UserError(f"--intervals must be >= 2 (1 = no caching), got {','.join(FLAGS.intervals)}")
    return intervals


def random_params(family, seed=0, scale=0.01):
    """Initialised parameters + N(0, scale^2) on every leaf: nothing is exactly zero."""
    import jax

    params = family.init_params(seed)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed + 1)
    return jax.tree.unflatten(treedef, [np.asarray(a) + scale * rng.standard_normal(a.shape).astype(np.float32) for a in leaves])


def torch_sampler(config, params, noise, labels, steps, cfg_scale):
    """`run(cache) -> (samples (B, F, H, W, C), full steps, cached steps)`: the reference model
    on the converted weights in a float32 DDIM loop; `cache` a SkipCache or None."""
    import torch
    import torch.nn.functional as F
    import torch_reference as ref

    from skipdit_jax.convert import latte_to_torch

    def sdpa_forward(self, x):  # the fused attention current PyTorch code uses
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, d))

    ref.Attention.forward = sdpa_forward
    model = ref.TorchLatte(
        input_size=config.input_size,
        patch_size=config.patch_size,
        in_channels=config.in_channels,
        hidden_size=config.hidden_size,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        num_frames=config.num_frames,
        num_classes=config.num_classes,
        learn_sigma=config.learn_sigma,
        long_skip=True,
    ).eval()
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in latte_to_torch(config, params).items()})
    diffusion = ref.create_diffusion(f"ddim{steps}")
    abar = torch.tensor(diffusion.alphas_cumprod, dtype=torch.float32)
    abar_prev = torch.tensor(diffusion.alphas_cumprod_prev, dtype=torch.float32)
    x0 = torch.from_numpy(np.array(noise)).permute(0, 1, 4, 2, 3).contiguous()  # (B, F, C, H, W)
    y = torch.from_numpy(np.array(labels)).long()
    y = torch.cat([y, torch.full_like(y, config.num_classes)])  # [cond; uncond], the null label last
    c = config.in_channels

    @torch.no_grad()
    def run(cache):
        if cache is None:
            model.cache_enabled = False
        else:  # the official c2v closes with `t < close`; SkipCache's `t <= close_t` is the same on integers
            model.enable_cache(cache.interval, cache.shallow_blocks, cache.start_t, cache.close_t + 1)
        model.reset_cache_state()
        model.reset_counters()
        x = torch.cat([x0, x0])
        for i in reversed(range(diffusion.num_timesteps)):
            t = torch.full((x.shape[0],), int(diffusion.timestep_map[i]), dtype=torch.long)
            eps = model(x, t, y)[:, :, :c]
            cond, uncond = eps.chunk(2)
            eps = uncond + cfg_scale * (cond - uncond)  # guidance on all eps channels (c2v)
            half = x[: x.shape[0] // 2]
            x_start = (half - torch.sqrt(1 - abar[i]) * eps) / torch.sqrt(abar[i])
            half = x_start * torch.sqrt(abar_prev[i]) + torch.sqrt(1 - abar_prev[i]) * eps
            x = torch.cat([half, half])
        return half.permute(0, 1, 3, 4, 2).numpy(), model.n_full, model.n_cached

    return run, torch.__version__


def _s(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds >= 10 else f"{seconds:.3g}"


def rounds(runs: dict, warmup: int, repeats: int) -> tuple[dict, dict]:
    """({name: [wall seconds per timed round]}, {name: [CPU seconds per timed round]}):
    every round runs each setting once, in an order rotated by one per round; `warmup`
    untimed rounds first. CPU time (all threads of this process: XLA's and torch's) is
    the work done, which other programs sharing the cores change far less than wall time."""
    names = list(runs)
    times = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return times, cpu


def main(_):
    intervals = check_flags()
    if FLAGS.xla_tuning:
        from skipdit_jax.xla_tuning import tune_xla_cpu_flags

        tune_xla_cpu_flags()  # before the first JAX computation starts the backend
    import jax
    import jax.numpy as jnp
    from _common import compiled_sampler, machine

    from skipdit_jax.cache import SkipCache
    from skipdit_jax.models import LatteConfig, family_of
    from skipdit_jax.paths import atomic_write_text
    from skipdit_jax.sampling import sampling_timesteps

    config = LatteConfig(
        input_size=FLAGS.size,
        patch_size=2,
        in_channels=4,
        hidden_size=FLAGS.width,
        depth=FLAGS.depth,
        num_heads=FLAGS.heads,
        num_frames=FLAGS.frames,
        num_classes=NUM_CLASSES,
        learn_sigma=True,
        long_skip=True,
    )
    family = family_of(config)
    caches = {"full": None} | {f"Skip-Cache N={n}": SkipCache(n, SHALLOW_PAIRS, START_T, CLOSE_T) for n in intervals}
    for cache in caches.values():
        if cache is not None:
            cache.check_model(family)
    timesteps = sampling_timesteps("ddim", FLAGS.steps)
    plans = {name: None if c is None else c.plan(timesteps, family.depth_units) for name, c in caches.items()}
    counts = {name: (len(timesteps), 0) if p is None else (p.num_full, p.num_cached) for name, p in plans.items()}
    predicted = {name: 1.0 if p is None else p.predicted_speedup for name, p in plans.items()}
    if FLAGS.steps == 50:
        for n, want in OFFICIAL_DDIM50.items():
            name = f"Skip-Cache N={n}"
            if name in counts:
                assert counts[name] == want, f"{name} at DDIM-50: plan {counts[name]} != official {want}"

    params = random_params(family)
    noise = jax.random.normal(jax.random.key(42), (1, *family.sample_shape))
    labels = jnp.array([7], jnp.int32)

    runs, results = {}, {}
    compile_start = time.perf_counter()
    for name, cache in caches.items():
        run = compiled_sampler(
            config, params, cache, noise, labels, sampler="ddim", num_steps=FLAGS.steps, cfg_scale=FLAGS.cfg_scale, clip=False
        )

        def jax_run(run=run, name=name):
            x, _, full = run()
            results[("jax", name)] = (x, int(full.sum()), int((~full).sum()))

        runs[("jax", name)] = jax_run
    compile_s = time.perf_counter() - compile_start

    torch_version, torch_threads = None, None
    if FLAGS.torch:
        import torch

        torch_threads = FLAGS.torch_threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(torch_threads)
        torch_run, torch_version = torch_sampler(config, params, noise, labels, FLAGS.steps, FLAGS.cfg_scale)
        for name, cache in caches.items():

            def t_run(cache=cache, name=name):
                results[("torch", name)] = torch_run(cache)

            runs[("torch", name)] = t_run

    times, cpu_times = rounds(runs, FLAGS.warmup, FLAGS.repeats)

    # What ran is what was planned: the realised JAX schedule and the reference's counters.
    for (impl, name), (x, n_full, n_cached) in results.items():
        assert (n_full, n_cached) == counts[name], f"{impl} {name}: ran {n_full}/{n_cached} full/cached, planned {counts[name]}"
        assert np.isfinite(x).all(), f"{impl} {name}: non-finite samples"

    med = {key: float(np.median(ts)) for key, ts in times.items()}
    med_cpu = {key: float(np.median(ts)) for key, ts in cpu_times.items()}
    m = machine()
    cores = m["cpu_cores"]
    versions = f"jax {jax.__version__}" + (f", torch {torch_version}" if FLAGS.torch else "")
    threads = f"XLA CPU on {cores} cores" + (f", torch {torch_threads} threads" if FLAGS.torch else "")
    cmd = " ".join(["python experiments/bench_latte.py", *sys.argv[1:]])
    lines = [
        "## Latte-skip video sampling: full vs Skip-Cache, JAX beside PyTorch",
        "",
        f"Settings: Latte-skip {config.depth} blocks ({config.num_pairs} pairs), width {config.hidden_size}, "
        f"{config.num_heads} heads, patch 2, {family.count_params():,} parameters (random, non-zero), float32; "
        f"{config.num_frames} frames of {config.input_size}x{config.input_size}x4 latents, {NUM_CLASSES} classes, batch 1 "
        f"+ guidance (scale {FLAGS.cfg_scale:g} on all 4 eps channels; model batch 2); DDIM-{FLAGS.steps} (eta 0); "
        f"Skip-Cache k={SHALLOW_PAIRS} pair, full while t >= {START_T}, dropped after t < {CLOSE_T + 1}; "
        f"predicted = block-count speedup of the plan ({config.num_pairs} pairs per full step, "
        f"{2 * SHALLOW_PAIRS} per cached step); "
        f"median of {FLAGS.repeats} interleaved rounds after {FLAGS.warmup} warm-up round(s), JAX compiled ahead "
        f"({compile_s:.1f} s for all settings, not timed); PyTorch: `tests/torch_reference.py` TorchLatte with its module-held "
        f"c2v cache, SDPA attention, same weights; {m['cpu']}, {cores} CPU cores, JAX device {m['device']}; {versions}; "
        f"{threads}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {m['date']}, commit {m['git_commit']}"
        f"{' (modified)' if m['git_dirty'] else ''}; command: `{cmd}`.",
        "",
    ]
    header = "| method | full/cached steps | predicted | JAX s | JAX speedup |"
    if FLAGS.torch:
        header += " PyTorch s | PyTorch speedup | JAX s / PyTorch s | max abs diff / max abs |"
    header += " JAX CPU s | JAX CPU speedup |" + (" PyTorch CPU s | PyTorch CPU speedup |" if FLAGS.torch else "")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name in caches:
        j = med[("jax", name)]
        steps = f"{counts[name][0]}/{counts[name][1]}"
        row = f"| {name} | {steps} | {predicted[name]:.2f}x | {_s(j)} | {med[('jax', 'full')] / j:.2f}x |"
        if FLAGS.torch:
            t = med[("torch", name)]
            xj, xt = results[("jax", name)][0], results[("torch", name)][0]
            rel = float(np.abs(xj - xt).max() / max(np.abs(xt).max(), 1e-12))
            row += f" {_s(t)} | {med[('torch', 'full')] / t:.2f}x | {j / t:.2f} | {rel:.1e} |"
        for impl in ("jax", "torch") if FLAGS.torch else ("jax",):
            c = med_cpu[(impl, name)]
            row += f" {_s(c)} | {med_cpu[(impl, 'full')] / c:.2f}x |"
        lines.append(row)
    text = "\n".join(lines) + "\n"
    print(text)
    if FLAGS.out:
        atomic_write_text(FLAGS.out, text)


if __name__ == "__main__":
    from _common import run_experiment

    run_experiment(main, "bench_latte")
