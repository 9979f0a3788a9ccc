"""Render a `skipdit demo` report.json as the markdown section of BENCHMARKS.md.

    python experiments/demo_table.py skipdit-demo/report.json

The table is printed with the run's settings beside it (they are in the report), so the
section is one command's output and nothing is copied by hand.
"""

from __future__ import annotations

import json
import sys


def render(report: dict, source: str) -> str:
    s, t, full, curve = report["settings"], report["train"], report["full"], report.get("curve")
    m = s["model"]
    lines = [
        f"Settings (from `{source}`): {s['image_size']}x{s['image_size']} digits, depth {m['depth']}, width "
        f"{m['hidden_size']}, {m['num_heads']} heads, patch {m['patch_size']}, long skips {m['long_skip']}; "
        f"{s['samples_per_class']} samples per class with guided {s['sampler']} (scale {s['cfg_scale']}), "
        f"Skip-Cache k = {s['shallow_blocks']}; device {s['device']}.",
        "",
        "| | result | target |",
        "|---|---|---|",
        f"| total wall time | {s['total_seconds']:.0f} s | <= 15 min |",
        f"| training | {t['steps']:,} steps in {t['seconds']:.0f} s, final loss {t['final_loss']:.3f} | |",
        f"| classifier held-out accuracy | {report['classifier_test_accuracy']:.3f} | >= 0.95 |",
        f"| full sampling: class accuracy | **{full['class_accuracy']:.2f}** ({full['seconds']:.2f} s) | >= 0.8 |",
    ]
    for row in report["cache"]:
        target = "within 0.05 of full, >= 1.3x" if row["interval"] == 2 else ""
        lines.append(
            f"| Skip-Cache N={row['interval']}: class accuracy, speedup (predicted), PSNR vs full | "
            f"{row['class_accuracy']:.2f}, **{row['speedup']:.2f}x** ({row['predicted_speedup']:.2f}x), {row['psnr_db']:.1f} dB | {target} |"
        )
    if curve:
        points = ", ".join(f"{step:,}: {v:.2f}" for step, v in zip(curve["steps"], curve["values"], strict=True))
        lines.append(
            f"| classifier FID during training ({curve['num_samples']} {curve['sampler']} samples every {curve['every']:,} steps) | "
            f"{points}; evaluations {curve['eval_seconds']:.1f} s = {100 * curve['overhead']:.1f}% of training | |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python experiments/demo_table.py REPORT.json")
    with open(sys.argv[1]) as f:
        print(render(json.load(f), sys.argv[1]))
