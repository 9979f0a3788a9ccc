"""Turning sample arrays into PNG grids."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from skipdit_jax import paths


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 with the official rounding: clamp(127.5 * x + 128)."""
    return np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)


def latents_for_display(latents: np.ndarray) -> np.ndarray:
    """A viewable picture of latents (images (B, H, W, C) or videos (B, F, H, W, C)):
    channels 0-2 (or the one channel), each standardised over all samples, frames and
    positions, mapped to [-1, 1]. Not a decoded image."""
    x = np.asarray(latents, np.float32)
    x = x[..., :3] if x.shape[-1] >= 3 else x[..., :1]
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes, keepdims=True)
    std = x.std(axis=axes, keepdims=True) + 1e-6
    return np.clip((x - mean) / (3 * std), -1, 1)


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (rows*H, cols*W, C) uint8 grid with `pad` pixels between."""
    b, h, w, c = images.shape
    cols = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img
    return grid


def make_video_grid(videos: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(B, F, H, W, C) uint8 -> (F, rows*H, cols*W, C) uint8: frame f of every video in
    one grid, for every f (an animation of grids)."""
    return np.stack([make_grid(videos[:, f], nrow, pad) for f in range(videos.shape[1])])


def save_grid(images: np.ndarray, path: paths.PathLike, nrow: int | None = None, upscale: int = 1) -> None:
    """Save [-1, 1] images (B, H, W, C), C in {1, 3}, as one PNG grid (local or remote
    path, written atomically)."""
    grid = make_grid(to_uint8(images), nrow)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    img = Image.fromarray(grid)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    paths.save_png(path, img)
