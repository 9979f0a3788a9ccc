"""Fréchet Video Distance as the official c2v evaluation computes it: StyleGAN-V's
`fvd2048_16f` (the `tools/` copy in Latte / Skip-DiT `class-to-video`).

Protocol (what the official code does, read from it):
- Detector: the Kinetics-400 I3D (`i3d.i3d_features`: uint8 -> x / 255 * 2 - 1, bilinear
  resize to 224, the 400 time-averaged logits).
- Clips of 16 frames. Real videos: a random subset of 2048 videos, one clip each at a
  random start in [0, frames - 16 * s + s - 1] taking every s-th frame; videos shorter
  than 16 * s frames are discarded. `compute_fvd` there passes a real-data subsample
  factor of 3, but its dataset class overrides it with `self.subsample_factor = 1`, so the
  official numbers use s = 1 (consecutive frames); `ref_subsample` defaults to that.
  Generated videos: a random subset of 2048, their FIRST 16 frames (no random offset).
  The official draws are unseeded; here they come from `seed`.
- Statistics in float64: mean and the BIASED covariance (sum x x^T / n - mu mu^T, StyleGAN-V's
  FeatureStats.get_mean_cov); FVD = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), computed
  through symmetric eigendecompositions (inception_metrics.frechet_distance) where
  StyleGAN-V calls scipy's sqrtm.

Inputs: an .npz whose arr_0 is uint8 (N, F, H, W, 3) (sample-many's output), a folder of
video files (`videos.VIDEO_EXTENSIONS`) and/or frame folders, or for the reference also an
.npz of precomputed statistics (`mu` (400,), `sigma` (400, 400); `save_stats` writes one).
Reference features are cached under paths.cache_dir("i3d_features"), keyed by the
reference's identity, the clip selection and the I3D weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any

import jax
import numpy as np

from skipdit_jax import paths, videos
from skipdit_jax.errors import UserError
from skipdit_jax.evaluation import inception_metrics as im

FRAMES = 16
NUM_VIDEOS = 2048
FEATURE_DIM = 400
FEATURES_VERSION = 1
PROTOCOL = (
    "StyleGAN-V fvd2048_16f: I3D Kinetics-400 logits (400-d), 16-frame clips, x/255*2-1 and bilinear resize to 224, "
    "float64 mean and biased covariance"
)

# ---- statistics and the distance ------------------------------------------------------------


def fvd_stats(features) -> im.FeatureStats:
    """Mean and BIASED covariance (divided by n, as StyleGAN-V's get_mean_cov) of (n, d)
    features, float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise UserError(f"FVD statistics need (n, d) features with n >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise UserError("FVD features contain non-finite values")
    stats = im.feature_stats(f)
    return im.FeatureStats(stats.mu, stats.sigma * ((len(f) - 1) / len(f)))


def frechet_video_distance(a: im.FeatureStats, b: im.FeatureStats) -> float:
    """The Fréchet distance of two Gaussians (float64)."""
    return im.frechet_distance(a, b)


def _low_rank_fvd(features, other: im.FeatureStats) -> float:
    """frechet_video_distance(fvd_stats(features), other) for n <= d features without a
    d x d eigendecomposition: with S1 = C^T C (C the centred features / sqrt(n)), the
    non-zero eigenvalues of S1 S2 are those of the PSD n x n matrix C S2 C^T."""
    f = np.asarray(features, np.float64)
    if f.shape[1] != other.dim:
        raise UserError(f"cannot compare {f.shape[1]}-d features with {other.dim}-d statistics")
    fvd_stats(f)  # the same checks
    mu = f.mean(axis=0)
    c = (f - mu) / np.sqrt(len(f))
    m = c @ np.asarray(other.sigma, np.float64) @ c.T
    root_trace = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))
    diff = mu - np.asarray(other.mu, np.float64)
    return float(diff @ diff + np.sum(c * c) + np.trace(other.sigma) - 2 * root_trace)


def compute_fvd(feats_a, feats_b) -> float:
    """FVD between two sets of I3D features (n, 400) (either may also be FeatureStats).
    Symmetric; a side with no more rows than dimensions goes through `_low_rank_fvd`."""
    for x, y in ((feats_a, feats_b), (feats_b, feats_a)):
        if not isinstance(x, im.FeatureStats) and np.ndim(x) == 2 and 2 <= len(x) <= np.shape(x)[1]:
            return _low_rank_fvd(x, y if isinstance(y, im.FeatureStats) else fvd_stats(y))
    a = feats_a if isinstance(feats_a, im.FeatureStats) else fvd_stats(feats_a)
    b = feats_b if isinstance(feats_b, im.FeatureStats) else fvd_stats(feats_b)
    return frechet_video_distance(a, b)


