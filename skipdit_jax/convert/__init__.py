"""Conversion between official PyTorch checkpoints and our parameters, by family.

`torch_io` reads files safely (no code runs); each family's module maps its official
layout to our parameter tree and back. `from_torch(state_dict)` picks the family from
the keys.
"""

from skipdit_jax.convert.dit import (
    dit_from_torch,
    dit_to_torch,
    expected_shapes,
    infer_config,
    validate_state_dict,
)
from skipdit_jax.convert.hunyuan import hunyuan_from_torch, hunyuan_to_torch
from skipdit_jax.convert.latte import latte_from_torch, latte_to_torch
from skipdit_jax.convert.latte_t2v import latte_t2v_from_torch, latte_t2v_to_torch, load_latte_t2v, save_latte_t2v_diffusers
from skipdit_jax.convert.torch_io import load_torch_checkpoint, resolve_path


def from_torch(state_dict: dict, family: str | None = None, **kwargs):
    """(model_config, params) of an official state dict of any family (detected from its
    keys, or the named `family`); kwargs go to that family's converter."""
    from skipdit_jax.models.families import family_for_state_dict

    return family_for_state_dict(state_dict, family).from_torch(state_dict, **kwargs)


def to_torch(config, params) -> dict:
    """The official PyTorch state dict (numpy) of a model of any family."""
    from skipdit_jax.models.families import family_of

    return family_of(config).to_torch(params)


def save_torch_safetensors(config, params, path) -> None:
    """Export to a PyTorch-layout `.safetensors` file (the model config, with its family,
    in the file's metadata). Written to a temporary name and renamed: an existing file is
    replaced only by a complete one."""
    import json

    from safetensors.numpy import save

    from skipdit_jax import paths
    from skipdit_jax.models.families import config_to_dict

    blob = save(to_torch(config, params), metadata={"skipdit_model_config": json.dumps(config_to_dict(config))})
    paths.atomic_write_bytes(path, blob)


__all__ = [
    "dit_from_torch",
    "dit_to_torch",
    "expected_shapes",
    "from_torch",
    "hunyuan_from_torch",
    "hunyuan_to_torch",
    "infer_config",
    "latte_from_torch",
    "latte_to_torch",
    "latte_t2v_from_torch",
    "latte_t2v_to_torch",
    "load_latte_t2v",
    "load_torch_checkpoint",
    "resolve_path",
    "save_latte_t2v_diffusers",
    "save_torch_safetensors",
    "to_torch",
    "validate_state_dict",
]
