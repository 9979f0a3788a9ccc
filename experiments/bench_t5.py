"""Benchmark: the T5 v1.1 text encoder (JAX) on CPU, beside transformers' PyTorch T5EncoderModel.

    python experiments/bench_t5.py --out t5_bench.md
    python experiments/bench_t5.py --repeats 1 --xxl_layer=false      # a quick check

Part 1 encodes --batch prompts of --length tokens (Latte: 120) with a reduced T5 v1.1
(--width, --layers, --heads, d_kv 64, d_ff = 2.5 x width like XXL's 10240/4096), random
weights plus noise, a realistic padding mask (prompts of 8 to --length tokens). JAX runs in
float32 and in bfloat16 (compute and weights); PyTorch in float32 on the same weights. The
table gives tokens/s (all positions, padded ones included: the encoder computes them) from
the median wall time and CPU time of --repeats timed rounds after one warm-up, and each
JAX output's largest difference from the PyTorch one (relative to its largest value).
Part 2 (--xxl_layer) times ONE layer at t5-v1_1-xxl's shape (d_model 4096, 64 heads, d_ff
10240) on one 120-token prompt in float32 and bfloat16; 24 of them make the XXL encoder, so
the table extrapolates seconds per prompt. Markdown is printed and, with --out, written
atomically.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

flags.DEFINE_integer("width", 512, "d_model of the reduced encoder")
flags.DEFINE_integer("layers", 4, "layers of the reduced encoder")
flags.DEFINE_integer("heads", 8, "heads of the reduced encoder (d_kv 64)")
flags.DEFINE_integer("batch", 8, "prompts per call")
flags.DEFINE_integer("length", 120, "tokens per prompt")
flags.DEFINE_integer("repeats", 3, "timed rounds (median reported)")
flags.DEFINE_bool("torch", True, "also time transformers' T5EncoderModel")
flags.DEFINE_bool("xxl_layer", True, "also time one layer at XXL's shape")
flags.DEFINE_string("out", None, "also write the markdown here (atomically)")
FLAGS = flags.FLAGS


def timed(fn, repeats):
    fn()  # warm-up (compilation)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)), float(np.median(cpu))


def main(_):
    from skipdit_jax.xla_tuning import tune_xla_cpu_flags

    tune_xla_cpu_flags()
    import jax

    from skipdit_jax.encoders.t5 import T5Config, T5Encoder, init_params, t5_to_torch
    from skipdit_jax.paths import atomic_write_text

    rng = np.random.default_rng(0)
    b, length = FLAGS.batch, FLAGS.length
    ids = rng.integers(3, 32000, (b, length)).astype(np.int32)
    lengths = np.linspace(8, length, b).astype(int)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    tokens = b * length
    cfg = T5Config(
        vocab_size=32128, d_model=FLAGS.width, d_kv=64, num_heads=FLAGS.heads, d_ff=FLAGS.width * 5 // 2, num_layers=FLAGS.layers
    )
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape, a.dtype), params)
    rows, outputs = [], {}
    for dtype in ("float32", "bfloat16"):
        c = cfg.replace(dtype=dtype, param_dtype=dtype)
        p = jax.tree.map(lambda a, dtype=dtype: a.astype(dtype), params)
        fn = jax.jit(lambda p, i, m, c=c: T5Encoder(c).apply({"params": p}, i, m))
        run = lambda fn=fn, p=p: jax.block_until_ready(fn(p, ids, mask))  # noqa: E731
        outputs[f"JAX {dtype}"] = np.asarray(run())
        rows.append((f"JAX {dtype}", *timed(run, FLAGS.repeats)))
    if FLAGS.torch:
        import conftest  # noqa: F401  (torchvision beside torch+cpu, as the tests)
        import torch
        from transformers import T5Config as HFT5Config
        from transformers import T5EncoderModel

        torch.set_num_threads(os.cpu_count() or 1)
        hf = HFT5Config(**{k: v for k, v in cfg.hf_config().items() if k not in ("architectures", "model_type")})
        model = T5EncoderModel(hf).eval()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in t5_to_torch(cfg, params).items()})
        ti, tm = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

        def run_torch():
            with torch.no_grad():
                return model(input_ids=ti, attention_mask=tm).last_hidden_state.numpy()

        outputs["PyTorch float32"] = run_torch()
        rows.append(("PyTorch float32", *timed(run_torch, FLAGS.repeats)))
    ref = outputs.get("PyTorch float32")
    lines = [
        f"### T5 v1.1 encoder on CPU ({platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} at the start)",
        "",
        f"Reduced encoder: d_model {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} heads x 64, d_ff {cfg.d_ff}, "
        f"vocab 32128 ({cfg.num_params / 1e6:.0f}M parameters); batch {b} x {length} tokens (real lengths 8..{length}); "
        f"median of {FLAGS.repeats} rounds after a warm-up.",
        "",
        "| implementation | wall s | tokens/s (wall) | CPU s | max diff vs PyTorch (rel.) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, wall, cpu in rows:
        diff = (
            f"{np.abs(outputs[name] - ref).max() / np.abs(ref).max():.1e}"
            if ref is not None and name != "PyTorch float32"
            else "-"
        )
        lines.append(f"| {name} | {wall:.3f} | {tokens / wall:,.0f} | {cpu:.2f} | {diff} |")
    if FLAGS.xxl_layer:
        xxl = T5Config.t5_v1_1_xxl(vocab_size=1024, num_layers=1)
        lines += [
            "",
            "One layer at t5-v1_1-xxl's shape (d_model 4096, 64 heads x 64, d_ff 10240), one prompt of 120 tokens:",
            "",
            "| dtype | wall s per layer | CPU s per layer | x 24 layers = wall s per prompt | tokens/s (24 layers, wall) |",
            "|---|---:|---:|---:|---:|",
        ]
        one_ids, one_mask = ids[:1, :120] % 1024, np.ones((1, 120), np.int32)
        for dtype in ("float32", "bfloat16"):
            c = xxl.replace(dtype=dtype, param_dtype=dtype)
            p = init_params(c, jax.random.key(2))
            fn = jax.jit(lambda p, i, m, c=c: T5Encoder(c).apply({"params": p}, i, m))
            wall, cpu = timed(lambda fn=fn, p=p: jax.block_until_ready(fn(p, one_ids, one_mask)), FLAGS.repeats)
            lines.append(f"| {dtype} | {wall:.3f} | {cpu:.2f} | {24 * wall:.1f} | {120 / (24 * wall):.1f} |")
            del p
    text = "\n".join(lines) + "\n"
    print(text)
    if FLAGS.out:
        atomic_write_text(FLAGS.out, text)


if __name__ == "__main__":
    app.run(main)
