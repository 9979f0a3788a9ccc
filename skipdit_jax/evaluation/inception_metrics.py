"""FID, sFID, Inception Score and improved precision/recall of sample sets, with the
semantics of ADM's `evaluations/evaluator.py` (openai/guided-diffusion), the evaluator
behind the DiT and Skip-DiT papers' numbers.

- Statistics: mean and covariance (`np.cov(rowvar=False)`) in float64; FID is the Fréchet
  distance of the 2048-d pool features' Gaussians, sFID the same on the 2023-d spatial
  features. A reference .npz that holds `mu`/`sigma` (an ADM reference batch) supplies its
  precomputed statistics, as ADM's `read_statistics` does.
- Inception Score: softmax of the bias-free logits (`pool @ W`), split into chunks of
  5000, exp(mean KL(p(y|x) || p(y))) per chunk, averaged over chunks, in float32.
- Precision/recall (Kynkäänniemi et al. 2019, ADM's ManifoldEstimator): k = 3; squared
  Euclidean distances in float16 (float32 when a block has a non-finite value); a point's
  radius is the k-th smallest distance of its row, the zero self-distance included; a
  sample is in the reference manifold when it lies within some reference point's radius.

The metric functions are pure NumPy/JAX on features; `evaluate_samples` reads the image
files, extracts Inception features over every device (`inception.extract_features`) and
caches the reference's features under `paths.cache_dir("inception_features")`.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import struct
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax import paths
from skipdit_jax.errors import UserError
from skipdit_jax.evaluation import image_metrics

PathLike = paths.PathLike

METRICS = ("fid", "sfid", "is", "precision", "recall")
METRIC_KEYS = {"fid": "fid", "sfid": "sfid", "is": "inception_score", "precision": "precision", "recall": "recall"}
K = 3  # ADM's nhood_sizes=(3,)
SPLIT_SIZE = 5000
ROW_BATCH_SIZE = COL_BATCH_SIZE = 10000
POOL_DIM, SPATIAL_DIM = 2048, 2023
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Bump when the feature extraction changes meaning, so cached reference features are not reused.
FEATURES_VERSION = 1


# ---- statistics and the Fréchet distance ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Mean (d,) and covariance (d, d) of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray

    @property
    def dim(self) -> int:
        return int(np.asarray(self.mu).shape[0])


def feature_stats(features, chunk: int = 4096) -> FeatureStats:
    """Mean and unbiased covariance (= `np.cov(features, rowvar=False)`) of (n, d) features,
    in float64, two passes over row chunks so 50K x 2048 float32 features never need a full
    float64 copy."""
    n = len(features)
    if n < 2:
        raise UserError(f"a covariance needs at least 2 feature vectors, got {n}")
    rows = lambda i: np.asarray(features[i : i + chunk], np.float64).reshape(min(chunk, n - i), -1)  # noqa: E731
    total = sum(rows(i).sum(axis=0) for i in range(0, n, chunk))
    mu = total / n
    sigma = np.zeros((mu.size, mu.size), np.float64)
    for i in range(0, n, chunk):
        x = rows(i) - mu
        sigma += x.T @ x
    return FeatureStats(mu, sigma / (n - 1))


def as_stats(mu, sigma, what: str) -> FeatureStats:
    mu = np.asarray(mu, np.float64)
    sigma = np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise UserError(f"{what}: mu must be (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    return FeatureStats(mu, sigma)


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2): ADM's FID formula,
    computed through symmetric eigendecompositions (image_metrics.frechet_distance) rather
    than scipy's sqrtm, which gives the same trace without complex round-off."""
    if a.dim != b.dim:
        raise UserError(f"cannot compare statistics of {a.dim}-d and {b.dim}-d features (mismatched feature dimensions)")
    return image_metrics.frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def frechet_distance_of_features(features, other: FeatureStats) -> float:
    """frechet_distance(feature_stats(features), other), exactly, without a d x d
    eigendecomposition when there are no more feature vectors than dimensions: with
    S1 = C^T C (C the centred features / sqrt(n - 1)), the non-zero eigenvalues of S1 S2
    are those of the symmetric PSD n x n matrix C S2 C^T, so tr((S1 S2)^1/2) is the sum of
    the square roots of its eigenvalues (few samples against a 2048-d reference)."""
    f = np.asarray(features, np.float64)
    n = len(f)
    if n < 2:
        raise UserError(f"a covariance needs at least 2 feature vectors, got {n}")
    f = f.reshape(n, -1)
    if f.shape[1] != other.dim:
        raise UserError(f"cannot compare statistics of {f.shape[1]}-d and {other.dim}-d features (mismatched feature dimensions)")
    if n > f.shape[1]:
        return frechet_distance(feature_stats(f), other)
    mu = f.mean(axis=0)
    c = (f - mu) / np.sqrt(n - 1)
    m = c @ np.asarray(other.sigma, np.float64) @ c.T
    covmean_trace = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))
    diff = mu - np.asarray(other.mu, np.float64)
    return float(diff @ diff + np.sum(c * c) + np.trace(other.sigma) - 2 * covmean_trace)


