"""The video demo: the moving-digits dataset (deterministic, the image demo's digits and
labels, motion as specified), and `skipdit demo --task video` end to end on a tiny Latte-skip
(report fields present and consistent, GIFs written, the markdown table), and its bad input."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from skipdit_jax import cli
from skipdit_jax.data import mnist_source
from skipdit_jax.data.moving_digits import MAX_SPEED, moving_digits_source
from skipdit_jax.demo.video import CACHE_INTERVALS, centres_of_mass, motion, run_video_demo
from skipdit_jax.errors import ConfigError


def _bounce(start: int, velocity: int, span: int, frames: int) -> list[int]:
    """A point moving at `velocity` px per frame that reverses on leaving [0, span], simulated."""
    p, v, out = start, velocity, []
    for _ in range(frames):
        out.append(p)
        p += v
        if p > span:
            p, v = 2 * span - p, -v
        elif p < 0:
            p, v = -p, -v
    return out


def test_moving_digits_clips():
    src = moving_digits_source(split="train", num_frames=12, image_size=16, seed=3)
    again = moving_digits_source(split="train", num_frames=12, image_size=16, seed=3)
    other_seed = moving_digits_source(split="train", num_frames=12, image_size=16, seed=4)
    digits = mnist_source(src.digit_size, split="train", resize="resize")
    assert (src.digit_size, src.span, len(src)) == (10, 6, len(digits)) and len(moving_digits_source(split="heldout")) == 1000
    np.testing.assert_array_equal(src.labels, digits.labels)
    speeds, moved = [], 0
    for i in (0, 1, 17, 999, len(src) - 1):
        r = src[i]
        assert r["image"].shape == (12, 16, 16, 1) and r["image"].dtype == np.float32 and r["label"].dtype == np.int32
        assert r["label"] == digits.labels[i] and -1 <= r["image"].min() and r["image"].max() <= 1
        np.testing.assert_array_equal(r["image"], again[i]["image"])  # deterministic
        traj = src.trajectory(i)
        moved += not np.array_equal(traj, other_seed.trajectory(i))
        # Straight lines bouncing inside the canvas, the velocity fixed by (seed, index).
        start, velocity = src.motion(i)
        assert all(1 <= abs(v) <= MAX_SPEED for v in velocity)
        for axis in (0, 1):
            assert traj[:, axis].tolist() == _bounce(int(start[axis]), int(velocity[axis]), src.span, 12)
        speeds.extend(np.abs(velocity).tolist())
        # Frame f is the digit at trajectory[f] on a blank canvas.
        d = src.digit_size
        for f, (y, x) in enumerate(traj):
            frame = r["image"][f, ..., 0]
            np.testing.assert_array_equal(frame[y : y + d, x : x + d], digits.images[i, ..., 0])
            mask = np.ones_like(frame, bool)
            mask[y : y + d, x : x + d] = False
            assert np.all(frame[mask] == -1.0)
        # The demo's centre-of-mass motion of a real clip is exactly its trajectory's.
        com = centres_of_mass(r["image"][None])[0]
        np.testing.assert_allclose(np.diff(com, axis=0), np.diff(traj, axis=0), atol=1e-9)
    assert moved >= 4 and len(set(speeds)) > 1
    assert motion(np.stack([src.trajectory(i) for i in range(20)]))["displacement_px"] >= 1.0
    for bad in (dict(split="test"), dict(num_frames=0), dict(image_size=16, digit_size=20), dict(image_size=6),
                dict(image_size=16, digit_size=12, motion_grid=5), dict(motion_grid=0)):
        with pytest.raises(ConfigError):
            moving_digits_source(**bad)


def test_patch_aligned_motion():
    """motion_grid g: every start and velocity is a multiple of g (so every position is), the
    speed stays within MAX_SPEED grid steps and the span, and the clips still bounce."""
    src = moving_digits_source(split="train", num_frames=6, image_size=16, digit_size=12, motion_grid=4, seed=3)
    seen = set()
    for i in range(40):
        start, velocity = src.motion(i)
        traj = src.trajectory(i)
        assert np.all(start % 4 == 0) and np.all(velocity % 4 == 0) and np.all(np.abs(velocity) == 4)  # span 4: one step
        assert np.all(traj % 4 == 0) and traj.min() >= 0 and traj.max() <= src.span
        for axis in (0, 1):
            assert traj[:, axis].tolist() == _bounce(int(start[axis]), int(velocity[axis]), src.span, 6)
        seen.update(map(tuple, traj.tolist()))
    assert seen == {(0, 0), (0, 4), (4, 0), (4, 4)}
    wide = moving_digits_source(split="train", num_frames=6, image_size=32, digit_size=12, motion_grid=4, seed=3)
    speeds = {int(abs(v)) for i in range(40) for v in wide.motion(i)[1]}
    assert speeds == {4, 8}  # MAX_SPEED grid steps


TINY = {
    "model.depth": 8,  # 4 pairs: Skip-Cache k = 1 pair
    "model.hidden_size": 32,
    "model.num_heads": 2,
    "model.scan_unroll": 1,
    "data.image_size": 12,  # 8 px digits moving on the 4 px patch grid (positions 0 and 4)
    "data.digit_size": 8,
    "data.motion_grid": 4,
    "data.num_frames": 4,
    "data.images_per_video": 2,
    "train.steps": 4,
    "train.global_batch_size": 8,
    "train.log_every": 2,
    "checkpoint.every": 4,
    "optimizer.warmup_steps": 0,
    "sample.num_steps": 4,
    "demo.reserve_seconds": 10.0,
    "demo.classifier_steps": 30,
    "demo.timing_repeats": 1,
}


def test_video_demo_end_to_end(tmp_path):
    report = run_video_demo(tmp_path, minutes=3, samples_per_class=1, overrides=TINY)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["train"]["steps"] == 4 and report["train"]["seconds"] > 0
    assert 0.1 < report["classifier_test_accuracy"] <= 1  # 30 steps: a weak but real judge
    s = report["settings"]
    got = (s["frames"], s["image_size"], s["digit_size"], s["pairs"], s["sampler"], s["samples_per_class"])
    assert got == (4, 12, 8, 4, "ddim4", 1)
    assert (s["motion_grid"], s["joint_images"], s["batch_size"]) == (4, 2, 8)
    # The real clips' motion: centre of mass and trajectory agree (the digit never leaves the canvas).
    data = report["data"]
    assert data["clips"] == 1000 and data["displacement_px"] == pytest.approx(data["trajectory"]["displacement_px"], abs=1e-3)
    assert data["displacement_px"] >= 4.0  # every step moves a whole patch along each axis
    tenths = {round(i / 10, 4) for i in range(11)}  # one clip per class
    fortieths = {round(i / 40, 4) for i in range(41)}  # 10 clips of 4 frames
    rows = [report["full"]] + report["cache"]
    assert [r["interval"] for r in report["cache"]] == list(CACHE_INTERVALS)
    for r in rows:
        assert r["class_accuracy"] in fortieths and r["frame_agreement"] in fortieths and r["clip_accuracy"] in tenths
        assert r["frame_agreement"] >= 0.5 - 1e-9  # the majority class holds at least 2 of 4 frames (ties: the lower class)
        assert r["seconds"] > 0 and r["displacement_px"] >= 0 and r["acceleration_px"] >= 0
    # DDIM-4 visits t = 750, 500, 250, 0 (close_t = 20 ends the cache after the last step).
    #   N=2: full, cached, full, cached -> 2 x 4 + 2 x 2 = 12 pairs vs 16 -> 1.333
    #   N=3: full, cached, cached, full -> 12 pairs                     -> 1.333
    for r in report["cache"]:
        assert r["predicted_speedup"] == round(16 / 12, 3)
        assert r["speedup"] == pytest.approx(report["full"]["seconds"] / r["seconds"], rel=0.02)  # of the unrounded seconds
        assert 0 < r["psnr_db"] < 200
    # One GIF per setting (+ the real clips): 4 frames of the 10 x 1 grid, upscaled 4x.
    for name in ["data.gif", "samples_full.gif"] + [f"samples_cache{n}.gif" for n in CACHE_INTERVALS]:
        with Image.open(tmp_path / name) as gif:
            assert gif.n_frames in (2, 3, 4) or name == "data.gif"  # identical consecutive frames are stored once
            assert gif.size == (4 * (12 + 4), 4 * (10 * 14 + 2))
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert json.loads((tmp_path / "classifier" / "classifier_meta.json").read_text())["image_size"] == 12
    # The markdown table of the report (experiments/demo_video_table.py).
    table = _table().render(report, "report.json")
    assert f"| full sampling: class accuracy per frame | **{report['full']['class_accuracy']:.2f}**" in table
    assert table.count("| Skip-Cache N=") == len(CACHE_INTERVALS) and f"{report['train']['steps']:,} steps" in table
    assert "on a 4 px grid), batches of 8 clips + 2 joint images per clip" in table
    # The training recipe comes from the run's own config, beside the report.
    opt = json.loads((tmp_path / "train" / "config.json").read_text())["optimizer"]
    assert report["settings"]["learning_rate"] == opt["lr"]
    training = _table().recipe(str(tmp_path / "report.json"))
    assert f"lr {opt['lr']:g}, {opt['warmup_steps']} warm-up steps, cosine decay" in training
    assert training in _table().render(report, "r", training)
    assert _table().recipe(str(tmp_path / "missing" / "report.json")) == ""


def test_video_demo_bad_input_is_one_line(tmp_path, capsys):
    for flag, message in [
        ("--task=audio", "unknown demo task 'audio'; expected one of: image, video"),
        ("--minutes=1", "--minutes 1.0 leaves no time to train; give at least 4"),  # checked before any work
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["skipdit", "demo", "--task=video", flag, f"--out={tmp_path}"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"skipdit: error: {message}"]
    assert not any(tmp_path.iterdir())


def _table():
    """experiments/demo_video_table.py as a module (experiments/ is not a package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "demo_video_table.py")
    spec = importlib.util.spec_from_file_location("demo_video_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
