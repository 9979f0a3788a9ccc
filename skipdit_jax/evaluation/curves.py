"""Metric-vs-training-steps curves from runs' `WORKDIR/metrics.jsonl`, the first step at
which each run reaches a target value, and the ratio of those steps between runs (the
paper's "4.4x": DiT-XL/2 reaches FID 9.49 at ~7M steps, Skip-DiT at ~1.6M).

The trainer logs an in-loop evaluation as its own row, `{"step": s, "<evaluator>/<metric>": v}`
(e.g. "fid/fid", "mnist_fid/classifier_fid"); training rows ("loss", ...) are other rows of
the same file. Files are read with the trainer's reader (a torn last line is dropped),
local or `gs://`.

Crossing rule. `mode="min"` (FID-like: lower is better) looks for the first evaluation with
value <= target, `mode="max"` (accuracy-like) for value >= target. The *logged* step is that
evaluation's step: the run had reached the target by then, and had not at the evaluation
before, so the true crossing lies in (previous step, logged step]. The *interpolated* step
assumes the metric moves linearly in steps between those two evaluations. When the very
first evaluation already reaches the target there is nothing to interpolate from: the
interpolated step is the logged one (`at_first_evaluation` says so). Non-finite values
(logged as "nan"/"inf") never reach a target.

Ratios. The reference is the run that reaches the target in the fewest logged steps
(ties: the fewest interpolated steps, then the first given); every other run's crossing
step is divided by the reference's, on logged and on interpolated steps. A run that never
reaches the target gives a lower bound: its crossing lies beyond its last evaluation, so
the ratio is more than last_step / reference step (`lower_bound: true`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re

import numpy as np

from skipdit_jax import paths
from skipdit_jax.errors import UserError
from skipdit_jax.training.metric_logging import FILENAME, read_metrics

INTERPOLATION = "linear in steps between the last evaluation short of the target and the first that reaches it"

# Metric names (the part after the last "/") whose lower / higher values are better.
_LOWER_IS_BETTER = re.compile(r"fid|kid|loss|lpips|err|distance|mse")
_HIGHER_IS_BETTER = re.compile(r"acc|precision|recall|inception_score|^is$|psnr|ssim|score")


@dataclasses.dataclass
class Curve:
    """One run's metric: `steps` (int, increasing) and `values` (float; NaN/inf kept)."""

    label: str
    workdir: str
    metric: str
    steps: np.ndarray
    values: np.ndarray


@dataclasses.dataclass
class Crossing:
    """Where a curve first reaches a target; `step` is None when it never does."""

    step: int | None
    interpolated_step: float | None
    value: float | None
    at_first_evaluation: bool = False

    @property
    def reached(self) -> bool:
        return self.step is not None