# ---- Inception Score ----------------------------------------------------------------------


def _softmax32(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def inception_score(logits, split_size: int = SPLIT_SIZE) -> float:
    """ADM's Inception Score of (n, classes) bias-free logits: p = softmax(logits) in
    float32; per consecutive chunk of `split_size` rows (the last may be shorter),
    exp(mean_i sum_y p_iy (log p_iy - log mean_j p_jy)); the mean over chunks. A
    probability that underflows to exactly 0 contributes 0 (the limit of p log p), where
    ADM's formula would give NaN."""
    logits = np.asarray(logits, np.float32)
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise UserError(f"Inception Score needs (n, classes) logits with n >= 1, got shape {logits.shape}")
    if split_size < 1:
        raise UserError(f"split_size must be >= 1, got {split_size}")
    preds = _softmax32(logits)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        marginal = np.expand_dims(np.mean(part, 0), 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), np.float32(0))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


# ---- improved precision and recall --------------------------------------------------------


def _pairwise(u, v, dtype):
    """ADM's _batch_pairwise_distances: max(||u||^2 - 2 u.v + ||v||^2, 0), in `dtype`."""
    u, v = u.astype(dtype), v.astype(dtype)
    nu = jnp.sum(jnp.square(u), axis=1)[:, None]
    nv = jnp.sum(jnp.square(v), axis=1)[None, :]
    uv = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(nu - 2 * uv + nv, jnp.zeros((), dtype))


def _distances(u, v, half: bool):
    """ADM's DistanceBlock: float16 distances, or float32 ones for the whole block when any
    float16 value is not finite; float32 output."""
    if not half:
        return _pairwise(u, v, jnp.float32)
    d16 = _pairwise(u, v, jnp.float16)
    return jax.lax.cond(
        jnp.all(jnp.isfinite(d16)), lambda: d16.astype(jnp.float32), lambda: _pairwise(u, v, jnp.float32)
    )


@functools.partial(jax.jit, static_argnames=("m", "half"))
def _smallest_block(u, v, num_valid_cols, m: int, half: bool):
    """The m smallest distances (ascending) of each row of u to the first num_valid_cols
    rows of v (the rest is padding)."""
    d = _distances(u, v, half)
    d = jnp.where(jnp.arange(v.shape[0])[None, :] < num_valid_cols, d, jnp.inf)
    return -jax.lax.top_k(-d, m)[0]


@functools.partial(jax.jit, static_argnames=("half",))
def _in_manifold_block(ref, ref_radii, samples, sample_radii, half: bool):
    """For a block of reference rows and sample columns: which samples lie within some
    reference point's radius, and which reference points within some sample's radius.
    Padding carries radius -inf, so it is never anyone's neighbour."""
    d = _distances(ref, samples, half)
    samples_in = jnp.any(d <= ref_radii[:, None], axis=0)
    ref_in = jnp.any(d <= sample_radii[None, :], axis=1)
    return samples_in, ref_in


