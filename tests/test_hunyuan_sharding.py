"""Hunyuan-DiT FSDP rules: every parameter has a rule of its rank that shards the model width in
the blocks; the full DiT-g/2 (1.5 B parameters, abstract) splits ~8x over 8 devices; and a tiny
model's parameters placed FSDP over 8 simulated devices (a subprocess) hold ~1/8 per device and
sample (DDPM, guidance, Skip-Cache) the same as one device."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from skipdit_jax.models import HunyuanConfig, family_of, hunyuan_preset
from skipdit_jax.models.hunyuan_sharding import PARAM_AXES
from skipdit_jax.sharding import _path_str, param_partition_specs

TINY = dict(
    input_size=8,
    hidden_size=64,
    depth=6,
    num_heads=2,
    mlp_ratio=2.5,
    text_len=5,
    text_len_t5=7,
    cross_attention_dim=32,
    cross_attention_dim_t5=48,
    pooled_projection_dim=40,
)


def _leaves(family):
    return [(_path_str(p), leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(family.abstract_params())]


def test_every_parameter_has_a_rule_of_its_rank():
    cfg = HunyuanConfig(**TINY)
    for path, shape in _leaves(family_of(cfg)):
        axes = next((a for pat, a in PARAM_AXES if re.search(f"(?:^|/)(?:{pat})$", path)), None)
        assert axes is not None, f"no sharding rule for {path}"
        assert len(axes) == len(shape), (path, axes, shape)
        if len(shape) - ("_blocks/" in path) >= 2:  # every matrix (not the vectors per layer) shards one dimension
            assert "embed" in axes, path
        if "_blocks/" in path and path.endswith("kernel"):  # the blocks shard the model width
            assert shape[axes.index("embed")] == cfg.hidden_size, (path, shape, axes)
    assert family_of(cfg).param_axes is PARAM_AXES


def test_full_dit_g_splits_eightfold():
    family = family_of(hunyuan_preset("DiT-g/2"))
    abstract = family.abstract_params()
    mesh = AbstractMesh((1, 8), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    specs = jax.tree.leaves(
        param_partition_specs(abstract, mesh, param_axes=PARAM_AXES), is_leaf=lambda s: isinstance(s, PartitionSpec)
    )
    total = per_device = 0
    for (path, shape), spec in zip(_leaves(family), specs, strict=True):
        n = int(np.prod(shape))
        total += n
        per_device += n // 8 if "fsdp" in tuple(spec) else n
        if len(shape) - ("_blocks/" in path) >= 2 and n >= 2**14:  # every matrix, no vectors per layer
            assert "fsdp" in tuple(spec), (path, shape, spec)
    assert total == 1_499_952_032
    assert 7.9 < total / per_device <= 8.0, total / per_device


SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from skipdit_jax import sharding
    from skipdit_jax.cache import SkipCache
    from skipdit_jax.diffusion.diffusers_schedulers import DiffusersDDPM
    from skipdit_jax.models import HunyuanConfig, family_of
    from skipdit_jax.sampling import sample

    assert jax.device_count() == 8, jax.devices()
    cfg = HunyuanConfig(**{tiny!r})
    family = family_of(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: np.asarray(a) + 0.1 * rng.standard_normal(a.shape).astype(np.float32),
                          family.init_params(0))
    B = 8
    cond = family.example_condition(B)
    for key in cond:
        if key.endswith("_emb"):
            cond[key] = rng.standard_normal(cond[key].shape).astype(np.float32)
        else:
            cond[key][:, : cond[key].shape[1] // 2] = 1
    noise = np.asarray(jax.random.normal(jax.random.key(1), (B, *family.sample_shape)))
    kw = dict(condition=cond, sampler="ddpm", num_steps=6, cfg_scale=6.0, scheduler=DiffusersDDPM.hunyuan(),
              cache=SkipCache(2, 1, 700, 50), rng=jax.random.key(3))
    ref = np.asarray(sample(cfg, params, noise=noise, **kw))

    mesh = sharding.make_mesh(data=1, fsdp=8)
    shardings = sharding.param_shardings(params, mesh, param_axes=family.param_axes, min_shard_size=1)
    placed = jax.device_put(params, shardings)
    per_device = {{}}
    for leaf in jax.tree.leaves(placed):
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    batch = sharding.batch_sharding(mesh)
    kw["condition"] = jax.device_put(cond, batch)
    out = sample(cfg, placed, noise=jax.device_put(noise, batch), **kw)
    total = sum(np.asarray(a).nbytes for a in jax.tree.leaves(params))

    # The converter's mesh= path builds every parameter straight on its FSDP sharding.
    from skipdit_jax.convert.hunyuan import hunyuan_from_torch, hunyuan_to_torch
    _, converted = hunyuan_from_torch(hunyuan_to_torch(cfg, params), input_size=cfg.input_size, mesh=mesh)
    want = sharding.param_shardings(params, mesh, param_axes=family.param_axes)
    converted_ok = all(jax.tree.leaves(jax.tree.map(
        lambda a, b, s: a.sharding == s and np.array_equal(np.asarray(a), b), converted, params, want)))
    converted_sharded = sum(not a.sharding.is_fully_replicated for a in jax.tree.leaves(converted))
    print(json.dumps(dict(total=int(total), per_device=sorted(per_device.values()), devices=len(out.sharding.device_set),
                          converted_ok=converted_ok, converted_sharded=int(converted_sharded),
                          max_diff=float(np.abs(np.asarray(out) - ref).max()), max_ref=float(np.abs(ref).max()),
                          finite=bool(np.isfinite(ref).all()))))
    """
)


def test_fsdp_over_eight_devices_samples_like_one():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    res = subprocess.run([sys.executable, "-c", SCRIPT.format(tiny=TINY)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(m["per_device"]) == 8 and m["devices"] == 8, m
    # each device holds its 1/8 of every matrix plus the (small) replicated vectors
    assert max(m["per_device"]) < 0.16 * m["total"], m
    assert sum(m["per_device"]) < 1.3 * m["total"], m
    assert m["finite"] and m["max_ref"] > 0.1, m
    assert m["max_diff"] <= 1e-4 * m["max_ref"], m
    assert m["converted_ok"] and m["converted_sharded"] > 0, m
