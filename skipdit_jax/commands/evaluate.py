"""`skipdit evaluate SAMPLES.npz --ref REF`: FID, sFID, Inception Score, precision and
recall of a sample set, with ADM's evaluator semantics (skipdit_jax.evaluation.inception_metrics).

SAMPLES.npz holds arr_0, uint8 images (N, H, W, 3) (what `skipdit sample-many` and the
official sample_ddp.py write). REF is an ADM reference batch .npz (images and/or mu, sigma,
mu_s, sigma_s; e.g. VIRTUAL_imagenet256_labeled.npz), any image .npz or a folder of
PNG/JPEG images. Every input is checked before the Inception weights load. The metrics go
to a table on stdout and to a JSON file, by default SAMPLES.metrics.json beside the samples
(written atomically, once everything is computed, by process 0).
"""

from __future__ import annotations

import json

import jax
from absl import flags

from skipdit_jax import distributed, paths
from skipdit_jax.errors import UserError
from skipdit_jax.evaluation import inception_metrics as im

USAGE = (
    "SAMPLES.npz --ref REF.npz|DIR [--inception SPEC] [--batch_size 200] [--out FILE.json] "
    "[--metrics fid,sfid,is,precision,recall]"
)

_LABELS = {"fid": "FID", "sfid": "sFID", "inception_score": "Inception Score", "precision": "Precision", "recall": "Recall"}


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "ref", None, "reference: ADM reference batch .npz, an image .npz (arr_0) or an image folder", flag_values=fv
    )
    flags.DEFINE_string(
        "inception",
        None,
        "FID Inception weights: pytorch-fid .pth, converted .safetensors, https URL or hf:// path "
        "(default: $SKIPDIT_INCEPTION, else the pytorch-fid release, cached)",
        flag_values=fv,
    )
    flags.DEFINE_integer("batch_size", 200, "images per Inception call, over all devices", flag_values=fv)
    flags.DEFINE_string("out", None, "metrics JSON (default: SAMPLES.metrics.json beside the samples)", flag_values=fv)
    flags.DEFINE_string("metrics", ",".join(im.METRICS), "comma-separated subset of fid,sfid,is,precision,recall", flag_values=fv)
    flags.DEFINE_enum(
        "distance_dtype", "float16", ["float16", "float32"], "precision/recall distances (float16 = ADM)", flag_values=fv
    )
    flags.DEFINE_bool("progress", True, "show progress bars", flag_values=fv)
    distributed.define_flags(fv)


def default_out(samples: str) -> paths.epath.Path:
    """SAMPLES.metrics.json beside SAMPLES (samples.npz -> samples.metrics.json)."""
    p = paths.as_path(samples)
    stem = p.name[: -len(".npz")] if p.name.endswith(".npz") else p.name
    return p.parent / f"{stem}.metrics.json"


def format_table(result: dict) -> str:
    rows = [(label, f"{result[key]:.4f}") for key, label in _LABELS.items() if key in result]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def main(args: list[str], fv: flags.FlagValues) -> int:
    if len(args) != 1:
        raise UserError(f"expected one SAMPLES.npz argument; usage: skipdit evaluate {USAGE}")
    if not fv.ref:
        raise UserError("--ref is required (an ADM reference batch .npz, an image .npz or an image folder)")
    if fv.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {fv.batch_size}")
    metrics = im.parse_metrics(fv.metrics)
    out = paths.as_path(fv.out) if fv.out else default_out(args[0])
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a directory")
    # The files themselves, before any weights are loaded or anything is compiled.
    images, _ = im.read_image_npz(args[0])
    reference = im.load_reference(fv.ref)
    im.check_inputs(images.shape[0], reference, metrics)
    del images
    distributed.initialize_from_flags(fv)

    result = im.evaluate_samples(
        args[0],
        reference,
        inception=fv.inception,
        batch_size=fv.batch_size,
        metrics=metrics,
        distance_dtype=fv.distance_dtype,
        progress=fv.progress and jax.process_index() == 0,
    )
    report = {"samples": args[0], "reference": fv.ref, **result}
    if jax.process_index() == 0:
        paths.atomic_write_text(out, json.dumps(report, indent=2) + "\n")
        print(format_table(result))
        print(
            f"{result['num_samples']} samples vs {result['num_reference']} reference images "
            f"(reference statistics {result['reference_statistics']}); Inception {result['inception']['weights']} "
            f"(sha256 {result['inception']['fingerprint']}); wrote {out}"
        )
    return 0
