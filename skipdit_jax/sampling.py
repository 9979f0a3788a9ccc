"""Sampling: DDPM / DDIM with classifier-free guidance and an optional cache, in one
jitted `lax.scan`.

The scan carry is (x_t, the cache's carry, the RNG key). The cache's full/cached decision
per step is a boolean array computed on the host from the timestep list and fed to the
scan as data; `lax.cond` then runs exactly one of the two passes. Nothing syncs with the
host inside the loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.cache import SkipCache
from skipdit_jax.diffusion import Diffusion, create_diffusion, respacing_for
from skipdit_jax.errors import ConfigError, UserError
from skipdit_jax.model_config import ModelConfig
from skipdit_jax.models import DiT


def guide(out: jax.Array, cfg_scale, eps_channels: int, cfg_channels: int | None) -> jax.Array:
    """Classifier-free guidance on a [cond; uncond] output -> the guided cond half.

    Only the first `cfg_channels` channels are guided (None: all eps channels); the other
    channels, including the learned variance, come from the conditional half. With
    cfg_channels=3 on a 4-channel latent model this is official DiT's guidance.
    """
    cond, uncond = jnp.split(out, 2, axis=0)
    g = eps_channels if cfg_channels is None else cfg_channels
    guided = uncond[..., :g] + cfg_scale * (cond[..., :g] - uncond[..., :g])
    return jnp.concatenate([guided, cond[..., g:]], axis=-1)


def resolve_respacing(sampler: str, num_steps: int | None, respacing: str | None) -> str:
    if sampler not in ("ddpm", "ddim"):
        raise ConfigError(f"unknown sampler {sampler!r}; expected 'ddpm' or 'ddim'")
    if respacing is not None:
        return respacing
    if num_steps is None or int(num_steps) < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
    return respacing_for(sampler, int(num_steps))


@functools.lru_cache(maxsize=32)
def build_sampler(
    config: ModelConfig,
    sampler: str,
    respacing: str,
    guided: bool,
    cfg_channels: int | None,
    cache: SkipCache | None,
    eta: float = 0.0,
    clip_denoised: bool = False,
    return_schedule: bool = False,
):
    """A jitted `fn(params, noise, labels, cfg_scale, rng) -> x_0`, one per setting.

    `cache` is any cache strategy (`SkipCache`, or one of `skipdit_jax.cache_baselines`).
    With `return_schedule` it returns `(x_0, full)`: the realised full (True) / cached
    decision of every step, which an adaptive strategy (TeaCache) makes on the device.
    Cached so repeated calls with the same setting reuse the compiled program.
    """
    diffusion = Diffusion(respacing, learn_sigma=config.learn_sigma)
    indices = np.arange(diffusion.num_steps, dtype=np.int32)[::-1]
    timesteps = diffusion.timestep_map[indices]
    full = cache.full_steps(timesteps) if cache is not None else np.ones(len(indices), bool)
    adaptive = getattr(cache, "adaptive", False)
    needs_noise = sampler == "ddpm" or eta > 0

    def denoise(params, x, labels, cfg_scale, t_orig, is_full, carry):
        x_in, y = (jnp.concatenate([x, x]), labels) if guided else (x, labels)
        t = jnp.full((x_in.shape[0],), t_orig, jnp.int32)
        if cache is None:
            out = DiT(config).apply({"params": params}, x_in, t, y)
        else:
            if adaptive:  # one scalar decision per step, from the step's own input
                is_full, carry = cache.decide(config, params, x_in, t, y, is_full, carry)
            out, carry = jax.lax.cond(
                is_full,
                lambda c: cache.full_pass(config, params, x_in, t, y, c),
                lambda c: cache.cached_pass(config, params, x_in, t, y, c),
                carry,
            )
        if guided:
            out = guide(out, cfg_scale, config.in_channels, cfg_channels)
        return out, carry, is_full

    def run(params, noise, labels, cfg_scale, rng):
        if guided:
            labels = jnp.concatenate([labels, jnp.full_like(labels, config.null_label)])
        batch = labels.shape[0]
        carry = cache.init_carry(config, batch) if cache is not None else None

        def step(state, xs):
            x, carry, key = state
            i, t_orig, is_full = xs
            out, carry, is_full = denoise(params, x, labels, cfg_scale, t_orig, is_full, carry)
            t = jnp.full((x.shape[0],), i, jnp.int32)
            if needs_noise:
                key, sub = jax.random.split(key)
                z = jax.random.normal(sub, x.shape, x.dtype)
            else:
                z = None
            if sampler == "ddpm":
                x = diffusion.ddpm_step(out, x, t, z, clip_denoised)
            else:
                x = diffusion.ddim_step(out, x, t, z, eta, clip_denoised)
            return (x, carry, key), is_full

        xs = (jnp.asarray(indices), jnp.asarray(timesteps, jnp.int32), jnp.asarray(full))
        (x, _, _), realised = jax.lax.scan(step, (noise.astype(jnp.float32), carry, rng), xs)
        return (x, realised) if return_schedule else x

    return jax.jit(run)


def validate_inputs(config: ModelConfig, noise, labels) -> None:
    want = (config.input_size, config.input_size, config.in_channels)
    if noise.ndim != 4 or tuple(noise.shape[1:]) != want:
        raise UserError(f"noise must have shape (B, {want[0]}, {want[1]}, {want[2]}) (NHWC), got {tuple(noise.shape)}")
    if labels.ndim != 1 or labels.shape[0] != noise.shape[0]:
        raise UserError(f"labels must have shape ({noise.shape[0]},) to match the noise batch, got {tuple(labels.shape)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise UserError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if config.num_classes:
        lab = np.asarray(labels)
        if lab.size and (lab.min() < 0 or lab.max() > config.num_classes):
            raise UserError(
                f"labels must be class ids in 0..{config.num_classes - 1} (or {config.num_classes}, the null label), "
                f"got values in {lab.min()}..{lab.max()}"
            )


def sample(
    model_config: ModelConfig,
    params,
    *,
    noise,
    labels,
    sampler: str = "ddpm",
    num_steps: int | None = 250,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    cache: SkipCache | None = None,
    rng: jax.Array | None = None,
    respacing: str | None = None,
    eta: float = 0.0,
    clip_denoised: bool = False,
) -> jax.Array:
    """Draw samples x_0 (B, H, W, C) from `noise` (B, H, W, C) conditioned on `labels` (B,).

    `sampler="ddim", num_steps=N` is ADM's "ddimN" respacing, `sampler="ddpm", num_steps=N`
    ADM's "N"; `respacing` (an ADM section string) overrides both. With cfg_scale != 1 the
    null-label half of the guidance batch is built here. `cache` (e.g. `SkipCache(2)`)
    turns on deep-feature caching. `rng` drives DDPM's (and DDIM eta > 0's) per-step noise.
    Inputs may be sharded over a mesh's batch axis; the computation follows their sharding.
    """
    labels = jnp.asarray(labels) if not isinstance(labels, jax.Array) else labels
    validate_inputs(model_config, noise, labels)
    respacing = resolve_respacing(sampler, num_steps, respacing)
    if cache is not None:
        cache.check_model(model_config)
    if cfg_channels is not None and not 1 <= cfg_channels <= model_config.in_channels:
        raise ConfigError(f"cfg_channels must be in 1..{model_config.in_channels}, got {cfg_channels}")
    guided = float(cfg_scale) != 1.0
    if guided and not model_config.num_classes:
        raise ConfigError("classifier-free guidance needs a class-conditional model (num_classes > 0)")
    if rng is None:
        rng = jax.random.key(0)
    fn = build_sampler(model_config, sampler, respacing, guided, cfg_channels, cache, float(eta), bool(clip_denoised))
    return fn(params, noise, labels, jnp.float32(cfg_scale), rng)


def sampling_timesteps(sampler: str, num_steps: int | None, respacing: str | None = None) -> np.ndarray:
    """Original-scale timesteps of the sampling steps, in sampling order."""
    d = create_diffusion(resolve_respacing(sampler, num_steps, respacing))
    return d.timestep_map[::-1].copy()
