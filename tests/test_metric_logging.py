"""metrics.jsonl: a torn last line (a crash mid-append) neither blocks a restart nor the
readers; remote (gs://) workdirs are rewritten whole and atomically, never appended to."""

import json

import pytest

from skipdit_jax.errors import UserError
from skipdit_jax.training.metric_logging import MetricWriter, read_metrics


def _rows(*steps):
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def test_torn_last_line_is_dropped_on_restart_and_by_readers(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(1, 2, 3, 4) + '{"step": 5, "lo')  # killed in the middle of an append
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    w = MetricWriter(tmp_path, resume_step=3, tensorboard=False)
    w.write(4, {"loss": 0.5})
    w.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert path.read_text().endswith("}\n") and path.read_text().count("\n") == 4


def test_a_bad_line_before_the_last_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_rows(1) + "not json\n" + _rows(2))
    with pytest.raises(UserError, match="line 2"):
        read_metrics(tmp_path)


def test_remote_workdir_is_rewritten_atomically_not_appended(tmp_path, monkeypatch):
    fake_gcs = pytest.importorskip("fake_gcs")
    from skipdit_jax import paths

    monkeypatch.chdir(tmp_path)
    with fake_gcs.installed(tmp_path / "gcs") as root:
        gpath_cls = type(paths.as_path("gs://bucket/x"))
        real_open = gpath_cls.open

        def no_append(self, mode="r", *args, **kwargs):
            assert "a" not in mode, f"appended to {self}: object stores have no reliable append"
            return real_open(self, mode, *args, **kwargs)

        monkeypatch.setattr(gpath_cls, "open", no_append)
        paths.atomic_write_text("gs://bucket/run/metrics.jsonl", _rows(1, 2, 3) + '{"step"')
        w = MetricWriter("gs://bucket/run", resume_step=2, tensorboard=False)
        for step in (3, 4):
            w.write(step, {"loss": 0.25})
            assert [r["step"] for r in read_metrics("gs://bucket/run")] == [1, 2, 3, 4][:step]
        w.close()
        local = root / "bucket" / "run" / "metrics.jsonl"
        assert [json.loads(line)["step"] for line in local.read_text().splitlines()] == [1, 2, 3, 4]