def _check_features(features, what: str) -> np.ndarray:
    f = np.asarray(features, np.float32)
    if f.ndim != 2:
        raise UserError(f"{what} must be (n, d) feature vectors, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise UserError(f"{what} contain non-finite values")
    return f


def _blocks(n: int, size: int) -> Iterable[tuple[int, int]]:
    for begin in range(0, n, size):
        yield begin, min(begin + size, n)


def _padded(x: np.ndarray, size: int, fill=0.0) -> np.ndarray:
    if len(x) == size:
        return x
    pad = np.full((size - len(x), *x.shape[1:]), fill, x.dtype)
    return np.concatenate([x, pad])


def _check_dtype(distance_dtype: str) -> bool:
    if distance_dtype not in ("float16", "float32"):
        raise UserError(f"distance_dtype must be 'float16' (ADM) or 'float32', got {distance_dtype!r}")
    return distance_dtype == "float16"


def manifold_radii(
    features,
    k: int = K,
    row_batch_size: int = ROW_BATCH_SIZE,
    col_batch_size: int = COL_BATCH_SIZE,
    distance_dtype: str = "float16",
) -> np.ndarray:
    """Radius of each point's k-NN hypersphere, float32 (n,): the squared distance at index
    k of its sorted row of distances to all n points, its own (zero) distance included, as
    ADM's ManifoldEstimator.manifold_radii. Blocks of row_batch_size x col_batch_size
    distances; only the k+1 smallest per row are kept between column blocks, so memory is
    O(row_batch_size * (col_batch_size + k)), and the result does not depend on the blocks."""
    f = _check_features(features, "features")
    n = len(f)
    if not 0 <= k < n:
        raise UserError(f"precision/recall with k={k} need more than {k} feature vectors, got {n}")
    if row_batch_size < 1 or col_batch_size < 1:
        raise UserError("row_batch_size and col_batch_size must be >= 1")
    half = _check_dtype(distance_dtype)
    rb, cb = min(row_batch_size, n), min(col_batch_size, n)
    m = min(k + 1, cb)
    radii = np.zeros((n,), np.float32)
    for r0, r1 in _blocks(n, rb):
        rows = jnp.asarray(_padded(f[r0:r1], rb))
        best = None
        for c0, c1 in _blocks(n, cb):
            part = np.asarray(_smallest_block(rows, jnp.asarray(_padded(f[c0:c1], cb)), c1 - c0, m, half))
            best = part if best is None else np.sort(np.concatenate([best, part], axis=1), axis=1)[:, : k + 1]
        radii[r0:r1] = best[: r1 - r0, k]
    return radii


def precision_recall(
    ref_features,
    sample_features,
    k: int = K,
    row_batch_size: int = ROW_BATCH_SIZE,
    col_batch_size: int = COL_BATCH_SIZE,
    distance_dtype: str = "float16",
    ref_radii: np.ndarray | None = None,
    sample_radii: np.ndarray | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (ADM's compute_prec_recall): precision = the fraction
    of samples within the k-NN radius of some reference point, recall = the fraction of
    reference points within the k-NN radius of some sample. Reference rows and sample
    columns are processed in blocks (row_batch_size x col_batch_size distances at a time).
    Radii may be passed in (e.g. the reference's, computed once)."""
    ref = _check_features(ref_features, "reference features")
    smp = _check_features(sample_features, "sample features")
    if ref.shape[1] != smp.shape[1]:
        raise UserError(f"reference and sample features differ in dimension ({ref.shape[1]} vs {smp.shape[1]})")
    half = _check_dtype(distance_dtype)
    kw = dict(k=k, row_batch_size=row_batch_size, col_batch_size=col_batch_size, distance_dtype=distance_dtype)
    ref_r = manifold_radii(ref, **kw) if ref_radii is None else np.asarray(ref_radii, np.float32).reshape(len(ref))
    smp_r = manifold_radii(smp, **kw) if sample_radii is None else np.asarray(sample_radii, np.float32).reshape(len(smp))
    rb, cb = min(row_batch_size, len(ref)), min(col_batch_size, len(smp))
    samples_in = np.zeros((len(smp),), bool)
    ref_in = np.zeros((len(ref),), bool)
    for r0, r1 in _blocks(len(ref), rb):
        rows, rows_r = jnp.asarray(_padded(ref[r0:r1], rb)), jnp.asarray(_padded(ref_r[r0:r1], rb, -np.inf))
        for c0, c1 in _blocks(len(smp), cb):
            cols, cols_r = jnp.asarray(_padded(smp[c0:c1], cb)), jnp.asarray(_padded(smp_r[c0:c1], cb, -np.inf))
            s_in, r_in = _in_manifold_block(rows, rows_r, cols, cols_r, half)
            samples_in[c0:c1] |= np.asarray(s_in)[: c1 - c0]
            ref_in[r0:r1] |= np.asarray(r_in)[: r1 - r0]
    return float(np.mean(samples_in.astype(np.float64))), float(np.mean(ref_in.astype(np.float64)))


# ---- reading images -----------------------------------------------------------------------


def _remove_quietly(name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name)


def local_file(path: PathLike) -> str:
    """A local file name for `path`: itself, or for a URI a temporary copy that lives until
    the process exits (the images are memory-mapped from it)."""
    path = paths.as_path(path)
    if paths.is_local(path):
        return os.fspath(path)
    fd, name = tempfile.mkstemp(prefix="skipdit-eval-", suffix="-" + path.name)
    os.close(fd)
    atexit.register(_remove_quietly, name)
    paths.copy_file(path, name)
    return name


def npz_keys(local: str, shown: str) -> list[str]:
    try:
        with zipfile.ZipFile(local) as zf:
            return [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{shown} is not a readable .npz file ({type(e).__name__}: {e})") from None


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


def npz_member(local: str, key: str, shown: str):
    """The array `key` of the .npz `local` without reading it into memory when the member is
    stored uncompressed (np.savez's default, and ADM's reference batches): a read-only
    memmap at the member's data offset. Compressed members are read once into memory.
    Never unpickles."""
    try:
        with zipfile.ZipFile(local) as zf:
            info = zf.getinfo(key + ".npy")
            with zf.open(info) as f:
                header = _npy_header(f)
        if header is not None and header[2].hasobject:
            raise UserError(f"{shown}: {key} holds Python objects; only numeric arrays are read")
        if header is not None and info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
            shape, fortran, dtype = header
            with open(local, "rb") as raw:
                raw.seek(info.header_offset)
                local_header = raw.read(30)
                if local_header[:4] != b"PK\x03\x04":
                    raise zipfile.BadZipFile("bad local file header")
                name_len, extra_len = struct.unpack("<HH", local_header[26:30])
                raw.seek(info.header_offset + 30 + name_len + extra_len)
                _npy_header(raw)
                offset = raw.tell()
            if int(np.prod(shape)) == 0:
                return np.zeros(shape, dtype)
            return np.memmap(local, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order="F" if fortran else "C")
        with np.load(local, allow_pickle=False) as npz:
            return npz[key]
    except UserError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:
        raise UserError(f"{shown}: cannot read {key} ({type(e).__name__}: {e})") from None


def _check_images(images, shown: str) -> None:
    shape, dtype = tuple(images.shape), np.dtype(images.dtype)
    if len(shape) != 4 or shape[-1] != 3:
        raise UserError(f"{shown}: images must be (N, H, W, 3) RGB, got shape {shape}")
    if dtype != np.uint8:
        raise UserError(f"{shown}: images must be uint8 in [0, 255], got {dtype}")
    if shape[0] < 1 or shape[1] < 1 or shape[2] < 1:
        raise UserError(f"{shown}: no images (shape {shape})")


def require_file(path: PathLike, what: str) -> paths.epath.Path:
    p = paths.as_path(path)
    if not p.exists():
        raise UserError(f"{what} {path} does not exist")
    return p


def read_image_npz(path: PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """The images (arr_0, uint8 (N, H, W, 3), memory-mapped when stored uncompressed) and
    labels (arr_1 (N,) integers, or None) of an ADM-style .npz, validated: one UserError
    line for a missing file, a file that is not an .npz, no arr_0, or images that are not
    uint8 RGB."""
    p = require_file(path, "sample file")
    if p.is_dir():
        raise UserError(f"{path} is a directory, not an .npz of images")
    local = local_file(p)
    keys = npz_keys(local, str(path))
    if "arr_0" not in keys:
        raise UserError(f"{path} has no arr_0 (the images array of an ADM .npz); it holds {sorted(keys) or 'nothing'}")
    images = npz_member(local, "arr_0", str(path))
    _check_images(images, str(path))
    labels = None
    if "arr_1" in keys:
        labels = np.asarray(npz_member(local, "arr_1", str(path)))
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{path}: arr_1 must be {images.shape[0]} integer labels, got {labels.dtype} {labels.shape}")
    return images, labels


class ImageFolderArray:
    """The images of a folder as a read-only (N, H, W, 3) uint8 array-like: indexing with
    an int, a slice or an index array decodes just those files (PIL, RGB)."""

    def __init__(self, files: list[paths.epath.Path], height: int, width: int):
        self.files = files
        self.shape = (len(files), height, width, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, i: int) -> np.ndarray:
        from PIL import Image

        with self.files[i].open("rb") as f, Image.open(f) as im:
            a = np.asarray(im.convert("RGB"))
        if a.shape != self.shape[1:]:
            raise UserError(f"{self.files[i]} is {a.shape[1]}x{a.shape[0]}, the other images {self.shape[2]}x{self.shape[1]}")
        return a

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self._read(range(len(self))[index])
        idx = np.arange(len(self))[index]
        out = np.empty((len(idx), *self.shape[1:]), np.uint8)
        if len(idx):
            from concurrent.futures import ThreadPoolExecutor

            # PIL decodes without the GIL: a few threads keep the accelerator fed.
            with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1, len(idx))) as pool:
                for j, image in enumerate(pool.map(self._read, (int(i) for i in idx))):
                    out[j] = image
        return out

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)


def _read_image_folder(path: PathLike) -> ImageFolderArray:
    from PIL import Image

    root = paths.as_path(path)
    files = sorted((f for f in paths.walk_files(root) if f.suffix.lower() in IMAGE_SUFFIXES), key=str)
    if not files:
        raise UserError(f"{path} holds no PNG or JPEG images")
    sizes = {}
    for f in files:
        try:
            with f.open("rb") as fh, Image.open(fh) as im:
                sizes.setdefault(im.size, f)
        except Exception as e:  # noqa: BLE001 - any unreadable image is one user error
            raise UserError(f"cannot read image {f} ({type(e).__name__}: {e})") from None
        if len(sizes) > 1:
            (s0, f0), (s1, f1) = list(sizes.items())[:2]
            raise UserError(f"images in {path} are not all one size: {f0.name} is {s0[0]}x{s0[1]}, {f1.name} is {s1[0]}x{s1[1]}")
    (w, h), _ = next(iter(sizes.items()))
    return ImageFolderArray(files, h, w)


# ---- the reference ------------------------------------------------------------------------


@dataclasses.dataclass
class Reference:
    """A reference set: images (array-like (N, H, W, 3) uint8, or None when the file holds
    statistics only) and/or precomputed statistics (ADM reference batches' mu/sigma for the
    pool features, mu_s/sigma_s for the spatial ones). `identity` names the file's version
    (path, size, modification time) for the feature cache."""

    path: str
    kind: str  # "npz" or "folder"
    images: Any | None
    stats: FeatureStats | None
    spatial_stats: FeatureStats | None
    identity: dict

    @property
    def num_images(self) -> int:
        return 0 if self.images is None else int(self.images.shape[0])


def file_identity(p: paths.epath.Path, kind: str) -> dict:
    def stat(q):
        try:
            s = q.stat()
            size = getattr(s, "st_size", None) or getattr(s, "length", None)
            return [size, str(getattr(s, "st_mtime_ns", None) or getattr(s, "mtime", None))]
        except Exception:  # noqa: BLE001 - a remote file system without stat: name-only identity
            return [None, None]

    if kind == "folder":
        listing = json.dumps([[str(f), *stat(f)] for f in sorted(paths.walk_files(p), key=str)])
        return {"kind": kind, "path": str(p), "files": hashlib.sha256(listing.encode()).hexdigest()}
    if paths.is_local(p):
        s = os.stat(os.fspath(p))
        return {"kind": kind, "path": os.path.realpath(os.fspath(p)), "size": s.st_size, "mtime_ns": s.st_mtime_ns}
    return {"kind": kind, "path": str(p), "stat": stat(p)}


def load_reference(path: PathLike) -> Reference:
    """Open a reference without extracting features: an ADM reference batch .npz (arr_0
    uint8 images and/or mu, sigma, mu_s, sigma_s), any .npz with arr_0 images, or a folder
    of PNG/JPEG images all of one size. Validated; one UserError line otherwise."""
    p = require_file(path, "reference")
    if p.is_dir():
        return Reference(str(path), "folder", _read_image_folder(p), None, None, file_identity(p, "folder"))
    local = local_file(p)
    keys = npz_keys(local, str(path))
    images = stats = spatial = None
    if "arr_0" in keys:
        images = npz_member(local, "arr_0", str(path))
        _check_images(images, str(path))
    if "mu" in keys:  # ADM's read_statistics: precomputed statistics win over the images
        if "sigma" not in keys:
            raise UserError(f"reference {path} has mu but no sigma")
        stats = as_stats(npz_member(local, "mu", str(path)), npz_member(local, "sigma", str(path)), f"reference {path}")
        if "mu_s" in keys and "sigma_s" in keys:
            mu_s, sigma_s = npz_member(local, "mu_s", str(path)), npz_member(local, "sigma_s", str(path))
            spatial = as_stats(mu_s, sigma_s, f"reference {path} (spatial)")
    if images is None and stats is None:
        held = sorted(keys) or "nothing"
        raise UserError(f"reference {path} has neither arr_0 (images) nor mu/sigma (statistics); it holds {held}")
    return Reference(str(path), "npz", images, stats, spatial, file_identity(p, "npz"))


# ---- features and their cache -------------------------------------------------------------


def weights_fingerprint(params) -> str:
    """A short sha256 of the Inception parameters (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for keys, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(keys)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _cache_path(reference: Reference, fingerprint: str) -> paths.epath.Path:
    key = json.dumps({"reference": reference.identity, "inception": fingerprint, "version": FEATURES_VERSION}, sort_keys=True)
    return paths.cache_dir("inception_features") / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def _read_cache(path: paths.epath.Path, n: int) -> dict[str, np.ndarray] | None:
    """Cached features, or None when the file is missing, unreadable or inconsistent (a
    corrupt cache is recomputed, never trusted)."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as z:
            out = {"pool": np.asarray(z["pool"], np.float32), "spatial": np.asarray(z["spatial"], np.float32)}
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None
    if out["pool"].shape != (n, POOL_DIM) or out["spatial"].shape != (n, SPATIAL_DIM):
        return None
    if not (np.isfinite(out["pool"]).all() and np.isfinite(out["spatial"]).all()):
        return None
    return out


def _write_cache(path: paths.epath.Path, features: Mapping[str, np.ndarray]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=os.fspath(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, pool=np.asarray(features["pool"], np.float32), spatial=np.asarray(features["spatial"], np.float32))
        os.replace(tmp, os.fspath(path))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def all_processes_agree(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def reference_features(
    reference: Reference, params, *, batch_size: int = 200, mesh=None, progress: bool = False, fingerprint: str | None = None
) -> tuple[dict[str, np.ndarray], bool]:
    """Pool and spatial Inception features of the reference images, from the cache under
    paths.cache_dir("inception_features") when every process has a valid copy (keyed by
    the reference's identity and the weights' fingerprint), else extracted over all
    devices and written there atomically. Returns (features, came_from_cache)."""
    from skipdit_jax.evaluation import inception

    if reference.images is None:
        raise UserError(f"reference {reference.path} holds statistics only, no images")
    fingerprint = fingerprint or weights_fingerprint(params)
    path = _cache_path(reference, fingerprint)
    cached = _read_cache(path, reference.num_images)
    if all_processes_agree(cached is not None):
        return cached, True
    feats = inception.extract_features(params, reference.images, batch_size=batch_size, mesh=mesh, progress=progress)
    feats = {"pool": np.asarray(feats["pool"], np.float32), "spatial": np.asarray(feats["spatial"], np.float32)}
    if cached is None:
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
            _write_cache(path, feats)
    return feats, False


# ---- all metrics ----------------------------------------------------------------------------


def parse_metrics(metrics: str | Iterable[str] | None) -> tuple[str, ...]:
    """Metric names ("fid,sfid,is,precision,recall" or a list), checked, in canonical order."""
    if metrics is None:
        return METRICS
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise UserError(f"unknown metric(s) {bad or names}; choose from {','.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)


def check_inputs(num_samples: int, reference: Reference, metrics: tuple[str, ...], k: int = K) -> None:
    """Everything about the inputs that can be refused before weights are loaded."""
    if {"fid", "sfid"} & set(metrics) and num_samples < 2:
        raise UserError(f"FID needs at least 2 samples for a covariance, got {num_samples}")
    if reference.images is None:
        if {"precision", "recall"} & set(metrics):
            raise UserError(
                f"precision/recall need reference images; {reference.path} holds statistics only (choose --metrics fid,sfid,is)"
            )
        if "sfid" in metrics and reference.spatial_stats is None:
            raise UserError(f"sFID needs reference images or mu_s/sigma_s; {reference.path} has neither")
    elif reference.stats is None and {"fid", "sfid"} & set(metrics) and reference.num_images < 2:
        raise UserError(f"FID needs at least 2 reference images for a covariance, got {reference.num_images}")
    if reference.stats is not None and reference.stats.dim != POOL_DIM:
        raise UserError(
            f"reference {reference.path}: mu is {reference.stats.dim}-d, Inception pool features are {POOL_DIM}-d "
            "(mismatched feature dimensions)"
        )
    if reference.spatial_stats is not None and reference.spatial_stats.dim != SPATIAL_DIM:
        raise UserError(
            f"reference {reference.path}: mu_s is {reference.spatial_stats.dim}-d, spatial features are {SPATIAL_DIM}-d "
            "(mismatched feature dimensions)"
        )
    if {"precision", "recall"} & set(metrics):
        for what, n in (("samples", num_samples), ("reference images", reference.num_images)):
            if n <= k:
                raise UserError(f"precision/recall with k={k} need more than {k} {what}, got {n}")


def compute_metrics(
    sample_features: Mapping[str, np.ndarray],
    reference: Reference,
    reference_feats: Mapping[str, np.ndarray] | None,
    metrics: tuple[str, ...] = METRICS,
    *,
    distance_dtype: str = "float16",
    row_batch_size: int = ROW_BATCH_SIZE,
    col_batch_size: int = COL_BATCH_SIZE,
) -> dict[str, float]:
    """The requested metrics from sample features ("pool", "logits", "spatial") and the
    reference (its precomputed statistics when present, else the statistics of
    `reference_feats`)."""
    out: dict[str, float] = {}

    def ref_stats(stats, key):
        return stats if stats is not None else feature_stats(reference_feats[key])

    if "fid" in metrics:
        out["fid"] = frechet_distance_of_features(sample_features["pool"], ref_stats(reference.stats, "pool"))
    if "sfid" in metrics:
        out["sfid"] = frechet_distance_of_features(sample_features["spatial"], ref_stats(reference.spatial_stats, "spatial"))
    if "is" in metrics:
        out["inception_score"] = inception_score(sample_features["logits"])
    if {"precision", "recall"} & set(metrics):
        p, r = precision_recall(
            reference_feats["pool"],
            sample_features["pool"],
            row_batch_size=row_batch_size,
            col_batch_size=col_batch_size,
            distance_dtype=distance_dtype,
        )
        if "precision" in metrics:
            out["precision"] = p
        if "recall" in metrics:
            out["recall"] = r
    return out


def _resolve_inception(inception_arg):
    """(params, description) from a spec string / None (load_inception) or a params tree."""
    from skipdit_jax.evaluation import inception

    if inception_arg is None or isinstance(inception_arg, (str, os.PathLike)):
        spec = None if inception_arg is None else os.fspath(inception_arg)
        shown = spec or os.environ.get("SKIPDIT_INCEPTION") or inception.INCEPTION_WEIGHTS_URL
        return inception.load_inception(spec), shown
    return inception_arg, "parameters given in Python"


def evaluate_samples(
    samples_path: PathLike,
    ref_path: PathLike | Reference,
    *,
    inception=None,
    batch_size: int = 200,
    mesh=None,
    metrics: str | Iterable[str] | None = None,
    distance_dtype: str = "float16",
    progress: bool = False,
) -> dict:
    """ADM's evaluation of the sample .npz `samples_path` against a reference (.npz,
    image folder or a loaded Reference). `inception`: a load_inception spec, None (the
    default weights) or a parameter tree. Every input is checked before the weights load.
    Returns {"fid", "sfid", "inception_score", "precision", "recall" (those requested),
    "num_samples", "num_reference", "reference_statistics", "inception", "settings"}."""
    metrics = parse_metrics(metrics)
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    _check_dtype(distance_dtype)
    images, _ = read_image_npz(samples_path)
    reference = ref_path if isinstance(ref_path, Reference) else load_reference(ref_path)
    check_inputs(images.shape[0], reference, metrics)

    params, shown = _resolve_inception(inception)
    from skipdit_jax.evaluation import inception as inception_lib

    fingerprint = weights_fingerprint(params)
    need_ref = bool(
        {"precision", "recall"} & set(metrics)
        or ("fid" in metrics and reference.stats is None)
        or ("sfid" in metrics and reference.spatial_stats is None)
    )
    ref_feats, cached = (None, False)
    if need_ref:
        ref_feats, cached = reference_features(
            reference, params, batch_size=batch_size, mesh=mesh, progress=progress, fingerprint=fingerprint
        )
    feats = inception_lib.extract_features(params, images, batch_size=batch_size, mesh=mesh, progress=progress)
    values = compute_metrics(feats, reference, ref_feats, metrics, distance_dtype=distance_dtype)
    precomputed = reference.stats is not None
    return {
        **values,
        "num_samples": int(images.shape[0]),
        "num_reference": reference.num_images,
        "reference_statistics": (
            "precomputed (mu/sigma in the reference file)" if precomputed else "computed from the reference images"
        ),
        "reference_features_cached": bool(cached),
        "inception": {"weights": shown, "fingerprint": fingerprint},
        "settings": {
            "metrics": list(metrics),
            "batch_size": batch_size,
            "k": K,
            "split_size": SPLIT_SIZE,
            "distance_dtype": distance_dtype,
            "row_batch_size": ROW_BATCH_SIZE,
            "col_batch_size": COL_BATCH_SIZE,
            "processes": jax.process_count(),
            "devices": jax.device_count(),
        },
    }
