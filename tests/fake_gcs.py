"""A fake `gs://` for tests: `gs://BUCKET/KEY` is the local file ROOT/BUCKET/KEY, for both
etils.epath (so everything in `skipdit_jax.paths`) and Orbax (tensorstore).

In a test, request the `fake_gcs` fixture; it yields the local root directory:

    def test_something(fake_gcs):
        paths.atomic_write_text("gs://bucket/a.txt", "hi")
        assert (fake_gcs / "bucket" / "a.txt").read_text() == "hi"

Import the fixture into a test module with `from fake_gcs import fake_gcs  # noqa: F401`
(tests/ is on sys.path), or list "fake_gcs" in a conftest's `pytest_plugins`.

In a subprocess (a CLI run, a trainer) install it before anything touches a gs:// path,
from the tests directory on sys.path (and point SKIPDIT_CACHE somewhere temporary if the
run reads remote latents):

    subprocess.run([sys.executable, "-c",
        "import sys; sys.path.insert(0, TESTS_DIR); import fake_gcs; fake_gcs.install(ROOT); "
        "from skipdit_jax.cli import run; sys.argv = ['skipdit', 'train', ...]; run()"], cwd=...)

`install(root)` / `uninstall()` are the plain functions and `installed(root)` the context
manager the fixture uses (`with fake_gcs.installed(ROOT): ...` in the script also gives it
the teardown check, `check_no_local_gs_dirs(cwd)`). Wait for Orbax's asynchronous saves
(`wait_until_finished`, or closing the CheckpointManager) before the fake is uninstalled.

How it works:
  - epath sends gs:// to its fsspec backend (install() sets EPATH_USE_TF=false, so even
    with TensorFlow installed it does not use tf.io.gfile), which asks
    `fsspec.filesystem("gcs")`. We register, for the protocols "gs" and "gcs", an fsspec
    `DirFileSystem` rooted at ROOT over the local file system, and clear epath's cache of
    file-system instances. fsspec-level paths are "BUCKET/KEY", as with gcsfs.
  - Orbax writes and reads arrays through tensorstore, whose kvstore for a gs:// path is
    built by `gcs_utils.get_kvstore_for_gcs`: patched to a {"driver": "file"} spec on the
    mapped local path. Orbax's only calls to the real GCS client (the hierarchical-namespace
    check, done before listing steps and after deletions) are patched to "not HNS".
  - Orbax picks GCS-style atomicity for gs:// paths (a commit_success.txt marker instead
    of a rename), so those code paths are the ones exercised, as on real GCS.

Limits (where the fake is kinder than GCS):
  - Directories are real: an empty directory exists, a rename is an atomic local rename
    (on GCS it is a copy and a delete per object, and a directory exists only while it
    holds an object). Code relying on atomic directory renames passes here but not on GCS.
  - No latency, consistency or permission behaviour, no object generations.
  - Orbax's arrays go through tensorstore's "file" kvstore, not its "gcs" one, so GCS-driver
    behaviour (retries, request limits, credentials) is not exercised; Orbax's own GCS code
    paths (commit markers, no renames, deletions) are.
  - Only libraries that go through fsspec (epath) or tensorstore via Orbax see the fake. Any
    other reader of a gs:// string (open(), PIL, numpy, the ArrayRecord C++ reader, torch)
    fails or, worse, creates a local folder named "gs:"; the fixture asserts at teardown
    that no such folder appeared under the working directory.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pathlib
import tempfile

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

PROTOCOLS = ("gs", "gcs")

_state: dict = {}


def _make_fs_class(root: str) -> type:
    class FakeGCSFileSystem(DirFileSystem):
        """gs://BUCKET/KEY <-> ROOT/BUCKET/KEY."""

        protocol = PROTOCOLS
        cachable = False
        root_dir = root

        def __init__(self, *args, **storage_options):
            # epath passes finalize_on_close=True (a gcsfs option); anything else is ignored too.
            super().__init__(path=root, fs=LocalFileSystem())

        @classmethod
        def _strip_protocol(cls, path):
            if isinstance(path, list):
                return [cls._strip_protocol(p) for p in path]
            path = os.fspath(path)
            for prefix in ("gs://", "gcs://"):
                if path.startswith(prefix):
                    path = path[len(prefix) :]
                    break
            return path.rstrip("/")

    return FakeGCSFileSystem


