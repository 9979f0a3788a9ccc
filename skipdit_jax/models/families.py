"""The registry of model families, chosen by name.

    family_of(config)             the family instance bound to a model config
    get_family("dit")             the family class of a name
    family_for_state_dict(state)  which family an official PyTorch state dict belongs to
    config_from_dict(d)           a model config from its JSON form (d["family"] names it)

Families are imported lazily, so loading one never imports the others' code.
"""

from __future__ import annotations

import importlib

from skipdit_jax.errors import CheckpointError, ConfigError
from skipdit_jax.models.family import ModelFamily

# name -> "module:class"
_FAMILIES: dict[str, str] = {
    "dit": "skipdit_jax.models.dit:DiTFamily",
    "latte": "skipdit_jax.models.latte:LatteFamily",
    "latte_t2v": "skipdit_jax.models.latte_t2v_family:LatteT2VFamily",
    "latte_t2v_joint": "skipdit_jax.models.latte_t2v_joint:LatteT2VJointFamily",
    "hunyuan": "skipdit_jax.models.hunyuan_family:HunyuanFamily",
}
DEFAULT_FAMILY = "dit"  # model_config.json files written before families were named


def family_names() -> list[str]:
    return list(_FAMILIES)


def get_family(name: str) -> type[ModelFamily]:
    if name not in _FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known families: {', '.join(_FAMILIES)}")
    module, cls = _FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def family_of(config) -> ModelFamily:
    """The family instance of a model config (each config class names its family)."""
    name = getattr(type(config), "family", None)
    if name is None:
        raise ConfigError(f"{type(config).__name__} is not a model config of a known family")
    return get_family(name)(config)


def as_family(config_or_family) -> ModelFamily:
    """A family instance from a model config, or the family itself."""
    return config_or_family if isinstance(config_or_family, ModelFamily) else family_of(config_or_family)


def config_from_dict(d: dict):
    """A model config from `config.to_dict()` plus its "family" key."""
    name = d.get("family", DEFAULT_FAMILY)
    return get_family(name).config_cls.from_dict({k: v for k, v in d.items() if k != "family"})


def config_to_dict(config) -> dict:
    return {"family": type(config).family, **config.to_dict()}


def family_for_state_dict(state_dict: dict, expected: str | None = None) -> type[ModelFamily]:
    """The family whose official layout `state_dict` has; `expected` (a name) insists on one."""
    found = [name for name in _FAMILIES if get_family(name).recognises(state_dict)]
    if expected is not None:
        cls = get_family(expected)
        if expected not in found:
            other = f" (it looks like a {found[0]} checkpoint)" if found else ""
            raise CheckpointError(f"not a {expected} checkpoint{other}")
        return cls
    if not found:
        raise CheckpointError(
            f"the state dict matches no known model family ({', '.join(_FAMILIES)}); first keys: {', '.join(list(state_dict)[:5])}"
        )
    return get_family(found[0])
