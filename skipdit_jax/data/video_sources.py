"""Video training data: `VideoFolderSource` (a folder of videos or frame folders) and the
official class-to-video clip sampling and resizing (Latte's datasets/video_transforms.py),
re-implemented in numpy.

A training record of a video source is

    {"image": float32 (F_total, H, W, 3) in [-1, 1], "label": int32}

with F_total = num_frames (+ images_per_video joint images, appended by the pipeline).

The source itself is deterministic: record i is only {"video_index": i, "label": ...}.
Which frames a training example holds is drawn from Grain's per-example rng by the
`LoadClip` RandomMap (`source.random_transform`, applied first by
`skipdit_jax.data.make_train_iterator`), so a run is reproducible from its seed and resumes
exactly. `source.clip(i, rng)` is the same decoding for any other caller (e.g.
`skipdit extract-latents --video`).

Clip sampling (TemporalRandomCrop(num_frames * frame_interval) of the official datasets):
a window of size = num_frames * frame_interval frames starts at a uniform start in
[0, max(0, total - size - 1)] and ends at min(start + size, total); then
  - "linspace" (the video-file datasets UCF-101 / FaceForensics): the frames
    linspace(start, end - 1, num_frames) truncated to integers;
  - "stride" (the frame-folder datasets Sky / Taichi): every frame_interval-th frame from
    the start (frames[idx0 : idx_last + 1 : frame_interval] of the official code).
A video shorter than the window is covered whole (the frames come closer together, as the
official code does); one with fewer than num_frames frames is an error naming it (the
official code fails an assertion there). As in the official code the last frame of a
long video is never the end of a window.
"""

from __future__ import annotations

import math

import grain
import numpy as np

from skipdit_jax import paths
from skipdit_jax.errors import ConfigError, UserError

RESIZE_MODES = ("center_crop", "center_crop_resize")
FRAME_SAMPLING = ("linspace", "stride")


