"""Benchmark: train-step speed, compile time and FSDP memory.

    python experiments/bench_train.py speed     # JAX (loop / unrolled blocks) vs PyTorch reference, fp32, batch 8, 256 tokens
    python experiments/bench_train.py xl        # (Skip-)DiT-XL/2 compile time and step time at batch 2
    python experiments/bench_train.py xl --dtype bfloat16 --batch 32 --peak_tflops 989   # MFU on a GPU
    python experiments/bench_train.py memory    # per-device params+optimizer bytes at 1/2/4/8 simulated devices

speed: one full training step (forward, hybrid loss, backward, AdamW, EMA) on 32x32x4
latents with patch 2 (256 tokens), float32, for Skip-DiT-S/2 and a depth-28 width-256
4-head Skip-DiT, timed beside the tests' PyTorch reference of the official model
(`tests/torch_reference.py`, fused SDPA attention) running the same step with
`torch.optim.AdamW` and the same hybrid loss. Median of --repeats steps after warm-up.
JAX runs twice: blocks in a `lax.scan` loop (`model.scan_unroll=1`, compile time flat in
depth) and fully unrolled (`scan_unroll=0`). With --xla_tuning (default, as the `skipdit`
command does) XLA's CPU flags from `skipdit_jax.xla_tuning` are set first.

memory: the compiled train step's argument bytes per device (parameters, EMA, AdamW state,
batch) from XLA's memory analysis, for Skip-DiT-XL/2 over a ('data', 'fsdp') = (1, n) mesh of
n simulated CPU devices (each n in its own process).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from skipdit_jax import sharding
from skipdit_jax.training import optim
from skipdit_jax.models.config import ModelConfig, preset
from skipdit_jax.models import count_params, family_of, init_params
from skipdit_jax.xla_tuning import tune_xla_cpu_flags
from skipdit_jax.training.train_step import TrainState, init_train_state, make_train_step

flags.DEFINE_integer("repeats", 3, "timed steps (median)")
flags.DEFINE_integer("batch", 8, "batch size for `speed`")
flags.DEFINE_bool("torch", True, "time the PyTorch reference in `speed`")
flags.DEFINE_string("json_out", None, "append results as JSON lines here")
flags.DEFINE_integer("devices", 0, "internal: device count of a `memory` worker")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype (parameters stay float32)")
flags.DEFINE_float("peak_tflops", 0.0, "the device's peak TFLOP/s at --dtype, to report MFU (e.g. 989 for an H100 SXM in bf16)")
flags.DEFINE_bool("xla_tuning", True, "set skipdit_jax.xla_tuning's XLA CPU flags (as the skipdit command does)")
FLAGS = flags.FLAGS


def _opt_cfg(steps=1000):
    return ml_collections.ConfigDict(dict(name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, decay="constant", end_lr_factor=0.0, grad_clip=0.0, steps=steps))


def _emit(row):
    print(json.dumps(row))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "a") as f:
            f.write(json.dumps(row) + "\n")


def jax_step_time(mc: ModelConfig, batch: int, repeats: int):
    params = init_params(mc, 0)
    tx = optim.make_optimizer(_opt_cfg(), params)
    state = jax.jit(lambda p: init_train_state(p, tx))(params)
    step = jax.jit(make_train_step(mc, tx, ema_decay=0.9999), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    b = {"image": jnp.asarray(rng.standard_normal((batch, mc.input_size, mc.input_size, mc.in_channels)), jnp.float32), "label": jnp.arange(batch) % mc.num_classes}
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = step.lower(state, b, key).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    jax_step_time.last_flops = float((cost or {}).get("flops", 0.0))
    state, m = compiled(state, b, key)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = compiled(state, b, key)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), compile_s


def torch_step_time(mc: ModelConfig, batch: int, repeats: int):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import torch_reference as ref

    def sdpa_forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, d))

    ref.Attention.forward = sdpa_forward
    model = ref.TorchDiT(input_size=mc.input_size, patch_size=mc.patch_size, in_channels=mc.in_channels, hidden_size=mc.hidden_size,
                         depth=mc.depth, num_heads=mc.num_heads, num_classes=mc.num_classes, long_skip=mc.long_skip)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0)
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)
    abar_prev = torch.cat([torch.ones(1), abar[:-1]])
    beta_t = torch.tensor(betas, dtype=torch.float32)
    post_var = beta_t * (1 - abar_prev) / (1 - abar)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    c1 = beta_t * abar_prev.sqrt() / (1 - abar)
    c2 = (1 - abar_prev) * (1 - beta_t).sqrt() / (1 - abar)
    x0 = torch.randn(batch, mc.in_channels, mc.input_size, mc.input_size)
    y = torch.arange(batch) % mc.num_classes

    def step():
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        e = lambda a: a[t].view(-1, 1, 1, 1)  # noqa: E731
        xt = e(abar).sqrt() * x0 + (1 - e(abar)).sqrt() * noise
        out = model(xt, t, y)
        eps, v = out[:, : mc.in_channels], out[:, mc.in_channels :]
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        log_var = (v + 1) / 2 * torch.log(e(beta_t)) + (1 - (v + 1) / 2) * e(post_logvar)
        x0_pred = (xt - (1 - e(abar)).sqrt() * eps.detach()) / e(abar).sqrt()
        mean = e(c1) * x0_pred + e(c2) * xt
        true_mean = e(c1) * x0 + e(c2) * xt
        kl = 0.5 * (-1 + log_var - e(post_logvar) + torch.exp(e(post_logvar) - log_var) + (true_mean - mean) ** 2 * torch.exp(-log_var))
        loss = (mse + kl.mean(dim=(1, 2, 3)) / math.log(2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for k, p in model.state_dict().items():
                ema[k].mul_(0.9999).add_(p, alpha=1e-4)

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), torch.get_num_threads()


def speed():
    models = {
        "Skip-DiT-S/2": preset("Skip-DiT-S/2"),
        "Skip-DiT depth28 w256 h4": preset("Skip-DiT-S/2", depth=28, hidden_size=256, num_heads=4),
    }
    for name, mc in models.items():
        j, c = jax_step_time(mc, FLAGS.batch, FLAGS.repeats)
        ju, cu = jax_step_time(mc.replace(scan_unroll=0), FLAGS.batch, FLAGS.repeats)
        row = dict(bench="train_step", model=name, params=count_params(jax.eval_shape(lambda: init_params(mc))), batch=FLAGS.batch,
                   xla_flags=os.environ.get("XLA_FLAGS", ""), jax_seconds=j, jax_compile_seconds=c, jax_unrolled_seconds=ju, jax_unrolled_compile_seconds=cu)
        if FLAGS.torch:
            t, threads = torch_step_time(mc, FLAGS.batch, FLAGS.repeats)
            row.update(torch_seconds=t, torch_threads=threads, jax_speedup_over_torch=t / j, jax_unrolled_speedup_over_torch=t / ju)
        _emit(row)


def xl():
    batch = FLAGS.batch if FLAGS.batch != 8 else 2  # --batch for an accelerator run; 2 on CPU
    for name in ("DiT-XL/2", "Skip-DiT-XL/2"):
        mc = preset(name, dtype=FLAGS.dtype)
        j, c = jax_step_time(mc, batch, max(1, FLAGS.repeats - 1))
        tflops = jax_step_time.last_flops / j / 1e12
        row = dict(bench="xl_train_step", model=name, batch=batch, dtype=FLAGS.dtype, device=jax.devices()[0].device_kind,
                   jax_seconds=j, jax_compile_seconds=c, xla_flops_per_step=jax_step_time.last_flops, achieved_tflops=tflops)
        if FLAGS.peak_tflops > 0:
            row["mfu"] = tflops / FLAGS.peak_tflops
        _emit(row)


def memory_worker(n: int):
    mc = preset("Skip-DiT-XL/2")
    mesh = sharding.make_mesh(data=1, fsdp=n)
    abstract_params = jax.eval_shape(lambda: init_params(mc, 0))
    tx = optim.make_optimizer(_opt_cfg(), abstract_params)
    abstract = jax.eval_shape(lambda p: init_train_state(p, tx), abstract_params)
    shard = lambda tree: sharding.param_shardings(tree, mesh, param_axes=family_of(mc).param_axes)  # noqa: E731
    shardings = TrainState(step=sharding.replicated(mesh), params=shard(abstract.params), ema_params=shard(abstract.ema_params), opt_state=shard(abstract.opt_state), skipped_updates=sharding.replicated(mesh))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    bs = sharding.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((n, 32, 32, 4), jnp.float32, sharding=bs), "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=bs)}
    step = jax.jit(make_train_step(mc, tx, ema_decay=0.9999), in_shardings=(shardings, bs, sharding.replicated(mesh)), out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(abstract, batch, jax.random.key(0)).compile()
    mem = compiled.memory_analysis()
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    _emit(dict(bench="fsdp_memory", model="Skip-DiT-XL/2", devices=n, argument_bytes_per_device=mem.argument_size_in_bytes, state_bytes_total=state_bytes, ratio_to_unsharded=mem.argument_size_in_bytes / state_bytes, compile_seconds=time.perf_counter() - t0))


def memory():
    for n in (1, 2, 4, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        cmd = [sys.executable, os.path.abspath(__file__), "memory_worker", f"--devices={n}"] + ([f"--json_out={FLAGS.json_out}"] if FLAGS.json_out else [])
        subprocess.run(cmd, env=env, check=True)


def main(argv):
    if FLAGS.xla_tuning:
        tune_xla_cpu_flags()  # before the first JAX computation starts the backend
    what = argv[1] if len(argv) > 1 else "speed"
    if what == "memory_worker":
        return memory_worker(FLAGS.devices)
    {"speed": speed, "xl": xl, "memory": memory}[what]()


if __name__ == "__main__":
    app.run(main)
