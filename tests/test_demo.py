"""The demo end to end on a tiny model: classifier, training through the trainer,
sampling with and without Skip-Cache, the report and images; and its bad input.

It runs from a regular (not editable) install of the package into a scratch directory,
started from another working directory: the library must not read files outside the
installed package (no `configs/` beside it)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from skipdit_jax.demo.image import CACHE_INTERVALS

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "model.depth": 6,
    "model.hidden_size": 32,
    "model.num_heads": 2,
    "model.scan_unroll": 1,
    "data.image_size": 8,
    "train.steps": 8,
    "train.global_batch_size": 16,
    "train.log_every": 4,
    "checkpoint.every": 8,
    "optimizer.warmup_steps": 0,
    "sample.every": 0,
    "sample.num_steps": 5,
    "demo.reserve_seconds": 10.0,
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install .` (no deps: they are this environment's) into a scratch directory."""
    target = tmp_path_factory.mktemp("site")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return target


def test_demo_end_to_end_from_an_installed_package(tmp_path, installed):
    script = textwrap.dedent(
        f"""
        import json, skipdit_jax
        assert skipdit_jax.__file__.startswith({str(installed)!r}), skipdit_jax.__file__
        from skipdit_jax.demo.image import run_demo
        report = run_demo("demo-out", minutes=3, samples_per_class=1, overrides={TINY!r})  # relative, as in the Quickstart
        print(json.dumps(report["train"]))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(installed))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report_train = json.loads(res.stdout.strip().splitlines()[-1])
    tmp_path = tmp_path / "demo-out"
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["train"] == report_train and on_disk["train"]["steps"] == 8
    assert set(on_disk) >= {"train", "classifier_test_accuracy", "full", "cache"}
    assert set(on_disk["train"]) == {"steps", "seconds", "final_loss"}
    assert on_disk["classifier_test_accuracy"] > 0.5  # a real classifier, even at 8x8
    tenths = {round(i / 10, 3) for i in range(11)}  # 10 samples: one per class
    assert round(on_disk["full"]["class_accuracy"], 3) in tenths
    assert [row["interval"] for row in on_disk["cache"]] == list(CACHE_INTERVALS)
    # DDIM-5 visits t = 800, 600, 400, 200, 0; depth 6, k = 2 (4 blocks per cached step);
    # t = 0 <= close_t ends the cache after that step. Counted by hand:
    #   N=2: full at steps 0, 2, 4 -> 3 x 6 + 2 x 4 = 26 blocks vs 30 -> 30/26
    #   N=3: full at steps 0, 3    -> 2 x 6 + 3 x 4 = 24 blocks       -> 30/24
    #   N=4: full at steps 0, 4    -> 2 x 6 + 3 x 4 = 24 blocks       -> 30/24
    expected = {2: 30 / 26, 3: 30 / 24, 4: 30 / 24}
    for row in on_disk["cache"]:
        assert set(row) == {"interval", "seconds", "speedup", "predicted_speedup", "psnr_db", "class_accuracy"}
        assert row["predicted_speedup"] == round(expected[row["interval"]], 3)
        assert 0 < row["psnr_db"] < 200  # cached samples differ from the full ones, but not wildly
        assert round(row["class_accuracy"], 3) in tenths
    for name in ["samples_full.png", "loss.png"] + [f"samples_cache{n}.png" for n in CACHE_INTERVALS]:
        assert (tmp_path / name).stat().st_size > 0


def test_demo_bad_minutes_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "skipdit_jax.cli", "demo", f"--out={tmp_path}", "--minutes=0"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["skipdit: error: --minutes must be > 0, got 0.0"]
