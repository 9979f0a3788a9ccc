"""Sampling: DDPM / DDIM with classifier-free guidance and an optional cache, in one
jitted `lax.scan`, for every model family.

The sampler knows models only through their family (`skipdit_jax.models.families`): the
sample shape, the condition and its unconditional counterpart, and the passes. The scan
carry is (x_t, the cache's carry, the RNG key). The cache's full/cached decision per step
is a boolean array computed on the host from the timestep list and fed to the scan as
data; `lax.cond` then runs exactly one of the two passes. Nothing syncs with the host
inside the loop.

A cache strategy (`skipdit_jax.cache`) implements `check_model(family)`,
`full_steps(timesteps)`, `init_carry(family, batch)`, `full_pass(family, params, x, t,
cond, carry)` and `cached_pass(...)`; an adaptive one (`adaptive = True`) also
`decide(family, params, x, t, cond, forced_full, carry)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.diffusion import Diffusion, create_diffusion, respacing_for
from skipdit_jax.errors import ConfigError, UserError
from skipdit_jax.models.families import family_of


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


def _tree_concat(a, b):
    return jax.tree.map(lambda u, v: jnp.concatenate([u, v]), a, b)


@functools.lru_cache(maxsize=32)
def build_sampler(
    config,
    sampler: str,
    respacing: str,
    guided: bool,
    cfg_channels: int | None,
    cache=None,
    eta: float = 0.0,
    clip_denoised: bool = False,
    return_schedule: bool = False,
    return_carry: bool = False,
):
    """A jitted `fn(params, noise, condition, cfg_scale, rng) -> x_0`, one per setting.

    `rng` is one PRNG key (the step noise of the whole batch is split from it step by
    step) or a batch of per-sample keys, shape (B,) (raw uint32 keys: (B, 2)): then sample
    b's noise at step index i is `normal(fold_in(rng[b], i))`, independent of the batch.

    `condition` is the family's condition pytree (class ids for DiT, None for an
    unconditional model). `cache` is any cache strategy (`skipdit_jax.cache`). With
    `return_schedule` it returns `(x_0, full)`: the realised full (True) / cached decision
    of every step, which an adaptive strategy (TeaCache) makes on the device; with
    `return_carry` also the cache's final carry (what a recording strategy collected).
    Cached so repeated calls with the same setting reuse the compiled program.
    """
    family = family_of(config)
    diffusion = Diffusion(respacing, learn_sigma=family.learn_sigma)
    indices = np.arange(diffusion.num_steps, dtype=np.int32)[::-1]
    timesteps = diffusion.timestep_map[indices]
    full = cache.full_steps(timesteps) if cache is not None else np.ones(len(indices), bool)
    adaptive = getattr(cache, "adaptive", False)
    needs_noise = sampler == "ddpm" or eta > 0

    def denoise(params, x, cond, cfg_scale, t_orig, is_full, carry):
        x_in = jnp.concatenate([x, x]) if guided else x
        t = jnp.full((x_in.shape[0],), t_orig, jnp.int32)
        if cache is None:
            out = family.apply(params, x_in, t, cond)
        else:
            if adaptive:  # one scalar decision per step, from the step's own input
                is_full, carry = cache.decide(family, params, x_in, t, cond, is_full, carry)
            out, carry = jax.lax.cond(
                is_full,
                lambda c: cache.full_pass(family, params, x_in, t, cond, c),
                lambda c: cache.cached_pass(family, params, x_in, t, cond, c),
                carry,
            )
        if guided:
            out = guide(out, cfg_scale, family.eps_channels, cfg_channels)
        return out, carry, is_full

    def run(params, noise, condition, cfg_scale, rng):
        cond = _tree_concat(condition, family.null_condition(condition)) if guided else condition
        model_batch = noise.shape[0] * (2 if guided else 1)
        carry = cache.init_carry(family, model_batch) if cache is not None else None
        per_sample = is_key_batch(rng)

        def step(state, xs):
            x, carry, key = state
            i, t_orig, is_full = xs
            out, carry, is_full = denoise(params, x, cond, cfg_scale, t_orig, is_full, carry)
            t = jnp.full((x.shape[0],), i, jnp.int32)
            if needs_noise and per_sample:
                # Sample b's step noise from its own key and the step index alone, so it
                # does not depend on which other samples share the batch.
                z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], x.dtype))(key)
            elif needs_noise:
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
        (x, carry, _), realised = jax.lax.scan(step, (noise.astype(jnp.float32), carry, rng), xs)
        out = (x,)
        if return_schedule or return_carry:
            out += (realised,)
        if return_carry:
            out += (carry,)
        return out if len(out) > 1 else x

    return jax.jit(run)


def is_key_batch(rng) -> bool:
    """Whether `rng` is a batch of keys (typed keys of shape (B,), raw keys (B, 2))
    rather than one key (shape (), raw (2,))."""
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    return len(rng.shape) == (1 if typed else 2)


def validate_inputs(config, noise, condition) -> None:
    """One clear `UserError` for noise or a condition that does not fit the model."""
    family = family_of(config)
    want = family.sample_shape
    shape = tuple(np.shape(noise))
    if len(shape) != len(want) + 1 or shape[1:] != want:
        layout = "NHWC" if len(want) == 3 else "NFHWC"
        raise UserError(f"noise must have shape (B, {', '.join(map(str, want))}) ({layout}), got {shape}")
    family.check_condition(condition, shape[0])


def check_settings(config, *, cache=None, cfg_scale: float = 1.0, cfg_channels: int | None = None) -> bool:
    """Validate the sampler settings against the model, as the API and the CLI both do;
    returns whether guidance is on."""
    family = family_of(config)
    if cache is not None:
        cache.check_model(family)
    if cfg_channels is not None and (int(cfg_channels) != cfg_channels or not 1 <= cfg_channels <= family.eps_channels):
        raise ConfigError(f"cfg_channels must be an integer in 1..{family.eps_channels} (None = all), got {cfg_channels}")
    guided = float(cfg_scale) != 1.0
    if guided and not family.is_conditional:
        raise ConfigError("classifier-free guidance needs a conditional model; this one is unconditional (use cfg_scale 1)")
    return guided


def sample(
    model_config,
    params,
    *,
    noise,
    labels=None,
    condition=None,
    sampler: str = "ddpm",
    num_steps: int | None = 250,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    cache=None,
    rng: jax.Array | None = None,
    respacing: str | None = None,
    eta: float = 0.0,
    clip_denoised: bool = False,
) -> jax.Array:
    """Draw samples x_0 (B, *sample_shape) from `noise` of that shape.

    The condition is `labels` (class ids (B,), or None for an unconditional model) or,
    for families with another condition, `condition` (their pytree).
    `sampler="ddim", num_steps=N` is ADM's "ddimN" respacing, `sampler="ddpm", num_steps=N`
    ADM's "N"; `respacing` (an ADM section string) overrides both. With cfg_scale != 1 the
    unconditional half of the guidance batch is built here (the null label for DiT);
    `cfg_channels` guides only the first C eps channels (3 = official DiT). `cache` (e.g.
    `SkipCache(2)`) turns on deep-feature caching. `rng` drives DDPM's (and DDIM eta > 0's)
    per-step noise: one key for the batch, or one key per sample (shape (B,)), which makes
    each sample's noise independent of the rest of the batch (`build_sampler`). Inputs may be sharded over a mesh's batch axis; the computation
    follows their sharding.
    """
    if labels is not None and condition is not None:
        raise UserError("pass either labels or condition, not both")
    cond = labels if labels is not None else condition
    if cond is not None:
        cond = jax.tree.map(lambda a: a if isinstance(a, jax.Array) else jnp.asarray(a), cond)
    validate_inputs(model_config, noise, cond)
    respacing = resolve_respacing(sampler, num_steps, respacing)
    guided = check_settings(model_config, cache=cache, cfg_scale=cfg_scale, cfg_channels=cfg_channels)
    if rng is None:
        rng = jax.random.key(0)
    if is_key_batch(rng) and rng.shape[0] != np.shape(noise)[0]:
        raise UserError(f"rng holds {rng.shape[0]} per-sample keys for a batch of {np.shape(noise)[0]}")
    fn = build_sampler(model_config, sampler, respacing, guided, cfg_channels, cache, float(eta), bool(clip_denoised))
    return fn(params, noise, cond, jnp.float32(cfg_scale), rng)


def sampling_timesteps(sampler: str, num_steps: int | None, respacing: str | None = None) -> np.ndarray:
    """Original-scale timesteps of the sampling steps, in sampling order."""
    d = create_diffusion(resolve_respacing(sampler, num_steps, respacing))
    return d.timestep_map[::-1].copy()
