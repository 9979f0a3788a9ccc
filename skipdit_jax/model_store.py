"""Model directories: an Orbax parameter tree plus the model config (with its family) as
JSON, and `load_model`, which opens any model a user can name.

Layout of a model directory (what `skipdit convert` writes):

    OUT_DIR/model_config.json   {"family": "dit", ...the model config...}
    OUT_DIR/params/             Orbax (OCDBT) checkpoint of the parameter pytree

`save_model` builds the whole directory under a temporary name beside OUT_DIR and renames
it into place only when complete; an existing OUT_DIR (with --overwrite) is set aside
first and deleted only after the new one is in place. So an interrupted save never leaves
a directory that looks valid and never loses the old one. Paths may be local or remote
(`gs://...`): every access goes through `skipdit_jax.paths`.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp

from skipdit_jax import paths
from skipdit_jax.errors import CheckpointError
from skipdit_jax.models.families import config_from_dict, config_to_dict, family_of

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def is_model_dir(path) -> bool:
    p = paths.as_path(path)
    return p.is_dir() and (p / CONFIG_FILE).exists() and (p / PARAMS_DIR).exists()


def is_training_workdir(path) -> bool:
    p = paths.as_path(path)
    return p.is_dir() and (p / "checkpoints").is_dir() and not is_model_dir(p)


def has_model_config(spec) -> bool:
    """Whether `spec` names a directory (model directory or training workdir) whose model
    config can be read on its own, without loading any weights."""
    spec = str(spec)
    if spec.startswith("hf://"):
        return False
    p = paths.as_path(spec)
    return p.is_dir() and (p / CONFIG_FILE).exists()


def save_model(path, config, params, *, overwrite: bool = False, extra: dict | None = None) -> None:
    """Write `params` and `config` to the model directory `path`, atomically."""
    out = paths.as_path(path)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"output {out} already exists and is not empty (pass --overwrite to replace it)")
    meta = config_to_dict(config)
    if extra:
        meta.update({"_" + k: v for k, v in extra.items()})
    text = json.dumps(meta, indent=2, sort_keys=True)
    paths.write_tree_dir(out, PARAMS_DIR, jax.tree.map(np.asarray, params), {CONFIG_FILE: text})


def read_model_config(path):
    """The model config stored in a model directory or training workdir."""
    p = paths.as_path(path) / CONFIG_FILE
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{p} not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{p} is a directory, not a JSON file") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p} does not hold a model config (a JSON object), found a JSON {type(meta).__name__}")
    try:
        return config_from_dict({k: v for k, v in meta.items() if not k.startswith("_")})
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{p} is not a valid model config: {str(e).strip() or type(e).__name__}") from None


def load_model_dir(path, *, shardings=None) -> tuple:
    """(config, params) of a model directory written by `save_model`. With `shardings`
    (a pytree of `jax.sharding.Sharding`s, or one for every leaf) each device reads only
    its shard; by default everything lands on the first local device."""
    p = paths.as_path(path)
    if not is_model_dir(p):
        raise CheckpointError(f"{p} is not a model directory (expected {CONFIG_FILE} and {PARAMS_DIR}/ inside)")
    config = read_model_config(p)
    abstract = family_of(config).abstract_params()
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    try:
        params = ocp.StandardCheckpointer().restore(p / PARAMS_DIR, target)
    except Exception as e:  # orbax raises a variety of errors for damaged or mismatched trees
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot restore parameters from {p / PARAMS_DIR}: {first}") from None
    return config, params


def load_model(spec, *, num_heads: int | None = None, preset: str | None = None, use_ema: bool = True, family: str | None = None) -> tuple:
    """(config, params) from a model directory, a training workdir (its latest checkpoint;
    EMA weights unless use_ema=False), or an official checkpoint file (`.pt`,
    `.safetensors`, `hf://org/repo/file`), converted on the fly (the family is detected
    from the keys, or insisted on with `family`)."""
    from skipdit_jax import convert

    spec = str(spec)
    if not spec.startswith("hf://"):
        p = paths.as_path(spec)
        if p.is_dir():
            if is_training_workdir(p):
                from skipdit_jax.training.checkpoints import load_trained

                return load_trained(p, use_ema=use_ema)
            return load_model_dir(p)
    state = convert.load_torch_checkpoint(spec)
    kwargs = {k: v for k, v in (("num_heads", num_heads), ("preset", preset)) if v is not None}
    return convert.from_torch(state, family=family, **kwargs)
