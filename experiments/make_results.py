"""Every number of experiments/RESULTS.md, from one command.

    python experiments/make_results.py --out runs/results            # ~1 h on 2 CPU cores
    python experiments/make_results.py --render_only                 # RESULTS.md from experiments/results/*.json
    python experiments/make_results.py --out runs/results --only spectral,convergence

1. Trains the Skip-DiT and the DiT once with the demo's settings
   (`skipdit_jax.demo.config.get_config()` and its "dit" variant, all of their 4,500
   steps: the time budget, --train_minutes, is generous so that the step count ends
   training) into OUT/models/{skipdit,dit}; a model already trained there is reused, an
   interrupted one resumed.
2. Runs every experiment on those two models with the settings RESULTS.md reports
   (the scripts' defaults; only perturbation's target and radius are given), each into
   OUT/NAME; convergence trains its own pair, as it always does. Each writes its
   results.json with a "settings" object (command line, every flag, model sources,
   machine).
3. After each experiment, copies its results.json and plot to experiments/results/NAME.*
   and renders experiments/RESULTS.md from experiments/RESULTS.template.md.

The template is Markdown with two kinds of placeholder, both filled from the JSON files
in experiments/results/:
    {{table:NAME}}             a generated table (see TABLES), preceded by a generated
                               line giving the settings of the run that measured it
    {{value:FILE/KEY/KEY|FMT}} one value of FILE.json (list indices as integers),
                               formatted with FMT (a format spec, e.g. .2f)
so no number in RESULTS.md can disagree with the JSON it came from
(tests/test_experiments.py re-renders and compares).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
TEMPLATE = HERE / "RESULTS.template.md"
RESULTS_MD = HERE / "RESULTS.md"
NOTICE = (
    "<!-- Rendered by `python experiments/make_results.py` from experiments/RESULTS.template.md "
    "and experiments/results/*.json: edit the template, not this file. -->\n\n"
)

# name: (script, its flags besides --out and the models, whether it takes the shared models,
#        {file the script writes: stem.suffix under experiments/results/})
EXPERIMENTS = {
    "cache_tradeoff": ("cache_tradeoff.py", [], True, {"results.json": "cache_tradeoff.json", "tradeoff.png": "cache_tradeoff.png"}),
    "feature_similarity": (
        "feature_similarity.py", [], True, {"results.json": "feature_similarity.json", "feature_similarity.png": "feature_similarity.png"},
    ),
    "perturbation_input": (
        "perturbation.py", ["--target=input", "--radius=0.2"], True,
        {"results.json": "perturbation_input.json", "perturbation.png": "perturbation_input.png"},
    ),
    "perturbation_weights": (
        "perturbation.py", ["--target=weights", "--radius=0.05"], True,
        {"results.json": "perturbation_weights.json", "perturbation.png": "perturbation_weights.png"},
    ),
    "spectral": ("spectral.py", [], True, {"results.json": "spectral.json", "spectral.png": "spectral.png"}),
    "convergence": ("convergence.py", [], False, {"results.json": "convergence.json", "convergence.png": "convergence.png"}),
}
MODEL_NAMES = {"skipdit": "Skip-DiT", "dit": "DiT"}


# ---- running -------------------------------------------------------------------------------------
def train_models(out: Path, train_minutes: float) -> dict:
    """Train (or reuse) the two demo models in OUT/models; {kind: path}. Refuses models that
    stopped before their step count (the tables would not be those of the demo's models)."""
    sys.path.insert(0, str(HERE))
    from skipdit_jax.xla_tuning import tune_xla_cpu_flags

    tune_xla_cpu_flags()
    from _common import DONE_FILE, MODEL_KINDS, ensure_model

    paths = {}
    for kind in MODEL_KINDS:
        t0 = time.perf_counter()
        ensure_model(kind, out, None, train_minutes)
        path = out / "models" / kind
        done = path / DONE_FILE
        if not done.exists():
            raise SystemExit(f"make_results: training {kind} in {path} was interrupted; run the command again to resume it")
        record = json.loads(done.read_text())
        if record["final_step"] < record.get("steps", 0):
            raise SystemExit(
                f"make_results: {kind} in {path} stopped at step {record['final_step']} of {record['steps']} (time budget); "
                f"delete {done} and run again with a larger --train_minutes to finish it"
            )
        print(f"{kind}: {record['final_step']} steps, {record['seconds']} s of training ({time.perf_counter() - t0:.0f} s here)", flush=True)
        paths[kind] = path
    return paths


def run_experiment(name: str, out: Path, models: dict | None) -> None:
    script, args, shared, outputs = EXPERIMENTS[name]
    cmd = [sys.executable, str(HERE / script), f"--out={out / name}", *args]
    if shared:
        cmd += [f"--skipdit={models['skipdit']}", f"--dit={models['dit']}"]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    if rc:
        raise SystemExit(f"make_results: {name} failed (exit status {rc}; its output is above)")
    print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    RESULTS_DIR.mkdir(exist_ok=True)
    for src, dst in outputs.items():
        shutil.copyfile(out / name / src, RESULTS_DIR / dst)


# ---- rendering: helpers --------------------------------------------------------------------------
def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _int(v) -> str:
    return f"{v:,}"


def _setting(v) -> str:
    return "-" if v is None else (str(int(v)) if float(v) == int(v) else f"{v:g}")


def _models_phrase(models: dict) -> str:
    parts = []
    for kind, src in models.items():
        name = MODEL_NAMES.get(kind, kind)
        t = src.get("trained")
        if t is None:
            parts.append(f"{name}: `{src['path']}`")
            continue
        over = ", ".join(f"{k}={v}" for k, v in t.get("overrides", {}).items())
        secs = t.get("seconds", t.get("seconds_this_run"))
        parts.append(
            f"{name}: `{t['config']}`" + (f" with {over}" if over else "")
            + f", {_int(t['final_step'])} steps" + (f" ({secs:.0f} s)" if secs else "")
        )
    return "; ".join(parts)


def _machine_phrase(m: dict) -> str:
    code = f", code {m['git_commit']}" + (" with uncommitted changes" if m.get("git_dirty") else "") if m.get("git_commit") else ""
    return f"{m['cpu_cores']} cores of {m['cpu']} (jax {m['jax']}, {m['device']} backend), {m['date']}{code}"


OLDER = (
    "*Not regenerated by the current version: measured by an earlier version of the experiment, "
    "whose results.json did not record its settings.*"
)


def settings_line(res: dict, details) -> str:
    """The generated line above a table: `details(flags)` (the experiment's own settings),
    the models, the machine and the command of the run that wrote `res`."""
    if "settings" not in res:
        return OLDER
    s = res["settings"]
    parts = [*details(s["flags"])]
    if "models" in s:
        parts.append("models: " + _models_phrase(s["models"]))
    parts.append("measured on " + _machine_phrase(s["machine"]))
    return f"*Settings: {'; '.join(parts)}. Command: `{s['command']}`.*"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---- rendering: the tables ------------------------------------------------------------------------
METHOD_NAMES = {
    "none": "uncached",
    "skip-cache": "Skip-Cache",
    "shallow-cache": "shallow cache",
    "fora": "FORA",
    "pab": "PAB",
    "delta-dit": "Delta-DiT",
    "teacache": "TeaCache",
}


def _ct_details(f: dict) -> list[str]:
    poly = f["teacache_polynomial"]
    clf = f.get("classifier")
    return [
        f"{f['samples']} samples ({f['per_class']} per class) from one fixed noise",
        f"guided DDIM-{f['steps']}, guidance {f['cfg_scale']:g}" + (", x0 clipped" if f.get("clip_denoised") else ""),
        f"k = {f['shallow_blocks']} for the static caches",
        "TeaCache with the identity polynomial" if poly == "identity" else "TeaCache polynomial (" + ", ".join(f"{c:.3g}" for c in poly) + ")",
        f"times: median of {f['repeats']} runs, each beside a run of its uncached model",
    ] + ([f"classifier: {clf['steps']} steps, held-out accuracy {clf['heldout_accuracy']:.3f}"] if clf else [])


def table_cache_tradeoff(R) -> str:
    r = R("cache_tradeoff")
    rows = []
    for x in r["rows"]:
        name = f"{METHOD_NAMES.get(x['method'], x['method'])} ({MODEL_NAMES[x['model']]})"
        setting = "-" if x["setting"] is None else (f"th={_setting(x['setting'])}" if x["method"] == "teacache" else f"N={_setting(x['setting'])}")
        rows.append([
            name, setting, f"{x['full_steps']}/{x['cached_steps']}", _x(x["predicted_speedup"]), _f(x["seconds"], ".2f"),
            _f(x["reference_seconds"], ".2f") if x["setting"] is not None else "-", _x(x["speedup"]),
            _f(x["psnr_db"], ".1f"), _f(x["ssim"], ".3f"), _f(x["class_accuracy"], ".2f"),
        ])
    header = ["method (model)", "setting", "full/cached", "predicted", "seconds", "uncached s (beside)", "speedup", "PSNR dB", "SSIM", "class acc."]
    if any(x["lpips"] is not None for x in r["rows"]):
        header.append("LPIPS")
        for row, x in zip(rows, r["rows"]):
            row.append(_f(x["lpips"], ".3f"))
    return settings_line(r, _ct_details) + "\n\n" + _table(header, rows)


def _interp(points: list[tuple[float, float]], s: float) -> float | None:
    """Linear interpolation of y at x = s over (x, y) points; None outside their range."""
    pts = sorted(points)
    if not pts or s < pts[0][0] or s > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= s <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (s - x0) / (x1 - x0)
    return pts[0][1]


def table_cache_matched(R) -> str:
    """PSNR of every DiT method at each Skip-Cache row's measured speedup, linearly
    interpolated along the method's own PSNR-vs-measured-speedup points."""
    r = R("cache_tradeoff")
    cached = [x for x in r["rows"] if x["setting"] is not None]
    skip = [x for x in cached if x["method"] == "skip-cache"]
    others = [m for m in METHOD_NAMES if m not in ("none", "skip-cache") and any(x["method"] == m for x in cached)]
    rows = []
    for x in skip:
        row = [f"N={_setting(x['setting'])}", _x(x["speedup"]), _f(x["psnr_db"], ".1f")]
        for m in others:
            v = _interp([(y["speedup"], y["psnr_db"]) for y in cached if y["method"] == m], x["speedup"])
            row.append(_f(v, ".1f"))
        rows.append(row)
    header = ["Skip-Cache", "its speedup", "its PSNR dB", *(f"{METHOD_NAMES[m]} (DiT)" for m in others)]
    line = (
        "*Derived from the table above (same run): each DiT method's PSNR at the measured speedup of each "
        "Skip-Cache row, linearly interpolated between the method's two neighbouring settings "
        "(\"-\": outside the speedups the method was measured at).*"
    )
    return line + "\n\n" + _table(header, rows)


def _fs_details(f: dict) -> list[str]:
    return [
        f"{f['samples']} samples ({f['per_class']} per class), guided DDIM-{f['steps']}, guidance {f['cfg_scale']:g}",
        f"N = {f['interval']}, k = {f['shallow_blocks']}",
    ]


def table_feature_similarity(R) -> str:
    r = R("feature_similarity")
    ts = r["timesteps"]
    rows = []
    for name, s in r["cached_vs_fresh"].items():
        i = min(range(len(s)), key=lambda j: s[j])
        rows.append([name, _f(r["mean_over_cached_steps"][name], ".5f"), f"{s[i]:.5f} (t = {ts[i]})"])
    return settings_line(r, _fs_details) + "\n\n" + _table(["model, cache", "mean over cached steps", "minimum (at t)"], rows)


def table_feature_consecutive(R) -> str:
    r = R("feature_similarity")
    ts = r["timesteps"]
    rows = []
    for kind, s in r["consecutive_step_similarity"].items():
        i = min(range(len(s)), key=lambda j: s[j])
        rows.append([MODEL_NAMES[kind], f"{r['mean_consecutive_step_similarity'][kind]:.5f}", f"{s[i]:.5f} (t = {ts[i + 1]})"])
    line = "*Same run as the table above: cosine similarity of the deep feature at each step with the one at the step before.*"
    return line + "\n\n" + _table(["model", "mean over steps", "minimum (at t)"], rows)


def _perturbation_table(R, name: str) -> str:
    r = R(name)

    def details(f):
        what = "input x_t" if f["target"] == "input" else "every weight tensor"
        return [
            f"{what}, alpha and beta in [-{f['radius']:g}, {f['radius']:g}] on a {f['grid']}x{f['grid']} grid",
            f"eps prediction at t = {f['timestep']} for {f['samples']} held-out digits",
        ]

    rows = []
    for kind, surface in r["surfaces"].items():
        flat = [v for row in surface for v in row]
        rows.append([MODEL_NAMES[kind], f"{min(flat):.3f}", f"{sum(flat) / len(flat):.3f}"])
    return settings_line(r, details) + "\n\n" + _table(["model", "min cosine similarity", "mean"], rows)


def table_spectral_jacobian(R) -> str:
    r = R("spectral")

    def details(f):
        return [f"power iteration, {f['iters']} steps, mean over {f['samples']} held-out digits noised to t"]

    rows = [[MODEL_NAMES[k], *(f"{v:.2f}" for v in m["jacobian_spectral_norm"])] for k, m in r["models"].items()]
    return settings_line(r, details) + "\n\n" + _table(["t", *(str(t) for t in r["timesteps"])], rows)


KERNELS = {
    "attn/qkv/kernel": "attention qkv",
    "attn/proj/kernel": "attention proj",
    "mlp/fc1/kernel": "MLP fc1",
    "mlp/fc2/kernel": "MLP fc2",
    "adaLN_modulation/kernel": "adaLN",
    "skip_fusion/linear/kernel": "skip fusion linear",
}


def table_spectral_weights(R) -> str:
    r = R("spectral")
    kinds = list(r["models"])
    names = [n for n in KERNELS if any(n in r["models"][k]["weight_spectral_norms"] for k in kinds)]
    names += sorted({n for k in kinds for n in r["models"][k]["weight_spectral_norms"]} - set(names))
    rows = []
    for n in names:
        row = [KERNELS.get(n, n)]
        for k in kinds:
            v = r["models"][k]["weight_spectral_norms"].get(n)
            row.append("-" if not v else f"{sum(v) / len(v):.2f} ({max(v):.2f})")
        rows.append(row)
    line = "*Same run as the table above: largest singular value of each block's kernels, mean (max) over the blocks.*"
    return line + "\n\n" + _table(["kernel", *(MODEL_NAMES[k] for k in kinds)], rows)


def table_convergence(R) -> str:
    r = R("convergence")

    def details(f):
        clf = f["classifier"]
        return [
            f"{_int(f['total_steps'])} steps per model, evaluated every {f['eval_every']} on the EMA weights",
            f"held-out eps-MSE on {f['heldout']} held-out digits (fixed noise and timesteps)",
            f"classifier FID and accuracy of {10 * f['per_class']} samples, guided DDIM-{f['sample_steps']} (guidance {f['cfg_scale']:g}); "
            f"classifier: {clf['steps']} steps, held-out accuracy {clf['heldout_accuracy']:.3f}",
        ]

    c = r["curves"]
    rows = []
    for a, b in zip(c["dit"], c["skipdit"]):
        rows.append([
            _int(a["step"]), f"{a['heldout_loss']:.4f}", f"{b['heldout_loss']:.4f}", f"{a['classifier_fid']:.1f}", f"{b['classifier_fid']:.1f}",
            f"{a['class_accuracy']:.2f}", f"{b['class_accuracy']:.2f}",
        ])
    header = ["step", "held-out loss DiT", "Skip-DiT", "classifier FID DiT", "Skip-DiT", "class acc. DiT", "Skip-DiT"]
    return settings_line(r, details) + "\n\n" + _table(header, rows)


def table_convergence_summary(R) -> str:
    r = R("convergence")
    names = {"heldout_loss": ("held-out loss", ".4f"), "classifier_fid": ("classifier FID", ".1f")}
    rows = []
    for metric, s in r["summary"].items():
        label, spec = names.get(metric, (metric, ".4g"))
        reach = s["skipdit_steps_to_dit_final"]
        rows.append([label, format(s["dit_final"], spec), format(s["skipdit_final"], spec), "-" if reach is None else f"~{reach:,.0f}", _x(s["steps_ratio"])])
    line = "*Same run as the table above: the step at which Skip-DiT first reaches DiT's final value (linearly interpolated between evaluations), and DiT's steps divided by it.*"
    return line + "\n\n" + _table(["metric", "DiT final", "Skip-DiT final", "Skip-DiT reaches it at step", "fewer steps"], rows)


def table_models(R) -> str:
    """The shared models: architecture, how they were trained, on what."""
    r = R("cache_tradeoff")
    if "settings" not in r:
        return OLDER.replace("experiment", "cache trade-off") + "\n\n" + _table(["model"], [[MODEL_NAMES[k]] for k in MODEL_NAMES])
    s = r["settings"]
    rows = []
    for kind, src in s["models"].items():
        a = src.get("architecture", {})
        t = src.get("trained")
        rows.append([
            MODEL_NAMES[kind], str(a.get("depth", "-")), str(a.get("hidden_size", "-")), str(a.get("num_heads", "-")), str(a.get("patch_size", "-")),
            f"{a['input_size']}x{a['input_size']}" if "input_size" in a else "-", "yes" if a.get("long_skip") else "no",
            f"{a['parameters'] / 1e6:.2f} M" if "parameters" in a else "-",
            f"`{t['config']}`" if t else f"`{src['path']}`", _int(t["final_step"]) if t else "-", f"{t['seconds']:.0f} s" if t else "-",
        ])
    trained = [src["trained"]["machine"] for src in s["models"].values() if src.get("trained") and "machine" in src["trained"]]
    line = "*The models of sections 1-4" + (f", trained on {_machine_phrase(trained[0])}" if trained else "") + ".*"
    header = ["model", "depth", "width", "heads", "patch", "input", "long skips", "parameters", "settings", "steps", "training time"]
    return line + "\n\n" + _table(header, rows)


TABLES = {
    "models": table_models,
    "cache_tradeoff": table_cache_tradeoff,
    "cache_matched": table_cache_matched,
    "feature_similarity": table_feature_similarity,
    "feature_consecutive": table_feature_consecutive,
    "perturbation_input": lambda R: _perturbation_table(R, "perturbation_input"),
    "perturbation_weights": lambda R: _perturbation_table(R, "perturbation_weights"),
    "spectral_jacobian": table_spectral_jacobian,
    "spectral_weights": table_spectral_weights,
    "convergence": table_convergence,
    "convergence_summary": table_convergence_summary,
}
PLACEHOLDER = re.compile(r"\{\{(table|value):([^}|]+?)(?:\|([^}]*))?\}\}")


def render(results_dir: Path = RESULTS_DIR, template: Path = TEMPLATE) -> str:
    """RESULTS.md: the template with every placeholder filled from results_dir/*.json."""
    cache: dict[str, dict] = {}

    def R(name: str) -> dict:
        if name not in cache:
            path = results_dir / f"{name}.json"
            if not path.is_file():
                raise SystemExit(f"make_results: {path} is missing (run that experiment first)")
            cache[name] = json.loads(path.read_text())
        return cache[name]

    def fill(m: re.Match) -> str:
        kind, arg, spec = m.group(1), m.group(2).strip(), m.group(3)
        if kind == "table":
            if arg not in TABLES:
                raise SystemExit(f"make_results: unknown table {arg!r} in the template; known: {', '.join(TABLES)}")
            return TABLES[arg](R)
        name, *keys = arg.split("/")
        v = R(name)
        for k in keys:
            try:
                v = v[int(k)] if isinstance(v, list) else v[k]
            except (KeyError, IndexError, ValueError):
                raise SystemExit(f"make_results: {arg!r}: no {k!r} in {name}.json") from None
        return format(v, spec) if spec else str(v)

    return NOTICE + PLACEHOLDER.sub(fill, template.read_text())


def write_results_md() -> None:
    RESULTS_MD.write_text(render())
    print(f"rendered {RESULTS_MD}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/results", help="output folder: the models, every experiment's own folder (default: runs/results)")
    p.add_argument("--train_minutes", type=float, default=120.0, help="time budget per model (generous: the step count should end training)")
    p.add_argument("--only", default="", help=f"comma-separated experiments to run (default: all of {', '.join(EXPERIMENTS)})")
    p.add_argument("--render_only", action="store_true", help="only render RESULTS.md from the JSON files in experiments/results/")
    a = p.parse_args(argv)
    if a.render_only:
        write_results_md()
        return 0
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        p.error(f"unknown experiments {unknown}; choose from {', '.join(EXPERIMENTS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = train_models(out, a.train_minutes) if any(EXPERIMENTS[n][2] for n in names) else None
    for name in names:
        run_experiment(name, out, models)
        try:  # the other JSONs may still be those of an older version, which the template may not fit
            write_results_md()
        except (KeyError, TypeError, SystemExit) as e:
            print(f"make_results: RESULTS.md not rendered after {name} ({type(e).__name__}: {e})", flush=True)
    write_results_md()
    print(f"make_results: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
