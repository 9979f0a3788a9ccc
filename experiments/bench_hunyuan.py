"""Benchmark: Hunyuan-DiT text-to-image, DDPM-100 full vs Skip-Cache, and FSDP memory per device.

    python experiments/bench_hunyuan.py --out hunyuan_bench.md     # 40 blocks, width 128, 16x16x4 latents
    python experiments/bench_hunyuan.py --quick                    # a smoke test (seconds)

Speed: times guided sampling of a DiT-g/2 at reduced width (--depth blocks with Hunyuan's native
long skips, width --width, MLP ratio 4.3637) on --size x --size x 4 latents, patch 2, captions of
the official lengths (CLIP 77, T5 256 tokens) at reduced widths (random embeddings: the cost does
not depend on their values; narrow, because the caption embedders run once per step outside the
blocks and cost <1% of a full DiT-g/2 step, which wide captions on a narrow model would not
keep), batch 1 with classifier-free guidance (scale 6, the official default; a negative caption
as the unconditional half: model batch 2), with Hunyuan's sampler:
diffusers DDPM-100, v-prediction, timesteps 991, 981, ..., 1 (`DiffusersDDPM.hunyuan()`). It
compares the full pass with Skip-Cache N = --intervals (`SkipCache(N, k, 700, 50)`, the official
`--cache --cache-step N --cache-at-branch k`: blocks 0..k-1 and D-k..D-1 on cached steps) beside
the block-count prediction of each plan and the speedups the Skip-DiT authors give for Hunyuan-DiT
(1.5x without quality loss, up to 2.0x); at 40 blocks and DDPM-100 it checks the full/cached
counts against the official schedule (N2 67/33, N3 56/44, N4 50/50).
Weights: the family's init plus N(0, 0.01^2) on every parameter. Every setting is compiled ahead,
then runs --warmup untimed and --repeats timed rounds, interleaved (each round runs every setting
once, in a rotated order); the table gives medians of wall time and of process CPU time, and a
least-squares fit of the CPU times to steps x a + blocks run x b splits a step's cost into the
work outside the blocks (a: embedders, final layer, guidance, scheduler step) and per block (b).

Memory: the parameter bytes per device of the FULL DiT-g/2 (1,499,952,032 parameters), float32
and bfloat16, FSDP over 1/2/4/8 devices, computed from the shardings of
`skipdit_jax.models.hunyuan_sharding.PARAM_AXES` (nothing allocated); and, measured in a
subprocess with --memory_devices simulated CPU devices, the reduced model's parameter shards
placed on the devices and XLA's per-device memory plan of the guided sampler compiled for them.
The markdown section is printed and, with --out, written atomically.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_integer("depth", 40, "blocks (even: the long skips pair them)")
flags.DEFINE_integer("width", 128, "hidden size (DiT-g/2: 1408)")
flags.DEFINE_integer("heads", 4, "attention heads (the head width must be divisible by 4)")
flags.DEFINE_integer("size", 16, "latent height and width (4 channels, patch 2; 1024 px: 128)")
flags.DEFINE_integer("text_len", 77, "CLIP caption tokens")
flags.DEFINE_integer("text_len_t5", 256, "T5 caption tokens")
flags.DEFINE_integer("clip_dim", 32, "CLIP width (v1.2: 1024)")
flags.DEFINE_integer("t5_dim", 64, "T5 width (v1.2: 2048; divisible by 8)")
flags.DEFINE_integer("steps", 100, "DDPM steps")
flags.DEFINE_float("cfg_scale", 6.0, "guidance scale (the official default)")
flags.DEFINE_list("intervals", ["2", "3", "4"], "Skip-Cache intervals N")
flags.DEFINE_integer("cache_at_branch", 1, "k: blocks computed at each end on a cached step")
flags.DEFINE_integer("repeats", 3, "timed rounds (median reported)")
flags.DEFINE_integer("warmup", 1, "untimed rounds before the timed ones")
flags.DEFINE_integer("memory_devices", 8, "simulated CPU devices of the measured memory (0: skip it)")
flags.DEFINE_bool(
    "quick",
    False,
    "a smoke test: 4 blocks of width 32, 8x8 latents, short captions, 10 steps, one round, "
    "Skip-Cache N=2 only, no compiled memory plan",
)
flags.DEFINE_bool("xla_tuning", True, "set skipdit_jax.xla_tuning's XLA CPU flags (as the skipdit command does)")
flags.DEFINE_bool("memory_child", False, "internal: print the measured memory as JSON (run with simulated devices)")
flags.DEFINE_string("out", None, "also write the markdown section here (atomically)")
FLAGS = flags.FLAGS

OFFICIAL_DDPM100 = {2: (67, 33), 3: (56, 44), 4: (50, 50)}  # at 40 blocks, k = 1
PAPER = "1.5x without quality loss, up to 2.0x"
QUICK = dict(
    depth=4, width=32, heads=2, size=8, text_len=8, text_len_t5=16, clip_dim=32, t5_dim=64, steps=10, repeats=1, warmup=0
)
DEVICE_COUNTS = (1, 2, 4, 8)


def settings() -> dict:
    s = {name: FLAGS[name].value for name in QUICK}
    if FLAGS.quick:
        s.update({k: v for k, v in QUICK.items() if FLAGS[k].using_default_value})
    return s


def check_flags(s: dict) -> list[int]:
    from skipdit_jax.errors import UserError

    for name, value in s.items():
        if value < (0 if name == "warmup" else 1):
            raise UserError(f"--{name} must be >= {0 if name == 'warmup' else 1}, got {value}")
    if s["depth"] % 2 or s["depth"] < 4:
        raise UserError(f"--depth must be even and >= 4 (long skips), got {s['depth']}")
    if s["size"] % 2:
        raise UserError(f"--size must be even (patch 2), got {s['size']}")
    if FLAGS.cfg_scale == 1.0:
        raise UserError("--cfg_scale must not be 1: the benchmark times guided sampling (model batch 2)")
    try:
        intervals = [int(n) for n in (FLAGS.intervals[:1] if FLAGS.quick else FLAGS.intervals)]
    except ValueError:
        raise UserError(f"--intervals must be integers, got {','.join(FLAGS.intervals)}") from None
    if any(n < 2 for n in intervals):
        raise UserError(f"--intervals must be >= 2 (1 caches nothing), got {','.join(FLAGS.intervals)}")
    return intervals


def model_config(s: dict):
    from skipdit_jax.models.hunyuan import HunyuanConfig

    return HunyuanConfig(
        input_size=s["size"],
        hidden_size=s["width"],
        depth=s["depth"],
        num_heads=s["heads"],
        mlp_ratio=4.3637,
        text_len=s["text_len"],
        text_len_t5=s["text_len_t5"],
        cross_attention_dim=s["clip_dim"],
        cross_attention_dim_t5=s["t5_dim"],
        pooled_projection_dim=s["clip_dim"],
    )


def inputs(family, seed: int = 1):
    """(params: init + N(0, 0.01^2), numpy; the 8-key condition of one prompt and its negative)."""
    import jax

    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: np.asarray(a) + 0.01 * rng.standard_normal(a.shape).astype(np.float32), family.init_params(0))
    cond = family.example_condition(1)
    for key in cond:
        if key.endswith("_emb"):
            cond[key] = (0.1 * rng.standard_normal(cond[key].shape)).astype(np.float32)
        else:  # a caption of 3/4 of the tokens; the negative one 1/2
            cond[key][:, : cond[key].shape[1] * (2 if key.startswith("null") else 3) // 4] = 1
    return params, cond


def per_device_bytes(abstract, n: int, itemsize: int | None = None) -> int:
    """Bytes of the largest device's parameter shards, FSDP over n devices (from the specs)."""
    import jax
    from jax.sharding import AbstractMesh, AxisType, PartitionSpec

    from skipdit_jax.models.hunyuan_sharding import PARAM_AXES
    from skipdit_jax.sharding import param_partition_specs

    mesh = AbstractMesh((1, n), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    specs = jax.tree.leaves(
        param_partition_specs(abstract, mesh, param_axes=PARAM_AXES), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    total = 0
    for leaf, spec in zip(jax.tree.leaves(abstract), specs, strict=True):
        shard = [
            d // (n if ax == "fsdp" else 1)
            for d, ax in zip(leaf.shape, (tuple(spec) + (None,) * leaf.ndim)[: leaf.ndim], strict=True)
        ]
        total += int(np.prod(shard)) * (itemsize or leaf.dtype.itemsize)
    return total


def sampler(config, cache, steps: int):
    from skipdit_jax.diffusion.diffusers_schedulers import DiffusersDDPM
    from skipdit_jax.sampling import build_sampler

    return build_sampler(
        config, "ddpm", str(steps), True, None, cache, 0.0, False, return_schedule=True, scheduler=DiffusersDDPM.hunyuan()
    )


def full_size_plan(n: int, dtype: str) -> dict:
    """XLA's per-device memory plan (GiB) of the guided full DDPM sampler of the full DiT-g/2 at
    1024 px (128x128 latents), parameters stored and computed in `dtype`, FSDP over the first n
    devices: compiled from shapes only, nothing allocated or run."""
    import jax
    import jax.numpy as jnp

    from skipdit_jax import sharding
    from skipdit_jax.models.families import family_of
    from skipdit_jax.models.hunyuan import hunyuan_preset

    config = hunyuan_preset("DiT-g/2", dtype=dtype)
    family = family_of(config)
    abstract = family.abstract_params()
    mesh = sharding.make_mesh(data=1, fsdp=n, devices=jax.devices()[:n])
    shardings = sharding.param_shardings(abstract, mesh, param_axes=family.param_axes)
    params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype), sharding=sh), abstract, shardings)
    cond = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.replicated(mesh))
        for k, v in family.example_condition(1).items()
    }
    noise = jax.ShapeDtypeStruct((1, *family.sample_shape), jnp.float32, sharding=sharding.replicated(mesh))
    start = time.perf_counter()
    mem = sampler(config, None, 100).lower(params, noise, cond, jnp.float32(6.0), jax.random.key(0)).compile().memory_analysis()
    return dict(
        devices=n,
        dtype=dtype,
        argument=mem.argument_size_in_bytes / 2**30,
        temp=mem.temp_size_in_bytes / 2**30,
        compile_s=time.perf_counter() - start,
    )


