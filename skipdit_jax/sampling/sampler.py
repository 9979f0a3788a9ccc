"""Sampling: DDPM / DDIM with classifier-free guidance and an optional cache, in one
jitted `lax.scan`, for every model family.

The sampler knows models only through their family (`skipdit_jax.models.families`): the
sample shape, the condition and its unconditional counterpart, and the passes. The scan
carry is (x_t, the cache's carry, the RNG key). The cache's full/cached decision per step
is a boolean array computed on the host from the timestep list and fed to the scan as
data; `lax.cond` then runs exactly one of the two passes. Nothing syncs with the host
inside the loop.

With a diffusers `scheduler` (`skipdit_jax.diffusion.diffusers_schedulers`: DiffusersDDIM /
DiffusersDDPM) the scan walks that scheduler's timesteps and applies its step rule instead
of ADM's respaced diffusion; the rest (guidance, caches, noise keys) is shared.

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


def check_scheduler(scheduler, sampler: str, config=None, *, eta: float = 0.0, clip_denoised: bool = False,
                    respacing: str | None = None) -> None:
    """One `ConfigError` for a diffusers scheduler that does not fit the other settings."""
    kind = getattr(scheduler, "kind", None)
    if kind not in ("ddim", "ddpm") or not hasattr(scheduler, "step_tables"):
        raise ConfigError(f"scheduler must be a DiffusersDDIM or DiffusersDDPM, got {type(scheduler).__name__}")
    if sampler != kind:
        raise ConfigError(f"{type(scheduler).__name__} is a {kind.upper()} scheduler; pass sampler={kind!r} (got {sampler!r})")
    if respacing is not None:
        raise ConfigError("respacing is an ADM setting; a diffusers scheduler sets its own timesteps (use num_steps)")
    if clip_denoised:
        raise ConfigError("clip_denoised is an ADM setting; with a diffusers scheduler use its clip_sample")
    if kind == "ddpm" and eta != 0:
        raise ConfigError("eta is a DDIM setting; DDPM's noise is fixed by its variance_type")
    if config is not None and getattr(scheduler, "uses_model_variance", False) and not family_of(config).learn_sigma:
        raise ConfigError("variance_type 'learned_range' needs a learned-sigma model (out channels = 2 x in channels)")


def _scheduler_steps(respacing) -> int:
    try:
        return int(respacing)
    except (TypeError, ValueError):
        raise ConfigError(f"with a diffusers scheduler, respacing must be the number of steps, got {respacing!r}") from None


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
    scheduler=None,
):
    """A jitted `fn(params, noise, condition, cfg_scale, rng) -> x_0`, one per setting.

    With a diffusers `scheduler` (DiffusersDDIM / DiffusersDDPM, matching `sampler`),
    `respacing` is its number of steps (int or decimal string): the scan walks
    `scheduler.timesteps(n)` and steps with its rule; `clip_denoised` must be False (the
    scheduler's clip_sample decides). The model's learned-sigma channels are dropped before
    the step (except DDPM's learned_range, which reads them: the conditional half's, as
    guidance leaves every non-eps channel to it).

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
    if scheduler is None:
        diffusion = Diffusion(respacing, learn_sigma=family.learn_sigma)
        indices = np.arange(diffusion.num_steps, dtype=np.int32)[::-1]
        timesteps = diffusion.timestep_map[indices]
        needs_noise = sampler == "ddpm" or eta > 0
    else:
        check_scheduler(scheduler, sampler, config, eta=eta, clip_denoised=clip_denoised)
        num = _scheduler_steps(respacing)
        timesteps = scheduler.timesteps(num)
        tables = scheduler.step_tables(num, eta)
        # Step indices count down to 0 as ADM's do: they only key the per-sample step noise.
        indices = np.arange(num, dtype=np.int32)[::-1]
        needs_noise = scheduler.needs_noise(eta)
    full = cache.full_steps(timesteps) if cache is not None else np.ones(len(indices), bool)
    adaptive = getattr(cache, "adaptive", False)

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
            # The batch is [cond; uncond] (diffusers' pipelines stack [uncond; text]); the
            # family's null_condition built the uncond half. Guiding only the eps channels
            # equals the Latte pipeline, which guides all channels and then keeps the first C.
            out = guide(out, cfg_scale, family.eps_channels, cfg_channels)
        return out, carry, is_full

    def run(params, noise, condition, cfg_scale, rng):
        cond = _tree_concat(condition, family.null_condition(condition)) if guided else condition
        model_batch = noise.shape[0] * (2 if guided else 1)
        carry = cache.init_carry(family, model_batch) if cache is not None else None
        per_sample = is_key_batch(rng)

        def step(state, xs):
            x, carry, key = state
            i, t_orig, is_full, *coef = xs
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
            if scheduler is not None:
                c = x.shape[-1]
                if getattr(scheduler, "uses_model_variance", False):
                    x = scheduler.step(out[..., :c], x, coef[0], z, model_var=out[..., c : 2 * c])
                else:
                    x = scheduler.step(out[..., :c], x, coef[0], z)
            elif sampler == "ddpm":
                x = diffusion.ddpm_step(out, x, t, z, clip_denoised)
            else:
                x = diffusion.ddim_step(out, x, t, z, eta, clip_denoised)
            return (x, carry, key), is_full

        xs = (jnp.asarray(indices), jnp.asarray(timesteps, jnp.int32), jnp.asarray(full))
        if scheduler is not None:
            xs += ({k: jnp.asarray(v) for k, v in tables.items()},)
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
    scheduler=None,
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

    `scheduler` (a `DiffusersDDIM` with sampler="ddim", or a `DiffusersDDPM` with
    sampler="ddpm") replaces ADM's respaced diffusion by diffusers' timesteps and step rule
    for `num_steps` steps (e.g. Latte text-to-video: `sampler="ddim", num_steps=50,
    scheduler=DiffusersDDIM.latte()`); `eta` is DDIM's, `respacing` and `clip_denoised` must
    stay unset. Caches see the scheduler's timesteps.
    """
    if labels is not None and condition is not None:
        raise UserError("pass either labels or condition, not both")
    cond = labels if labels is not None else condition
    if cond is not None:
        cond = jax.tree.map(lambda a: a if isinstance(a, jax.Array) else jnp.asarray(a), cond)
    validate_inputs(model_config, noise, cond)
    if scheduler is not None:
        check_scheduler(scheduler, sampler, model_config, eta=eta, clip_denoised=clip_denoised, respacing=respacing)
        scheduler.timesteps(num_steps)  # a ConfigError for a bad step count
    else:
        respacing = resolve_respacing(sampler, num_steps, respacing)
    guided = check_settings(model_config, cache=cache, cfg_scale=cfg_scale, cfg_channels=cfg_channels)
    if rng is None:
        rng = jax.random.key(0)
    if is_key_batch(rng) and rng.shape[0] != np.shape(noise)[0]:
        raise UserError(f"rng holds {rng.shape[0]} per-sample keys for a batch of {np.shape(noise)[0]}")
    if scheduler is not None:
        fn = build_sampler(model_config, sampler, str(int(num_steps)), guided, cfg_channels, cache, float(eta), False,
                           scheduler=scheduler)
    else:
        fn = build_sampler(model_config, sampler, respacing, guided, cfg_channels, cache, float(eta), bool(clip_denoised))
    return fn(params, noise, cond, jnp.float32(cfg_scale), rng)


def sampling_timesteps(sampler: str, num_steps: int | None, respacing: str | None = None, scheduler=None) -> np.ndarray:
    """Original-scale timesteps of the sampling steps, in sampling order (ADM's respacing, or
    the diffusers `scheduler`'s timesteps for `num_steps`)."""
    if scheduler is not None:
        check_scheduler(scheduler, sampler, respacing=respacing)
        return np.asarray(scheduler.timesteps(num_steps))
    d = create_diffusion(resolve_respacing(sampler, num_steps, respacing))
    return d.timestep_map[::-1].copy()
