"""Latent files: ArrayRecord shards written by `write_latents` (e.g. by
`skipdit extract-latents`), read back by `LatentSource`. Each record is an uncompressed
.npz (no pickle): a latent, its label and optionally the latent of the flipped image.

Local and remote (gs://...) directories both work, but ArrayRecord's C++ reader and writer
only open local files, so for a remote directory
  - `write_latents` writes the shards to a local temporary directory ($TMPDIR; it needs
    local space for the whole output) and then uploads them;
  - `LatentSource` copies the shards once into a local cache (`cache_dir`, default
    $SKIPDIT_CACHE/latents, i.e. ~/.cache/skipdit/latents) and reads them there. A copy is
    keyed by the remote path, size, modification time and the write's id in latents.json,
    so re-extracted latents are fetched again; the cache may be deleted when no job runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import uuid
from typing import Any, Iterable, Mapping

import grain
import numpy as np
from etils import epath

from skipdit_jax import paths
from skipdit_jax.errors import ConfigError, UserError

# Written last by `write_latents`: a directory without it is an interrupted extraction.
LATENTS_METADATA = "latents.json"
_SHARD_PATTERN = "latents-{index:05d}-of-{count:05d}.array_record"
_SHARD_GLOB = "latents-*-of-*.array_record"
# group_size:1 makes every record its own chunk, which random access (Grain) needs to be fast.
_WRITER_OPTIONS = "group_size:1"


# Arrays a record may carry beside its latent (text-to-video: the caption's text-encoder
# output and mask, see `skipdit_jax.data.text_video`), stored with their own dtype.
RECORD_EXTRAS = ("text_emb", "text_mask")
# Files beside the shards that belong to the latents (written by `write_latents(extra_files=)`).
LATENTS_EXTRA_FILES = ("null_text.npz",)


def _encode_record(latent: np.ndarray, label: int, latent_flipped: np.ndarray | None, extras=None) -> bytes:
    """One record as an uncompressed .npz: plain arrays, readable without pickle."""
    arrays = {"latent": np.asarray(latent, np.float32), "label": np.int32(label)}
    if latent_flipped is not None:
        arrays["latent_flipped"] = np.asarray(latent_flipped, np.float32)
    arrays.update({k: np.asarray(v) for k, v in (extras or {}).items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _decode_record(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _existing_latent_files(out: epath.Path) -> list[epath.Path]:
    meta = out / LATENTS_METADATA
    extra = [out / name for name in LATENTS_EXTRA_FILES if (out / name).exists()]
    return sorted(out.glob(_SHARD_GLOB), key=lambda p: p.name) + extra + ([meta] if meta.exists() else [])


def latents_exist(out_path: paths.PathLike) -> bool:
    """Whether `out_path` already holds (possibly partial) output of `write_latents`."""
    out = paths.as_path(out_path)
    return out.is_dir() and bool(_existing_latent_files(out))


def check_latents_output(out_path: paths.PathLike, overwrite: bool) -> epath.Path:
    """The checks `write_latents` makes on its output before writing anything (UserError):
    not a file, no latents there unless `overwrite`, nothing else there."""
    out = paths.as_path(out_path)
    if out.exists() and not out.is_dir():
        raise UserError(f"latent output {out} exists and is not a directory")
    if out.is_dir():
        old = _existing_latent_files(out)
        if old and not overwrite:
            raise UserError(f"{out} already holds latents ({len(old)} file(s)); pass overwrite=True (--overwrite) to replace them")
        others = sorted({e.name for e in out.iterdir()} - {f.name for f in old})
        if others:
            raise UserError(
                f"{out} holds files other than latents ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                "write latents to a new or empty directory"
            )
    return out


def write_latents(
    out_path: paths.PathLike,
    latents_iter: Iterable[Mapping[str, Any]],
    num_shards: int = 1,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
) -> dict[str, Any]:
    """Writes latents to ArrayRecord shards in the directory `out_path` (local or remote).

    `latents_iter` yields dicts {"latent": (h, w, c) array, "label": int} and, optionally
    for all records or none, "latent_flipped": the latent of the horizontally flipped image.
    Record i goes to shard i % num_shards (files `latents-00000-of-0000N.array_record`), each
    record an uncompressed .npz (no pickle). `latents.json` holds
    {"count", "latent_shape", "has_flipped", "shards", "write_id", **metadata}.
    A record may also carry the arrays named in RECORD_EXTRAS under "extras" (a dict,
    the same keys in every record), stored beside the latent; `extra_files` ({name: bytes},
    names from LATENTS_EXTRA_FILES) are written into the directory with the shards.

    Everything is written into a temporary directory beside `out_path` (for a remote
    output: first locally, then uploaded there), and only when it is complete is it
    swapped in under the final name. So a failure at any point (an error in
    `latents_iter`, a full disk, an interruption) leaves existing latents untouched, and a
    directory with latents.json is always complete; a crash may leave the hidden
    `.NAME.tmp-*` directory behind.

    Existing latents in out_path raise UserError unless overwrite=True; a directory holding
    anything else is refused either way (the swap would delete it). Returns the metadata
    dict written.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {num_shards}")
    unknown = sorted(set(extra_files or {}) - set(LATENTS_EXTRA_FILES))
    if unknown:
        raise ConfigError(f"unknown extra latent file(s) {', '.join(unknown)}; known: {', '.join(LATENTS_EXTRA_FILES)}")
    out = check_latents_output(out_path, overwrite)

    names = [_SHARD_PATTERN.format(index=i, count=num_shards) for i in range(num_shards)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.temporary_dir_beside(out)
    with tempfile.TemporaryDirectory(prefix="skipdit-latents-") as scratch:
        # The C++ writer needs local files: write in place locally, else in local scratch.
        shard_dir = os.fspath(tmp) if paths.is_local(tmp) else scratch
        try:
            count, shape, has_flipped = _write_shards(ArrayRecordWriter, [os.path.join(shard_dir, n) for n in names], latents_iter)
            if count == 0:
                raise UserError(f"no latents to write to {out}")
            if shard_dir == scratch:
                for n in names:
                    paths.copy_file(os.path.join(scratch, n), tmp / n)
            for name, blob in (extra_files or {}).items():
                paths.atomic_write_bytes(tmp / name, blob)
            meta = dict(metadata or {})
            meta.update(count=count, latent_shape=list(shape), has_flipped=has_flipped, shards=names, write_id=uuid.uuid4().hex)
            paths.atomic_write_text(tmp / LATENTS_METADATA, json.dumps(meta, indent=2) + "\n")
            paths.replace_dir(tmp, out)
        finally:
            paths.remove_dir_quietly(tmp)
    return meta


def _write_shards(writer_cls, files: list[str], latents_iter) -> tuple[int, tuple | None, bool | None]:
    writers = [writer_cls(f, _WRITER_OPTIONS) for f in files]
    count, shape, has_flipped, extra_keys = 0, None, None, None
    try:
        for rec in latents_iter:
            latent = np.asarray(rec["latent"], np.float32)
            flipped = rec.get("latent_flipped")
            extras = dict(rec.get("extras") or {})
            if extra_keys is None:
                extra_keys = sorted(extras)
                unknown = sorted(set(extra_keys) - set(RECORD_EXTRAS))
                if unknown:
                    raise UserError(f"unknown record extras {', '.join(unknown)}; known: {', '.join(RECORD_EXTRAS)}")
            if sorted(extras) != extra_keys:
                raise UserError(f"latent {count} carries extras {sorted(extras)}, the first carried {extra_keys}")
            if shape is None:
                shape, has_flipped = latent.shape, flipped is not None
            if latent.shape != shape:
                raise UserError(f"latent {count} has shape {latent.shape}, the first had {shape}")
            if (flipped is not None) != has_flipped:
                raise UserError(f"latent {count}: 'latent_flipped' must be given for all records or none")
            if flipped is not None and np.shape(flipped) != shape:
                raise UserError(f"flipped latent {count} has shape {np.shape(flipped)}, expected {shape}")
            writers[count % len(writers)].write(_encode_record(latent, int(rec["label"]), flipped, extras))
            count += 1
    finally:
        for w in writers:
            w.close()
    return count, shape, has_flipped


def _local_shards(files: list[epath.Path], write_id: str | None, cache_dir) -> list[str]:
    """Local file names for `files`: the files themselves when local, else copies in the
    cache (made once, atomically; reused while path, size, mtime and write id match)."""
    if all(paths.is_local(f) for f in files):
        return [os.fspath(f) for f in files]
    cache = paths.as_path(cache_dir) if cache_dir is not None else paths.cache_dir("latents")
    if paths.is_uri(cache):
        raise ConfigError(f"the latent cache must be a local directory, got {cache}")
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        if paths.is_local(f):
            out.append(os.fspath(f))
            continue
        st = f.stat()
        key = hashlib.sha256(f"{f}\n{st.length}\n{st.mtime}\n{write_id}".encode()).hexdigest()[:20]
        local = cache / f"{key}-{f.name}"
        if not local.exists():
            paths.copy_file(f, local)
        out.append(os.fspath(local))
    return out


class LatentSource:
    """Latents written by `write_latents` (`skipdit extract-latents`).

    `path_or_glob` is the output directory of `write_latents` (its shards are listed in
    latents.json), a single ArrayRecord file, or a glob of files (sorted); local or remote
    (remote shards are read from local copies in `cache_dir`, see the module docstring).
    Record i is {"image": float32 latent (h, w, c), "label": int32} plus, when the files
    hold them, "image_flipped": the latent of the flipped image.
    `make_train_iterator(flip=True)` picks one of the two per example; a flipped latent is
    not the flip of the latent, so flip augmentation needs files written with flipped
    latents.

    Video latents (`extract-latents --video`) are records of (F, h, w, c) clips; with
    `--captions`, records also hold "text_emb" / "text_mask" (RECORD_EXTRAS, passed through
    as stored; `skipdit_jax.data.text_video.TextLatentSource` pads them to full length).

    Attributes: paths (the shards as given), local_paths (the files read), latent_shape,
    has_flipped, metadata (latents.json or None), labels (every record's label when
    latents.json lists them, else None).
    """

    def __init__(self, path_or_glob: paths.PathLike, *, cache_dir: paths.PathLike | None = None):
        spec = paths.as_path(path_or_glob)
        self.metadata = None
        if spec.is_dir():
            meta_path = spec / LATENTS_METADATA
            if not meta_path.exists():
                raise UserError(f"{spec} has no {LATENTS_METADATA}: not a latent directory, or its extraction did not finish")
            try:
                self.metadata = json.loads(meta_path.read_text())
                files = [spec / name for name in self.metadata["shards"]]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{meta_path} is not a valid latents metadata file: {e}") from e
            missing = [f for f in files if not f.exists()]
            if missing:
                raise UserError(f"latent shard {missing[0]} listed in {meta_path} is missing")
        else:
            try:
                files = [f for f in paths.glob(spec) if not f.is_dir()]
            except ValueError as e:
                raise UserError(f"bad latent path {spec}: {e}") from None
            if not files:
                raise UserError(f"no latent files match {spec}")
        write_id = self.metadata.get("write_id") if isinstance(self.metadata, dict) else None
        self.paths = [str(f) for f in files]
        self.local_paths = _local_shards(files, write_id, cache_dir)
        try:
            self._records = grain.sources.ArrayRecordDataSource(self.local_paths)
        except Exception as e:  # the C++ reader raises plain RuntimeError/ValueError on bad files
            raise UserError(f"cannot read ArrayRecord latents {self.paths[0] if len(files) == 1 else spec}: {e}") from e
        if len(self._records) == 0:
            raise UserError(f"the latent files {spec} hold no records")
        try:
            first = _decode_record(self._records[0])
            self.latent_shape = tuple(first["latent"].shape)
        except (ValueError, KeyError, OSError) as e:
            raise UserError(f"{self.paths[0]} does not hold latents written by write_latents: {e}") from e
        self.has_flipped = "latent_flipped" in first
        self.labels = self._labels_in_read_order(len(self._records))

    def _labels_in_read_order(self, count: int):
        """The records' labels from latents.json ("labels", in write order; written by
        `extract-latents --video`), or None. Write record i went to shard i % S and the
        shards are read one after another, so shard s holds write records s, s+S, ..."""
        labels = (self.metadata or {}).get("labels") if isinstance(self.metadata, dict) else None
        if not isinstance(labels, list) or len(labels) != count:
            return None
        labels, shards = np.asarray(labels, np.int32), len(self.paths)
        return np.concatenate([labels[s::shards] for s in range(shards)])

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        rec = _decode_record(self._records[index])
        out = {"image": rec["latent"], "label": rec["label"].astype(np.int32)}
        if "latent_flipped" in rec:
            out["image_flipped"] = rec["latent_flipped"]
        out.update({k: rec[k] for k in RECORD_EXTRAS if k in rec})
        return out

    def __repr__(self) -> str:
        flip = ", with flipped" if self.has_flipped else ""
        return f"LatentSource({len(self)} x {self.latent_shape}{flip}, {len(self.paths)} file(s))"