def memory_child(s: dict) -> None:
    """Measured on this process's devices: parameter shard bytes per device, and XLA's memory
    plan (per device) of the guided full sampler compiled for one device and for FSDP over all."""
    import jax
    import jax.numpy as jnp

    from skipdit_jax import sharding
    from skipdit_jax.models.families import family_of

    config = model_config(s)
    family = family_of(config)
    params, cond = inputs(family)
    n = jax.device_count()
    mesh = sharding.make_mesh(data=1, fsdp=n)
    placed = jax.device_put(params, sharding.param_shardings(params, mesh, param_axes=family.param_axes))
    held: dict = {}
    for leaf in jax.tree.leaves(placed):
        for shard in leaf.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    noise = jnp.zeros((1, *family.sample_shape), jnp.float32)
    fn = sampler(config, None, s["steps"])
    plans = {}
    for name, p in () if FLAGS.quick else (("1", jax.device_put(params, jax.devices()[0])), (str(n), placed)):
        start = time.perf_counter()
        mem = fn.lower(p, noise, cond, jnp.float32(FLAGS.cfg_scale), jax.random.key(0)).compile().memory_analysis()
        plans[name] = dict(
            argument=mem.argument_size_in_bytes,
            temp=mem.temp_size_in_bytes,
            output=mem.output_size_in_bytes,
            compile_s=time.perf_counter() - start,
        )
    full = [] if FLAGS.quick else [full_size_plan(d, dt) for d, dt in ((1, "float32"), (n, "float32"), (n, "bfloat16"))]
    print(
        json.dumps(
            dict(
                devices=n,
                total=int(sum(a.nbytes for a in jax.tree.leaves(params))),
                held=sorted(held.values()),
                computed=per_device_bytes(family.abstract_params(), n),
                plans=plans,
                full_size=full,
            )
        )
    )


