"""Training data: sources (`sources`: MNIST, image folders, in-memory arrays;
`video_sources`: folders of videos), latent
files (`latents`: ArrayRecord shards and their writer) and the Grain pipelines
(`pipeline`: the sharded, resumable training iterator and evaluation batches)."""

from skipdit_jax.data.latents import LATENTS_METADATA, LatentSource, latents_exist, write_latents
from skipdit_jax.data.pipeline import (
    iterator_state_restore_args,
    iterator_state_save_args,
    make_eval_batches,
    make_train_iterator,
)
from skipdit_jax.data.sources import IMAGE_EXTENSIONS, ArraySource, ImageFolderSource, center_crop_arr, mnist_source
from skipdit_jax.data.video_sources import VideoFolderSource, clip_indices, resize_frames

__all__ = [
    "ArraySource",
    "mnist_source",
    "center_crop_arr",
    "ImageFolderSource",
    "VideoFolderSource",
    "clip_indices",
    "resize_frames",
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
