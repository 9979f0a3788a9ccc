"""Model checkpoints on disk: an Orbax parameter tree plus the model config as JSON.

Layout of a model directory (what `skipdit convert` writes):

    OUT_DIR/model_config.json   the ModelConfig
    OUT_DIR/params/             Orbax (OCDBT) checkpoint of the parameter pytree

Orbax writes into a temporary directory and renames it when complete, and the JSON is
written to a temporary file and renamed, so an interrupted save never leaves a directory
that looks valid.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from skipdit_jax.errors import CheckpointError
from skipdit_jax.model_config import ModelConfig

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def absolute_path(path) -> epath.Path:
    """An absolute `epath.Path` (Orbax refuses relative ones); cloud paths (`gs://...`)
    are absolute already and are left as they are."""
    text = os.fspath(path) if not isinstance(path, str) else path
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_model_dir(path) -> bool:
    p = epath.Path(path)
    return p.is_dir() and (p / CONFIG_FILE).exists() and (p / PARAMS_DIR).exists()


def save_model(path, config: ModelConfig, params, *, overwrite: bool = False, extra: dict | None = None) -> None:
    """Write `params` and `config` to the model directory `path`."""
    out = absolute_path(path)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"output directory {out} already exists and is not empty")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(out / PARAMS_DIR, jax.tree.map(np.asarray, params))
    ckptr.wait_until_finished()
    meta = config.to_dict()
    if extra:
        meta = {**meta, **{"_" + k: v for k, v in extra.items()}}
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, out / CONFIG_FILE)


def load_model_dir(path) -> tuple[ModelConfig, dict]:
    """(config, params) of a model directory written by `save_model`."""
    p = absolute_path(path)
    if not is_model_dir(p):
        raise CheckpointError(f"{p} is not a model directory (expected {CONFIG_FILE} and {PARAMS_DIR}/ inside)")
    try:
        meta = json.loads((p / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p / CONFIG_FILE} is not valid JSON: {e}") from None
    config = ModelConfig.from_dict({k: v for k, v in meta.items() if not k.startswith("_")})
    from skipdit_jax.models import init_params

    abstract = jax.eval_shape(lambda: init_params(config, 0))
    try:
        params = ocp.StandardCheckpointer().restore(p / PARAMS_DIR, abstract)
    except Exception as e:  # orbax raises a variety of errors for damaged or mismatched trees
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot restore parameters from {p / PARAMS_DIR}: {first}") from None
    return config, params


def load_model(spec: str, *, num_heads: int | None = None, preset: str | None = None, use_ema: bool = True) -> tuple[ModelConfig, dict]:
    """(config, params) from a model directory, a training workdir (its latest checkpoint;
    EMA weights unless use_ema=False), or an official checkpoint file (`.pt`,
    `.safetensors`, `hf://org/repo/file`), converted on the fly."""
    from skipdit_jax import convert

    spec = str(spec)
    if not spec.startswith("hf://") and os.path.isdir(os.path.expanduser(spec)):
        path = os.path.expanduser(spec)
        if os.path.isdir(os.path.join(path, "checkpoints")) and not is_model_dir(path):
            from skipdit_jax.train import load_trained  # a training workdir

            return load_trained(path, use_ema=use_ema)
        return load_model_dir(path)
    state = convert.load_torch_checkpoint(spec)
    return convert.dit_from_torch(state, num_heads=num_heads, preset=preset)