# ---- reading ------------------------------------------------------------------------------------
def read_rows(workdir) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl; a missing workdir or file is a one-line UserError."""
    path = paths.as_path(workdir)
    if not path.exists():
        raise UserError(f"workdir not found: {workdir}")
    if not (path / FILENAME).exists():
        raise UserError(f"{workdir} has no {FILENAME} (not a training workdir, or nothing logged yet)")
    return read_metrics(path)


def metric_keys(rows: list[dict]) -> list[str]:
    """Every logged key but "step", sorted."""
    return sorted({k for r in rows for k in r if k != "step"})


def _is_fid_key(key: str) -> bool:
    """Ends in "fid" as a word: "fid/fid", "mnist_fid/classifier_fid"; not "fid/sfid"."""
    name = key.rsplit("/", 1)[-1].lower()
    return name == "fid" or name.endswith("_fid")


def choose_metric(rows_by_run: dict[str, list[dict]], metric: str | None) -> str:
    """`metric` itself when given, else the only FID key logged by any run (see
    `_is_fid_key`); none or several is a one-line UserError naming the candidates."""
    if metric:
        return metric
    keys = sorted({k for rows in rows_by_run.values() for k in metric_keys(rows)})
    fids = [k for k in keys if _is_fid_key(k)]
    if len(fids) == 1:
        return fids[0]
    if not fids:
        shown = ", ".join(keys) if keys else "none"
        raise UserError(f"no FID metric (a key ending in 'fid') in {', '.join(rows_by_run)}; pass --metric (logged keys: {shown})")
    raise UserError(f"several FID metrics: {', '.join(fids)}; pick one with --metric")


def default_mode(metric: str) -> str | None:
    """"min" for FID-like names (fid, loss, lpips, ...), "max" for accuracy-like ones
    (accuracy, precision, recall, inception_score, psnr, ...), None when the name says neither."""
    name = metric.rsplit("/", 1)[-1].lower()
    if _LOWER_IS_BETTER.search(name):
        return "min"
    if _HIGHER_IS_BETTER.search(name):
        return "max"
    return None


def _as_float(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise UserError(f"{where}: {v!r} is not a number")
    try:
        return float(v)  # the writer logs non-finite values as "nan" / "inf" strings
    except ValueError:
        raise UserError(f"{where}: {v!r} is not a number") from None


def curve_from_rows(rows: list[dict], metric: str, *, label: str, workdir: str = "") -> Curve:
    """The `metric` rows as a curve, sorted by step; a step logged twice keeps its last row.
    A run without the metric is a one-line UserError naming the keys it has."""
    by_step: dict[int, float] = {}
    for r in rows:
        if metric in r:
            by_step[int(r["step"])] = _as_float(r[metric], f"{workdir or label} step {r.get('step')} {metric}")
    if not by_step:
        keys = metric_keys(rows)
        raise UserError(f"{workdir or label} has no {metric!r} rows (logged keys: {', '.join(keys) or 'none'})")
    steps = np.asarray(sorted(by_step), np.int64)
    return Curve(label, str(workdir), metric, steps, np.asarray([by_step[s] for s in steps], np.float64))


def read_curve(workdir, metric: str, label: str | None = None) -> Curve:
    return curve_from_rows(read_rows(workdir), metric, label=label or default_labels([workdir])[0], workdir=str(workdir))


def default_labels(workdirs) -> list[str]:
    """Each workdir's last path component; more components where two would look alike."""
    parts = [[p for p in str(w).rstrip("/").replace("://", "/").split("/") if p] or [str(w)] for w in workdirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{w}" for i, w in enumerate(workdirs)]


# ---- crossings and ratios ---------------------------------------------------------------------
def _reaches(value: float, target: float, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    return value <= target if mode == "min" else value >= target


def first_crossing(steps, values, target: float, mode: str) -> Crossing:
    """The first evaluation that reaches `target` (see the module docstring for the rule)."""
    if mode not in ("min", "max"):
        raise UserError(f"mode must be 'min' or 'max', got {mode!r}")
    steps, values = np.asarray(steps), np.asarray(values, np.float64)
    for i, (s, v) in enumerate(zip(steps, values)):
        if not _reaches(float(v), target, mode):
            continue
        if i == 0 or not math.isfinite(values[i - 1]):
            return Crossing(int(s), float(s), float(v), at_first_evaluation=i == 0)
        s0, v0 = float(steps[i - 1]), float(values[i - 1])
        # v0 is short of the target and v reaches it, so v != v0 and the fraction is in (0, 1].
        frac = (target - v0) / (float(v) - v0)
        return Crossing(int(s), s0 + frac * (float(s) - s0), float(v))
    return Crossing(None, None, None)


def _best(curve: Curve, mode: str | None) -> dict | None:
    finite = np.isfinite(curve.values)
    if not finite.any():
        return None
    idx = np.flatnonzero(finite)
    vals = curve.values[idx]
    i = idx[int(np.argmax(vals) if mode == "max" else np.argmin(vals))]
    return {"step": int(curve.steps[i]), "value": float(curve.values[i])}


def _value(v: float):
    return float(v) if math.isfinite(v) else str(v)


def summarize(curves: list[Curve], target: float | None = None, mode: str | None = None) -> dict:
    """The JSON-ready summary: every run's evaluations, best and final values, and with a
    `target` its crossing (logged and interpolated) and the step ratios between runs."""
    if target is not None and mode not in ("min", "max"):
        raise UserError(f"mode must be 'min' or 'max' with a target, got {mode!r}")
    metric = curves[0].metric if curves else None
    out = {"metric": metric, "mode": mode, "target": target, "interpolation": INTERPOLATION if target is not None else None, "runs": []}
    crossings = []
    for c in curves:
        run = {
            "label": c.label,
            "workdir": c.workdir,
            "evaluations": len(c.steps),
            "first_step": int(c.steps[0]),
            "last_step": int(c.steps[-1]),
            "final": {"step": int(c.steps[-1]), "value": _value(c.values[-1])},
            "best": _best(c, mode),
            "curve": {"steps": [int(s) for s in c.steps], "values": [_value(v) for v in c.values]},
        }
        if target is not None:
            x = first_crossing(c.steps, c.values, target, mode)
            crossings.append(x)
            run.update(
                reached=x.reached, step=x.step, interpolated_step=None if x.interpolated_step is None else round(x.interpolated_step, 3),
                value_at_step=x.value, at_first_evaluation=x.at_first_evaluation,
            )
        out["runs"].append(run)
    if target is None:
        return out
    reached = [i for i, x in enumerate(crossings) if x.reached]
    out["reference"] = None
    out["ratios"] = []
    if not reached:
        return out
    ref = min(reached, key=lambda i: (crossings[i].step, crossings[i].interpolated_step, i))
    rx = crossings[ref]
    out["reference"] = curves[ref].label
    for i, (c, x) in enumerate(zip(curves, crossings)):
        if i == ref:
            continue
        steps, interp = (x.step, x.interpolated_step) if x.reached else (int(c.steps[-1]), float(c.steps[-1]))
        out["ratios"].append(
            {
                "run": c.label,
                "reference": curves[ref].label,
                "ratio": round(steps / rx.step, 4) if rx.step > 0 else None,
                "interpolated_ratio": round(interp / rx.interpolated_step, 4) if rx.interpolated_step > 0 else None,
                "lower_bound": not x.reached,
            }
        )
    return out


def describe(summary: dict) -> list[str]:
    """The summary as printed lines: one per run (and a header, and a line when no run reaches
    the target)."""
    metric, target, mode = summary["metric"], summary["target"], summary["mode"]
    lines = []
    if target is None:
        for r in summary["runs"]:
            best = r["best"]
            best_text = f"best {best['value']:.4g} at step {best['step']}, " if best and mode else ""
            lines.append(f"{r['label']}: {r['evaluations']} evaluations of {metric}, {best_text}final {_fmt(r['final']['value'])} at step {r['final']['step']}")
        return lines
    op = "<=" if mode == "min" else ">="
    lines.append(f"first step with {metric} {op} {target:g} (interpolated: {INTERPOLATION})")
    ratios = {r["run"]: r for r in summary.get("ratios", [])}
    for r in summary["runs"]:
        if r["reached"]:
            first = " (its first evaluation)" if r["at_first_evaluation"] else ""
            text = f"{r['label']}: step {r['step']}{first}, interpolated {r['interpolated_step']:.0f} ({metric} {r['value_at_step']:.4g})"
        else:
            best = r["best"]
            best_text = f"; best {best['value']:.4g} at step {best['step']}" if best else ""
            text = f"{r['label']}: never reached by step {r['last_step']}{best_text}"
        q = ratios.get(r["label"])
        if q is not None:
            gt = "> " if q["lower_bound"] else ""
            text += f" -> {gt}{_fmt_ratio(q['ratio'])} the steps of {q['reference']} (interpolated {gt}{_fmt_ratio(q['interpolated_ratio'])})"
        lines.append(text)
    if summary.get("reference") is None:
        lines.append(f"no run reaches {metric} {op} {target:g}")
    return lines


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _fmt_ratio(r) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


# ---- the plot -----------------------------------------------------------------------------------
def _linear_segments(steps: np.ndarray, values: np.ndarray, points: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """The polyline between evaluations, densified so that on a log-x axis it shows the
    linear-in-steps interpolation the crossings use (a straight segment there would be
    linear in log steps, and the crossing marker would sit off the line)."""
    if len(steps) < 2:
        return steps.astype(np.float64), values
    t = np.linspace(0.0, 1.0, points, endpoint=False)
    xs = [s0 + t * (s1 - s0) for s0, s1 in zip(steps[:-1], steps[1:])]
    ys = [v0 + t * (v1 - v0) for v0, v1 in zip(values[:-1], values[1:])]
    return np.concatenate([*xs, steps[-1:]]).astype(np.float64), np.concatenate([*ys, values[-1:]])


def plot(curves: list[Curve], path, summary: dict | None = None, title: str | None = None) -> None:
    """All curves on one log-x axis (matplotlib Agg), the target as a dashed line and each
    run's interpolated crossing as a marker; written atomically as PNG. Evaluations at
    step 0 cannot sit on a log axis and are left out of the picture (not of the summary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summary or {}
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    runs = {r["label"]: r for r in summary.get("runs", [])}
    for c in curves:
        keep = (c.steps > 0) & np.isfinite(c.values)
        xs, ys = _linear_segments(c.steps[keep], c.values[keep])
        (line,) = ax.plot(xs, ys, lw=1.2, label=c.label)
        ax.plot(c.steps[keep], c.values[keep], "o", ms=3, color=line.get_color())
        r = runs.get(c.label, {})
        if r.get("reached"):
            s = max(r["interpolated_step"], 1e-9)
            ax.plot([s], [summary["target"]], marker="*", ms=11, color=line.get_color(), mec="black", mew=0.5, zorder=5)
            ax.axvline(s, color=line.get_color(), ls=":", lw=0.8)
    if summary.get("target") is not None:
        ax.axhline(summary["target"], color="gray", ls="--", lw=1, label=f"target {summary['target']:g}")
    ax.set_xscale("log")
    metric = curves[0].metric if curves else ""
    ax.set(xlabel="training steps", ylabel=metric, title=title or f"{metric} vs training steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    paths.atomic_write_bytes(path, buf.getvalue())


def write(curves: list[Curve], png, target: float | None = None, mode: str | None = None, title: str | None = None) -> dict:
    """Summarise, plot to `png` and write the summary beside it (same name, .json);
    returns the summary."""
    summary = summarize(curves, target, mode)
    png = paths.as_path(png)
    plot(curves, png, summary, title)
    paths.atomic_write_text(png.with_suffix(".json"), json.dumps(summary, indent=2))
    return summary
