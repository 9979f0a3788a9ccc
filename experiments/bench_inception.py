"""Benchmark: FID Inception features, JAX (`extract_features`) beside pytorch-fid.

    python experiments/bench_inception.py                          # 32 images of 256x256, 5 repeats
    python experiments/bench_inception.py --batch 64 --size 512

Times, in one process and interleaved (so both see the same machine load):
* JAX `extract_features(params, images, batch_size=batch)`: the public path (BatchNorm
  folded once per call, images sharded over the devices, features back as numpy);
* JAX network only, BatchNorm folded once (`make_feature_fn` on device-resident images);
* JAX network only, BatchNorm applied at every call (not folded), to show what folding buys;
* pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)` under
  `torch.inference_mode()` with `torch.set_num_threads(--torch_threads)` on float [0, 1]
  NCHW input (its own conversion from uint8 included, as its data loader does it).

Random weights (speed does not depend on their values); JAX times exclude compilation
(one warm-up call each); every number is the median of --repeats runs. Prints a markdown
section with the settings beside the numbers.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags

flags.DEFINE_integer("batch", 32, "images per call")
flags.DEFINE_integer("size", 256, "image height and width (uint8, 3 channels)")
flags.DEFINE_integer("repeats", 5, "timed runs per setting (median reported)")
flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads")
flags.DEFINE_bool("torch", True, "also time pytorch-fid")
flags.DEFINE_bool("xla_tuning", True, "set skipdit_jax.xla_tuning's XLA CPU flags (as the skipdit command does)")
FLAGS = flags.FLAGS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def main(_):
    if FLAGS.xla_tuning:
        from skipdit_jax.xla_tuning import tune_xla_cpu_flags

        tune_xla_cpu_flags()  # before the first JAX computation starts the backend
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from skipdit_jax.evaluation import inception as inc

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from experiments._common import machine

    images = np.random.default_rng(0).integers(0, 256, (FLAGS.batch, FLAGS.size, FLAGS.size, 3), dtype=np.uint8)
    params = inc.init_inception(jax.random.key(0))
    mesh = inc.default_mesh()
    feature_fn = inc.make_feature_fn(params, mesh)
    on_device = jax.device_put(images, NamedSharding(mesh, P(tuple(mesh.axis_names))))
    unfolded = jax.jit(lambda p, x: inc.InceptionV3(folded=False).apply({"params": p}, inc.preprocess(x)))
    params_dev = jax.device_put(params)

    runs = {
        "JAX `extract_features` (public path)": lambda: inc.extract_features(params, images, batch_size=FLAGS.batch),
        "JAX network, BatchNorm folded once": lambda: jax.block_until_ready(feature_fn(on_device)),
        "JAX network, BatchNorm not folded": lambda: jax.block_until_ready(unfolded(params_dev, on_device)),
    }
    if FLAGS.torch:
        import torch

        from torch_reference import import_pytorch_fid_inception

        torch.set_num_threads(FLAGS.torch_threads)
        pf = import_pytorch_fid_inception()
        state = {k: torch.from_numpy(v) for k, v in inc.inception_to_torch(params).items()}
        original = pf.load_state_dict_from_url
        pf.load_state_dict_from_url = lambda *a, **k: state
        try:
            model = pf.InceptionV3([3], resize_input=True, normalize_input=True).eval()
        finally:
            pf.load_state_dict_from_url = original

        def torch_run():
            with torch.inference_mode():
                x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
                return model(x)[0].numpy()

        runs[f"pytorch-fid InceptionV3 (torch, {FLAGS.torch_threads} threads)"] = torch_run

    compile_s = {name: _timed(fn)[0] for name, fn in runs.items()}  # warm-up: compilation, caches
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(FLAGS.repeats):  # interleaved: every setting sees the same load
        for name, fn in runs.items():
            times[name].append(_timed(fn))

    m = machine()
    versions = f"jax {jax.__version__}"
    if FLAGS.torch:
        import pytorch_fid

        versions += f", torch {torch.__version__}, pytorch-fid {pytorch_fid.__version__}"
    print("## FID Inception feature extraction: JAX beside pytorch-fid\n")
    print(
        f"Settings: {FLAGS.batch} random uint8 images of {FLAGS.size}x{FLAGS.size}x3 per call (resized to 299x299 inside), "
        f"random weights, median of {FLAGS.repeats} interleaved runs after one warm-up call each (JAX compilation excluded); "
        f"{m['cpu']}, {m['cpu_cores']} CPU cores, {len(jax.devices())} JAX device(s) ({m['device']}); {versions}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; command: `python experiments/bench_inception.py "
        f"--batch {FLAGS.batch} --size {FLAGS.size} --repeats {FLAGS.repeats} --torch_threads {FLAGS.torch_threads}"
        f"{'' if FLAGS.xla_tuning else ' --noxla_tuning'}`; {m['date']}, "
        f"commit {m['git_commit']}{' (modified)' if m['git_dirty'] else ''}.\n"
    )
    print(
        "Wall time is what a user waits; CPU time (all threads of the process) is the work done, "
        "the steadier number when other programs share the cores.\n"
    )
    columns = ["wall s / batch (median)", "images/s", "CPU s / batch (median)", "images per CPU-second", "wall runs (s)"]
    print("| implementation | " + " | ".join(columns) + " | first call (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        wall, cpu = (float(np.median([t[i] for t in ts])) for i in (0, 1))
        runs_text = ", ".join(f"{t[0]:.2f}" for t in ts)
        print(
            f"| {name} | {wall:.3f} | {FLAGS.batch / wall:.1f} | {cpu:.2f} | {FLAGS.batch / cpu:.2f} | {runs_text} "
            f"| {compile_s[name]:.1f} |"
        )


if __name__ == "__main__":
    app.run(main)
