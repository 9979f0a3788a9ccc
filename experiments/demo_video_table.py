"""Render a `skipdit demo --task video` report.json as a markdown section.

    python experiments/demo_video_table.py skipdit-demo-video/report.json

The table is printed with the run's settings beside it (they are in the report), so the
section is one command's output and nothing is copied by hand.
"""

from __future__ import annotations

import json
import os
import sys


def recipe(report_path: str) -> str:
    """The training recipe from the run's own config (OUT/train/config.json beside OUT/report.json), or ""."""
    path = os.path.join(os.path.dirname(os.path.abspath(report_path)), "train", "config.json")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        c = json.load(f)
    o, t = c["optimizer"], c["train"]
    return (
        f"; {o['name']} lr {o['lr']:g}, {o['warmup_steps']} warm-up steps, {o['decay']} decay to {o['end_lr_factor']:g}x, "
        f"EMA {t['ema_decay']:g}, at most {t['steps']:,} steps (from `{path}`)"
    )


def render(report: dict, source: str, training: str = "") -> str:
    s, t, full, data = report["settings"], report["train"], report["full"], report["data"]
    m = s["model"]
    lines = [
        f"Settings (from `{source}`): {s['frames']} frames of {s['image_size']}x{s['image_size']} px, "
        f"{s['digit_size']} px moving digits"
        + (
            f" (start and speed on a {s['motion_grid']} px grid), batches of {s['batch_size']} clips + "
            f"{s['joint_images']} joint images per clip"
            if "motion_grid" in s
            else ""
        )
        + f"; Latte, {s['pairs']} (spatial, temporal) pairs, width {m['hidden_size']}, "
        f"{m['num_heads']} heads, patch {m['patch_size']}, long skips {m['long_skip']}; {s['samples_per_class']} clips per "
        f"class with guided {s['sampler']} (scale {s['cfg_scale']}), Skip-Cache k = {s['shallow_pairs']} pair(s); "
        f"device {s['device']}{training}.",
        "",
        "| | result | target |",
        "|---|---|---|",
        f"| total wall time | {s['total_seconds']:.0f} s | <= 15 min |",
        f"| training | {t['steps']:,} steps in {t['seconds']:.0f} s, final loss {t['final_loss']:.3f} | |",
        f"| classifier accuracy on held-out real frames | {report['classifier_test_accuracy']:.3f} | >= 0.95 |",
        f"| full sampling: class accuracy per frame | **{full['class_accuracy']:.2f}** ({full['seconds']:.2f} s) | >= 0.8 |",
        f"| full sampling: frame agreement, clip accuracy (majority) | {full['frame_agreement']:.2f}, "
        f"{full['clip_accuracy']:.2f} | |",
        f"| full sampling: digit step, acceleration (centre of mass) | {full['displacement_px']:.2f} px, "
        f"{full['acceleration_px']:.2f} px | real clips: {data['displacement_px']:.2f} px, {data['acceleration_px']:.2f} px |",
    ]
    for row in report["cache"]:
        target = "within 0.05 of full, >= 1.25x" if row["interval"] == 2 else ""
        lines.append(
            f"| Skip-Cache N={row['interval']}: class accuracy, speedup (predicted), PSNR vs full, frame agreement, step | "
            f"{row['class_accuracy']:.2f}, **{row['speedup']:.2f}x** ({row['predicted_speedup']:.2f}x), {row['psnr_db']:.1f} dB, "
            f"{row['frame_agreement']:.2f}, {row['displacement_px']:.2f} px | {target} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python experiments/demo_video_table.py REPORT.json")
    with open(sys.argv[1]) as f:
        print(render(json.load(f), sys.argv[1], recipe(sys.argv[1])))
