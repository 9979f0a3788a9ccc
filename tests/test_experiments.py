"""Every experiment runs end to end in a tiny configuration (tiny models trained through
the trainer once and shared), writes its results.json and plot, and refuses bad flags
with one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ",".join(
    [
        "model.depth=4",
        "model.hidden_size=32",
        "model.num_heads=2",
        "model.scan_unroll=1",
        "data.image_size=8",
        "train.steps=6",
        "train.global_batch_size=8",
        "train.log_every=3",
        "checkpoint.every=6",
        "optimizer.warmup_steps=0",
        "sample.shallow_blocks=1",
    ]
)


_CACHE_ENV = {}


@pytest.fixture(scope="module", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
    """The experiments' processes share one persistent XLA compilation cache (per test
    worker): the tiny models' programs that several scripts compile (training steps, the
    classifier, samplers) are compiled once; a hit runs the very same executable."""
    cache = tmp_path_factory.getbasetemp() / "jax_cache"
    cache.mkdir(exist_ok=True)
    _CACHE_ENV.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    yield
    _CACHE_ENV.clear()


def run(script, *args, timeout=600, expect_ok=True):
    env = dict(os.environ, **_CACHE_ENV)
    cmd = [sys.executable, str(ROOT / "experiments" / script), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if expect_ok:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny Skip-DiT and DiT workdirs, trained by the spectral experiment (cheapest)."""
    out = tmp_path_factory.mktemp("exp")
    run("spectral.py", f"--out={out / 'spectral'}", f"--overrides={TINY}", "--timesteps=100,900", "--samples=1", "--iters=3")
    res = json.loads((out / "spectral" / "results.json").read_text())
    assert set(res["models"]) == {"skipdit", "dit"}
    for r in res["models"].values():
        assert all(v > 0 for v in r["jacobian_spectral_norm"])
        assert len(r["weight_spectral_norms"]["mlp/fc1/kernel"]) == 4
    assert "skip_fusion/linear/kernel" in res["models"]["skipdit"]["weight_spectral_norms"]
    assert (out / "spectral" / "spectral.png").stat().st_size > 0
    m = out / "spectral" / "models"
    assert (m / "skipdit" / "experiment_done.json").exists()
    return str(m / "skipdit"), str(m / "dit"), out


