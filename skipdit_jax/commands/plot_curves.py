"""`skipdit plot-curves WORKDIR [WORKDIR ...]`: a logged metric (FID by default) against
training steps for every run on one log-x axis, the first step at which each run reaches
`--target`, and the ratio of those steps between runs (`skipdit_jax.evaluation.curves`
states the rules). Writes the PNG and a JSON summary beside it (same name, .json)."""

from __future__ import annotations

from absl import flags

from skipdit_jax.errors import UserError

USAGE = "WORKDIR [WORKDIR ...] [--metric fid/fid] [--target 9.49] [--mode min|max] [--labels a,b] [--out curves.png]"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("metric", None, "the full logged key, e.g. fid/fid or mnist_fid/classifier_fid (default: the only key ending in 'fid')", flag_values=fv)
    flags.DEFINE_float("target", None, "report the first step at which each run reaches this value", flag_values=fv)
    flags.DEFINE_enum("mode", None, ["min", "max"], "min: reached at value <= target (FID-like); max: >= (accuracy-like); default from the metric's name", flag_values=fv)
    flags.DEFINE_string("labels", None, "comma-separated legend labels, one per workdir (default: the workdirs' names)", flag_values=fv)
    flags.DEFINE_string("out", "curves.png", "the PNG to write (local or gs://); the summary goes beside it as .json", flag_values=fv)
    flags.DEFINE_string("title", None, "plot title (default: METRIC vs training steps)", flag_values=fv)


def main(args: list[str], fv: flags.FlagValues) -> int:
    if not args:
        raise UserError(f"give at least one workdir; usage: skipdit plot-curves {USAGE}")
    if not fv.out.lower().endswith(".png"):
        raise UserError(f"--out {fv.out!r} must name a .png file")
    labels = None
    if fv.labels is not None:
        labels = [s.strip() for s in fv.labels.split(",")]
        if len(labels) != len(args) or not all(labels):
            raise UserError(f"--labels {fv.labels!r} must give {len(args)} non-empty comma-separated names, one per workdir")
        if len(set(labels)) != len(labels):
            raise UserError(f"--labels {fv.labels!r} must give distinct names")
    from skipdit_jax import paths
    from skipdit_jax.evaluation import curves as C

    labels = labels or C.default_labels(args)
    rows = {w: C.read_rows(w) for w in args}  # every input is checked before anything is drawn
    metric = C.choose_metric(rows, fv.metric)
    mode = fv.mode or C.default_mode(metric)
    if fv.target is not None and mode is None:
        raise UserError(f"cannot tell from its name whether a lower or higher {metric} is better; pass --mode min or --mode max")
    runs = [C.curve_from_rows(rows[w], metric, label=lab, workdir=w) for w, lab in zip(args, labels)]
    summary = C.write(runs, fv.out, fv.target, mode, fv.title)
    for line in C.describe(summary):
        print(line)
    out = paths.as_path(fv.out)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
