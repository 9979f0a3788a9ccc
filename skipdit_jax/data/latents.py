"""Latent files: ArrayRecord shards written by `write_latents` (e.g. by
`skipdit extract-latents`), read back by `LatentSource`. Each record is an uncompressed
.npz (no pickle): a latent, its label and optionally the latent of the flipped image.
"""

from __future__ import annotations

import glob
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import grain
import numpy as np

from skipdit_jax.errors import ConfigError, UserError

# Written last by `write_latents`: a directory without it is an interrupted extraction.
LATENTS_METADATA = "latents.json"
_SHARD_PATTERN = "latents-{index:05d}-of-{count:05d}.array_record"
_SHARD_GLOB = "latents-*-of-*.array_record"
# group_size:1 makes every record its own chunk, which random access (Grain) needs to be fast.
_WRITER_OPTIONS = "group_size:1"


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

