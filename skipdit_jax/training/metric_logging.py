"""Training metrics: `WORKDIR/metrics.jsonl` (one JSON object per logged step) and
TensorBoard event files, written by process 0 only."""

from __future__ import annotations

import json
import math

import jax
from etils import epath


class MetricWriter:
    """Appends metrics to metrics.jsonl and TensorBoard. On resume, lines past the restored
    step are dropped from metrics.jsonl (they came from steps that are about to be redone),
    so the file reads as one uninterrupted run."""

    def __init__(self, workdir, resume_step: int = 0, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not self.active:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
            except ImportError:  # optional: metrics.jsonl still has everything
                self._tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def write_image(self, step: int, name: str, image_hwc_uint8) -> None:
        if self.active and self._tb is not None:
            self._tb.add_image(name, image_hwc_uint8, step, dataformats="HWC")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(workdir) -> list[dict]:
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