def local_path(uri: str) -> pathlib.Path:
    """The local file behind `gs://BUCKET/KEY` under the installed fake."""
    if not _state:
        raise RuntimeError("fake_gcs is not installed")
    text = os.fspath(uri)
    if not text.startswith("gs://"):
        raise ValueError(f"not a gs:// path: {text}")
    return pathlib.Path(_state["root"]) / text[len("gs://") :].strip("/")


def install(root) -> pathlib.Path:
    """Map gs://BUCKET/KEY to ROOT/BUCKET/KEY for epath and Orbax in this process."""
    from etils.epath import backend as epath_backend
    from orbax.checkpoint._src.path import gcs_utils

    if _state:
        raise RuntimeError(f"fake_gcs is already installed at {_state['root']}")
    root = pathlib.Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    fs_class = _make_fs_class(str(root))
    saved = {p: fsspec.registry.get(p) for p in PROTOCOLS}
    for p in PROTOCOLS:
        fsspec.register_implementation(p, fs_class, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()

    def get_kvstore_for_gcs(ckpt_path: str) -> dict:
        return {"driver": "file", "path": str(local_path(_normalise_gs(ckpt_path)))}

    originals = {
        "get_kvstore_for_gcs": gcs_utils.get_kvstore_for_gcs,
        "is_hierarchical_namespace_enabled": gcs_utils.is_hierarchical_namespace_enabled,
    }
    gcs_utils.get_kvstore_for_gcs = get_kvstore_for_gcs
    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False
    _state.update(root=root, saved=saved, originals=originals, env=os.environ.get("EPATH_USE_TF"))
    os.environ["EPATH_USE_TF"] = "false"
    return root


def _normalise_gs(path) -> str:
    text = os.fspath(path) if not isinstance(path, str) else path
    if text.startswith("gs:/") and not text.startswith("gs://"):
        text = "gs://" + text[len("gs:/") :]
    return text


def uninstall() -> None:
    """Undo `install` (a no-op when not installed)."""
    from etils.epath import backend as epath_backend
    from orbax.checkpoint._src.path import gcs_utils

    if not _state:
        return
    registry = importlib.import_module("fsspec.registry")
    for p, cls in _state["saved"].items():
        if cls is None:
            registry._registry.pop(p, None)  # back to fsspec's lazy default (gcsfs)
        else:
            fsspec.register_implementation(p, cls, clobber=True)
    for name, fn in _state["originals"].items():
        setattr(gcs_utils, name, fn)
    if _state["env"] is None:
        os.environ.pop("EPATH_USE_TF", None)
    else:
        os.environ["EPATH_USE_TF"] = _state["env"]
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    _state.clear()


def check_no_local_gs_dirs(cwd) -> None:
    """Fail if something created a local folder named "gs:" under `cwd`: the symptom of a
    local-only API (open, os.makedirs, PIL, np.save, a C++ reader) given a gs:// string."""
    cwd = pathlib.Path(cwd)
    found = [str(p) for p in cwd.rglob("gs:")] if cwd.exists() else []
    assert not found, f"a local-only API was given a gs:// path: {found}"


@contextlib.contextmanager
def installed(root=None):
    """Context manager: the fake installed on `root` (a new temporary directory by
    default), yielding the root; on exit it is uninstalled and the working directory is
    checked for a stray "gs:" folder."""
    cwd = pathlib.Path.cwd()
    with contextlib.ExitStack() as stack:
        if root is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="fake-gcs-"))
        path = install(root)
        try:
            yield path
        finally:
            uninstall()
        check_no_local_gs_dirs(cwd)


try:
    import pytest
except ImportError:  # usable without pytest, e.g. from a subprocess script
    pytest = None

if pytest is not None:

    @pytest.fixture
    def fake_gcs(tmp_path, monkeypatch):
        """gs://BUCKET/KEY -> tmp_path/"gcs"/BUCKET/KEY for epath and Orbax; yields that
        root. The test runs in a fresh working directory (tmp_path/"cwd"), which must hold
        no "gs:" folder at teardown, and with SKIPDIT_CACHE (the local copies of remote
        latent shards) in tmp_path/"skipdit-cache"."""
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        monkeypatch.setenv("SKIPDIT_CACHE", str(tmp_path / "skipdit-cache"))
        with installed(tmp_path / "gcs") as root:
            yield root
