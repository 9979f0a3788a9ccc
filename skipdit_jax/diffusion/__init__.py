"""Diffusion processes and their samplers' step rules. `adm`: ADM/DiT Gaussian diffusion
(linear betas, respacing, learned-range variance, hybrid loss, DDPM and DDIM steps)."""

from skipdit_jax.diffusion.adm import (
    NUM_TRAIN_TIMESTEPS,
    Diffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    respacing_for,
    space_timesteps,
)

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "Diffusion",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "linear_betas",
    "normal_kl",
    "respacing_for",
    "space_timesteps",
]
