"""Reading and writing videos as uint8 arrays (F, H, W, 3), channels-last.

Reading goes through PyAV (every container/codec FFmpeg knows: MP4, AVI, MKV, WebM, GIF,
...), or takes a folder of frame images (sorted by file name). Writing makes H.264 MP4s
(libx264, yuv420p, what every player and the FVD pipelines read) and GIFs (Pillow). Paths
may be local or remote (gs://...): reads use `paths.local_copy`, writes go to a temporary
local file first and land atomically through `paths`.

`video_to_uint8` is the official c2v conversion of decoded samples,
`((x * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255).to(uint8)`, i.e. clip(127.5 x + 128) truncated:
the same rounding as `images.to_uint8`.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from skipdit_jax import paths
from skipdit_jax.errors import UserError
from skipdit_jax.images import to_uint8

__all__ = [
    "VIDEO_EXTENSIONS",
    "FRAME_EXTENSIONS",
    "read_video",
    "video_num_frames",
    "write_mp4",
    "write_gif",
    "video_to_uint8",
]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ---- conversion ---------------------------------------------------------------------------
def video_to_uint8(x) -> np.ndarray:
    """Decoded frames in [-1, 1] (..., F, H, W, C) -> uint8 of the same shape, with the
    official c2v rounding (clip(127.5 x + 128), truncated)."""
    return to_uint8(x)


# ---- reading ------------------------------------------------------------------------------
def _frame_files(folder) -> list:
    files = [p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS and not p.name.startswith(".")]
    return sorted(files, key=lambda p: p.name)


def _check_indices(indices, path) -> list[int] | None:
    if indices is None:
        return None
    out = [int(i) for i in indices]
    if any(i < 0 for i in out):
        raise UserError(f"negative frame index requested from {path}")
    return out


def _read_frame_folder(folder, indices) -> np.ndarray:
    from PIL import Image

    files = _frame_files(folder)
    if not files:
        raise UserError(f"{folder}: no frame images ({', '.join(FRAME_EXTENSIONS)}) in this folder")
    wanted = range(len(files)) if indices is None else indices
    if indices is not None and indices and max(indices) >= len(files):
        raise UserError(f"{folder}: has {len(files)} frames, frame {max(indices)} was requested")
    frames = []
    for i in wanted:
        try:
            with files[i].open("rb") as f, Image.open(f) as img:
                frames.append(np.asarray(img.convert("RGB")))
        except (OSError, ValueError) as e:
            raise UserError(f"{files[i]}: cannot read this frame image ({e})") from None
    return _stack(frames, folder)


def _stack(frames: list[np.ndarray], path) -> np.ndarray:
    if not frames:
        raise UserError(f"{path}: no frames")
    if len({f.shape for f in frames}) > 1:
        raise UserError(f"{path}: frames of different sizes")
    return np.stack(frames).astype(np.uint8)


def _decode_file(path, indices) -> np.ndarray:
    import av

    with paths.local_copy(path) as local:
        try:
            with av.open(local, "r") as container:
                if not container.streams.video:
                    raise UserError(f"{path}: no video stream")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                last = None if indices is None else (max(indices) if indices else -1)
                wanted = None if indices is None else set(indices)
                got: dict[int, np.ndarray] = {}
                count = 0
                if last is None or last >= 0:
                    for frame in container.decode(stream):
                        if wanted is None or count in wanted:
                            got[count] = frame.to_ndarray(format="rgb24")
                        count += 1
                        if last is not None and count > last:
                            break  # decode only as far as the last frame needed
        except UserError:
            raise
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise UserError(f"{path}: cannot decode this video ({type(e).__name__}: {e})") from None
    if indices is None:
        return _stack([got[i] for i in range(count)], path)
    if indices and max(indices) >= count:
        raise UserError(f"{path}: has {count} frames, frame {max(indices)} was requested")
    return _stack([got[i] for i in indices], path) if indices else np.zeros((0, 0, 0, 3), np.uint8)


def read_video(path: paths.PathLike, indices: Sequence[int] | None = None) -> np.ndarray:
    """All frames of a video file or frame folder, or only `indices` (in that order,
    repeats allowed), as uint8 (F, H, W, 3).

    A file is decoded with PyAV (local or remote; a remote one is copied locally first);
    decoding stops after the last frame needed. A directory is read as its frame images
    sorted by file name. A missing or undecodable file, an empty folder, or fewer frames
    than `indices` needs: UserError naming the path.
    """
    p = paths.as_path(path)
    indices = _check_indices(indices, p)
    if not p.exists():
        raise UserError(f"{p}: no such video file or frame folder")
    if p.is_dir():
        return _read_frame_folder(p, indices)
    return _decode_file(p, indices)


def video_num_frames(path: paths.PathLike) -> int:
    """Number of frames of a video file (the container's count when it has one, else
    counted from the demuxed packets) or of a frame folder. UserError as `read_video`."""
    p = paths.as_path(path)
    if not p.exists():
        raise UserError(f"{p}: no such video file or frame folder")
    if p.is_dir():
        return len(_frame_files(p))
    import av

    with paths.local_copy(p) as local:
        try:
            with av.open(local, "r") as container:
                if not container.streams.video:
                    raise UserError(f"{p}: no video stream")
                stream = container.streams.video[0]
                if stream.frames and stream.frames > 0:
                    return int(stream.frames)
                # Without a frame count in the header, one packet per frame (no decoding).
                return sum(1 for pkt in container.demux(stream) if pkt.size)
        except UserError:
            raise
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise UserError(f"{p}: cannot decode this video ({type(e).__name__}: {e})") from None


# ---- writing ------------------------------------------------------------------------------
def _check_frames(frames, channels=(3,)) -> np.ndarray:
    x = np.asarray(frames)
    if x.ndim != 4 or x.shape[-1] not in channels or x.shape[0] < 1:
        want = "/".join(str(c) for c in channels)
        raise UserError(f"video frames must be (F, H, W, {want}) with F >= 1, got shape {x.shape}")
    if x.dtype != np.uint8:
        raise UserError(f"video frames must be uint8 (use video_to_uint8), got {x.dtype}")
    return x


@contextlib.contextmanager
def _local_tmp_file(suffix: str):
    fd, name = tempfile.mkstemp(prefix="skipdit-video-", suffix=suffix)
    os.close(fd)
    try:
        yield name
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def write_mp4(path: paths.PathLike, frames, fps: float = 8, crf: int = 17) -> None:
    """Write uint8 frames (F, H, W, 3) as an H.264 MP4 (libx264, yuv420p) at `fps`,
    atomically (local or remote). yuv420p needs even sizes: an odd height/width is padded
    by one replicated row/column. `crf` is x264's quality (0 lossless, 17 visually
    lossless, 23 x264's default)."""
    import av

    x = _check_frames(frames)
    pad_h, pad_w = x.shape[1] % 2, x.shape[2] % 2
    if pad_h or pad_w:
        x = np.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with _local_tmp_file(".mp4") as name:
        with av.open(name, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = x.shape[2], x.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(int(crf))}
            for frame in x:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.copy_file(name, paths.as_path(path))


def write_gif(path: paths.PathLike, frames, fps: float = 8, loop: int = 0) -> None:
    """Write uint8 frames (F, H, W, 3) or (F, H, W, 1) as an animated GIF (Pillow) at `fps`
    (GIF stores delays in 10 ms units: 1/fps rounded to them), looping `loop` times (0: forever), atomically.
    A GIF is for viewing (256 colours per frame): identical consecutive frames are stored
    once with their summed delay. Use MP4 or arrays for data."""
    from PIL import Image

    x = _check_frames(frames, channels=(1, 3))
    images = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in x]
    buf = io.BytesIO()
    # optimize=False: every frame a full image with its own palette. Pillow always stores
    # bit-identical consecutive frames once with the summed delay (playback is the same).
    images[0].save(
        buf,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=[10 * round(100 / fps)] * len(images),
        loop=loop,
        optimize=False,
        disposal=1,
    )
    paths.atomic_write_bytes(path, buf.getvalue())
