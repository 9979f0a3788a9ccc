"""`skipdit plot-curves`: hand-made metrics.jsonl files whose crossings are counted by hand
-> exact logged and interpolated steps and ratios; the plot and its JSON summary; bad input
is one line and exit status 2 ("never reached" is a result)."""

import json

import numpy as np
import pytest

from skipdit_jax import cli
from skipdit_jax.evaluation import curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Training rows ("loss") interleaved with evaluation rows, as the trainer writes them.
SKIP = [(100, 50.0), (200, 20.0), (300, 8.0), (400, 5.0)]
DIT = [(100, 60.0), (200, 40.0), (400, 25.0), (800, 12.0), (1600, 9.0)]
SLOW = [(100, 90.0), (500, 30.0)]


def _workdir(root, name, evals, key="fid/fid", extra=None, tail=""):
    d = root / name
    d.mkdir()
    lines = []
    for step, value in evals:
        lines.append({"step": step, "loss": 1.0 / step, "lr": 1e-4})
        lines.append({"step": step, key: value, **(extra or {})})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + tail)
    return d


def _run(argv, capsys):
    try:
        code = cli.main(["skipdit", "plot-curves", *map(str, argv)])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_crossings_and_ratios_counted_by_hand(tmp_path, capsys):
    # "fid/sfid" also ends in "fid" but is not FID: the default pick is "fid/fid".
    # The DiT run's file ends in a torn line (a crash mid-append), which is dropped.
    skip = _workdir(tmp_path, "skipdit", SKIP, extra={"fid/sfid": 1.0})
    dit = _workdir(tmp_path, "dit", DIT, tail='{"step": 1700, "fid/fi')
    slow = _workdir(tmp_path, "slow", SLOW)
    out_png = tmp_path / "plots" / "curves.png"
    code, out, err = _run([dit, skip, slow, "--target", "10", f"--out={out_png}"], capsys)
    assert code == 0, err
    summary = json.loads(out_png.with_suffix(".json").read_text())
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    assert summary["metric"] == "fid/fid" and summary["mode"] == "min" and summary["target"] == 10
    runs = {r["label"]: r for r in summary["runs"]}
    # skipdit: 20 at 200 -> 8 at 300 crosses 10 at 200 + (10 - 20) / (8 - 20) * 100 = 283.333
    assert runs["skipdit"]["step"] == 300 and runs["skipdit"]["interpolated_step"] == pytest.approx(200 + 100 * 10 / 12, abs=1e-3)
    # dit: 12 at 800 -> 9 at 1600 crosses at 800 + (10 - 12) / (9 - 12) * 800 = 1333.333
    assert runs["dit"]["step"] == 1600 and runs["dit"]["interpolated_step"] == pytest.approx(800 + 800 * 2 / 3, abs=1e-3)
    assert runs["dit"]["last_step"] == 1600 and runs["dit"]["evaluations"] == 5  # torn row dropped
    assert runs["slow"]["reached"] is False and runs["slow"]["step"] is None
    assert runs["slow"]["best"] == {"step": 500, "value": 30.0}
    assert runs["skipdit"]["curve"] == {"steps": [s for s, _ in SKIP], "values": [v for _, v in SKIP]}
    assert summary["reference"] == "skipdit"
    ratios = {r["run"]: r for r in summary["ratios"]}
    assert set(ratios) == {"dit", "slow"}
    assert ratios["dit"]["ratio"] == round(1600 / 300, 4) and ratios["dit"]["lower_bound"] is False
    assert ratios["dit"]["interpolated_ratio"] == round((800 + 1600 / 3) / (200 + 1000 / 12), 4)
    # never reached by its last evaluation at 500: more than 500 / 300 the steps
    assert ratios["slow"]["ratio"] == round(500 / 300, 4) and ratios["slow"]["lower_bound"] is True
    lines = out.strip().splitlines()
    assert lines[0].startswith("first step with fid/fid <= 10 ")
    assert lines[1].startswith("dit: step 1600, interpolated 1333 (fid/fid 9) -> 5.33x the steps of skipdit (interpolated 4.71x)")
    assert lines[2].startswith("skipdit: step 300, interpolated 283 (fid/fid 8)")
    assert lines[3] == "slow: never reached by step 500; best 30 at step 500 -> > 1.67x the steps of skipdit (interpolated > 1.76x)"
    assert lines[-1].startswith("wrote ")


