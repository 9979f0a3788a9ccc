"""Meshes and sharding rules, as data.

Parameters get *logical* axis names from their model family's `param_axes` (regex over the
"/"-joined parameter path -> one name per dimension; e.g. `skipdit_jax.models.dit.PARAM_AXES`);
`LOGICAL_RULES` map logical names to mesh axes. A parameter no rule names is replicated.
The default is FSDP: every tensor's model-width ("embed") dimension is sharded over the 'fsdp' mesh axis,
everything else replicated, and tensors smaller than `min_shard_size` elements stay whole
(sharding them costs more in collectives than it saves). Batches are sharded over both
('data', 'fsdp'). The optimizer state mirrors the parameters, so it shards the same way.

Meshes use `AxisType.Auto` (GSPMD propagation): the model code stays free of sharding
annotations, and `jax.jit`'s in/out shardings pin the state and the batch.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from skipdit_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (None = replicated).
LOGICAL_RULES: list[tuple[str, str | None]] = [
    ("embed", "fsdp"),
    ("layers", None),
    ("hidden", None),
    ("vocab", None),
]


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over all (or the given) devices; -1 takes what is left."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ConfigError("only one of mesh.data and mesh.fsdp can be -1")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ConfigError(f"mesh data={data} x fsdp={fsdp} does not cover the {n} available devices")
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def _path_str(path) -> str:
    parts = []
    for k in path:  # DictKey.key, GetAttrKey.name (optax's NamedTuple states), SequenceKey.idx
        parts.append(str(next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k)))
    return "/".join(parts)


def logical_axes(path: str, ndim: int, param_axes=()) -> tuple[str | None, ...]:
    """Logical axes of the parameter at `path`. Patterns match a path's tail, so optimizer
    state (e.g. ".../mu/encoder_blocks/attn/qkv/kernel") shards like its parameter."""
    for pattern, axes in param_axes:
        if re.search(f"(?:^|/)(?:{pattern})$", path):
            if len(axes) != ndim:
                raise ConfigError(f"sharding rule {pattern!r} names {len(axes)} axes but {path} has {ndim}")
            return axes
    return (None,) * ndim


def param_partition_specs(params, mesh: Mesh, *, param_axes, min_shard_size: int = 2**14, logical_rules=LOGICAL_RULES):
    """PartitionSpec tree for `params` (arrays or ShapeDtypeStructs) on `mesh`, by the
    `param_axes` rules of their model family."""
    rules = dict(logical_rules)

    def spec(path, leaf):
        shape = leaf.shape
        if int(np.prod(shape)) < min_shard_size:
            return P()
        mesh_axes = []
        for size, name in zip(shape, logical_axes(_path_str(path), len(shape), param_axes)):
            axis = rules.get(name) if name else None
            # A dimension the mesh axis does not divide stays whole rather than failing.
            mesh_axes.append(axis if axis and size % mesh.shape[axis] == 0 and mesh.shape[axis] > 1 else None)
        return P(*mesh_axes)

    return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params, mesh: Mesh, **kw):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_partition_specs(params, mesh, **kw))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
    """Per-process numpy batch -> global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
