"""Benchmark: Latte-T2V-skip text-to-video sampling, DDIM-50 full vs the official Skip-Cache specs.

    python experiments/bench_latte_t2v.py --out t2v_bench.md      # 28 pairs, width 128, 16x16x16x4
    python experiments/bench_latte_t2v.py --steps 10 --pairs 4 --frames 4 --size 8 --repeats 1   # a quick check

Times text-to-video sampling of a Latte-T2V-skip (--pairs (spatial, temporal) pairs with
cross-attention to the caption in the spatial blocks, long skips between pairs) at reduced
width on --frames frames of --size x --size x 4 latents, patch 2, with a caption of
--text_len tokens of T5-XXL width (4096; random embeddings: the model cost does not depend on
their values), batch 1 with classifier-free guidance (scale 7.5, the null caption as the
unconditional half; model batch 2), as the official Latte pipeline samples: diffusers
DDIMScheduler-50 with leading spacing (timesteps 980, 960, ..., 0), eta 0, no clipping
(`DiffusersDDIM.latte()`). It compares the full pass with the official text-to-video
Skip-Cache specs --specs ("N{N}-{start}-{close}": one pair computed at each end, full while
t >= start, the cache dropped after a step with t <= close). Beside each measured speedup it
prints the block-count prediction of the cache plan (pairs: --pairs per full step, 2 per
cached step); at 28 pairs and DDIM-50 it checks the full/cached counts against the official
schedule (N2 33/17, N3 28/22, N4 25/25).

Weights: the family's init plus N(0, 0.01^2) on every parameter (no zero gate or projection).
Every setting is compiled ahead of time, then runs --warmup untimed rounds and --repeats timed
rounds, interleaved (each round runs every setting once, in a rotated order, so load changes
hit all of them); the table gives medians of wall time and of process CPU time (every thread:
the work done, which other programs sharing the cores change far less). The markdown section
is printed and, with --out, written atomically.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_integer("pairs", 28, "(spatial, temporal) pairs (even: the long skips pair them)")
flags.DEFINE_integer("width", 128, "hidden size")
flags.DEFINE_integer("heads", 4, "attention heads")
flags.DEFINE_integer("frames", 16, "video frames")
flags.DEFINE_integer("size", 16, "latent height and width (4 channels, patch 2)")
flags.DEFINE_integer("text_len", 16, "caption tokens")
flags.DEFINE_integer("caption_channels", 4096, "text-encoder width (T5-v1.1-XXL: 4096)")
flags.DEFINE_integer("steps", 50, "DDIM steps")
flags.DEFINE_float("cfg_scale", 7.5, "guidance scale (the official Latte setting)")
flags.DEFINE_list("specs", ["N2-700-50", "N3-700-50", "N4-700-50"], "official text-to-video Skip-Cache specs")
flags.DEFINE_integer("repeats", 1, "timed rounds (median reported)")
flags.DEFINE_integer("warmup", 1, "untimed rounds before the timed ones")
flags.DEFINE_bool("xla_tuning", True, "set skipdit_jax.xla_tuning's XLA CPU flags (as the skipdit command does)")
flags.DEFINE_string("out", None, "also write the markdown section here (atomically)")
FLAGS = flags.FLAGS

OFFICIAL_DDIM50 = {"N2-700-50": (33, 17), "N3-700-50": (28, 22), "N4-700-50": (25, 25)}  # at 28 pairs


def check_flags():
    from skipdit_jax.cache import parse_cache_spec
    from skipdit_jax.errors import UserError

    for name in ("pairs", "width", "heads", "frames", "size", "text_len", "caption_channels", "steps", "repeats"):
        if FLAGS[name].value < 1:
            raise UserError(f"--{name} must be >= 1, got {FLAGS[name].value}")
    if FLAGS.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {FLAGS.warmup}")
    if FLAGS.pairs % 2 or FLAGS.pairs < 4:
        raise UserError(f"--pairs must be even and >= 4 (a cached step skips the middle pairs), got {FLAGS.pairs}")
    if FLAGS.size % 2:
        raise UserError(f"--size must be even (patch 2), got {FLAGS.size}")
    if FLAGS.cfg_scale == 1.0:
        raise UserError("--cfg_scale must not be 1: the benchmark times guided sampling (model batch 2)")
    return {spec: parse_cache_spec(spec) for spec in FLAGS.specs}


def _s(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds >= 10 else f"{seconds:.3g}"


def rounds(runs: dict, warmup: int, repeats: int) -> tuple[dict, dict]:
    """({name: [wall s per timed round]}, {name: [process CPU s per timed round]}); every round
    runs each setting once, in an order rotated by one per round."""
    names = list(runs)
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            if r >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def main(_):
    specs = check_flags()
    if FLAGS.xla_tuning:
        from skipdit_jax.xla_tuning import tune_xla_cpu_flags

        tune_xla_cpu_flags()  # before the first JAX computation starts the backend
    import jax
    import jax.numpy as jnp
    from _common import machine

    from skipdit_jax.diffusion import DiffusersDDIM
    from skipdit_jax.models.families import family_of
    from skipdit_jax.models.latte_t2v import LatteT2VConfig
    from skipdit_jax.paths import atomic_write_text
    from skipdit_jax.sampling import build_sampler, sampling_timesteps

    config = LatteT2VConfig(
        input_size=FLAGS.size, patch_size=2, in_channels=4, hidden_size=FLAGS.width, depth=FLAGS.pairs, num_heads=FLAGS.heads,
        num_frames=FLAGS.frames, caption_channels=FLAGS.caption_channels, text_len=FLAGS.text_len, learn_sigma=True,
        long_skip=True,
    )
    family = family_of(config)
    scheduler = DiffusersDDIM.latte()
    caches = {"full": None} | specs
    for cache in specs.values():
        cache.check_model(family)
    timesteps = sampling_timesteps("ddim", FLAGS.steps, scheduler=scheduler)
    plans = {name: None if c is None else c.plan(timesteps, family.depth_units) for name, c in caches.items()}
    counts = {name: (len(timesteps), 0) if p is None else (p.num_full, p.num_cached) for name, p in plans.items()}
    predicted = {name: 1.0 if p is None else p.predicted_speedup for name, p in plans.items()}
    if FLAGS.steps == 50 and FLAGS.pairs == 28:
        for spec, want in OFFICIAL_DDIM50.items():
            if spec in counts:
                assert counts[spec] == want, f"{spec} at DDIM-50: plan {counts[spec]} != official {want}"

    params = family.init_params(0)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(1)
    params = jax.tree.unflatten(treedef, [np.asarray(a) + 0.01 * rng.standard_normal(a.shape).astype(np.float32) for a in leaves])
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    L, C = FLAGS.text_len, FLAGS.caption_channels
    text_mask = np.zeros((1, L), np.int32)
    text_mask[:, : max(1, 3 * L // 4)] = 1
    null_mask = np.zeros((1, L), np.int32)
    null_mask[:, 0] = 1  # an empty prompt: one (end-of-text) token
    cond = {
        "text_emb": rng.standard_normal((1, L, C)).astype(np.float32) * 0.1,
        "text_mask": text_mask,
        "null_emb": rng.standard_normal((1, L, C)).astype(np.float32) * 0.1,
        "null_mask": null_mask,
    }
    noise = jax.random.normal(jax.random.key(42), (1, *family.sample_shape))

    runs, results = {}, {}
    compile_start = time.perf_counter()
    for name, cache in caches.items():
        fn = build_sampler(config, "ddim", str(FLAGS.steps), True, None, cache, 0.0, False, return_schedule=True,
                           scheduler=scheduler)
        args = (params, noise, cond, jnp.float32(FLAGS.cfg_scale), jax.random.key(0))
        compiled = fn.lower(*args).compile()

        def run(compiled=compiled, args=args, name=name):
            x, full = jax.block_until_ready(compiled(*args))
            results[name] = (np.asarray(x), np.asarray(full))

        runs[name] = run
    compile_s = time.perf_counter() - compile_start
    wall, cpu = rounds(runs, FLAGS.warmup, FLAGS.repeats)

    for name, (x, full) in results.items():  # what ran is what was planned
        assert (int(full.sum()), int((~full).sum())) == counts[name], f"{name}: ran {full.sum()} full steps, planned {counts[name]}"
        assert np.isfinite(x).all(), f"{name}: non-finite samples"
    med = {k: float(np.median(v)) for k, v in wall.items()}
    med_cpu = {k: float(np.median(v)) for k, v in cpu.items()}
    ref = results["full"][0]
    m = machine()
    cmd = " ".join(["python experiments/bench_latte_t2v.py", *sys.argv[1:]])
    lines = [
        f"## Latte-T2V-skip text-to-video sampling: DDIM-{FLAGS.steps} full vs the official Skip-Cache specs",
        "",
        f"Settings: Latte-T2V-skip, {config.depth} (spatial, temporal) pairs, width {config.hidden_size}, {config.num_heads} "
        f"heads, patch 2, {n_params:,} parameters (random, non-zero), float32; {config.num_frames} frames of "
        f"{config.input_size}x{config.input_size}x4 latents; a {L}-token caption of width {C} (random embeddings; "
        f"{int(text_mask.sum())} tokens unmasked, the null caption 1); batch 1 + guidance (scale {FLAGS.cfg_scale:g}; model "
        f"batch 2); diffusers DDIM-{FLAGS.steps}, leading spacing ({timesteps[0]}..{timesteps[-1]}), eta 0, no clipping; "
        f"Skip-Cache \"N{{N}}-{{start}}-{{close}}\": one pair at each end on cached steps; predicted = block-count speedup "
        f"({config.depth} pairs per full step, 2 per cached step); median of {FLAGS.repeats} interleaved round(s) after "
        f"{FLAGS.warmup} warm-up round(s), compiled ahead ({compile_s:.1f} s for all settings, not timed); {m['cpu']}, "
        f"{m['cpu_cores']} CPU cores (shared with other jobs: CPU time is the steadier measure), JAX {m['jax']} on "
        f"{m['device']}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {m['date']}, commit {m['git_commit']}"
        f"{' (modified)' if m['git_dirty'] else ''}; command: `{cmd}`.",
        "",
        "| method | full/cached steps | predicted | wall s | wall speedup | CPU s | CPU speedup | max abs diff vs full / max abs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in caches:
        rel = float(np.abs(results[name][0] - ref).max() / max(np.abs(ref).max(), 1e-12))
        lines.append(
            f"| {'full' if name == 'full' else 'Skip-Cache ' + name} | {counts[name][0]}/{counts[name][1]} | "
            f"{predicted[name]:.2f}x | {_s(med[name])} | {med['full'] / med[name]:.2f}x | {_s(med_cpu[name])} | "
            f"{med_cpu['full'] / med_cpu[name]:.2f}x | {rel:.1e} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if FLAGS.out:
        atomic_write_text(FLAGS.out, text)


if __name__ == "__main__":
    from _common import run_experiment

    run_experiment(main, "bench_latte_t2v")