def test_cache_tradeoff(models):
    skip, dit, out = models
    res_dir = out / "tradeoff"
    run(
        "cache_tradeoff.py", f"--out={res_dir}", f"--skipdit={skip}", f"--dit={dit}", "--per_class=1", "--steps=6", "--repeats=1",
        "--skip_cache=2", "--shallow_cache=2", "--fora=2", "--pab=2", "--delta_dit=2", "--teacache=0.5", "--teacache_calibrate", "--classifier_steps=10", "--shallow_blocks=1",
    )
    res = json.loads((res_dir / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"none", "skip-cache", "shallow-cache", "fora", "pab", "delta-dit", "teacache"}
    for r in res["rows"]:
        assert set(r) >= {"method", "setting", "predicted_speedup", "speedup", "psnr_db", "ssim", "lpips", "class_accuracy"}
        assert r["lpips"] is None  # grayscale digits
        assert round(r["class_accuracy"], 3) in {round(i / 10, 3) for i in range(11)}  # 10 samples, one per class
        if r["method"] != "none":
            assert r["cached_steps"] > 0 and r["predicted_speedup"] > 1 and r["ssim"] <= 1
    # FORA, DDIM-6, N=2: full at the first step and where the index counted down from 5 is
    # even (5 4 3 2 1 0 -> steps 0, 1, 3, 5): 4 full, 2 cached with no block -> 6/4.
    assert rows["fora"]["full_steps"] == 4 and rows["fora"]["predicted_speedup"] == 1.5
    assert len(res["teacache_coefficients"]) >= 2
    assert (res_dir / "tradeoff.png").stat().st_size > 0


def test_feature_similarity(models):
    skip, dit, out = models
    run("feature_similarity.py", f"--out={out / 'fs'}", f"--skipdit={skip}", f"--dit={dit}", "--steps=6", "--per_class=1", "--shallow_blocks=1")
    res = json.loads((out / "fs" / "results.json").read_text())
    assert set(res["cached_vs_fresh"]) == {"Skip-DiT, Skip-Cache", "DiT, shallow cache", "DiT, FORA"}
    for name, s in res["cached_vs_fresh"].items():
        assert len(s) == 6 and s[0] == 1.0
        assert -1 <= res["mean_over_cached_steps"][name] < 1
    assert (out / "fs" / "feature_similarity.png").stat().st_size > 0


def test_perturbation(models):
    skip, dit, out = models
    targets = ("input", "weights")
    flags = [f"--skipdit={skip}", f"--dit={dit}", "--grid=3", "--samples=2"]
    runs = [["perturbation.py", [f"--out={out / f'pert_{t}'}", *flags, f"--target={t}"]] for t in targets]
    for code, stderr in _run_scripts(runs, out / "pert_logs"):
        assert code == 0, stderr[-3000:]
    for target in targets:
        d = out / f"pert_{target}"
        res = json.loads((d / "results.json").read_text())
        for s in res["surfaces"].values():
            assert abs(s[1][1] - 1.0) < 1e-5  # alpha = beta = 0 is the unperturbed model
            assert min(min(r) for r in s) < 1.0
        assert (d / "perturbation.png").stat().st_size > 0


def test_convergence(tmp_path_factory):
    tmp_path = tmp_path_factory.getbasetemp() / "convergence"  # also read by test_render_fresh_results
    run(
        "convergence.py", f"--out={tmp_path}", f"--overrides={TINY}", "--total_steps=4", "--eval_every=2", "--per_class=2",
        "--sample_steps=3", "--heldout=20", "--classifier_steps=10",
    )
    res = json.loads((tmp_path / "results.json").read_text())
    for kind in ("dit", "skipdit"):
        assert [r["step"] for r in res["curves"][kind]] == [2, 4]
        # The held-out loss of an 4-step model is near that of noise prediction by zeros (~1
        # per element + the vb term); samples that far from the data sit far from it in FID.
        assert all(0.5 < r["heldout_loss"] < 10 and r["classifier_fid"] > 1e-3 for r in res["curves"][kind])
    assert set(res["summary"]) == {"heldout_loss", "classifier_fid"}
    assert (tmp_path / "convergence.png").stat().st_size > 0


BAD_FLAGS = [
    ("cache_tradeoff.py", ["--fora=0"], "interval"),
    ("cache_tradeoff.py", ["--teacache=-1"], "threshold"),
    ("cache_tradeoff.py", ["--pab=two"], "bad setting"),
    ("spectral.py", ["--timesteps=5000"], "0..999"),
    ("perturbation.py", ["--radius=0"], "radius"),
    ("feature_similarity.py", ["--interval=1"], "interval"),
    ("convergence.py", ["--eval_every=0"], "eval_every"),
]

# Runs `python experiments/SCRIPT ARGS...` for each [script, args] of the JSON list
# sys.argv[1], each in a child forked from this process once the modules every script
# imports are loaded (no JAX backend has started, so forking is safe): the child is the
# script's process from there on (sys.path[0] = experiments/, sys.argv, uncaught
# exceptions, exit status and interpreter shutdown as usual), with stdout and stderr in
# files i.out and i.err under sys.argv[2] (file descriptors 1 and 2). What the shared
# imports print goes to import.err. Prints the exit statuses as JSON.
_SCRIPT_DRIVER = """
import json, os, runpy, sys, warnings
runs, out_dir, experiments = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path[0] = experiments
def redirect(fd, name):
    f = os.open(os.path.join(out_dir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(f, fd)
    os.close(f)
saved = os.dup(2)
redirect(2, "import.err")
import jax, numpy, absl.flags, _common  # noqa: F401
sys.stderr.flush()
os.dup2(saved, 2)
codes = []
for i, (script, args) in enumerate(runs):
    sys.stdout.flush()
    sys.stderr.flush()
    with warnings.catch_warnings():  # (parent and child leave it: the child's filters are the usual ones)
        # Python >= 3.12 warns about forking a process with threads (numpy's BLAS pool is one).
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        redirect(1, f"{i}.out")
        redirect(2, f"{i}.err")
        sys.argv = [os.path.join(experiments, script), *args]
        runpy.run_path(sys.argv[0], run_name="__main__")
        sys.exit(0)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""


@pytest.fixture(scope="module")
def bad_flag_runs(models):
    """(exit status, stderr) of each of BAD_FLAGS (the models' paths given where the script
    takes them), all from one process that loads the shared modules once."""
    skip, dit, out = models
    runs = []
    for script, args, _ in BAD_FLAGS:
        model_flags = [] if script == "convergence.py" else [f"--skipdit={skip}", f"--dit={dit}"]
        runs.append([script, [f"--out={out / 'bad'}", *model_flags, *args]])
    return _run_scripts(runs, out / "bad_flag_logs")


def _run_scripts(runs, logs):
    """(exit status, stderr) of `python experiments/SCRIPT ARGS...` for each [script, args]
    of `runs`, one after another, from one process that loads the shared modules once."""
    logs.mkdir()
    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT_DRIVER, json.dumps(runs), str(logs), str(ROOT / "experiments")],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, **_CACHE_ENV),
    )
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr[-3000:]
    codes = json.loads(res.stdout)
    assert len(codes) == len(runs)
    # A script's own process would print what the shared imports printed, then its own output.
    imports = (logs / "import.err").read_text()
    return [(code, imports + (logs / f"{i}.err").read_text()) for i, code in enumerate(codes)]


@pytest.mark.parametrize("script,args,match", BAD_FLAGS)
def test_bad_flags_one_line(script, args, match, bad_flag_runs):
    returncode, stderr = bad_flag_runs[BAD_FLAGS.index((script, args, match))]
    assert returncode != 0
    lines = [line for line in stderr.strip().splitlines() if line.strip() and "libtpu" not in line and "xla_bridge" not in line]
    assert len(lines) == 1 and match in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr


def _make_results():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_results", ROOT / "experiments" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_md_is_rendered_from_the_committed_json():
    """RESULTS.md is exactly what the template and the committed results/*.json render to:
    no table or quoted number can drift from the JSON it came from."""
    mr = _make_results()
    rendered = mr.render(ROOT / "experiments" / "results", ROOT / "experiments" / "RESULTS.template.md")
    committed = (ROOT / "experiments" / "RESULTS.md").read_text()
    assert rendered == committed, "experiments/RESULTS.md differs from its rendering: run `python experiments/make_results.py --render_only`"
    assert "{{" not in rendered
    for name in mr.EXPERIMENTS:
        res = json.loads((ROOT / "experiments" / "results" / f"{name}.json").read_text())
        assert {"command", "flags", "machine"} <= set(res["settings"]), name


def test_render_fails_on_unknown_placeholders(tmp_path):
    mr = _make_results()
    for text in ("{{table:nonsense}}", "{{value:spectral/no_such_key}}"):
        (tmp_path / "t.md").write_text(text)
        with pytest.raises(SystemExit, match="unknown table|no 'no_such_key'"):
            mr.render(ROOT / "experiments" / "results", tmp_path / "t.md")
    (tmp_path / "t.md").write_text("{{value:convergence/curves/dit/0/step|,}} {{value:spectral/timesteps/1}}")
    steps = json.loads((ROOT / "experiments" / "results" / "convergence.json").read_text())["curves"]["dit"][0]["step"]
    ts = json.loads((ROOT / "experiments" / "results" / "spectral.json").read_text())["timesteps"][1]
    assert mr.render(ROOT / "experiments" / "results", tmp_path / "t.md") == mr.NOTICE + f"{steps:,} {ts}"


def test_render_fresh_results(models, tmp_path_factory, tmp_path):
    """The template renders from what the scripts write today (the tiny runs above), with
    a settings line above every table."""
    skip, dit, out = models
    conv = tmp_path_factory.getbasetemp() / "convergence"
    fresh = {
        "cache_tradeoff": out / "tradeoff", "feature_similarity": out / "fs", "perturbation_input": out / "pert_input",
        "perturbation_weights": out / "pert_weights", "spectral": out / "spectral", "convergence": conv,
    }
    if not all((d / "results.json").exists() for d in fresh.values()):
        pytest.skip("needs the results of the experiment tests above")
    for name, d in fresh.items():
        (tmp_path / f"{name}.json").write_text((d / "results.json").read_text())
    mr = _make_results()
    text = mr.render(tmp_path, ROOT / "experiments" / "RESULTS.template.md")
    assert "{{" not in text
    blocks = text.split("\n\n")
    tables = [i for i, b in enumerate(blocks) if b.startswith("| ")]
    assert len(tables) == (ROOT / "experiments" / "RESULTS.template.md").read_text().count("{{table:")
    for i in tables:
        assert blocks[i - 1].startswith("*"), blocks[i - 1]  # the generated settings line
    assert "--per_class=1" in text and "--steps=6" in text  # the commands of these runs


def test_bench_latte_tiny(tmp_path):
    """The video sampling benchmark end to end at a tiny size: full and Skip-Cache N=2 in JAX
    and through the PyTorch reference, the plan's counts and prediction in the table, both
    implementations' samples equal."""
    from torch_reference import create_diffusion, latte_cache_schedule

    out = tmp_path / "latte.md"
    steps, pairs = 4, 4
    run("bench_latte.py", f"--steps={steps}", "--width=32", "--heads=2", f"--depth={2 * pairs}", "--frames=2", "--size=8",
        "--intervals=2", "--repeats=1", "--warmup=0", "--torch_threads=1", f"--out={out}", timeout=120)
    text = out.read_text()
    assert f"DDIM-{steps}" in text and f"{2 * pairs} blocks ({pairs} pairs)" in text
    table = [r.split("|")[1:-1] for r in text.splitlines() if r.startswith("| ") and "---" not in r]
    rows = {r[0].strip(): [c.strip() for c in r[1:]] for r in table}
    assert set(rows) == {"method", "full", "Skip-Cache N=2"}
    schedule = latte_cache_schedule([int(t) for t in create_diffusion(f"ddim{steps}").timestep_map[::-1]], 2, 900, 50)
    full, cached = sum(schedule), len(schedule) - sum(schedule)
    assert cached > 0 and rows["full"][0] == f"{steps}/0" and rows["Skip-Cache N=2"][0] == f"{full}/{cached}"
    assert rows["Skip-Cache N=2"][1] == f"{steps * pairs / (full * pairs + cached * 2):.2f}x"
    for cols in (rows["full"], rows["Skip-Cache N=2"]):
        assert float(cols[2]) > 0 and float(cols[4]) > 0 and float(cols[6]) > 0  # JAX s, PyTorch s, ratio
        assert float(cols[7]) < 1e-4  # JAX and PyTorch drew the same samples
