"""The trainer: exact resume after SIGKILL, SIGTERM (also on a checkpoint step), damaged
checkpoints (set aside) vs a changed config (an error that touches nothing), 1 vs 8
devices, 2 processes vs 1 (with sample grids), the profiler, gradient accumulation, config
errors; and, in-process, restore failures and `load_trained`'s partial restore. Tiny models
(8x8 MNIST, depth 2, width 16).

The training processes share one persistent XLA compilation cache (per test worker), so
the tiny train step is compiled once rather than in each of the ~20 processes; a process
that finds it runs the very same executable."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "mnist_skipdit.py")
TINY = [
    "--config.model.depth=2",
    "--config.model.hidden_size=16",
    "--config.model.num_heads=2",
    "--config.model.patch_size=2",
    "--config.data.image_size=8",
    "--config.train.global_batch_size=8",
    "--config.train.log_every=1",
    "--config.sample.every=0",  # no grids, whichever spelling the config file uses
    "--config.evals.grid.every=0",
    "--config.checkpoint.every=4",
    "--config.checkpoint.async_save=False",
    "--config.optimizer.warmup_steps=0",
    "--config.optimizer.decay=constant",  # runs of different lengths share a schedule
]


def train_cmd(workdir, *extra):
    return [sys.executable, "-m", "skipdit_jax.cli", "train", "--config", CONFIG, "--workdir", str(workdir), *TINY, *extra]


def run_train(workdir, *extra, env=None, timeout=600):
    res = subprocess.run(train_cmd(workdir, *extra), capture_output=True, text=True, env=env or _env(), timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def losses(workdir):
    """step -> loss of the training rows (evaluation rows, e.g. {"step", "grid/seconds"}, have no loss)."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


_CACHE_ENV = {}


