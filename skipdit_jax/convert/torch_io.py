"""Reading PyTorch checkpoint files safely, for every family's converter.

Reading a checkpoint never runs code from it: `.pt` files go through
`torch.load(weights_only=True)` with only `argparse.Namespace` allowed (the released
DiT-XL-2-skip.pt stores its training args as one); `.safetensors` holds no code at all.
Every unreadable file (missing, a directory, empty, truncated, text, random bytes, a bad
safetensors header, a pickle of something other than a state dict) gives one
`CheckpointError` line naming it. Paths may be local, remote (`gs://...`, read through a
temporary local copy, as torch and safetensors only open local files) or `hf://`.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from typing import Any

import numpy as np

from skipdit_jax import paths
from skipdit_jax.errors import CheckpointError, HubUnavailableError


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0].strip() if text else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def resolve_path(path) -> str:
    """A local or remote path (absolute, `~` expanded), or `hf://org/repo/path/in/repo`
    downloaded through huggingface_hub (its local file name)."""
    path = str(path)
    if not path.startswith("hf://"):
        return str(paths.as_path(path))
    parts = path[len("hf://") :].split("/")
    if len(parts) < 3:
        raise CheckpointError(f"hf:// paths look like hf://org/repo/file.pt, got {path!r}")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id=repo, filename=filename)
    except Exception as e:  # network down, offline mode, missing repo or file
        raise HubUnavailableError(
            f"could not fetch {path} from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "download the file elsewhere and pass its local path instead"
        ) from None


def _to_numpy(value) -> np.ndarray:
    import torch

    t = value.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy()


def _load_pt(path: str, shown: str) -> Any:
    """torch.load of the local file `path`; errors name `shown` (the path the user gave)."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"reading PyTorch file {shown} needs torch: pip install torch==2.13.0 (or convert it to .safetensors)"
        ) from None
    with paths.as_path(path).open("rb") as f:  # a local file (the caller made a local copy if needed)
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{shown} is empty, not a PyTorch checkpoint")
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):
        # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (\x80..).
        raise CheckpointError(f"{shown} is not a PyTorch checkpoint (neither a zip archive nor a pickle; a text file or another format?)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            # A zip-format file is memory-mapped: a training checkpoint's optimizer state
            # (two thirds of DiT-XL/2-skip.pt's 11 GB) is then never read into host memory.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK"))
    except pickle.UnpicklingError as e:
        # torch names a refused object on a line like "Unsupported global: GLOBAL builtins.print ...";
        # any other unpickling error means the bytes are not a checkpoint at all.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found or "Unsupported global" in str(e):
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"refusing to load {shown}: it references Python objects outside the allow-list{what}, and "
                "unpickling them could run code"
            ) from None
        raise CheckpointError(f"{shown} is not a readable PyTorch checkpoint (truncated or another format?)") from None
    except Exception as e:  # noqa: BLE001
        # Text, random bytes or a damaged archive make the unpickler fail in many ways
        # (KeyError, EOFError, RuntimeError, zipfile/struct errors, ...): all mean the same.
        raise CheckpointError(
            f"{shown} is not a readable PyTorch checkpoint (truncated or another format?): {_first_line(e)}"
        ) from None


def _load_safetensors(path: str, shown: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        out = {}
        with safe_open(path, framework="flax") as f:  # flax: handles bfloat16
            for k in f.keys():
                out[k] = np.asarray(f.get_tensor(k), dtype=np.float32)
        return out
    except Exception as e:  # noqa: BLE001  (SafetensorError, OSError, ValueError, TypeError, ...)
        raise CheckpointError(f"{shown} is not a readable safetensors file: {_first_line(e)}") from None


def _unwrap(obj: Any, path: str) -> dict:
    """The model state dict inside a checkpoint: EMA weights when present."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    for key in ("ema", "model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            return obj[key]
    return obj


def load_torch_checkpoint(path) -> dict[str, np.ndarray]:
    """Model weights of an official checkpoint as float32 numpy arrays.

    Accepts a bare state dict (DiT-XL-2-256x256.pt), a training checkpoint
    {"model", "ema", "opt", "args"} (returns "ema"), an {"ema": ...} file, or a
    `.safetensors` file; local, remote (gs://) or `hf://org/repo/file` (fetched from the
    Hub). Anything unreadable raises `CheckpointError`.
    """
    resolved = resolve_path(path)
    shown = str(path) if str(path).startswith("hf://") else resolved
    p = paths.as_path(resolved)
    try:
        is_dir, exists = p.is_dir(), p.exists()
    except OSError as e:
        raise CheckpointError(f"cannot access checkpoint {shown}: {_first_line(e)}") from None
    if is_dir:
        raise CheckpointError(f"{shown} is a directory, not a checkpoint file (.pt or .safetensors)")
    if not exists:
        raise CheckpointError(f"checkpoint file not found: {shown}")
    try:
        with paths.local_copy(p) as local:
            if p.name.endswith(".safetensors"):
                return _load_safetensors(local, shown)
            obj = _load_pt(local, shown)
    except OSError as e:  # copying a remote file
        raise CheckpointError(f"cannot read checkpoint {shown}: {_first_line(e)}") from None
    state = _unwrap(obj, shown)
    out = {}
    for k, v in state.items():
        if not isinstance(k, str) or not hasattr(v, "detach"):
            what = f"entry {k!r} is a {type(v).__name__}, not a tensor" if isinstance(k, str) else f"key {k!r} is not a string"
            raise CheckpointError(f"{shown}: {what}")
        for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = _to_numpy(v)
    return out


def check_keys_and_shapes(state: dict[str, np.ndarray], want: dict[str, tuple[int, ...]], what: str) -> None:
    """One CheckpointError naming the missing keys, unexpected keys and wrong shapes of
    `state` against the expected `want` (at most 8 of each shown); `what` names the
    checkpoint kind in the message."""
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {want[k]})" for k in sorted(want) if k in state and tuple(state[k].shape) != want[k]]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{what} does not fit the inferred architecture: " + "; ".join(problems))


def read_diffusers_folder_state(folder) -> dict[str, np.ndarray]:
    """Weights of a diffusers model folder: sharded safetensors (index), one safetensors or .bin."""
    folder = paths.as_path(folder)
    for index_name in ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{index} is not a valid shard index (a JSON object with a weight_map)") from None
            state: dict[str, np.ndarray] = {}
            for name in files:
                state.update(load_torch_checkpoint(folder / name))
            return state
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).exists():
            return load_torch_checkpoint(folder / name)
    raise CheckpointError(f"no diffusion_pytorch_model weights (.safetensors, .bin or a sharded index) in {folder}")
