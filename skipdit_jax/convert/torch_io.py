"""Reading PyTorch checkpoint files safely, for every family's converter.

Reading a checkpoint never runs code from it: `.pt` files go through
`torch.load(weights_only=True)` with only `argparse.Namespace` allowed (the released
DiT-XL-2-skip.pt stores its training args as one); `.safetensors` holds no code at all.
Every unreadable file gives one `CheckpointError` line.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from typing import Any

import numpy as np

from skipdit_jax.errors import CheckpointError, HubUnavailableError


def resolve_path(path: str) -> str:
    """A local path, or `hf://org/repo/path/in/repo` downloaded through huggingface_hub."""
    path = str(path)
    if not path.startswith("hf://"):
        return os.path.expanduser(path)
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


def _load_pt(path: str) -> Any:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"reading PyTorch file {path} needs torch: pip install torch==2.13.0 (or convert it to .safetensors)"
        ) from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names a refused object on a line like "Unsupported global: GLOBAL builtins.print ...";
        # any other unpickling error means the bytes are not a checkpoint at all.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found or "Unsupported global" in str(e):
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"refusing to load {path}: it references Python objects outside the allow-list{what}, and "
                "unpickling them could run code"
            ) from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or another format?)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or another format?): {first}") from None


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        out = {}
        with safe_open(path, framework="flax") as f:  # flax: handles bfloat16
            for k in f.keys():
                out[k] = np.asarray(f.get_tensor(k), dtype=np.float32)
        return out
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def _unwrap(obj: Any, path: str) -> dict:
    """The model state dict inside a checkpoint: EMA weights when present."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    for key in ("ema", "model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            return obj[key]
    return obj


def load_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Model weights of an official checkpoint as float32 numpy arrays.

    Accepts a bare state dict (DiT-XL-2-256x256.pt), a training checkpoint
    {"model", "ema", "opt", "args"} (returns "ema"), an {"ema": ...} file, or a
    `.safetensors` file; `hf://org/repo/file` paths are fetched from the Hub.
    """
    local = resolve_path(path)
    if not os.path.isfile(local):
        raise CheckpointError(f"checkpoint file not found: {local}")
    if local.endswith(".safetensors"):
        return _load_safetensors(local)
    state = _unwrap(_load_pt(local), local)
    out = {}
    for k, v in state.items():
        if not hasattr(v, "detach"):
            raise CheckpointError(f"{local}: entry {k!r} is a {type(v).__name__}, not a tensor")
        for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = _to_numpy(v)
    return out