@pytest.fixture(scope="module", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    _CACHE_ENV.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    yield
    _CACHE_ENV.clear()


def _env(devices=None):
    env = dict(os.environ, **_CACHE_ENV)
    if devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    return env


@pytest.fixture(scope="module")
def reference_workdir(tmp_path_factory):
    """An uninterrupted 40-step run, the baseline of the resume tests (read-only: copy it).
    It keeps all its checkpoints (4, 8, ..., 40), so a copy can stand for the run as it
    stood at any of them."""
    workdir = tmp_path_factory.mktemp("reference")
    run_train(workdir, "--config.train.steps=40", "--config.checkpoint.keep=10")
    return workdir


@pytest.fixture(scope="module")
def reference_run(reference_workdir):
    """step -> loss of the reference run."""
    return losses(reference_workdir)


def test_sigkill_then_restart_gives_the_same_losses(tmp_path, reference_run):
    workdir = tmp_path / "run"
    cmd = train_cmd(workdir, "--config.train.steps=40")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(metrics.read_text().splitlines())
    assert 10 <= killed_at < 40, "the run finished before it could be killed"
    run_train(workdir, "--config.train.steps=40")
    resumed = losses(workdir)
    assert sorted(resumed) == list(range(1, 41))
    np.testing.assert_allclose([resumed[s] for s in range(1, 41)], [reference_run[s] for s in range(1, 41)], rtol=1e-6)


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    workdir = tmp_path / "run"
    cmd = train_cmd(workdir, "--config.train.steps=100000", "--config.checkpoint.every=100000")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "preempted" in out
    steps = [int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()]
    assert steps and max(steps) >= 3


def test_sigterm_on_a_checkpoint_step_saves_once_and_writes_the_partial_metrics(tmp_path):
    """checkpoint.every=1: the step where SIGTERM is noticed is always also a checkpoint
    step, and must be saved once. log_every is never reached, so the only metrics row is
    the partial interval's, written at the stop."""
    workdir = tmp_path / "run"
    cmd = train_cmd(workdir, "--config.train.steps=100000", "--config.checkpoint.every=1", "--config.train.log_every=100000")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not _checkpoint_steps(workdir):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted: saved a checkpoint at step" in out
    stopped = int(out.split("preempted: saved a checkpoint at step")[1].split()[0])
    assert max(_checkpoint_steps(workdir)) == stopped
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [stopped] and np.isfinite(rows[0]["loss"])


def _checkpoint_steps(workdir):
    d = workdir / "checkpoints"
    return [int(p) for p in os.listdir(d) if p.isdigit()] if d.exists() else []


def _garble_every_file(step_dir):
    for root, _, files in os.walk(step_dir / "state"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")


def _delete_array_data(step_dir):
    """Metadata intact, array bytes gone: only reading the arrays finds out."""
    data = list((step_dir / "state").glob("ocdbt.process_*/d/*"))
    assert data
    for f in data:
        f.unlink()


def test_damaged_newest_checkpoint_is_set_aside_and_falls_back(tmp_path, reference_workdir, reference_run):
    """The subtle damage (metadata intact, array bytes gone); wholly garbled files are the
    two-process test's case. A run stopped after step 12 (a copy of the reference run as it
    stood then: checkpoints up to 12, metrics rows up to 12) whose newest checkpoint is
    damaged, continued to step 16: it must fall back to step 8 and redo steps 9-12. Their
    rows in the copy are spoiled first, so only redone steps can match the reference."""
    workdir, steps = tmp_path / "run", 16
    shutil.copytree(reference_workdir, workdir)
    for step in _checkpoint_steps(workdir):
        if step > 12:
            shutil.rmtree(workdir / "checkpoints" / str(step))
    assert sorted(_checkpoint_steps(workdir)) == [4, 8, 12]
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    rows = [dict(r, loss=1e6) if r["step"] > 8 and "loss" in r else r for r in rows if r["step"] <= 12]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _delete_array_data(workdir / "checkpoints" / "12")
    res = run_train(workdir, f"--config.train.steps={steps}")
    assert "unreadable" in res.stdout and "falling back to step 8" in res.stdout
    assert (workdir / "checkpoints" / "12.damaged").is_dir()
    resumed = losses(workdir)
    assert sorted(resumed) == list(range(1, steps + 1))
    np.testing.assert_allclose([resumed[s] for s in range(1, steps + 1)], [reference_run[s] for s in range(1, steps + 1)], rtol=1e-6)


def test_changed_config_on_resume_is_one_error_and_touches_nothing(tmp_path, reference_workdir):
    """A good checkpoint that no longer fits (the width changed) is not "damaged": exit 2
    with one line naming the mismatch; no directory renamed, metrics.jsonl untouched. (The
    good checkpoint is a copy of the reference run's.)"""
    workdir = tmp_path / "run"
    shutil.copytree(reference_workdir, workdir)
    before = sorted(os.listdir(workdir / "checkpoints")), (workdir / "metrics.jsonl").read_text()
    assert before[0] and before[1]
    cmd = train_cmd(workdir, "--config.train.steps=44", "--config.model.hidden_size=32")
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith(("I1", "W1"))]
    assert len(lines) == 1 and lines[0].startswith("skipdit: error:"), res.stderr[-2000:]
    assert re.search(r"does not fit .*: params/\S+ is float32\[1, 96\] in the checkpoint but float32\[1, 192\] in this run", lines[0]), lines[0]
    assert (sorted(os.listdir(workdir / "checkpoints")), (workdir / "metrics.jsonl").read_text()) == before


def test_eight_devices_fsdp_match_one_device(tmp_path, reference_run):
    workdir = tmp_path / "run8"
    run_train(workdir, "--config.train.steps=20", "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.mesh.min_shard_size=0", env=_env(8))
    eight = losses(workdir)
    np.testing.assert_allclose([eight[s] for s in range(1, 21)], [reference_run[s] for s in range(1, 21)], rtol=1e-3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(workdir, *extra):
    """Both processes' stdout, after both exit 0."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            train_cmd(workdir, *extra, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def test_two_processes_match_one_process_with_two_devices(tmp_path):
    """Same losses as one process with two devices; the in-loop sample grids (80 asked
    for, capped at 64, drawn by both processes in sharded batches) are written by process
    0 alone; a damaged newest checkpoint is set aside once and both processes fall back."""
    single = tmp_path / "single"
    run_train(single, "--config.train.steps=12", env=_env(2))
    multi = tmp_path / "multi"
    sampling = ["--config.evals.grid.every=6", "--config.sample.num_steps=2", "--config.sample.num_per_class=8", "--config.sample.batch_size=16"]
    outs = _run_two_processes(multi, "--config.train.steps=12", *sampling)
    a, b = losses(single), losses(multi)
    np.testing.assert_allclose([b[s] for s in range(1, 13)], [a[s] for s in range(1, 13)], rtol=1e-5)
    assert sorted(os.listdir(multi / "samples")) == ["step_0000006.png", "step_0000012.png"]
    assert outs[0].count("sample grid of 64 written") == 2 and "sample grid" not in outs[1]
    grid_rows = [r["step"] for r in map(json.loads, open(multi / "metrics.jsonl")) if "grid/seconds" in r]
    assert grid_rows == [6, 12]  # one row per evaluation, written by process 0 alone
    from PIL import Image

    from skipdit_jax import images

    # 64 cells of 8x8 in a square grid, each cell upscaled 8x: what 64 samples make.
    expected = images.make_grid(np.zeros((64, 8, 8, 1), np.uint8)).shape[:2]
    with Image.open(multi / "samples" / "step_0000012.png") as im:
        assert (im.height, im.width) == (expected[0] * 8, expected[1] * 8)

    _garble_every_file(multi / "checkpoints" / "12")
    outs = _run_two_processes(multi, "--config.train.steps=12")
    assert "falling back to step 8" in outs[0] and "falling back" not in outs[1]
    assert sorted(os.listdir(multi / "checkpoints")) == ["12", "12.damaged", "8"]  # checkpoint.keep=2
    b = losses(multi)
    np.testing.assert_allclose([b[s] for s in range(1, 13)], [a[s] for s in range(1, 13)], rtol=1e-5)


def test_profiler_trace_and_gradient_accumulation(tmp_path):
    """A run with train.profile_steps writes one TensorBoard profile (process 0's), and a
    run with train.grad_accum_steps trains and logs every step."""
    workdir = tmp_path / "run"
    run_train(workdir, "--config.train.steps=4", "--config.train.grad_accum_steps=2", "--config.train.profile_steps=2", "--config.train.profile_after=1")
    traces = list((workdir / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert sorted(losses(workdir)) == [1, 2, 3, 4]


CONFIG_ERRORS = [
    (["--config.model.depth=3"], "depth must be even"),
    (["--config.data.image_size=10", "--config.model.patch_size=4"], "not divisible by patch_size"),
    (["--config.train.global_batch_size=6", "--config.mesh.data=4"], "not divisible by the 4"),
    (["--config.data.name=folder", "--config.data.path=/nonexistent/folder"], "data folder not found"),
    (["--config.train.stpes=3"], "stpes"),
    (["--config.mesh.data=3"], "does not match the 4 devices"),
    (["--config.train.grad_accum_steps=4"], "not divisible by train.grad_accum_steps 4 x 4 devices"),
    (["--config.train.profile_steps=-1"], "profile_steps must be >= 0"),
    (["--config.evals.grid.every=-1"], "evals.grid.every must be an integer >= 0 (0 = off), got -1"),
]

# Runs `skipdit train` as `skipdit_jax.cli.run` does (XLA flag tuning, then main) for each
# argv of the JSON list sys.argv[1], each with its own stdout/stderr files under sys.argv[2]
# (i.out, i.err) bound to file descriptors 1 and 2, so that output from C++ is caught too;
# prints the exit statuses as JSON. The first run's capture starts before anything is
# imported, so it sees everything a fresh `skipdit` process would print.
_CLI_DRIVER = """
import json, os, sys, traceback
runs, out_dir = json.loads(sys.argv[1]), sys.argv[2]
codes = []
for i, argv in enumerate(runs):
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(f"{out_dir}/{i}.out", "w") as out, open(f"{out_dir}/{i}.err", "w") as err:
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        try:
            from skipdit_jax.cli import main
            from skipdit_jax.xla_tuning import tune_xla_cpu_flags
            tune_xla_cpu_flags()
            sys.argv = ["skipdit", *argv]  # config_flags reads the --config.* overrides from sys.argv
            code = main(sys.argv)
        except SystemExit as e:
            code = e.code
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    codes.append(code)
print(json.dumps(codes))
"""


@pytest.fixture(scope="module")
def config_error_runs(tmp_path_factory):
    """(exit status, stdout, stderr) of `skipdit train` with each of CONFIG_ERRORS (each its
    own workdir), all run one after another by one process with 4 devices: one start-up
    instead of nine."""
    out = tmp_path_factory.mktemp("config_errors")
    runs = [train_cmd(out / f"w{i}", *overrides)[3:] for i, (overrides, _) in enumerate(CONFIG_ERRORS)]
    cmd = [sys.executable, "-c", _CLI_DRIVER, json.dumps(runs), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(4), timeout=600)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr[-3000:]
    codes = json.loads(res.stdout)
    assert len(codes) == len(CONFIG_ERRORS)
    return [(code, (out / f"{i}.out").read_text(), (out / f"{i}.err").read_text()) for i, code in enumerate(codes)]


@pytest.mark.parametrize("overrides,needle", CONFIG_ERRORS)
def test_config_errors_are_one_line_before_compiling(config_error_runs, overrides, needle):
    returncode, stdout, stderr = config_error_runs[CONFIG_ERRORS.index((overrides, needle))]
    assert returncode == 2, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("I1", "W1"))]
    assert len(lines) == 1 and lines[0].startswith("skipdit: error:") and needle in lines[0], stderr[-2000:]
    assert "compiled" not in stdout


def test_gs_workdir_trains_resumes_and_samples(tmp_path):
    """A gs:// workdir (the fake of tests/fake_gcs.py, installed in the training process):
    checkpoints, metrics (rewritten whole, never appended), samples and the resume all go
    through epath/Orbax; nothing lands in a local "gs:" folder. The grid is asked for with
    the old spelling, `sample.every`."""
    pytest.importorskip("fake_gcs")
    root, cwd = tmp_path / "gcs", tmp_path / "cwd"
    cwd.mkdir()
    script = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import fake_gcs; "
        f"fake_gcs.install({str(root)!r}); from skipdit_jax.cli import run; sys.argv = ['skipdit'] + sys.argv[1:]; run()"
    )
    for steps in (4, 6):
        cmd = [sys.executable, "-c", script, *train_cmd("gs://bucket/run", f"--config.train.steps={steps}", "--config.sample.every=4", "--config.sample.num_steps=2")[3:]]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    run = root / "bucket" / "run"
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]
    assert (run / "samples" / "step_0000004.png").exists() and {"4", "6"} <= set(os.listdir(run / "checkpoints"))
    # ...and the trained workdir samples from gs:// to gs://.
    sample = ["sample", "gs://bucket/run", "--out=gs://bucket/out", "--sampler=ddim", "--steps=2", "--labels=0,1,2", "--cfg_scale=2"]
    res = subprocess.run([sys.executable, "-c", script, *sample], capture_output=True, text=True, cwd=cwd, env=_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = root / "bucket" / "out"
    assert np.load(out / "samples.npy").shape == (3, 8, 8, 1)
    assert json.loads((out / "samples.json").read_text())["labels"] == [0, 1, 2]
    assert not list(cwd.rglob("gs:"))


# ---- in-process: restore decisions, load_trained, remote data paths ----------------------------
def _tiny_config(width=16):
    from skipdit_jax.training import config as train_config

    c = train_config.default_config()
    c.model.update(depth=2, hidden_size=width, num_heads=2, patch_size=2)
    c.data.update(image_size=8)
    c.train.update(global_batch_size=8)
    c.checkpoint.update(async_save=False)
    return train_config.finalize(c)


def _abstract_state(config):
    """(family, tx, shardings, abstract state with shardings) as the trainer builds them."""
    import jax

    from skipdit_jax import sharding
    from skipdit_jax.models.families import family_of
    from skipdit_jax.training import config as train_config, optim
    from skipdit_jax.training.train import _opt_cfg, train_state_shardings
    from skipdit_jax.training.train_step import init_train_state

    family = family_of(train_config.validate(config, 1))
    tx = optim.make_optimizer(_opt_cfg(config), family.abstract_params())
    abstract = jax.eval_shape(lambda p: init_train_state(p, tx), family.abstract_params())
    shardings = train_state_shardings(abstract, sharding.make_mesh(-1, 1), 0, [])
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return family, tx, shardings, abstract


def _iterator(config):
    from skipdit_jax import data as data_lib
    from skipdit_jax.training.train import make_source

    return data_lib.make_train_iterator(make_source(config), global_batch_size=8, seed=0)


@pytest.fixture
def saved_workdir(saved_workdir_template, tmp_path):
    """A workdir with checkpoints at steps 1 and 2 (EMA = params + 1) and model_config.json
    (a fresh copy for each test); yields (workdir, config, the saved state)."""
    template, config, state = saved_workdir_template
    workdir = tmp_path / "saved"
    shutil.copytree(template, workdir)
    return workdir, config, state


@pytest.fixture(scope="module")
def saved_workdir_template(tmp_path_factory):
    """What `saved_workdir` copies: written once per module."""
    import jax
    import jax.numpy as jnp

    from skipdit_jax.models.families import config_to_dict
    from skipdit_jax.training import checkpoints
    from skipdit_jax.training.train import create_train_state

    config = _tiny_config()
    family, tx, shardings, _ = _abstract_state(config)
    state = create_train_state(family, config, tx, jax.random.key(0), shardings)
    state = state.replace(ema_params=jax.tree.map(lambda p: p + 1.0, state.params))
    workdir = tmp_path_factory.mktemp("saved")
    mngr = checkpoints.checkpoint_manager(workdir, config)
    for step in (1, 2):
        checkpoints.save(mngr, step, state.replace(step=jnp.int32(step)), jax.random.key(1), _iterator(config), config)
    mngr.wait_until_finished()
    mngr.close()
    (workdir / checkpoints.MODEL_CONFIG_FILE).write_text(json.dumps(config_to_dict(family.config)))
    return workdir, config, state


@pytest.mark.parametrize("error", [OSError("Connection reset by peer"), MemoryError(), ValueError("RESOURCE_EXHAUSTED: out of memory")])
def test_a_restore_failure_that_is_not_damage_touches_nothing(saved_workdir, monkeypatch, error):
    import orbax.checkpoint as ocp

    from skipdit_jax.errors import CheckpointError
    from skipdit_jax.training import checkpoints

    workdir, config, _ = saved_workdir
    before = sorted(os.listdir(workdir / "checkpoints"))

    def failing_restore(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, "restore", failing_restore)
    mngr = checkpoints.checkpoint_manager(workdir, config)
    with pytest.raises(CheckpointError, match="step 2.*nothing was changed"):
        checkpoints.restore_latest(mngr, _abstract_state(config)[3], _iterator(config))
    assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_restore_sorts_damage_from_mismatch(saved_workdir):
    """In-process view of the decision: damage is read off the step's files, a config
    change off the metadata (never the other way round)."""
    from skipdit_jax.errors import CheckpointError
    from skipdit_jax.training import checkpoints

    workdir, config, _ = saved_workdir
    step2 = workdir / "checkpoints" / "2"
    assert checkpoints.missing_or_unreadable(step2) is None
    mngr = checkpoints.checkpoint_manager(workdir, config)
    with pytest.raises(CheckpointError, match="does not fit"):
        checkpoints.restore_latest(mngr, _abstract_state(_tiny_config(width=32))[3], _iterator(config))
    data = step2 / "data" / "process_0-of-1.json"
    data.rename(data.with_name("process_0-of-2.json"))  # as if saved by 2 processes
    with pytest.raises(CheckpointError, match="saved by 2 processes but this run has 1"):
        checkpoints.restore_latest(mngr, _abstract_state(config)[3], _iterator(config))
    data.with_name("process_0-of-2.json").rename(data)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    (step2 / "state" / "_METADATA").write_text('{"tree_metadata": {"par')  # truncated
    assert "not valid JSON" in checkpoints.missing_or_unreadable(step2)
    state, _ = checkpoints.restore_latest(checkpoints.checkpoint_manager(workdir, config), _abstract_state(config)[3], _iterator(config))
    assert int(state.step) == 1 and sorted(os.listdir(workdir / "checkpoints")) == ["1", "2.damaged"]


@pytest.mark.parametrize("use_ema", [True, False])
def test_load_trained_reads_only_the_returned_parameters(saved_workdir, monkeypatch, use_ema):
    import jax
    import orbax.checkpoint as ocp

    from skipdit_jax.training.checkpoints import load_trained

    workdir, _, state = saved_workdir
    read = []
    handlers = [ocp.type_handlers.ArrayHandler, ocp.type_handlers.NumpyHandler, ocp.type_handlers.ScalarHandler]
    for cls in handlers:
        original = cls.deserialize

        async def spy(self, infos, args=None, _original=original):
            read.extend(info.name for info in infos)
            return await _original(self, infos, args)

        monkeypatch.setattr(cls, "deserialize", spy)
    _, params = load_trained(workdir, use_ema=use_ema)
    key = "ema_params" if use_ema else "params"
    expected = state.ema_params if use_ema else state.params
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Only that subtree was read: not the other copy, not the optimizer's moments.
    assert read and all(name.startswith(key + ".") for name in read), sorted({n.split(".")[0] for n in read})
    assert len(read) == len(jax.tree.leaves(expected))


def test_a_remote_data_folder_is_accepted(tmp_path, monkeypatch):
    """data.path goes through epath, so a gs:// image folder passes validation (and a
    missing one is still reported)."""
    fake_gcs = pytest.importorskip("fake_gcs")
    from skipdit_jax.errors import ConfigError
    from skipdit_jax.training import config as train_config

    monkeypatch.chdir(tmp_path)
    with fake_gcs.installed(tmp_path / "gcs") as root:
        (root / "bucket" / "images" / "cat").mkdir(parents=True)
        config = _tiny_config()
        config.data.update(name="folder", path="gs://bucket/images", num_classes=1)
        train_config.validate(config, 1)
        config.data.path = "gs://bucket/missing"
        with pytest.raises(ConfigError, match="data folder not found"):
            train_config.validate(config, 1)
