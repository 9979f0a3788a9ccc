"""What the text pipelines share: per-seed initial noise, the jitted text sampler under a
diffusers scheduler, and ahead-of-time compilation kept per setting (so sampling and
compiling are timed apart, and a second run in one process does not compile again)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.errors import UserError
from skipdit_jax.sampling import build_sampler, check_settings


@jax.jit
def _keys(seeds):
    return jax.vmap(jax.random.key)(seeds)


@functools.partial(jax.jit, static_argnums=1)
def _normal(keys, shape):
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def make_noise(seeds: Sequence[int], sample_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(per-sample keys (B,), initial noise (B, *sample_shape)): sample j's noise is
    `normal(key(seeds[j]), sample_shape)`, whatever else is in the batch."""
    seeds = np.asarray(seeds, np.int64)
    if seeds.ndim != 1 or seeds.size == 0 or seeds.min() < 0 or seeds.max() >= 2**32:
        raise UserError(f"seeds must be a non-empty list of integers in [0, 2**32), got {seeds.tolist()}")
    keys = _keys(jnp.asarray(seeds.astype(np.uint32)))
    return keys, _normal(keys, tuple(sample_shape))


def build_text_sampler(config, scheduler, num_steps: int, cfg_scale: float, cache=None):
    """The jitted `fn(params, noise, condition, cfg_scale, keys) -> latents`: the shared scan
    sampler of a text model under a diffusers scheduler, guidance on all eps channels (as
    LattePipeline and Hunyuan-DiT's pipeline guide)."""
    guided = check_settings(config, cache=cache, cfg_scale=cfg_scale)
    scheduler.timesteps(int(num_steps))  # one error line for a bad step count
    return build_sampler(config, scheduler.kind, str(int(num_steps)), guided, None, cache, 0.0, False, scheduler=scheduler)


_COMPILED: dict = {}


def compiled_for(fn, *args):
    """`fn.lower(*args).compile()`, kept per (jitted fn, argument shapes, dtypes and shardings),
    so a second run of the same setting in one process (a notebook, a test) does not compile
    again. AOT so that sampling and compiling are timed apart."""
    leaves, treedef = jax.tree.flatten(args)
    sig = (
        fn,
        treedef,
        tuple((np.shape(a), str(getattr(a, "dtype", type(a))), str(getattr(a, "sharding", None))) for a in leaves),
    )
    if sig not in _COMPILED:
        if len(_COMPILED) > 16:
            _COMPILED.clear()
        _COMPILED[sig] = fn.lower(*args).compile()
    return _COMPILED[sig]
