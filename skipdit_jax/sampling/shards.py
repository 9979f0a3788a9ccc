"""The files of a `sample_many` run: deterministic .npz writing, the run's settings and
shards (checked and resumed), the final file, and the per-sample PNGs / MP4s.

    OUT/settings.json                  everything that determines the bytes (checked on resume)
    OUT/shards/SSSSSSSS-EEEEEEEE.npz   one global batch: images (or videos), labels, indices (atomic)
    OUT/samples_{N}x{H}x{W}x3.npz      images, ADM format: arr_0 uint8 NHWC, arr_1 labels (conditional)
    OUT/samples.npz                    videos: arr_0 uint8 (N, F, H, W, 3), arr_1 labels (conditional)
    OUT/png/000000.png ...             images, with png=True
    OUT/videos/sample_000000.mp4 ...   videos, with videos=True (H.264, `skipdit_jax.videos`)

Process 0 reads and writes; `prepare_out_dir` gives every process the same verdict.
Zip entries carry a fixed timestamp, so equal arrays give equal bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from collections.abc import Iterable

import jax
import numpy as np

from skipdit_jax import paths
from skipdit_jax.errors import UserError

ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold: no wall clock in the bytes
SHARDS_DIR, PNG_DIR, VIDEO_DIR, SETTINGS_FILE, SUMMARY_FILE = "shards", "png", "videos", "settings.json", "summary.json"
VIDEO_NPZ = "samples.npz"


# ---- deterministic .npz files -----------------------------------------------------------------
def _npy_header(shape, dtype) -> bytes:
    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(int(s) for s in shape)}
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # header too long for format 1.0 (what np.save falls back to as well)
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def write_npz(fileobj, arrays: dict) -> None:
    """An uncompressed .npz (what np.savez writes) with fixed zip timestamps, so equal
    arrays give equal bytes. Each value is an array, or (shape, dtype, chunks): C-order
    chunks (arrays) streamed one after another, for arrays too large to hold."""
    with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            if isinstance(value, tuple):
                shape, dtype, chunks = value
            else:
                value = np.ascontiguousarray(value)
                shape, dtype, chunks = value.shape, value.dtype, [value]
            header = _npy_header(shape, dtype)
            size = len(header) + int(np.prod(shape)) * np.dtype(dtype).itemsize
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            written = 0
            with zf.open(info, "w", force_zip64=size >= zipfile.ZIP64_LIMIT) as out:
                out.write(header)
                for chunk in chunks:
                    data = np.ascontiguousarray(chunk, dtype=dtype).tobytes()
                    out.write(data)
                    written += len(data)
            if written != size - len(header):
                raise ValueError(f"{name}: wrote {written} data bytes for shape {tuple(shape)}")


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    write_npz(buf, arrays)
    return buf.getvalue()


def save_npz(path, arrays: dict) -> None:
    """`write_npz` to `path` atomically (a temporary sibling renamed into place; a remote
    path is built in a local temporary file first, as zip writing needs to seek)."""
    path = paths.as_path(path)
    if paths.is_local(path):
        with paths.written_atomically(path) as tmp, tmp.open("wb") as f:
            write_npz(f, arrays)
        return
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".npz") as f:
        write_npz(f, arrays)
        f.flush()
        paths.copy_file(f.name, path)


# ---- settings, fingerprints and the output directory ---------------------------------------
def fingerprint(tree) -> str:
    """sha256 (first 16 hex digits) of a pytree's paths, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run writes: the batches (global batch = shard), the output names.
    `image_shape` is one uint8 sample: (H, W, 3) for images, (F, H, W, 3) for videos."""

    num: int
    batch_size: int
    image_shape: tuple[int, ...]

    @property
    def num_batches(self) -> int:
        return -(-self.num // self.batch_size)

    @property
    def is_video(self) -> bool:
        return len(self.image_shape) == 4

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.batch_size, min((k + 1) * self.batch_size, self.num)

    def shard_name(self, k: int) -> str:
        lo, hi = self.bounds(k)
        return f"{lo:08d}-{hi:08d}.npz"

    @property
    def final_name(self) -> str:
        if self.is_video:
            return VIDEO_NPZ
        h, w, c = self.image_shape
        return f"samples_{self.num}x{h}x{w}x{c}.npz"


def _diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys if old.get(k) != new.get(k)]


def _load_shard(path, plan: Plan, k: int):
    """(images, labels) of a complete shard k, or None if it is missing or unreadable."""
    lo, hi = plan.bounds(k)
    try:
        with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
            images, labels, indices = z["images"], z["labels"], z["indices"]
    except Exception:  # a torn or corrupt file is redone, whatever the error
        return None
    ok = (
        images.dtype == np.uint8 and images.shape == (hi - lo, *plan.image_shape)
        and labels.shape == (hi - lo,) and np.array_equal(indices, np.arange(lo, hi))
    )
    return (images, labels) if ok else None


def _final_ok(path, plan: Plan, conditional: bool) -> bool:
    """A cheap check of an existing final .npz: its members and arr_0's header."""
    try:
        if not path.exists():
            return False
        with path.open("rb") as raw, zipfile.ZipFile(raw) as zf:
            names = sorted(zf.namelist())
            with zf.open("arr_0.npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
    except Exception:
        return False
    want = ["arr_0.npy", "arr_1.npy"] if conditional else ["arr_0.npy"]
    return names == want and tuple(shape) == (plan.num, *plan.image_shape) and dtype == np.uint8


def _broadcast(array: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return array
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(array))


def _agree(error: str | None, todo: np.ndarray) -> np.ndarray:
    """Process 0's verdict (an error line, or the batches to draw) on every process."""
    msg = np.zeros(1024, np.uint8)
    raw = (error or "").encode()[:1024]
    msg[: len(raw)] = np.frombuffer(raw, np.uint8)
    msg = _broadcast(msg)
    text = bytes(msg).rstrip(b"\0").decode(errors="replace")
    if text:
        raise UserError(text if jax.process_index() == 0 or error else f"{text} (process 0)")
    return _broadcast(todo.astype(np.uint8)).astype(bool)


def prepare_out_dir(out, settings: dict, plan: Plan, conditional: bool) -> tuple[np.ndarray, bool]:
    """Check (or create) OUT/settings.json; returns (todo: per-batch bool, final done).
    Process 0 reads and writes, every process gets the same answer. Nothing is deleted."""
    out = paths.as_path(out)
    error, todo, final_done = None, np.ones(plan.num_batches, bool), False
    if jax.process_index() == 0:
        try:
            error = _check_settings_file(out, settings)
            if error is None:
                final_done = _final_ok(out / plan.final_name, plan, conditional)
                if not final_done:
                    shards = out / SHARDS_DIR
                    present = {p.name for p in shards.iterdir()} if shards.is_dir() else set()
                    for k in range(plan.num_batches):
                        name = plan.shard_name(k)
                        todo[k] = name not in present or _load_shard(shards / name, plan, k) is None
                else:
                    todo[:] = False
        except OSError as e:
            error = f"cannot use --out {out}: {e}"
    todo = _agree(error, np.append(todo, final_done))
    return todo[:-1], bool(todo[-1])


def _check_settings_file(out, settings: dict) -> str | None:
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a directory"
    file = out / SETTINGS_FILE
    if file.exists():
        try:
            old = json.loads(file.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            return f"{file} is unreadable ({e}); use another --out"
        diff = _diff(old, settings)
        if diff:
            return f"{out} holds samples drawn with other settings ({'; '.join(diff)}); use another --out or the same settings"
        return None
    ours = [n for n in (SHARDS_DIR, PNG_DIR, VIDEO_DIR, VIDEO_NPZ) if (out / n).exists()]
    ours += [p.name for p in (out.glob("samples_*.npz") if out.exists() else [])]
    if ours:
        return f"{out} holds {', '.join(ours)} but no {SETTINGS_FILE}; use another --out"
    paths.atomic_write_text(file, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return None


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"sample_many:{name}")



def _shard_chunks(out, plan: Plan) -> Iterable[np.ndarray]:
    for k in range(plan.num_batches):
        shard = _load_shard(out / SHARDS_DIR / plan.shard_name(k), plan, k)
        if shard is None:
            raise UserError(f"shard {plan.shard_name(k)} became unreadable while assembling; run again to redraw it")
        yield shard[0]


def _read_member(path, name: str) -> np.ndarray:
    with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
        return z[name]


def _assemble(out, plan: Plan, conditional: bool) -> None:
    """The final ADM .npz from the shards, streamed (never all images in memory)."""
    arrays = {"arr_0": ((plan.num, *plan.image_shape), np.uint8, _shard_chunks(out, plan))}
    if conditional:
        labels = [_read_member(out / SHARDS_DIR / plan.shard_name(k), "labels") for k in range(plan.num_batches)]
        arrays["arr_1"] = np.concatenate(labels).astype(np.int64)
    save_npz(out / plan.final_name, arrays)


def _batch_source(out, plan: Plan):
    """k -> the uint8 samples of batch k: from the shards, or from the final .npz when the
    shards are gone (then read once, whole)."""
    if (out / SHARDS_DIR).exists():
        return lambda k: _load_shard(out / SHARDS_DIR / plan.shard_name(k), plan, k)[0]
    everything = _read_member(out / plan.final_name, "arr_0")
    return lambda k: everything[slice(*plan.bounds(k))]


def _write_per_sample(out, plan: Plan, name, write) -> int:
    """`write(path, sample)` for every sample whose file `out / name(i)` is missing;
    returns how many were written (each file is written atomically, so one that exists
    is complete)."""
    missing = [i for i in range(plan.num) if not (out / name(i)).exists()]
    if not missing:
        return 0
    source, want = _batch_source(out, plan), set(missing)
    for k in range(plan.num_batches):
        lo, hi = plan.bounds(k)
        if want.isdisjoint(range(lo, hi)):
            continue
        batch = source(k)
        for i in range(lo, hi):
            if i in want:
                write(out / name(i), batch[i - lo])
    return len(missing)


def png_name(i: int) -> str:
    return f"{PNG_DIR}/{i:06d}.png"


def video_name(i: int) -> str:
    return f"{VIDEO_DIR}/sample_{i:06d}.mp4"


def _write_pngs(out, plan: Plan) -> int:
    """OUT/png/{i:06d}.png for every image not written yet."""
    from PIL import Image

    return _write_per_sample(out, plan, png_name, lambda path, x: paths.save_png(path, Image.fromarray(x)))


def _write_videos(out, plan: Plan, fps: float = 8) -> int:
    """OUT/videos/sample_{i:06d}.mp4 (H.264) for every video not written yet."""
    from skipdit_jax.videos import write_mp4

    return _write_per_sample(out, plan, video_name, lambda path, x: write_mp4(path, x, fps=fps))
