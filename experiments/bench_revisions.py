"""Benchmark two revisions of the project side by side: did a change cost speed?

    python experiments/bench_revisions.py --base 2265d00            # vs the working tree
    python experiments/bench_revisions.py --base v1 --head v2 --rounds 3

Checks the base (and, if given, the head) revision out into temporary git worktrees and
runs each revision's own `experiments/bench_sampling.py` (DDIM-50 with guidance, Skip-DiT
depth 28 width 256, full and Skip-Cache N=2,3,4) and `experiments/bench_train.py speed`
(train step of Skip-DiT-S/2 and of depth 28 width 256, batch 8), JAX only. Runs alternate
between the revisions (base, head, base, head, ...) so that drifts of a shared machine hit
both alike; each number is the median over rounds of each run's own median. Prints a
markdown table with the ratio head / base (time: < 1 is faster) and, with --json_out,
writes the settings beside the numbers.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from absl import app, flags

flags.DEFINE_string("base", None, "git revision to compare against (required)")
flags.DEFINE_string("head", None, "git revision to measure (default: the working tree)")
flags.DEFINE_integer("rounds", 2, "alternating rounds per revision")
flags.DEFINE_integer("repeats", 3, "timed runs per setting inside each benchmark run")
flags.DEFINE_string("json_out", None, "write settings and results as JSON here")
FLAGS = flags.FLAGS

ROOT = Path(__file__).resolve().parents[1]
SAMPLING_ARGS = ["--torch=false", "--baselines=false"]
TRAIN_ARGS = ["speed", "--torch=false"]


def _worktree(rev: str, where: Path) -> Path:
    path = where / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True, capture_output=True)
    return path


def _run(tree: Path, script: str, args: list[str], out: Path) -> list[dict]:
    """One benchmark run of `tree`'s own script, importing `tree`'s package."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(tree / "experiments" / script), *args, f"--repeats={FLAGS.repeats}", f"--json_out={out}"]
    res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{script} failed in {tree}:\n{res.stderr[-3000:]}")
    text = out.read_text()
    out.unlink()
    if script == "bench_sampling.py":
        return [{"bench": "sampling", "setting": r["setting"], "seconds": r["jax_seconds"]} for r in json.loads(text)["rows"]]
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    out = []
    for r in (r for r in rows if r.get("bench") == "train_step"):
        out.append({"bench": "train_step", "setting": f"{r['model']} (block loop)", "seconds": r["jax_seconds"]})
        out.append({"bench": "train_step", "setting": f"{r['model']} (unrolled)", "seconds": r["jax_unrolled_seconds"]})
    return out


def main(_):
    if not FLAGS.base:
        raise SystemExit("--base REV is required")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {"base": _worktree(FLAGS.base, tmp), "head": _worktree(FLAGS.head, tmp) if FLAGS.head else ROOT}
        try:
            times: dict[tuple[str, str, str], list[float]] = {}
            for r in range(FLAGS.rounds):
                for name, tree in trees.items():
                    for script, args in (("bench_sampling.py", SAMPLING_ARGS), ("bench_train.py", TRAIN_ARGS)):
                        for row in _run(tree, script, args, tmp / f"{name}-{r}.json"):
                            times.setdefault((row["bench"], row["setting"], name), []).append(row["seconds"])
                        print(f"round {r + 1}/{FLAGS.rounds}: {name} {script} done", file=sys.stderr)
        finally:
            for name, tree in trees.items():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
    head = FLAGS.head or "working tree"
    print(f"\n{machine}; base {FLAGS.base}, head {head}; {FLAGS.rounds} alternating rounds, {FLAGS.repeats} repeats each; JAX only")
    print("| benchmark | setting | base s | head s | head / base |")
    print("|---|---|---|---|---|")
    rows = []
    for bench, setting in dict.fromkeys((b, s) for b, s, _ in times):
        base, new = (float(np.median(times[(bench, setting, n)])) for n in ("base", "head"))
        rows.append(dict(bench=bench, setting=setting, base_seconds=base, head_seconds=new, ratio=new / base))
        print(f"| {bench} | {setting} | {base:.3f} | {new:.3f} | {new / base:.3f} |")
    if FLAGS.json_out:
        settings = dict(base=FLAGS.base, head=head, rounds=FLAGS.rounds, repeats=FLAGS.repeats, machine=machine,
                        sampling_args=SAMPLING_ARGS, train_args=TRAIN_ARGS)
        Path(FLAGS.json_out).write_text(json.dumps(dict(settings=settings, rows=rows), indent=2))


if __name__ == "__main__":
    app.run(main)
