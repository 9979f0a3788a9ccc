"""Every file the project reads or writes goes through here, as an `etils.epath.Path`, so
local paths and cloud URIs (`gs://bucket/...`, and whatever else epath/fsspec resolves)
work alike everywhere: data, metrics, images, checkpoints, latents, model directories.

Writes are atomic where the file system allows it: the bytes go to a temporary sibling
first and are renamed over the target, so a crash never leaves a half-written file under
the real name and an existing good file is only ever replaced by a complete one. (On GCS a
rename is a copy and a delete per object: a directory swap there is not atomic, but the old
directory is only removed once the new one is complete.)

Libraries that only take local file names (torch.load, safetensors, the ArrayRecord C++
reader and writer) get them from `local_copy` / `copy_file`. Never hand a gs:// string to
open(), os.*, PIL or numpy: they would create a local folder named "gs:".
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import uuid
from typing import Iterator

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


def is_local(path: PathLike) -> bool:
    return not is_uri(path)


def walk_files(root: PathLike) -> Iterator[epath.Path]:
    """Every file under the directory `root`, recursively (order unspecified). Local
    symlinked folders are followed (as torchvision's ImageFolder does). For URIs one listing
    per directory; epath's own `walk` returns the roots of remote paths without their
    scheme ("bucket/dir"), which this corrects."""
    root = as_path(root)
    if is_local(root):
        for dirpath, _, files in os.walk(os.fspath(root), followlinks=True):
            for f in files:
                yield epath.Path(dirpath) / f
        return
    scheme = str(root).split("://", 1)[0] + "://"
    for dirpath, _, files in root.walk():
        text = str(dirpath)
        if "://" not in text:
            text = scheme + text.lstrip("/")
        for f in files:
            yield epath.Path(text) / f


def glob(pattern: PathLike) -> list[epath.Path]:
    """Paths matching a glob pattern (sorted), local or remote. Wildcards may appear in any
    component after the first; "**" is not supported."""
    text = str(pattern) if isinstance(pattern, epath.Path) else os.fspath(pattern)
    if "**" in text:
        raise ValueError(f"recursive '**' patterns are not supported: {text}")
    path = as_path(text)
    parts = path.parts
    first = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
    if first is None:
        return [path] if path.exists() else []
    if is_uri(path) and first < 3:
        raise ValueError(f"a remote glob needs a fixed bucket: {text}")
    base = path
    for _ in range(len(parts) - first):
        base = base.parent
    return sorted(base.glob("/".join(parts[first:])), key=lambda p: p.parts)


_CHUNK = 16 << 20


def copy_file(src: PathLike, dst: PathLike) -> epath.Path:
    """Stream `src` to `dst` (either local or remote) through a temporary sibling of `dst`
    and a rename: `dst` holds either its old content or all of `src`."""
    src, dst = as_path(src), as_path(dst)
    with written_atomically(dst) as tmp, src.open("rb") as fin, tmp.open("wb") as fout:
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)
    return dst


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
    """A local file name with the content of `path`, for libraries that only read local
    files: the path itself when it is local, else a temporary copy (removed on exit)."""
    path = as_path(path)
    if is_local(path):
        yield os.fspath(path)
        return
    fd, name = tempfile.mkstemp(prefix="skipdit-", suffix="-" + path.name)
    os.close(fd)
    try:
        copy_file(path, name)
        yield name
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def cache_dir(*parts: str) -> epath.Path:
    """A local cache directory: $SKIPDIT_CACHE (default ~/.cache/skipdit) / parts."""
    root = os.environ.get("SKIPDIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "skipdit")
    out = as_path(root).joinpath(*parts)
    if is_uri(out):
        raise ValueError(f"SKIPDIT_CACHE must be a local directory, got {root}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _temporary_sibling(path: epath.Path) -> epath.Path:
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def written_atomically(path: epath.Path) -> Iterator[epath.Path]:
    """A temporary sibling of `path` to write; renamed over `path` when the block
    completes, removed if it raises (so `path` keeps its old content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> epath.Path:
    """Write `data` to `path` through a temporary sibling and a rename."""
    path = as_path(path)
    with written_atomically(path) as tmp:
        tmp.write_bytes(data)
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
        remove_dir_quietly(aside)  # the new directory is in place; a leftover is harmless


def remove_dir_quietly(path: epath.Path) -> None:
    """Remove a temporary directory if it exists, ignoring errors (cleanup must never hide
    the error that made it necessary)."""
    with contextlib.suppress(Exception):
        if path.exists():
            path.rmtree()


def temporary_dir_beside(final: epath.Path) -> epath.Path:
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True, exist_ok=False)
    return tmp


def save_orbax_tree(path: PathLike, tree) -> epath.Path:
    """Save a pytree of numeric arrays with Orbax's StandardCheckpointer and wait until it
    is written. Non-numeric leaves are refused before anything is written. On a failure
    while writing, the checkpointer is closed before the error propagates; tensorstore may
    still finish writes already started, so a caller removing the directory should do so
    on a best-effort basis (`remove_dir_quietly`)."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    # Orbax fails on other leaves only once some arrays are being written, and tensorstore
    # keeps writing the rest after the error: refuse them before anything is written.
    for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)):
            what = f"dtype {dtype}" if dtype is not None else f"a {type(leaf).__name__}"
            raise ValueError(f"cannot save {jax.tree_util.keystr(keys)}: {what} is not a numeric array")
    path = as_path(path)
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(path, tree)
        ckptr.wait_until_finished()
    except BaseException:
        with contextlib.suppress(Exception):
            ckptr.wait_until_finished()
        with contextlib.suppress(Exception):
            ckptr.close()
        raise
    ckptr.close()
    return path


def write_tree_dir(out: epath.Path, tree_name: str, tree, files: dict[str, str]) -> None:
    """Build the directory `out` holding an Orbax checkpoint of `tree` (as `tree_name`)
    and small text files, under a temporary name, then swap it in (`replace_dir`): an
    interrupted write never leaves a half-written `out` and never loses the old one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir_beside(out)
    try:
        save_orbax_tree(tmp / tree_name, tree)
        for name, text in files.items():
            atomic_write_text(tmp / name, text)
        replace_dir(tmp, out)
    finally:
        remove_dir_quietly(tmp)
