"""Benchmark: the SVD temporal VAE decoder (Latte's text-to-video decoder), JAX beside diffusers.

    python experiments/bench_vae_temporal.py                    # 16 latent frames of 8x8, 2 repeats
    python experiments/bench_vae_temporal.py --side 16 --repeats 3

Times, in one process and interleaved (both see the same machine load), one video of
--frames latent frames decoded as Latte's pipeline does (consecutive chunks of 14 frames):
* JAX `decode_video_latents_temporal` (the public path: one jitted program per chunk length);
* diffusers' `AutoencoderKLTemporalDecoder.decode` on the same chunks, `torch.inference_mode()`,
  `torch.set_num_threads(--torch_threads)`.

Both use the same random weights at the full SVD / Latte-1 architecture (widths 128/256/512/512,
2 resnets per level; the time mixers' blend factors drawn from N(0, 1)); speed does not depend on
the values. One warm-up call each (JAX compilation excluded, reported separately); medians of
--repeats runs. Prints a markdown section with the settings and the largest difference.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags

flags.DEFINE_integer("side", 8, "latent height and width (the video is 8x larger)")
flags.DEFINE_integer("frames", 16, "latent frames of the video")
flags.DEFINE_integer("chunk", 14, "frames per decoder call (Latte's pipeline: 14)")
flags.DEFINE_integer("repeats", 2, "timed runs per implementation (median reported)")
flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def _timed(fn) -> tuple[float, float, object]:
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu, out


def main(_):
    from skipdit_jax.xla_tuning import tune_xla_cpu_flags

    tune_xla_cpu_flags()  # as the skipdit command does, before the backend starts
    import conftest  # noqa: F401  (lets diffusers import torchvision beside torch+cpu)
    import diffusers
    import jax
    import torch

    from experiments._common import machine
    from skipdit_jax.encoders.vae_temporal import (
        TemporalVAEConfig,
        decode_video_latents_temporal,
        temporal_vae_params_from_diffusers,
    )

    torch.manual_seed(0)
    torch.set_num_threads(FLAGS.torch_threads)
    model = diffusers.AutoencoderKLTemporalDecoder(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mix_factor"):  # initialised to one constant: vary them so both blends matter
                p.normal_()
    decoder_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder."))
    config = TemporalVAEConfig()
    params = temporal_vae_params_from_diffusers({k: v.numpy() for k, v in model.state_dict().items()}, config)
    latents = np.random.default_rng(0).standard_normal((1, FLAGS.frames, FLAGS.side, FLAGS.side, 4)).astype(np.float32)
    z = torch.from_numpy(latents[0]).permute(0, 3, 1, 2) / config.scaling_factor

    def jax_run():
        return np.asarray(jax.block_until_ready(decode_video_latents_temporal(params, config, latents, FLAGS.chunk)))

    def torch_run():
        with torch.inference_mode():
            chunks = [z[i : i + FLAGS.chunk] for i in range(0, FLAGS.frames, FLAGS.chunk)]
            out = torch.cat([model.decode(c, num_frames=c.shape[0]).sample for c in chunks])
        return out.permute(0, 2, 3, 1).numpy()[None]

    runs = {"JAX `decode_video_latents_temporal`": jax_run, f"diffusers `AutoencoderKLTemporalDecoder` ({FLAGS.torch_threads} threads)": torch_run}
    first, outputs = {}, {}
    for name, fn in runs.items():
        first[name], _, outputs[name] = _timed(fn)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(FLAGS.repeats):
        for name, fn in runs.items():
            times[name].append(_timed(fn)[:2])
    jax_out, torch_out = outputs.values()
    diff = float(np.abs(jax_out - torch_out).max())

    m = machine()
    print("## Temporal VAE decode (SVD `AutoencoderKLTemporalDecoder`): JAX beside diffusers\n")
    print(
        f"Settings: one video of {FLAGS.frames} latent frames of {FLAGS.side}x{FLAGS.side}x4 -> "
        f"{FLAGS.frames}x{8 * FLAGS.side}x{8 * FLAGS.side}x3, decoded in chunks of {FLAGS.chunk} frames as Latte's "
        f"pipeline does; the full SVD / Latte-1 decoder ({decoder_params / 1e6:.1f}M parameters, random weights, the "
        f"same in both), float32; median of {FLAGS.repeats} interleaved runs after one warm-up call each; {m['cpu']}, "
        f"{m['cpu_cores']} CPU cores, {len(jax.devices())} JAX device(s) ({m['device']}); jax {jax.__version__}, torch "
        f"{torch.__version__}; command: `python experiments/bench_vae_temporal.py --side {FLAGS.side} --frames "
        f"{FLAGS.frames} --chunk {FLAGS.chunk} --repeats {FLAGS.repeats} --torch_threads {FLAGS.torch_threads}`; "
        f"{m['date']}, commit {m['git_commit']}{' (modified)' if m['git_dirty'] else ''}. Largest |JAX - diffusers| "
        f"over the video: {diff:.1e} (outputs up to {float(np.abs(torch_out).max()):.2f}).\n"
    )
    print("| implementation | wall s / video (median) | frames/s | CPU s / video (median) | first call (s) |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        wall, cpu = (float(np.median([t[i] for t in ts])) for i in (0, 1))
        print(f"| {name} | {wall:.2f} | {FLAGS.frames / wall:.2f} | {cpu:.2f} | {first[name]:.1f} |")


if __name__ == "__main__":
    app.run(main)
