"""Reading the tensors of a TorchScript archive WITHOUT running any code from it.

A TorchScript `.pt` (what `torch.jit.save` writes, e.g. StyleGAN-V's `i3d_torchscript.pt`)
is a zip: `<name>/data.pkl` pickles the module tree (objects of classes `__torch__.*`
whose state is a dict of attributes: submodules, parameters, buffers, flags),
`<name>/data/<key>` hold the raw little-endian storages, and `<name>/code/` the compiled
Python that `torch.jit.load` would run. Here only `data.pkl` is unpickled, through an
unpickler that knows a closed list of globals (module placeholders, the tensor rebuild
function, storage dtypes, OrderedDict, TorchScript's list builders) and refuses every
other one; tensors become numpy arrays read from the storages. The result is a flat
dict "submodule.path.attribute" -> float32 array, like a state dict.
"""

from __future__ import annotations

import collections
import pickle
import zipfile

import numpy as np

from skipdit_jax.errors import CheckpointError

_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class ScriptObject:
    """Placeholder for a `__torch__.*` object: keeps its class name and attributes."""

    def __init__(self, *args):
        self.__dict__["_state"] = {}

    def __setstate__(self, state):
        self.__dict__["_state"] = state if isinstance(state, dict) else {"__state__": state}


def _placeholder(name: str):
    return type(name.rsplit(".", 1)[-1], (ScriptObject,), {"_qualified": name})


def _rebuild_tensor(storage, offset, size, stride, *args):
    """torch._utils._rebuild_tensor_v2 on a (dtype, flat numpy) storage."""
    flat = storage
    itemsize = flat.itemsize
    if not size:
        return flat[offset : offset + 1].reshape(())
    return np.lib.stride_tricks.as_strided(
        flat[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride), writeable=False
    ).copy()


def _identity(*args):
    return args[0] if len(args) == 1 else list(args)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, shown: str, storages: str = "data"):
        super().__init__(file)
        self._archive, self._prefix, self._shown, self._storages = archive, prefix, shown, storages

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _placeholder(f"{module}.{name}")
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad=False, hooks=None: data
        if module == "torch" and name in _DTYPES:
            return ("storage", name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name.startswith(("build_", "restore_type_tag")):
            return _identity
        raise CheckpointError(f"refusing to read {self._shown}: its data.pkl references {module}.{name}, outside the allow-list")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self._shown}: unexpected persistent id in data.pkl")
        _, storage_type, key, _location, numel = pid[:5]
        name = storage_type[1] if isinstance(storage_type, tuple) else str(storage_type)
        dtype = _DTYPES.get(name)
        if dtype is None:
            raise CheckpointError(f"{self._shown}: unsupported storage type {name}")
        raw = self._archive.read(f"{self._prefix}{self._storages}/{key}")
        if dtype == "bfloat16":
            as_u16 = np.frombuffer(raw, np.uint16)[:numel]
            return (as_u16.astype(np.uint32) << 16).view(np.float32)
        return np.frombuffer(raw, dtype)[:numel]


def is_torchscript(path: str) -> bool:
    """Whether the local file `path` is a zip holding `*/data.pkl` and `*/code/` (a
    TorchScript archive rather than a torch.save file)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any(n.endswith("/data.pkl") for n in names) and any("/code/" in n for n in names)


def _walk(obj, prefix: str, out: dict, seen: set) -> None:
    """Tensors under `obj`, named by their attribute path (private attributes skipped)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
        return
    if isinstance(obj, ScriptObject):
        obj = obj._state
    if isinstance(obj, dict):
        items = [(k, v) for k, v in obj.items() if isinstance(k, str) and not k.startswith("_")]
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        return
    for k, v in items:
        _walk(v, f"{prefix}.{k}" if prefix else k, out, seen)


def _load_pickle(path: str, member: str, storages: str, shown: str):
    """(unpickled `member` of the archive, whether it exists)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{shown} is not a readable TorchScript archive ({e})") from None
    with archive:
        pkl = [n for n in archive.namelist() if n.endswith("/" + member) and n.count("/") == 1]
        if not pkl:
            return None, False
        prefix = pkl[0][: -len(member)]
        try:
            with archive.open(pkl[0]) as f:
                return _Unpickler(f, archive, prefix, shown, storages).load(), True
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged archive fails in many ways
            raise CheckpointError(f"{shown}: cannot read its {member} ({type(e).__name__}: {e})") from None


def _floats(tensors: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in tensors.items() if np.issubdtype(np.asarray(v).dtype, np.floating)}


def read_tensors(path: str, shown: str | None = None) -> dict[str, np.ndarray]:
    """Every tensor attribute of the module tree in the TorchScript archive `path`, as
    {"sub.module.name": float32 array} in the module's attribute order. Never runs code
    from the archive; anything outside the allow-list is one CheckpointError."""
    shown = shown or path
    root, found = _load_pickle(path, "data.pkl", "data", shown)
    if not found:
        raise CheckpointError(f"{shown} is not a TorchScript archive (no data.pkl)")
    out: dict[str, np.ndarray] = {}
    _walk(root, "", out, set())
    return _floats(out)


def read_constants(path: str, shown: str | None = None) -> dict[str, np.ndarray]:
    """The tensor constants of the archive (`constants.pkl`: where a FROZEN module,
    `torch.jit.freeze`, keeps its weights, BatchNorms folded into the convs), as
    {"constants.<i>": float32 array} in the order the compiled code numbers them."""
    shown = shown or path
    root, found = _load_pickle(path, "constants.pkl", "constants", shown)
    out: dict[str, np.ndarray] = {}
    if found:
        _walk(root, "constants", out, set())
    return _floats(out)


__all__ = ["is_torchscript", "read_tensors", "read_constants", "ScriptObject"]
