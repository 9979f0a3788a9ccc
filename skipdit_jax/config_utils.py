"""Config files and overrides, shared by the CLI, the demo and the experiments.

A config file is a Python file with `get_config(arg=None) -> ml_collections.ConfigDict`;
`path.py:arg` passes `arg` (big_vision style variants, e.g. `configs/mnist_skipdit.py:dit`).
Overrides are dotted keys (`train.steps`) set on a locked config, so a mistyped key is an
error rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from typing import Any

import ml_collections

from skipdit_jax.errors import ConfigError, UserError


def split_config_arg(spec: str) -> tuple[str, str | None]:
    """"configs/x.py:arg" -> ("configs/x.py", "arg"); no ":" -> (spec, None)."""
    path, sep, arg = str(spec).rpartition(":")
    if sep and path.endswith(".py"):
        return path, arg or None
    return str(spec), None


def load_config_file(spec: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file; `spec` may carry the arg as `path.py:arg`."""
    path, spec_arg = split_config_arg(os.fspath(spec))
    arg = arg if arg is not None else spec_arg
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    # A unique module name per file, so two config files with the same stem never collide.
    name = "skipdit_config_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a broken config file is the user's to fix: say where
        raise UserError(f"cannot load config file {path}: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"config file {path} has no get_config() function")
    try:
        return module.get_config(arg) if arg is not None else module.get_config()
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: get_config({arg!r}) failed: {e}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """Set dotted keys ({"train.steps": 10}) of a config in place; unknown keys and values
    of the wrong type are one-line `ConfigError`s. Returns the config."""
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        try:
            for p in parents:
                node = node[p]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = value  # an existing key: allowed on a locked config
        except KeyError:
            raise ConfigError(f"unknown config key {dotted!r}") from None
        except TypeError as e:
            raise ConfigError(f"bad value for {dotted}: {e}") from None
    return config


def parse_overrides(text: str) -> dict[str, Any]:
    """'a.b=1,c.d="x"' -> {"a.b": 1, "c.d": "x"} (values are JSON; bare words are strings)."""
    out = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"bad override {item!r}: expected key=value")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


# Fields of an encoder config that say how we run it, never read from a checkpoint's config.json.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "scan_unroll")


def dataclass_from_hf_config(cls, config: dict[str, Any], overrides: dict[str, Any], what: str):
    """`cls(**fields)` from a Hugging Face config.json dict: its keys that name fields of the
    dataclass `cls` (except `RUNTIME_FIELDS`), then `overrides`; unknown keys are ignored,
    a bad value is one `ConfigError` line ("bad {what} config: ...")."""
    fields = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS)
    kw = {k: config[k] for k in fields if k in config}
    kw.update(overrides)
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigError(f"bad {what} config: {e}") from None
