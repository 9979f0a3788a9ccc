"""Training Latte (class-to-video): the c2v recipe configs (model sizes, diffusers' linear
schedule, clipping only after start_clip_iter, the skip-only stage), and a tiny Latte-skip
trained end to end from a folder of videos (joint images, flips) with FSDP over 8 devices:
a run stopped and resumed gives exactly the losses of the uninterrupted one, and so does
the run in two processes of four devices."""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from skipdit_jax.training import config as train_config
from skipdit_jax.training import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


# ---- the recipe configs -------------------------------------------------------------------
def test_c2v_configs_follow_the_official_recipe():
    torch = pytest.importorskip("torch")
    from diffusers.optimization import get_scheduler

    from skipdit_jax.models.families import family_of

    expected = {  # dataset: (classes, steps, warm-up, start_clip_iter, flip)
        "ucf101": (101, 100_000, 300, 10_000, True),
        "sky": (0, 1_000_000, 0, 20_000, False),
        "taichi": (0, 1_000_000, 0, 500_000, True),
        "ffs": (0, 1_000_000, 0, 500_000, True),
    }
    for name, (classes, steps, warmup, clip_after, flip) in expected.items():
        c = _load_config(f"latte_{name}.py")
        mc = train_config.model_config(c)
        fam = family_of(mc)
        assert (mc.num_frames, mc.input_size, mc.in_channels, mc.num_classes, mc.long_skip) == (16, 32, 4, classes, True)
        # The released Latte-XL/2-skip sizes (692.4M UCF-101, 692.3M unconditional).
        assert round(fam.count_params() / 1e5) == (6924 if classes else 6923)
        assert fam.batch_spec(2)["image"].shape == (2, 16 + 8, 32, 32, 4)
        assert (c.data.flip, c.train.global_batch_size, c.train.ema_decay, c.optimizer.grad_clip) == (flip, 32, 0.9999, 0.1)
        assert (c.train.steps, c.optimizer.clip_after_steps, c.optimizer.lr) == (steps, clip_after, 1e-4)
        # diffusers' get_scheduler("linear") on the hard-coded AdamW lr 1e-4.
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        sched = get_scheduler("linear", optimizer=opt, num_warmup_steps=warmup, num_training_steps=steps)
        ours = optim.learning_rate_schedule(train_config.ml_collections.ConfigDict({**c.optimizer.to_dict(), "steps": steps}))
        for step in [0, 1, warmup // 2, warmup, warmup + 7, steps // 2, steps - 1, steps]:
            want = 1e-4 * sched.lr_lambdas[0](step)
            np.testing.assert_allclose(float(ours(step)), want, rtol=1e-5, atol=1e-9)  # float32 near 0
    assert not train_config.model_config(_load_config("latte_ucf101.py", "latte")).long_skip


def test_clipping_starts_after_the_given_updates():
    tx = optim.clip_by_global_norm_after(0.1, 2)
    grads = {"a": jnp.full((4,), 3.0)}  # norm 6
    state = tx.init(grads)
    norms = []
    for _ in range(4):
        out, state = jax.jit(tx.update)(grads, state)
        norms.append(float(optax.global_norm(out)))
    np.testing.assert_allclose(norms, [6.0, 6.0, 0.1, 0.1], rtol=1e-5)


def test_finetune_stage1_trains_only_latte_skip_fusions():
    from skipdit_jax.models.families import family_of

    c = _load_config("finetune_latte_to_skip.py", "stage1_sky")
    assert c.train.trainable == "skip_only" and c.data.num_classes == 0
    assert _load_config("finetune_latte_to_skip.py", "stage2").train.trainable == "all"
    mc = train_config.model_config(c).replace(depth=8, hidden_size=32, num_heads=2, input_size=8, num_frames=4)
    params = family_of(mc).abstract_params()
    mask = optim.trainable_mask(params, "skip_only")
    trained = {"/".join(str(getattr(k, "key", k)) for k in path) for path, m in jax.tree_util.tree_leaves_with_path(mask) if m}
    assert trained and all(p.startswith("skip_fusions/") for p in trained)
    assert len(trained) == len(jax.tree.leaves(params["skip_fusions"]))


# ---- a tiny Latte-skip trained from videos --------------------------------------------------------
TINY_CONFIG = '''
from skipdit_jax.training.config import default_config, finalize


def get_config(arg=None):
    c = default_config()
    c.model.update(family="latte", depth=4, hidden_size=32, num_heads=2, patch_size=2, skip_init="xavier")
    c.data.update(name="video_folder", image_size=8, num_classes=2, flip=True, num_frames=4, frame_interval=1,
                  images_per_video=1, video_resize="center_crop")
    c.train.update(steps=6, global_batch_size=8, log_every=1)
    c.optimizer.update(warmup_steps=2, decay="constant", grad_clip=0.05, clip_after_steps=2)
    c.checkpoint.update(every=3, keep=2, async_save=False)
    c.mesh.update(data=4, fsdp=2, min_shard_size=0)
    return finalize(c)
'''


# argv: config file, videos, tmp dir. On 8 devices: the uninterrupted 6-step run in
# TMP/full, then the same run stopped after 3 steps and resumed to 6 in TMP/resumed (a
# second train_and_evaluate restores the step-3 checkpoint exactly as a restarted job
# would, without paying a second start-up).
RUNS_SCRIPT = """
import importlib.util, sys
from skipdit_jax.training.train import train_and_evaluate
config_file, videos, tmp = sys.argv[1:]
spec = importlib.util.spec_from_file_location("tiny", config_file)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
for workdir, steps in (("full", 6), ("resumed", 3), ("resumed", 6)):
    config = module.get_config()
    config.data.path, config.train.steps = videos, steps
    train_and_evaluate(config, f"{tmp}/{workdir}", progress=False)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices, tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    # Runs after the first in a process read their compiled programs from the cache.
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _losses(workdir):
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_tiny_latte_fsdp_resume_and_two_processes(tmp_path):
    """A tiny Latte-skip (2 pairs, width 32, 4 frames of 8x8 RGB + 1 joint image, flips,
    clipping from update 2) from a folder of videos, FSDP over a 4 x 2 (data x fsdp) mesh
    of 8 devices: the run stopped after 3 steps and resumed has exactly the losses of the
    uninterrupted one, and so do 3 steps in two processes of 4 devices (`skipdit train`)."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for v in range(3):  # 6 frame folders of 5 frames, 10x12: centre-cropped to 8x8
            folder = tmp_path / "videos" / c / f"v{v}"
            folder.mkdir(parents=True)
            for f in range(5):
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"{f}.png")
    config = tmp_path / "tiny_latte.py"
    config.write_text(TINY_CONFIG)
    videos = str(tmp_path / "videos")

    def start(args, devices):
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(devices, tmp_path))

    def finish(proc):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return out

    port = _free_port()
    train = [sys.executable, "-m", "skipdit_jax.cli", "train", "--config", str(config), f"--config.data.path={videos}"]
    job = ["--workdir", str(tmp_path / "two"), "--config.train.steps=3", f"--coordinator_address=127.0.0.1:{port}"]
    job.append("--num_processes=2")
    two = [start([*train, *job, f"--process_id={i}"], 4) for i in range(2)]
    out = finish(start([sys.executable, "-c", RUNS_SCRIPT, str(config), videos, str(tmp_path)], 8))
    assert "Latte-skip 2 pairs width 32, 4 frames" in out and "resuming at step 3 of 6" in out
    outs = [finish(p) for p in two]
    assert "starting at step 0 of 3" in outs[0]

    full, resumed, two = (_losses(tmp_path / w) for w in ("full", "resumed", "two"))
    assert sorted(full) == sorted(resumed) == list(range(1, 7)) and sorted(two) == [1, 2, 3]
    assert all(np.isfinite(v) for v in full.values())
    np.testing.assert_allclose([resumed[s] for s in range(1, 7)], [full[s] for s in range(1, 7)], rtol=1e-6)
    np.testing.assert_allclose([two[s] for s in range(1, 4)], [full[s] for s in range(1, 4)], rtol=1e-5)
    model = json.loads((tmp_path / "full" / "model_config.json").read_text())
    assert (model["family"], model["num_frames"], model["input_size"], model["in_channels"]) == ("latte", 4, 8, 3)