def test_no_run_reaching_the_target_is_a_result(tmp_path, capsys):
    a, b = _workdir(tmp_path, "a", SKIP), _workdir(tmp_path, "b", DIT)
    code, out, err = _run([a, b, "--target", "1", "--labels", "A,B", f"--out={tmp_path / 'c.png'}"], capsys)
    assert code == 0, err
    assert "no run reaches fid/fid <= 1" in out
    assert "A: never reached by step 400; best 5 at step 400" in out
    summary = json.loads((tmp_path / "c.json").read_text())
    assert summary["reference"] is None and summary["ratios"] == []


def test_accuracy_like_metric_crosses_upwards(tmp_path, capsys):
    key = "eval/class_accuracy"
    run = _workdir(tmp_path, "run", [(10, 0.2), (20, 0.5), (30, 0.9)], key=key)
    code, out, err = _run([run, f"--metric={key}", "--target=0.8", f"--out={tmp_path / 'acc.png'}"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "acc.json").read_text())["runs"][0]
    # 0.5 at 20 -> 0.9 at 30 crosses 0.8 at 20 + (0.8 - 0.5) / (0.9 - 0.5) * 10 = 27.5
    assert (r["step"], r["interpolated_step"], r["at_first_evaluation"]) == (30, 27.5, False)
    assert "first step with eval/class_accuracy >= 0.8" in out
    # --mode overrides the name: "min" reaches 0.3 at the first evaluation (nothing to interpolate from)
    code, out, err = _run([run, f"--metric={key}", "--target=0.3", "--mode=min", f"--out={tmp_path / 'acc.png'}"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "acc.json").read_text())["runs"][0]
    assert (r["step"], r["interpolated_step"], r["at_first_evaluation"]) == (10, 10.0, True)
    assert "run: step 10 (its first evaluation)" in out


def test_first_crossing_skips_non_finite_values():
    x = curves.first_crossing([1, 2, 3, 4], [9.0, float("nan"), 6.0, 2.0], target=5.0, mode="min")
    assert (x.step, x.interpolated_step) == (4, 3.25)  # 6 at 3 -> 2 at 4: 3 + 1/4
    x = curves.first_crossing([1, 2, 3], [9.0, float("nan"), 4.0], target=5.0, mode="min")
    assert (x.step, x.interpolated_step) == (3, 3.0)  # no finite evaluation just before: logged step
    assert not curves.first_crossing([1, 2], [float("inf"), 7.0], 5.0, "min").reached


def test_without_target_prints_best_and_final_and_reads_gcs(tmp_path, capsys):
    fake_gcs = pytest.importorskip("fake_gcs")
    from skipdit_jax import paths

    rows = "".join(json.dumps({"step": s, "mnist_fid/classifier_fid": v}) + "\n" for s, v in [(0, 300.0), (50, 80.0), (100, 90.0)])
    with fake_gcs.installed(tmp_path / "gcs") as root:
        paths.atomic_write_text("gs://bucket/run/metrics.jsonl", rows)
        code, out, err = _run(["gs://bucket/run", "--out=gs://bucket/out/curves.png"], capsys)
        assert code == 0, err
        assert out.splitlines()[0] == "run: 3 evaluations of mnist_fid/classifier_fid, best 80 at step 50, final 90 at step 100"
        assert (root / "bucket" / "out" / "curves.png").read_bytes()[:8] == PNG_MAGIC
        summary = json.loads((root / "bucket" / "out" / "curves.json").read_text())
    assert summary["target"] is None and "ratios" not in summary
    assert summary["runs"][0]["curve"]["steps"] == [0, 50, 100]  # step 0 is kept, only the log-x plot leaves it out


