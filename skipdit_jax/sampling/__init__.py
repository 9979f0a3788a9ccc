"""Sampling: the one jitted `lax.scan` sampler for every model family (`sampler`), and
large deterministic, resumable sample sets for FID (`many`)."""

from skipdit_jax.sampling.sampler import (
    build_sampler,
    check_scheduler,
    check_settings,
    guide,
    is_key_batch,
    resolve_respacing,
    sample,
    sampling_timesteps,
    validate_inputs,
)
from skipdit_jax.sampling.many import FID_PRESET, PRESETS, make_batch_fn, sample_inputs, sample_many, write_npz

__all__ = [
    "FID_PRESET",
    "PRESETS",
    "build_sampler",
    "check_scheduler",
    "check_settings",
    "guide",
    "is_key_batch",
    "make_batch_fn",
    "resolve_respacing",
    "sample",
    "sample_inputs",
    "sample_many",
    "sampling_timesteps",
    "validate_inputs",
    "write_npz",
]