def measure_memory(n: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    args = [a for a in sys.argv[1:] if not a.startswith("--out")]
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args, "--memory_child"],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if res.returncode:
        raise RuntimeError(f"the {n}-device memory measurement failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _s(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds >= 10 else f"{seconds:.3g}"


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def rounds(runs: dict, warmup: int, repeats: int) -> tuple[dict, dict]:
    """({name: [wall s per timed round]}, {name: [process CPU s]}), settings rotated per round."""
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
    s = settings()
    intervals = check_flags(s)
    if FLAGS.memory_child:
        return memory_child(s)
    if FLAGS.xla_tuning:
        from skipdit_jax.xla_tuning import tune_xla_cpu_flags

        tune_xla_cpu_flags()  # before the first JAX computation starts the backend
    import jax
    import jax.numpy as jnp
    from _common import machine

    from skipdit_jax.cache import SkipCache
    from skipdit_jax.diffusion.diffusers_schedulers import DiffusersDDPM
    from skipdit_jax.models.families import family_of
    from skipdit_jax.models.hunyuan import hunyuan_preset
    from skipdit_jax.paths import atomic_write_text
    from skipdit_jax.sampling import sampling_timesteps

    config = model_config(s)
    family = family_of(config)
    k = FLAGS.cache_at_branch
    caches = {"full": None} | {f"N={n}": SkipCache(n, k, 700, 50) for n in intervals}
    for cache in caches.values():
        if cache is not None:
            cache.check_model(family)
    timesteps = sampling_timesteps("ddpm", s["steps"], scheduler=DiffusersDDPM.hunyuan())
    plans = {name: None if c is None else c.plan(timesteps, family.depth_units) for name, c in caches.items()}
    counts = {name: (len(timesteps), 0) if p is None else (p.num_full, p.num_cached) for name, p in plans.items()}
    predicted = {name: 1.0 if p is None else p.predicted_speedup for name, p in plans.items()}
    if s["steps"] == 100 and s["depth"] == 40 and k == 1:
        for n, want in OFFICIAL_DDPM100.items():
            if f"N={n}" in counts:
                assert counts[f"N={n}"] == want, f"N={n} at DDPM-100: plan {counts[f'N={n}']} != official {want}"

    params, cond = inputs(family)
    n_params = family.count_params(params)
    noise = jax.random.normal(jax.random.key(42), (1, *family.sample_shape))
    runs, results = {}, {}
    compile_start = time.perf_counter()
    for name, cache in caches.items():
        args = (params, noise, cond, jnp.float32(FLAGS.cfg_scale), jax.random.key(0))
        compiled = sampler(config, cache, s["steps"]).lower(*args).compile()

        def run(compiled=compiled, args=args, name=name):
            x, full = jax.block_until_ready(compiled(*args))
            results[name] = (np.asarray(x), np.asarray(full))

        runs[name] = run
    compile_s = time.perf_counter() - compile_start
    wall, cpu = rounds(runs, s["warmup"], s["repeats"])
    for name, (x, full) in results.items():  # what ran is what was planned
        assert (int(full.sum()), int((~full).sum())) == counts[name], (
            f"{name}: ran {full.sum()} full steps, planned {counts[name]}"
        )
        assert np.isfinite(x).all(), f"{name}: non-finite samples"
    med = {key: float(np.median(v)) for key, v in wall.items()}
    med_cpu = {key: float(np.median(v)) for key, v in cpu.items()}
    ref = results["full"][0]
    blocks = {name: c[0] * config.depth + c[1] * 2 * k for name, c in counts.items()}
    design = np.array([[len(timesteps), blocks[name]] for name in caches], np.float64)
    (a, b), *_ = np.linalg.lstsq(design, np.array([med_cpu[name] for name in caches]), rcond=None)

    m = machine()
    cmd = " ".join(["python experiments/bench_hunyuan.py", *sys.argv[1:]])
    text_desc = (
        f"captions CLIP {config.text_len}x{config.cross_attention_dim} and T5 {config.text_len_t5}x"
        f"{config.cross_attention_dim_t5} (random embeddings, 3/4 of the tokens unmasked; the negative caption 1/2)"
    )
    lines = [
        f"## Hunyuan-DiT text-to-image sampling: DDPM-{s['steps']} full vs Skip-Cache, and FSDP memory",
        "",
        f"Settings: a DiT-g/2 at reduced width: {config.depth} blocks with the native long skips, width {config.hidden_size}, "
        f"{config.num_heads} heads, MLP {config.mlp_hidden}, patch 2, {n_params:,} parameters (random, non-zero), float32; "
        f"{config.input_size}x{config.input_size}x4 latents ({config.num_patches} tokens); {text_desc}; batch 1 + guidance "
        f"(scale {FLAGS.cfg_scale:g}; model batch 2); diffusers DDPM-{s['steps']}, v-prediction "
        f"({timesteps[0]}..{timesteps[-1]}); Skip-Cache N, k={k}, full while t >= 700, dropped after t <= 50; "
        f"predicted = block-count speedup ({config.depth} blocks "
        f"per full step, {2 * k} per cached step); paper: the Skip-DiT authors' figure for Hunyuan-DiT ({PAPER}); median of "
        f"{s['repeats']} interleaved round(s) after {s['warmup']} warm-up round(s), compiled ahead ({compile_s:.1f} s for all "
        f"settings, not timed); {m['cpu']}, {m['cpu_cores']} CPU cores (shared with other jobs: CPU time is the steadier "
        f"measure), JAX {m['jax']} on {m['device']}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {m['date']}, commit "
        f"{m['git_commit']}{' (modified)' if m['git_dirty'] else ''}; command: `{cmd}`.",
        "",
        "| method | full/cached steps | predicted | paper | wall s | wall speedup | CPU s | CPU speedup "
        "| max abs diff vs full / max abs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in caches:
        rel = float(np.abs(results[name][0] - ref).max() / max(np.abs(ref).max(), 1e-12))
        lines.append(
            f"| {'full' if name == 'full' else 'Skip-Cache ' + name} | {counts[name][0]}/{counts[name][1]} | "
            f"{predicted[name]:.2f}x | {'' if name == 'full' else '1.5x-2.0x'} | {_s(med[name])} | "
            f"{med['full'] / med[name]:.2f}x | "
            f"{_s(med_cpu[name])} | {med_cpu['full'] / med_cpu[name]:.2f}x | {rel:.1e} |"
        )

    lines += (
        []
        if len(caches) < 3
        else [  # two settings fit exactly: no information
            "",
            f"Fit of the CPU times to steps x a + blocks x b: a = {1e3 * a:.2f} ms per step outside the blocks, b = "
            f"{1e3 * b:.3f} ms per block; the work outside the blocks is {a / (a + config.depth * b):.1%} of a full step here "
            "(the block-count prediction takes it as 0).",
        ]
    )
    full = family_of(hunyuan_preset("DiT-g/2")).abstract_params()
    total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(full))
    lines += [
        "",
        f"Parameter memory per device of the full DiT-g/2 ({total:,} parameters), FSDP (`hunyuan_sharding.PARAM_AXES`: the "
        "model width of every matrix over the 'fsdp' axis; biases and norms replicated), computed from the shardings "
        "(GiB; activations, text encoders and VAE not included):",
        "",
        "| devices | float32 GiB | bfloat16 GiB | share of the whole |",
        "|---|---|---|---|",
    ]
    for n in DEVICE_COUNTS:
        f32, bf16 = per_device_bytes(full, n, 4), per_device_bytes(full, n, 2)
        lines.append(f"| {n} | {f32 / 2**30:.3f} | {bf16 / 2**30:.3f} | {f32 / (4 * total):.4f} |")
    if FLAGS.memory_devices:
        mem = measure_memory(FLAGS.memory_devices)
        n = mem["devices"]
        none = dict(argument=None, temp=None)  # --quick compiles no memory plan
        one, many = mem["plans"].get("1", none), mem["plans"].get(str(n), none)
        lines += [
            "",
            f"Measured on {n} simulated CPU devices (`--xla_force_host_platform_device_count={n}`), the reduced model above "
            f"(float32, {_mib(mem['total'])} MiB of parameters): the parameter shards each device holds after `jax.device_put` "
            "onto the FSDP shardings, and XLA's per-device memory plan of the guided full sampler (batch 1 + guidance, "
            f"replicated latents) compiled for one device and for FSDP over {n} (MiB):",
            "",
            "| devices | parameter bytes held per device (max) | computed from the shardings | sampler arguments "
            "| sampler temp |",
            "|---|---|---|---|---|",
            f"| 1 | {_mib(mem['total'])} | {_mib(mem['total'])} | {_mib(one['argument'])} | {_mib(one['temp'])} |",
            f"| {n} | {_mib(max(mem['held']))} (min {_mib(min(mem['held']))}) | {_mib(mem['computed'])} | "
            f"{_mib(many['argument'])} | {_mib(many['temp'])} |",
        ]
        if mem["full_size"]:
            lines += [
                "",
                "XLA's per-device memory plan of the guided full DDPM sampler of the full DiT-g/2 at 1024 px (128x128x4 latents, "
                "4,096 tokens, model batch 2), parameters stored and computed in the given dtype, compiled from shapes for the "
                "simulated devices (nothing allocated or run; arguments: the parameter shards and the inputs; temp: XLA's "
                "scratch at its peak: activations, which GSPMD also splits over the model width, and the weights gathered for a "
                "block; GiB):",
                "",
                "| devices | dtype | arguments per device | temp per device |",
                "|---|---|---|---|",
                *(f"| {p['devices']} | {p['dtype']} | {p['argument']:.3f} | {p['temp']:.3f} |" for p in mem["full_size"]),
            ]
    text = "\n".join(lines) + "\n"
    print(text)
    if FLAGS.out:
        atomic_write_text(FLAGS.out, text)


if __name__ == "__main__":
    from _common import run_experiment

    run_experiment(main, "bench_hunyuan")