def test_default_labels_and_mode():
    assert curves.default_labels(["runs/a/skipdit", "runs/b/skipdit", "x/dit/"]) == ["a/skipdit", "b/skipdit", "x/dit"]
    assert curves.default_labels(["gs://bucket/run1", "run2"]) == ["run1", "run2"]
    assert [curves.default_mode(k) for k in ("fid/fid", "m/classifier_fid", "e/class_accuracy", "fid/inception_score", "x/y")] == [
        "min", "min", "max", "max", None,
    ]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "skipdit: error: workdir not found: {root}/nope"),
        ("no_metrics_file", "skipdit: error: {root}/empty has no metrics.jsonl (not a training workdir, or nothing logged yet)"),
        ("without_metric", "skipdit: error: {root}/b has no 'fid/fid' rows (logged keys: loss, lr, other/fid)"),
        ("two_fids", "skipdit: error: several FID metrics: fid/fid, other/fid; pick one with --metric"),
        ("no_fid", "skipdit: error: no FID metric (a key ending in 'fid') in {root}/c; pass --metric (logged keys: acc/acc, loss, lr)"),
        ("labels", "skipdit: error: --labels 'x' must give 2 non-empty comma-separated names, one per workdir"),
        ("mode", "skipdit: error: cannot tell from its name whether a lower or higher acc/x is better; pass --mode min or --mode max"),
        ("out", "skipdit: error: --out 'curves.pdf' must name a .png file"),
        ("no_args", "skipdit: error: give at least one workdir; usage: skipdit plot-curves " + __import__("skipdit_jax.commands.plot_curves", fromlist=["USAGE"]).USAGE),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, expected):
    a = _workdir(tmp_path, "a", SKIP)
    b = _workdir(tmp_path, "b", SKIP, key="other/fid")
    c = _workdir(tmp_path, "c", SKIP, key="acc/acc")
    (tmp_path / "empty").mkdir()
    out = f"--out={tmp_path / 'p.png'}"
    argv = {
        "missing": [a, tmp_path / "nope", out],
        "no_metrics_file": [a, tmp_path / "empty", out],
        "without_metric": [a, b, "--metric=fid/fid", out],
        "two_fids": [a, b, out],
        "no_fid": [c, out],
        "labels": [a, b, "--labels=x", out],
        "mode": [_workdir(tmp_path, "d", SKIP, key="acc/x"), "--metric=acc/x", "--target=1", out],
        "out": [a, "--out=curves.pdf"],
        "no_args": [out],
    }[case]
    code, stdout, err = _run(argv, capsys)
    assert code == 2
    assert err.strip().splitlines() == [expected.format(root=tmp_path)]
    assert not (tmp_path / "p.png").exists()


def test_summary_is_the_plotted_data(tmp_path):
    c1 = curves.Curve("one", "w1", "fid/fid", np.array([10, 20]), np.array([5.0, 3.0]))
    c2 = curves.Curve("two", "w2", "fid/fid", np.array([10, 40]), np.array([6.0, 4.0]))
    s = curves.write([c1, c2], tmp_path / "x.png", target=4.0, mode="min", title="t")
    assert s == json.loads((tmp_path / "x.json").read_text())
    # one: 5 at 10 -> 3 at 20 crosses 4 at 15; two reaches 4 at its evaluation at 40 (6 -> 4: 40)
    assert [(r["step"], r["interpolated_step"]) for r in s["runs"]] == [(20, 15.0), (40, 40.0)]
    assert s["ratios"] == [{"run": "two", "reference": "one", "ratio": 2.0, "interpolated_ratio": round(40 / 15, 4), "lower_bound": False}]
