"""Training metrics: `WORKDIR/metrics.jsonl` (one JSON object per logged step) and
TensorBoard event files, written by process 0 only, local or remote (`gs://`).

Local files are appended to. Object stores have no reliable append, so for a remote
workdir the writer keeps the rows and rewrites the whole file atomically at each write:
a reader always sees a complete file. A crash in the middle of a local append can leave a
torn last line; readers drop it.
"""

from __future__ import annotations

import json
import math

import jax
from absl import logging

from skipdit_jax import paths
from skipdit_jax.errors import UserError

FILENAME = "metrics.jsonl"


def _parse(text: str, where) -> list[dict]:
    """The rows of a metrics.jsonl text. An undecodable *last* line is a torn append (the
    process died mid-write) and is dropped; an undecodable line elsewhere is an error."""
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i + 1 < len(lines):
                raise UserError(f"{where} line {i + 1} is not JSON ({e}); only the last line can be torn by a crash") from None
            logging.warning("dropping the torn last line of %s: %r", where, line[:80])
    return rows


def _dumps(row: dict) -> str:
    return json.dumps(row) + "\n"


class MetricWriter:
    """Writes metrics to metrics.jsonl and TensorBoard. On resume, rows past the restored
    step are dropped from metrics.jsonl (they came from steps that are about to be redone),
    so the file reads as one uninterrupted run.

    `append`: None (default) appends to local files and rewrites remote ones whole."""

    def __init__(self, workdir, resume_step: int = 0, tensorboard: bool = True, append: bool | None = None):
        self.active = jax.process_index() == 0
        workdir = paths.as_path(workdir)
        self.path = workdir / FILENAME
        self._append = (not paths.is_uri(self.path)) if append is None else append
        self._lines: list[str] = []  # the whole file, when rewriting it at each write
        self._tb = None
        if not self.active:
            return
        if self.path.exists():
            kept = [_dumps(r) for r in _parse(self.path.read_text(), self.path) if r["step"] <= resume_step]
            paths.atomic_write_text(self.path, "".join(kept))  # also drops a torn last line
            self._lines = [] if self._append else kept
        if tensorboard:
            self._tb = _summary_writer(workdir / "tensorboard")

    def write(self, step: int, metrics: dict, tensorboard_prefix: str = "train") -> None:
        """One row of metrics.jsonl; the same scalars in TensorBoard as `PREFIX/key`
        (evaluations use "eval", so their curves sit apart from the training curves)."""
        if not self.active:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
        if self._append:
            with self.path.open("a") as f:
                f.write(_dumps(row))
        else:
            self._lines.append(_dumps(row))
            paths.atomic_write_text(self.path, "".join(self._lines))
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self._tb.add_scalar(f"{tensorboard_prefix}/{k}", v, step)

    def write_image(self, step: int, name: str, image_hwc_uint8) -> None:
        if self.active and self._tb is not None:
            self._tb.add_image(name, image_hwc_uint8, step, dataformats="HWC")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _summary_writer(logdir):
    """A tensorboardX writer, or None (with a warning) when it cannot write there: it is
    optional, metrics.jsonl has everything (gs:// needs google-cloud-storage)."""
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter(str(logdir))
    except (ImportError, OSError) as e:
        logging.warning("no TensorBoard events (%s); metrics.jsonl has every metric", e)
        return None


def read_metrics(workdir) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl (a torn last line dropped); [] when there is none."""
    path = paths.as_path(workdir) / FILENAME
    if not path.exists():
        return []
    return _parse(path.read_text(), path)
