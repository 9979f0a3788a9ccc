"""The trainer: exact resume after SIGKILL, SIGTERM, corrupt checkpoints, 1 vs 8 devices,
2 processes vs 1, and config errors. Tiny models (8x8 MNIST, depth 2, width 16)."""

import json
import os
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
    "--config.sample.every=0",
    "--config.checkpoint.every=4",
    "--config.checkpoint.async_save=False",
    "--config.optimizer.warmup_steps=0",
    "--config.optimizer.decay=constant",  # runs of different lengths share a schedule
]


def train_cmd(workdir, *extra):
    return [sys.executable, "-m", "skipdit_jax.cli", "train", "--config", CONFIG, "--workdir", str(workdir), *TINY, *extra]


def run_train(workdir, *extra, env=None, timeout=600):
    res = subprocess.run(train_cmd(workdir, *extra), capture_output=True, text=True, env=env, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows}


def _env(devices=None):
    env = dict(os.environ)
    if devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    return env


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 40-step run, the baseline of the resume tests."""
    workdir = tmp_path_factory.mktemp("reference")
    run_train(workdir, "--config.train.steps=40")
    return losses(workdir)


def test_sigkill_then_restart_gives_the_same_losses(tmp_path, reference_run):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(workdir, "--config.train.steps=40"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    proc = subprocess.Popen(train_cmd(workdir, "--config.train.steps=100000", "--config.checkpoint.every=100000"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def test_corrupt_newest_checkpoint_falls_back(tmp_path, reference_run):
    workdir = tmp_path / "run"
    run_train(workdir, "--config.train.steps=12")
    newest = workdir / "checkpoints" / "12" / "state"
    for root, _, files in os.walk(newest):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    res = run_train(workdir, "--config.train.steps=40")
    assert "unreadable" in res.stdout and "falling back to step 8" in res.stdout
    resumed = losses(workdir)
    np.testing.assert_allclose([resumed[s] for s in range(1, 41)], [reference_run[s] for s in range(1, 41)], rtol=1e-6)


def test_eight_devices_fsdp_match_one_device(tmp_path, reference_run):
    workdir = tmp_path / "run8"
    run_train(workdir, "--config.train.steps=20", "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.mesh.min_shard_size=0", env=_env(8))
    eight = losses(workdir)
    np.testing.assert_allclose([eight[s] for s in range(1, 21)], [reference_run[s] for s in range(1, 21)], rtol=1e-3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_two_devices(tmp_path):
    single = tmp_path / "single"
    run_train(single, "--config.train.steps=12", env=_env(2))
    multi = tmp_path / "multi"
    port = _free_port()
    procs = [
        subprocess.Popen(
            train_cmd(multi, "--config.train.steps=12", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        )
        for i in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    a, b = losses(single), losses(multi)
    np.testing.assert_allclose([b[s] for s in range(1, 13)], [a[s] for s in range(1, 13)], rtol=1e-5)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["--config.model.depth=3"], "depth must be even"),
        (["--config.data.image_size=10", "--config.model.patch_size=4"], "not divisible by patch_size"),
        (["--config.train.global_batch_size=6", "--config.mesh.data=4"], "not divisible by the 4"),
        (["--config.data.name=folder", "--config.data.path=/nonexistent/folder"], "data folder not found"),
        (["--config.train.stpes=3"], "stpes"),
        (["--config.mesh.data=3"], "does not match the 4 devices"),
    ],
)
def test_config_errors_are_one_line_before_compiling(tmp_path, overrides, needle):
    res = subprocess.run(train_cmd(tmp_path / "w", *overrides), capture_output=True, text=True, env=_env(4), timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith(("I1", "W1"))]
    assert len(lines) == 1 and lines[0].startswith("skipdit: error:") and needle in lines[0], res.stderr[-2000:]
    assert "compiled" not in res.stdout