def save_stats(path, stats: im.FeatureStats) -> None:
    """Write FVD statistics as an .npz (mu, sigma; float64) that `--ref` accepts."""
    import io

    buf = io.BytesIO()
    np.savez(buf, mu=np.asarray(stats.mu, np.float64), sigma=np.asarray(stats.sigma, np.float64))
    paths.atomic_write_bytes(path, buf.getvalue())


# ---- video sets ------------------------------------------------------------------------------


@dataclasses.dataclass
class VideoSet:
    """Videos (an (N, F, H, W, 3) uint8 array, or a list of files / frame folders with their
    frame counts) and/or precomputed statistics. `identity` names the source's version."""

    path: str
    kind: str  # "npz", "folder" or "stats"
    array: Any | None = None
    sources: list | None = None
    lengths: list[int] | None = None
    stats: im.FeatureStats | None = None
    identity: dict | None = None

    @property
    def num_videos(self) -> int:
        if self.array is not None:
            return int(self.array.shape[0])
        return len(self.sources or [])

    def length(self, i: int) -> int:
        return int(self.array.shape[1]) if self.array is not None else self.lengths[i]


def _folder_entries(root) -> list:
    """Video files and frame folders directly in `root`, sorted by name."""
    entries = []
    for p in sorted(root.iterdir(), key=lambda q: q.name):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if any(q.suffix.lower() in videos.FRAME_EXTENSIONS for q in p.iterdir()):
                entries.append(p)
        elif p.suffix.lower() in videos.VIDEO_EXTENSIONS:
            entries.append(p)
    return entries


def _check_video_array(arr, shown: str) -> None:
    shape = tuple(arr.shape)
    if len(shape) != 5 or shape[-1] != 3:
        raise UserError(f"{shown}: videos must be uint8 (N, frames, H, W, 3), got shape {shape}")
    if np.dtype(arr.dtype) != np.uint8:
        raise UserError(f"{shown}: videos must be uint8 in [0, 255], got {arr.dtype}")


def npz_array_shape(path) -> tuple[int, ...] | None:
    """The shape of arr_0 in the .npz `path` (memory-mapped, not read), or None without arr_0."""
    p = im.require_file(path, "file")
    local = im.local_file(p)
    if "arr_0" not in im.npz_keys(local, str(path)):
        return None
    return tuple(im.npz_member(local, "arr_0", str(path)).shape)


def open_videos(path, *, allow_stats: bool = False, what: str = "samples") -> VideoSet:
    """A VideoSet from a folder (video files and/or frame folders), an .npz with arr_0 uint8
    (N, F, H, W, 3), or (with `allow_stats`) an .npz of FVD statistics (mu, sigma). Checked;
    one UserError line otherwise."""
    p = im.require_file(path, what)
    if p.is_dir():
        entries = _folder_entries(p)
        if not entries:
            raise UserError(f"{what} {path} holds no videos (files {', '.join(videos.VIDEO_EXTENSIONS)} or frame folders)")
        lengths = [videos.video_num_frames(e) for e in entries]
        return VideoSet(str(path), "folder", sources=entries, lengths=lengths, identity=im.file_identity(p, "folder"))
    local = im.local_file(p)
    keys = im.npz_keys(local, str(path))
    if allow_stats and "mu" in keys:
        if "sigma" not in keys:
            raise UserError(f"{what} {path} has mu but no sigma")
        stats = im.as_stats(im.npz_member(local, "mu", str(path)), im.npz_member(local, "sigma", str(path)), f"{what} {path}")
        if stats.dim != FEATURE_DIM:
            raise UserError(f"{what} {path}: mu is {stats.dim}-d, FVD statistics are {FEATURE_DIM}-d (I3D logits)")
        return VideoSet(str(path), "stats", stats=stats, identity=im.file_identity(p, "npz"))
    if "arr_0" not in keys:
        raise UserError(f"{what} {path} has no arr_0 (videos){' nor mu/sigma (FVD statistics)' if allow_stats else ''}")
    arr = im.npz_member(local, "arr_0", str(path))
    _check_video_array(arr, f"{what} {path}")
    return VideoSet(str(path), "npz", array=arr, identity=im.file_identity(p, "npz"))


# ---- clips -------------------------------------------------------------------------------------


