"""The XLA CPU flags the `skipdit` command sets: added once, never over a user's choice,
switchable off, and accepted by the installed jaxlib (an unknown flag would abort)."""

import os
import subprocess
import sys

from skipdit_jax import xla_tuning


def test_adds_flags_once_and_keeps_user_flags(monkeypatch):
    monkeypatch.delenv("SKIPDIT_NO_XLA_TUNING", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setattr(xla_tuning, "_jaxlib_version", lambda: xla_tuning._TESTED_JAXLIB[0])
    assert xla_tuning.tune_xla_cpu_flags() == list(xla_tuning.CPU_FLAGS)
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_force_host_platform_device_count=2"
    assert set(xla_tuning.CPU_FLAGS) <= set(flags)
    assert xla_tuning.tune_xla_cpu_flags() == []  # idempotent
    assert os.environ["XLA_FLAGS"].split() == flags


def test_respects_user_value_opt_out_and_untested_versions(monkeypatch):
    monkeypatch.setattr(xla_tuning, "_jaxlib_version", lambda: xla_tuning._TESTED_JAXLIB[0])
    name = xla_tuning.CPU_FLAGS[0].split("=")[0]
    monkeypatch.setenv("XLA_FLAGS", f"{name}=dot")
    assert xla_tuning.tune_xla_cpu_flags() == []
    assert os.environ["XLA_FLAGS"] == f"{name}=dot"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("SKIPDIT_NO_XLA_TUNING", "1")
    assert xla_tuning.tune_xla_cpu_flags() == []
    monkeypatch.delenv("SKIPDIT_NO_XLA_TUNING")
    monkeypatch.setattr(xla_tuning, "_jaxlib_version", lambda: (99, 0))
    assert xla_tuning.tune_xla_cpu_flags() == []
    assert os.environ["XLA_FLAGS"] == ""


def test_installed_jaxlib_accepts_the_flags():
    code = (
        "from skipdit_jax.xla_tuning import tune_xla_cpu_flags; import jax, jax.numpy as jnp; "
        "added = tune_xla_cpu_flags(); x = jnp.ones((64, 64)); print(len(added), float((x @ x).sum()))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SKIPDIT_NO_XLA_TUNING")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == str(64.0**3)