# ---- clip indices -----------------------------------------------------------------------------
def temporal_window(total: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """TemporalRandomCrop(size): (begin, end) with begin uniform in [0, max(0, total-size-1)]."""
    begin = int(rng.integers(0, max(0, total - size - 1) + 1))
    return begin, min(begin + size, total)


def clip_indices(
    total: int, num_frames: int, frame_interval: int, rng: np.random.Generator, sampling: str = "linspace"
) -> np.ndarray:
    """The `num_frames` frame indices of one random clip of a `total`-frame video (see the
    module docstring). Raises UserError when total < num_frames."""
    if total < num_frames:
        raise UserError(f"a video has {total} frames, fewer than the {num_frames} frames of a clip")
    begin, end = temporal_window(total, num_frames * frame_interval, rng)
    index = np.linspace(begin, end - 1, num_frames).astype(np.int64)  # numpy's dtype=int truncation
    if sampling == "stride" and end - begin >= num_frames * frame_interval:
        index = begin + frame_interval * np.arange(num_frames)
    return index


# ---- resizing (torch.nn.functional.interpolate, bilinear, align_corners=False) ------------------
def _bilinear_axis(x: np.ndarray, axis: int, out_len: int, inv_scale: float) -> np.ndarray:
    """Resample `axis` to `out_len` samples: source coordinate (o + 0.5) * inv_scale - 0.5,
    clamped at 0, linear between the two neighbours (as PyTorch's bilinear, no antialias)."""
    n = x.shape[axis]
    src = np.maximum((np.arange(out_len, dtype=np.float32) + 0.5) * np.float32(inv_scale) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (src - i0).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = out_len
    w = w.reshape(shape)
    return np.take(x, i0, axis=axis) * (1 - w) + np.take(x, i1, axis=axis) * w


def resize_frames(frames_uint8: np.ndarray, image_size: int, mode: str) -> np.ndarray:
    """uint8 (F, H, W, 3) -> float32 (F, image_size, image_size, 3) in [-1, 1].

    "center_crop" = UCFCenterCropVideo: scale by s = image_size / min(H, W) (output sides
    floor(side * s)), then the central square (offsets round((side - size) / 2)).
    "center_crop_resize" = CenterCropResizeVideo: the central min(H, W) square, then resize
    it to image_size. Both bilinear on [0, 1] values, then Normalize(0.5, 0.5)."""
    x = frames_uint8.astype(np.float32) / 255.0
    h, w = x.shape[1:3]
    if mode == "center_crop":
        scale = image_size / min(h, w)
        # PyTorch's output sides floor(side * s); for some short sides (e.g. 322 -> 256) that
        # rounds to image_size - 1, where the official crop fails: take image_size there.
        oh, ow = max(math.floor(h * scale), image_size), max(math.floor(w * scale), image_size)
        x = _bilinear_axis(_bilinear_axis(x, 1, oh, 1.0 / scale), 2, ow, 1.0 / scale)
        i, j = int(round((oh - image_size) / 2.0)), int(round((ow - image_size) / 2.0))
        x = x[:, i : i + image_size, j : j + image_size]
    elif mode == "center_crop_resize":
        s = min(h, w)
        i, j = (int(round((h - s) / 2.0)), 0) if h > w else (0, int(round((w - s) / 2.0)))
        x = x[:, i : i + s, j : j + s]
        x = _bilinear_axis(_bilinear_axis(x, 1, image_size, s / image_size), 2, image_size, s / image_size)
    else:
        raise ConfigError(f"video resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    return np.ascontiguousarray((x - 0.5) / 0.5, dtype=np.float32)


# ---- the folder source --------------------------------------------------------------------------
def find_videos(root) -> list:
    """Videos under `root`, sorted by path: files with a VIDEO_EXTENSIONS suffix, and
    folders that directly hold frame images (a frame folder is one video)."""
    from skipdit_jax.videos import FRAME_EXTENSIONS, VIDEO_EXTENSIONS

    videos, frame_dirs = [], set()
    for p in paths.walk_files(root):
        name = p.name.lower()
        if name.startswith("."):
            continue
        if name.endswith(VIDEO_EXTENSIONS):
            videos.append(p)
        elif name.endswith(FRAME_EXTENSIONS):
            frame_dirs.add(str(p.parent))
    videos.extend(paths.as_path(d) for d in frame_dirs)
    return sorted(videos, key=lambda p: str(p))


class VideoFolderSource:
    """A folder of videos (files PyAV decodes, or frame folders), read with
    `skipdit_jax.videos.read_video`; local or remote.

    classes=True: the UCF-101 layout ROOT/CLASS/**/VIDEO, class folders sorted by name give
    the labels 0..C-1; classes=False: every video under ROOT, label 0 (unconditional).
    Record i is {"video_index": int32 i, "label": int32}; `clip(i, rng)` decodes a random
    clip (see the module docstring), `random_frame(i, rng)` one random frame (a joint
    image), `random_transform` is the Grain RandomMap that turns records into clips.

    Attributes: root, classes (names; [] when unconditional), videos [(path, label)],
    image_size, num_frames, frame_interval, resize, frame_sampling.
    """

    def __init__(
        self,
        root: paths.PathLike,
        *,
        image_size: int,
        num_frames: int,
        frame_interval: int = 1,
        resize: str = "center_crop",
        frame_sampling: str = "linspace",
        classes: bool = True,
    ):
        root = paths.as_path(root)
        if image_size < 1 or num_frames < 1 or frame_interval < 1:
            raise ConfigError(
                f"image_size, num_frames and frame_interval must be >= 1, got {image_size}, {num_frames}, {frame_interval}"
            )
        if resize not in RESIZE_MODES:
            raise ConfigError(f"video resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        if frame_sampling not in FRAME_SAMPLING:
            raise ConfigError(f"frame sampling must be one of {', '.join(FRAME_SAMPLING)}, got {frame_sampling!r}")
        if not root.is_dir():
            raise UserError(f"video folder {root} does not exist or is not a directory")
        videos = []
        if classes:
            names = sorted(d.name for d in root.iterdir() if not d.name.startswith(".") and d.is_dir())
            if not names:
                raise UserError(f"no class folders in {root}: expected the layout ROOT/CLASS/VIDEO (or data.num_classes=0)")
            empty = []
            for label, name in enumerate(names):
                found = find_videos(root / name)
                if not found:
                    empty.append(name)
                videos.extend((str(p), label) for p in found)
            if empty:
                raise UserError(f"class folder(s) without videos in {root}: {', '.join(empty[:5])}")
        else:
            names = []
            videos = [(str(p), 0) for p in find_videos(root)]
        if not videos:
            raise UserError(f"no videos (video files or frame folders) in {root}")
        self.root, self.classes, self.videos = root, names, videos
        self.image_size, self.num_frames, self.frame_interval = image_size, num_frames, frame_interval
        self.resize, self.frame_sampling = resize, frame_sampling

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([label for _, label in self.videos], np.int32)

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        return {"video_index": np.int32(index), "label": np.int32(self.videos[index][1])}

    def _num_frames(self, path: str) -> int:
        from skipdit_jax.videos import video_num_frames

        return video_num_frames(path)

    def clip(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """float32 (num_frames, image_size, image_size, 3) in [-1, 1]: a random clip of video `index`."""
        from skipdit_jax.videos import read_video

        path = self.videos[index][0]
        total = self._num_frames(path)
        if total < self.num_frames:
            raise UserError(f"{path}: has {total} frames, fewer than the {self.num_frames} frames of a clip (data.num_frames)")
        idx = clip_indices(total, self.num_frames, self.frame_interval, rng, self.frame_sampling)
        return resize_frames(read_video(path, idx), self.image_size, self.resize)

    def random_frame(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """float32 (image_size, image_size, 3): one uniformly drawn frame of video `index`."""
        from skipdit_jax.videos import read_video

        path = self.videos[index][0]
        k = int(rng.integers(self._num_frames(path)))
        return resize_frames(read_video(path, [k]), self.image_size, self.resize)[0]

    @property
    def random_transform(self) -> grain.transforms.RandomMap:
        return LoadClip(self)

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.classes else "unconditional"
        return (
            f"VideoFolderSource({self.root}, {len(self)} videos, {kind}, {self.num_frames} frames x{self.frame_interval}, "
            f"size {self.image_size}, {self.resize})"
        )


class LoadClip(grain.transforms.RandomMap):
    """{"video_index", "label"} -> {"image": a random clip, "label"}, from Grain's per-example rng."""

    def __init__(self, source: VideoFolderSource):
        self.source = source

    def random_map(self, record, rng: np.random.Generator):
        return {"image": self.source.clip(int(record["video_index"]), rng), "label": np.int32(record["label"])}


def source_labels(source) -> np.ndarray | None:
    """The label of every record, when the source knows them without reading records:
    `source.labels` (an array) or None."""
    labels = getattr(source, "labels", None)
    return None if labels is None else np.asarray(labels, np.int32)


class AppendJointImages(grain.transforms.RandomMap):
    """Joint image-video training: appends `count` single frames after the clip's frames,
    each a uniformly drawn frame of a uniformly drawn video, and their labels as
    "image_labels" int32 (count,). As in the official datasets the images are not flipped.

    `same_class=True` draws only from videos with the record's label, so that a model
    conditioning every frame on the video's label (one label per example) sees correctly
    labelled images; the official UCF-101 code instead draws from all videos and conditions
    each image on its own label (`y_image`), which `same_class=False` + "image_labels"
    reproduces. Sources with `random_frame(i, rng)` decode just that frame; for others
    (latents, in-memory clips) it is a frame of record i's "image"."""

    def __init__(self, source, count: int, same_class: bool = False):
        self.source, self.count = source, count
        labels = source_labels(source)
        if labels is None and same_class:
            raise ConfigError(
                f"joint images of the same class need the labels of {source!r} (e.g. video latents extracted with their labels)"
            )
        self.labels = labels
        self.by_class = None
        if same_class:
            self.by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}

    def _frame(self, index: int, rng: np.random.Generator) -> np.ndarray:
        if hasattr(self.source, "random_frame"):
            return self.source.random_frame(index, rng)
        clip = np.asarray(self.source[index]["image"])
        return clip[int(rng.integers(len(clip)))]

    def random_map(self, record, rng: np.random.Generator):
        video = np.asarray(record["image"])
        if video.ndim != 4:
            raise ConfigError(f"joint images (data.images_per_video) need video records (F, H, W, C), got shape {video.shape}")
        if self.by_class is not None:
            pool = self.by_class[int(record["label"])]
            picks = pool[rng.integers(len(pool), size=self.count)]
        else:
            picks = rng.integers(len(self.source), size=self.count)
        images = [self._frame(int(j), rng) for j in picks]
        if self.labels is not None:
            image_labels = self.labels[picks]
        else:
            image_labels = np.asarray([self.source[int(j)]["label"] for j in picks], np.int32)
        return {
            **record,
            "image": np.concatenate([video, np.stack(images).astype(video.dtype)], axis=0),
            "image_labels": image_labels.astype(np.int32),
        }