class ClipArray:
    """The selected clips of a VideoSet as a read-only uint8 (N, frames, H, W, 3) array-like
    (what `i3d.extract_features` indexes): rows decode only their frames, a few in parallel."""

    def __init__(self, video_set: VideoSet, rows: list[int], indices: list[np.ndarray]):
        self.video_set, self.rows, self.indices = video_set, rows, indices
        first = self._read(0)
        self.shape = (len(rows), *first.shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 5

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, j: int) -> np.ndarray:
        vs, row, idx = self.video_set, self.rows[j], self.indices[j]
        if vs.array is not None:
            clip = np.asarray(vs.array[row, idx])
            where = f"{vs.path} video {row}"
        else:
            clip = videos.read_video(vs.sources[row], idx)
            where = str(vs.sources[row])
        if hasattr(self, "shape") and clip.shape != self.shape[1:]:
            got, want = f"{clip.shape[2]}x{clip.shape[1]}", f"{self.shape[3]}x{self.shape[2]}"
            raise UserError(f"{where}: frames are {got}, the first clip's {want} (all videos must have one size)")
        return clip

    def __getitem__(self, index):
        idx = np.arange(len(self))[index]
        if np.ndim(idx) == 0:
            return self._read(int(idx))
        out = np.empty((len(idx), *self.shape[1:]), np.uint8)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(idx)))) as pool:
            for j, clip in enumerate(pool.map(self._read, (int(i) for i in idx))):
                out[j] = clip
        return out


def select_clips(
    video_set: VideoSet, *, num: int, frames: int = FRAMES, subsample: int = 1, random_offset: bool = True, seed: int = 0
) -> tuple[list[int], list[np.ndarray]]:
    """The official clip selection: videos with at least frames * subsample frames; a random
    subset of `num` of them when there are more (seeded); per video the frames
    offset + [0, s, ..., (frames - 1) s], offset uniform in [0, len - frames * s + s - 1]
    (`random_offset`) or 0. Returns (video rows, frame indices per row)."""
    if frames < 1 or subsample < 1 or num < 1:
        raise UserError(f"clip frames, subsample and count must be >= 1, got {frames}, {subsample}, {num}")
    need = frames * subsample
    eligible = [i for i in range(video_set.num_videos) if video_set.length(i) >= need]
    if not eligible:
        longest = max((video_set.length(i) for i in range(video_set.num_videos)), default=0)
        raise UserError(f"{video_set.path}: no video has the {need} frames a {frames}-frame clip needs (longest: {longest})")
    rng = np.random.default_rng(seed)
    if len(eligible) > num:
        eligible = sorted(rng.permutation(eligible)[:num].tolist())
    offsets = [
        int(rng.integers(0, video_set.length(i) - need + subsample)) if random_offset else 0 for i in eligible
    ]
    return eligible, [o + np.arange(0, need, subsample) for o in offsets]


def clips(video_set: VideoSet, **kwargs) -> ClipArray:
    """`select_clips` as a ClipArray."""
    rows, indices = select_clips(video_set, **kwargs)
    return ClipArray(video_set, rows, indices)


# ---- reference features and their cache ---------------------------------------------------------


def _cache_path(video_set: VideoSet, selection: dict, fingerprint: str):
    key = json.dumps(
        {"reference": video_set.identity, "clips": selection, "i3d": fingerprint, "version": FEATURES_VERSION}, sort_keys=True
    )
    return paths.cache_dir("i3d_features") / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def _read_cache(path, n: int) -> np.ndarray | None:
    try:
        with np.load(os.fspath(path), allow_pickle=False) as z:
            f = np.asarray(z["features"], np.float32)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None
    return f if f.shape == (n, FEATURE_DIM) and np.isfinite(f).all() else None


