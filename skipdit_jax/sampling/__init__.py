"""Sampling: the one jitted `lax.scan` sampler for every model family (`sampler`)."""

from skipdit_jax.sampling.sampler import (
    build_sampler,
    check_settings,
    guide,
    resolve_respacing,
    sample,
    sampling_timesteps,
    validate_inputs,
)

__all__ = ["build_sampler", "check_settings", "guide", "resolve_respacing", "sample", "sampling_timesteps", "validate_inputs"]
