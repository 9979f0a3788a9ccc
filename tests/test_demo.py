"""The demo end to end on a tiny model: classifier, training through the trainer (with the
in-loop classifier-FID curve), sampling with and without Skip-Cache, the report and images;
the same with --compare-dit (a DiT without long skips, both curves); and its bad input.

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
    # The classifier-FID curve: every 8 // 2 = 4 steps (every 2 with --compare-dit), tiny.
    "demo.curve_points": 2,
    "evals.classifier_fid.num_samples": 20,
    "evals.classifier_fid.batch_size": 20,
    "evals.classifier_fid.num_steps": 2,
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


def _cache_dir(tmp_path_factory):
    """The persistent XLA compilation cache the tests' subprocesses share (per test worker)."""
    cache = tmp_path_factory.getbasetemp() / "jax_cache"
    cache.mkdir(exist_ok=True)
    return cache


def _metric_rows(workdir, key):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def test_demo_end_to_end_from_an_installed_package(tmp_path, tmp_path_factory, installed):
    # Then, in the same process (compilations shared), the demo with --compare-dit.
    script = textwrap.dedent(
        f"""
        import json, skipdit_jax
        assert skipdit_jax.__file__.startswith({str(installed)!r}), skipdit_jax.__file__
        from skipdit_jax.demo.image import run_demo
        report = run_demo("demo-out", minutes=3, samples_per_class=1, overrides={TINY!r})  # relative, as in the Quickstart
        run_demo("demo-cmp", minutes=4, samples_per_class=1, overrides={TINY!r}, compare_dit=True)
        print(json.dumps(report["train"]))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(installed))
    # A persistent compilation cache: the --compare-dit demo compiles the programs of the
    # first one again (new function objects), and finds them there.
    env.update(JAX_COMPILATION_CACHE_DIR=str(_cache_dir(tmp_path_factory)), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
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
    # The classifier-FID curve, measured in the loop with the demo's classifier (saved for it).
    assert json.loads((tmp_path / "classifier" / "classifier_meta.json").read_text())["image_size"] == 8
    curve = on_disk["curve"]
    logged = _metric_rows(tmp_path / "train", "classifier_fid/fid")
    assert [s for s, _ in logged] == curve["steps"] == [4, 8]
    assert curve["values"] == pytest.approx([v for _, v in logged], abs=1e-4) and all(v > 0 for v in curve["values"])
    assert (curve["metric"], curve["every"], curve["num_samples"], curve["sampler"], curve["cache"]) == ("classifier_fid/fid", 4, 20, "ddim2", "none")
    twentieths = {round(i / 20, 3) for i in range(21)}  # 20 samples
    assert len(curve["class_accuracy"]) == 2 and all(round(a, 3) in twentieths for a in curve["class_accuracy"])
    eval_seconds = sum(v for _, v in _metric_rows(tmp_path / "train", "classifier_fid/seconds"))
    assert curve["eval_seconds"] == round(eval_seconds, 1) > 0
    assert curve["overhead"] == pytest.approx(eval_seconds / (on_disk["train"]["seconds"] - eval_seconds), rel=0.05)
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    plotted = json.loads((tmp_path / "curves.json").read_text())
    assert [r["curve"]["steps"] for r in plotted["runs"]] == [[4, 8]] and "compare_dit" not in on_disk
    # BENCHMARKS.md's demo table is rendered from this report by experiments/demo_table.py.
    table = _demo_table().render(on_disk, "report.json")
    assert f"| full sampling: class accuracy | **{on_disk['full']['class_accuracy']:.2f}**" in table
    assert f"{on_disk['train']['steps']:,} steps" in table and table.count("| Skip-Cache N=") == len(CACHE_INTERVALS)
    assert f"4: {curve['values'][0]:.2f}, 8: {curve['values'][1]:.2f}" in table

    # --compare-dit: a DiT without long skips trains for the same seconds; both curves on one plot.
    cmp_dir = tmp_path.parent / "demo-cmp"
    cmp = json.loads((cmp_dir / "report.json").read_text())
    c = cmp["compare_dit"]
    assert json.loads((cmp_dir / "train" / "model_config.json").read_text())["long_skip"] is True
    assert json.loads((cmp_dir / "train_dit" / "model_config.json").read_text())["long_skip"] is False
    assert c["budget"].startswith("the same seconds") and c["dit_train"]["steps"] == 8
    skip_curve, dit_curve = _metric_rows(cmp_dir / "train", "classifier_fid/fid"), _metric_rows(cmp_dir / "train_dit", "classifier_fid/fid")
    assert [s for s, _ in skip_curve] == cmp["curve"]["steps"] == [2, 4, 6, 8]  # twice the points: half the time each
    assert [s for s, _ in dit_curve] == c["dit_curve"]["steps"] == [2, 4, 6, 8]
    # The target is the DiT's final value; the first step at or below it, found here by hand.
    target = dit_curve[-1][1]
    assert c["target"] == round(target, 4)
    first = lambda rows: next((s for s, v in rows if v <= target), None)  # noqa: E731
    assert c["dit"]["step"] == first(dit_curve) and c["dit"]["reached"] is True
    assert c["skipdit"]["step"] == first(skip_curve) and c["skipdit"]["reached"] is (first(skip_curve) is not None)
    skip_steps = first(skip_curve) or skip_curve[-1][0]
    assert c["steps_ratio"] == round(first(dit_curve) / skip_steps, 3)
    assert c["bound"] == (None if first(skip_curve) else "upper")
    assert (cmp_dir / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert [r["label"] for r in json.loads((cmp_dir / "curves.json").read_text())["runs"]] == ["Skip-DiT", "DiT"]


def test_demo_bad_minutes_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "skipdit_jax.cli", "demo", f"--out={tmp_path}", "--minutes=0"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["skipdit: error: --minutes must be > 0, got 0.0"]


def _demo_table():
    """experiments/demo_table.py as a module (experiments/ is not a package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "demo_table.py")
    spec = importlib.util.spec_from_file_location("demo_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