def _write_cache(path, features: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=os.fspath(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, features=np.asarray(features, np.float32))
        os.replace(tmp, os.fspath(path))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def reference_features(
    video_set: VideoSet, params, clip_array: ClipArray, selection: dict, *, fingerprint: str, batch_size: int = 32,
    mesh=None, progress: bool = False,
) -> tuple[np.ndarray, bool]:
    """I3D features of the reference clips, from the cache when every process has a valid
    copy, else extracted over all devices and cached atomically. (features, from_cache)."""
    from skipdit_jax.evaluation import i3d

    path = _cache_path(video_set, selection, fingerprint)
    cached = _read_cache(path, len(clip_array))
    if im.all_processes_agree(cached is not None):
        return cached, True
    feats = i3d.extract_features(params, clip_array, batch_size=batch_size, mesh=mesh, progress=progress)
    if cached is None:  # every process keeps its own (local) cache, as the Inception features
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
            _write_cache(path, feats)
    return feats, False


# ---- the whole evaluation -------------------------------------------------------------------------


def _resolve_i3d(spec):
    from skipdit_jax.evaluation import i3d

    if spec is None or isinstance(spec, (str, os.PathLike)):
        spec = None if spec is None else os.fspath(spec)
        return i3d.load_i3d(spec), spec or os.environ.get(i3d.ENV_VAR, "")
    return spec, "parameters given in Python"


def prepare(samples, reference, *, num_samples=NUM_VIDEOS, num_reference=NUM_VIDEOS, frames=FRAMES, ref_subsample=1, seed=0):
    """Open and check both sides and select their clips, before any weights load:
    (sample clips, reference VideoSet, reference clips or None, reference selection)."""
    from skipdit_jax.evaluation.i3d import MIN_FRAMES

    if frames < MIN_FRAMES:
        raise UserError(f"FVD clips need at least {MIN_FRAMES} frames for the I3D, got {frames}")
    sample_set = samples if isinstance(samples, VideoSet) else open_videos(samples, what="samples")
    ref_set = reference if isinstance(reference, VideoSet) else open_videos(reference, allow_stats=True, what="reference")
    sample_clips = clips(sample_set, num=num_samples, frames=frames, subsample=1, random_offset=False, seed=seed)
    if len(sample_clips) < 2:
        raise UserError(f"FVD needs at least 2 sample videos of {frames}+ frames, got {len(sample_clips)}")
    ref_clips, selection = None, None
    if ref_set.stats is None:
        selection = {"num": num_reference, "frames": frames, "subsample": ref_subsample, "offset": "random", "seed": seed}
        ref_clips = clips(ref_set, num=num_reference, frames=frames, subsample=ref_subsample, random_offset=True, seed=seed)
        if len(ref_clips) < 2:
            raise UserError(f"FVD needs at least 2 reference videos of {frames * ref_subsample}+ frames, got {len(ref_clips)}")
    return sample_clips, ref_set, ref_clips, selection


def evaluate_videos(
    samples, reference, *, i3d=None, num_samples: int = NUM_VIDEOS, num_reference: int = NUM_VIDEOS, frames: int = FRAMES,
    ref_subsample: int = 1, seed: int = 0, batch_size: int = 32, mesh=None, progress: bool = False, save_ref_stats=None,
) -> dict:
    """FVD of `samples` (sample .npz, video folder or VideoSet) against `reference` (video
    folder, video .npz, FVD-statistics .npz or VideoSet), with the protocol of the module
    docstring. `i3d`: a load_i3d spec, None ($SKIPDIT_I3D) or params. Every input is
    checked before the weights load. Returns {"fvd", "num_samples", "num_reference",
    "reference_statistics", "protocol", "i3d", "settings"}."""
    from skipdit_jax.evaluation import i3d as i3d_lib

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    sample_clips, ref_set, ref_clips, selection = prepare(
        samples, reference, num_samples=num_samples, num_reference=num_reference, frames=frames,
        ref_subsample=ref_subsample, seed=seed,
    )
    params, shown = _resolve_i3d(i3d)
    fingerprint = im.weights_fingerprint(params)
    cached = False
    if ref_set.stats is not None:
        ref_stats = ref_set.stats
    else:
        ref_feats, cached = reference_features(
            ref_set, params, ref_clips, selection, fingerprint=fingerprint, batch_size=batch_size, mesh=mesh, progress=progress
        )
        ref_stats = fvd_stats(ref_feats)
        if save_ref_stats is not None and jax.process_index() == 0:
            save_stats(save_ref_stats, ref_stats)
    feats = i3d_lib.extract_features(params, sample_clips, batch_size=batch_size, mesh=mesh, progress=progress)
    return {
        "fvd": compute_fvd(feats, ref_stats),
        "num_samples": len(sample_clips),
        "num_reference": 0 if ref_clips is None else len(ref_clips),
        "reference_statistics": (
            "precomputed (mu/sigma in the reference file)" if ref_clips is None else "computed from reference clips"
        ),
        "reference_features_cached": bool(cached),
        "protocol": PROTOCOL,
        "i3d": {"weights": shown, "fingerprint": fingerprint},
        "settings": {
            "frames": frames, "num_samples": num_samples, "num_reference": num_reference, "ref_subsample": ref_subsample,
            "sample_clip": "first frames", "reference_clip": "random offset", "seed": seed, "batch_size": batch_size,
            "clip_shape": list(sample_clips.shape[1:]), "processes": jax.process_count(), "devices": jax.device_count(),
        },
    }


__all__ = [
    "FRAMES",
    "NUM_VIDEOS",
    "PROTOCOL",
    "fvd_stats",
    "compute_fvd",
    "frechet_video_distance",
    "save_stats",
    "VideoSet",
    "open_videos",
    "npz_array_shape",
    "ClipArray",
    "select_clips",
    "clips",
    "reference_features",
    "prepare",
    "evaluate_videos",
]
