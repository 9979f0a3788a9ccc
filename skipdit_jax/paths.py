"""Every file the project reads or writes goes through here, as an `etils.epath.Path`, so
local paths and cloud URIs (`gs://bucket/...`, and whatever else epath/fsspec resolves)
work alike everywhere: data, metrics, images, checkpoints, latents, model directories.

Writes are atomic where the file system allows it: the bytes go to a temporary sibling
first and are renamed over the target, so a crash never leaves a half-written file under
the real name and an existing good file is only ever replaced by a complete one.
"""

from __future__ import annotations

import io
import os
import uuid

from etils import epath

PathLike = str | os.PathLike | epath.Path


def is_uri(path: PathLike) -> bool:
    """A cloud/remote path such as gs://bucket/x (anything with a scheme)."""
    return "://" in os.fspath(path) if not isinstance(path, epath.Path) else "://" in str(path)


def as_path(path: PathLike) -> epath.Path:
    """An absolute `epath.Path` (Orbax refuses relative ones); `~` is expanded; URIs are
    left as they are."""
    text = str(path) if isinstance(path, epath.Path) else os.fspath(path)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _temporary_sibling(path: epath.Path) -> epath.Path:
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


def atomic_write_bytes(path: PathLike, data: bytes) -> epath.Path:
    """Write `data` to `path` through a temporary sibling and a rename."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: PathLike, text: str) -> epath.Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_png(path: PathLike, image) -> epath.Path:
    """Save a PIL image as PNG at `path` (local or remote), atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def save_npy(path: PathLike, array) -> epath.Path:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())


def replace_dir(tmp: epath.Path, final: epath.Path) -> None:
    """Move the finished directory `tmp` to `final`. An existing `final` is first renamed
    aside and removed only after the new one is in place, so a failure at any point leaves
    either the old or the new directory under the final name (or both, one set aside)."""
    aside = None
    if final.exists():
        aside = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(aside)
    try:
        tmp.rename(final)
    except BaseException:
        if aside is not None and not final.exists():
            aside.rename(final)
        raise
    if aside is not None:
        aside.rmtree()


def temporary_dir_beside(final: epath.Path) -> epath.Path:
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True, exist_ok=False)
    return tmp
