"""`skipdit evaluate SAMPLES --ref REF`: FID, sFID, Inception Score, precision and recall
of an image sample set, with ADM's evaluator semantics (skipdit_jax.evaluation.inception_metrics),
or the FVD of a video sample set, with StyleGAN-V's fvd2048_16f protocol
(skipdit_jax.evaluation.fvd).

SAMPLES.npz holds arr_0, uint8 images (N, H, W, 3) (what `skipdit sample-many` and the
official sample_ddp.py write). REF is an ADM reference batch .npz (images and/or mu, sigma,
mu_s, sigma_s; e.g. VIRTUAL_imagenet256_labeled.npz), any image .npz or a folder of
PNG/JPEG images. Every input is checked before the Inception weights load. The metrics go
to a table on stdout and to a JSON file, by default SAMPLES.metrics.json beside the samples
(written atomically, once everything is computed, by process 0).

Videos: SAMPLES is an .npz whose arr_0 is uint8 (N, F, H, W, 3) (sample-many's output for
video models) or a folder of video files and/or frame folders; REF is a folder of real
videos (or frame folders), a video .npz, or an .npz of FVD statistics (mu, sigma: 400-d;
`--save_ref_stats` writes one). The I3D weights come from --i3d or $SKIPDIT_I3D
(`skipdit convert-i3d`).
"""

from __future__ import annotations

import json

import jax
from absl import flags

from skipdit_jax import distributed, paths
from skipdit_jax.errors import UserError
from skipdit_jax.evaluation import fvd
from skipdit_jax.evaluation import inception_metrics as im

USAGE = (
    "SAMPLES.npz|VIDEO_DIR --ref REF.npz|DIR [--inception SPEC] [--batch_size 200] [--out FILE.json] "
    "[--metrics fid,sfid,is,precision,recall]; videos: [--i3d SPEC] [--fvd_num 2048] [--fvd_frames 16] "
    "[--fvd_ref_subsample 1] [--fvd_seed 0] [--video_batch_size 32] [--save_ref_stats FILE.npz]"
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
    flags.DEFINE_string(
        "i3d", None, "FVD I3D weights: i3d_torchscript.pt, a piergiaj/hassony2 .pt, a converted .safetensors, "
        "an https URL or hf:// path (default: $SKIPDIT_I3D)", flag_values=fv,
    )
    flags.DEFINE_integer("fvd_num", fvd.NUM_VIDEOS, "FVD: videos per side (a seeded random subset when more)", flag_values=fv)
    flags.DEFINE_integer("fvd_frames", fvd.FRAMES, "FVD: frames per clip", flag_values=fv)
    flags.DEFINE_integer(
        "fvd_ref_subsample", 1, "FVD: take every n-th frame of the reference videos (the official code runs with 1)",
        flag_values=fv,
    )
    flags.DEFINE_integer("fvd_seed", 0, "FVD: seed of the video subsets and reference clip offsets", flag_values=fv)
    flags.DEFINE_integer("video_batch_size", 32, "FVD: clips per I3D call, over all devices", flag_values=fv)
    flags.DEFINE_string(
        "save_ref_stats", None, "FVD: also write the reference statistics (mu, sigma) to this .npz", flag_values=fv
    )
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


def is_video_input(samples: str) -> bool:
    """Whether SAMPLES names videos: a folder, or an .npz whose arr_0 has rank 5."""
    p = paths.as_path(samples)
    if not p.exists():
        raise UserError(f"sample file {samples} does not exist")
    if p.is_dir():
        return True
    shape = fvd.npz_array_shape(samples)
    if shape is not None and len(shape) not in (4, 5):
        raise UserError(f"{samples}: arr_0 must be images (N, H, W, 3) or videos (N, frames, H, W, 3), got shape {shape}")
    return shape is not None and len(shape) == 5


def main_videos(samples: str, fv: flags.FlagValues, out) -> int:
    if fv["metrics"].present and fv.metrics.strip().lower() != "fvd":
        raise UserError(f"{samples} holds videos: the only video metric is fvd (got --metrics {fv.metrics})")
    if fv.video_batch_size < 1:
        raise UserError(f"--video_batch_size must be >= 1, got {fv.video_batch_size}")
    kwargs = dict(
        num_samples=fv.fvd_num, num_reference=fv.fvd_num, frames=fv.fvd_frames, ref_subsample=fv.fvd_ref_subsample,
        seed=fv.fvd_seed,
    )
    # Both sides opened, checked and their clips chosen before any weights load.
    sample_clips, ref_set, ref_clips, _ = fvd.prepare(samples, fv.ref, **kwargs)
    distributed.initialize_from_flags(fv)
    result = fvd.evaluate_videos(
        sample_clips.video_set, ref_set, i3d=fv.i3d, batch_size=fv.video_batch_size,
        progress=fv.progress and jax.process_index() == 0, save_ref_stats=fv.save_ref_stats, **kwargs,
    )
    report = {"samples": samples, "reference": fv.ref, **result}
    if jax.process_index() == 0:
        paths.atomic_write_text(out, json.dumps(report, indent=2) + "\n")
        print(f"FVD  {result['fvd']:.4f}")
        print(
            f"{result['num_samples']} sample clips vs {result['num_reference'] or 'precomputed'} reference clips; "
            f"protocol: {result['protocol']}; I3D {result['i3d']['weights']} (sha256 {result['i3d']['fingerprint']}); wrote {out}"
        )
    return 0


def main(args: list[str], fv: flags.FlagValues) -> int:
    if len(args) != 1:
        raise UserError(f"expected one SAMPLES argument (.npz or a video folder); usage: skipdit evaluate {USAGE}")
    if not fv.ref:
        raise UserError(
            "--ref is required (an ADM reference batch .npz, an image .npz or an image folder; for videos a video "
            "folder, a video .npz or FVD statistics)"
        )
    if fv.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {fv.batch_size}")
    out = paths.as_path(fv.out) if fv.out else default_out(args[0])
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a directory")
    if is_video_input(args[0]):
        return main_videos(args[0], fv, out)
    metrics = im.parse_metrics(fv.metrics)
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
