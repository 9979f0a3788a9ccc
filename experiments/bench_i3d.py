"""Benchmark: FVD I3D features, JAX (`extract_features`) beside the PyTorch reference I3D.

    python experiments/bench_i3d.py                       # 2 clips of 16x64x64, 2 repeats
    python experiments/bench_i3d.py --batch 16 --size 128 --repeats 5

Times, in one process and interleaved (both see the same machine load):
* JAX `extract_features(params, videos, batch_size=batch)`: the public path (BatchNorm
  folded once per call, clips sharded over the devices, features back as numpy);
* the PyTorch reference detector (tests/torch_i3d_reference.py, piergiaj's I3D with the
  detector's rescale and trilinear resize) under `torch.inference_mode()` with
  `torch.set_num_threads(--torch_threads)`.

uint8 clips of --frames x --size x --size are resized to 224x224 inside. Random weights
(speed does not depend on their values); one warm-up call each (JAX compilation
excluded); medians of --repeats runs. Prints a markdown section with the settings.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags

flags.DEFINE_integer("batch", 2, "clips per call")
flags.DEFINE_integer("frames", 16, "frames per clip")
flags.DEFINE_integer("size", 64, "frame height and width (uint8, 3 channels)")
flags.DEFINE_integer("repeats", 2, "timed runs per setting (median reported)")
flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads")
flags.DEFINE_bool("torch", True, "also time the PyTorch reference")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def _timed(fn) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def main(_):
    from skipdit_jax.xla_tuning import tune_xla_cpu_flags

    tune_xla_cpu_flags()  # as the skipdit command does, before the backend starts
    import jax

    from experiments._common import machine
    from skipdit_jax.evaluation import i3d

    shape = (FLAGS.batch, FLAGS.frames, FLAGS.size, FLAGS.size, 3)
    videos = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    params = i3d.init_i3d(jax.random.key(0))
    runs = {"JAX `extract_features` (public path)": lambda: i3d.extract_features(params, videos, batch_size=FLAGS.batch)}
    if FLAGS.torch:
        import torch
        from torch_i3d_reference import TorchI3D, detector_features

        torch.set_num_threads(FLAGS.torch_threads)
        model = TorchI3D().eval()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in i3d.i3d_to_torch(params).items()}, strict=False)

        def torch_run():
            with torch.inference_mode():
                return detector_features(model, videos)

        runs[f"PyTorch reference I3D ({FLAGS.torch_threads} threads)"] = torch_run

    first = {name: _timed(fn)[0] for name, fn in runs.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(FLAGS.repeats):
        for name, fn in runs.items():
            times[name].append(_timed(fn))

    m = machine()
    print("## FVD I3D feature extraction: JAX beside the PyTorch reference\n")
    print(
        f"Settings: {FLAGS.batch} random uint8 clips of {FLAGS.frames}x{FLAGS.size}x{FLAGS.size}x3 per call (resized to "
        f"224x224 inside), random weights, median of {FLAGS.repeats} interleaved runs after one warm-up call each; "
        f"{m['cpu']}, {m['cpu_cores']} CPU cores, {len(jax.devices())} JAX device(s) ({m['device']}); jax {jax.__version__}"
        f"{', torch ' + torch.__version__ if FLAGS.torch else ''}; command: `python experiments/bench_i3d.py --batch "
        f"{FLAGS.batch} --frames {FLAGS.frames} --size {FLAGS.size} --repeats {FLAGS.repeats} --torch_threads "
        f"{FLAGS.torch_threads}`; {m['date']}, commit {m['git_commit']}{' (modified)' if m['git_dirty'] else ''}.\n"
    )
    print("| implementation | wall s / batch (median) | clips/s | CPU s / batch (median) | first call (s) |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        wall, cpu = (float(np.median([t[i] for t in ts])) for i in (0, 1))
        print(f"| {name} | {wall:.2f} | {FLAGS.batch / wall:.2f} | {cpu:.2f} | {first[name]:.1f} |")


if __name__ == "__main__":
    app.run(main)
