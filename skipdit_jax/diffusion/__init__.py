"""Diffusion processes and their samplers' step rules. `adm`: ADM/DiT Gaussian diffusion
(linear betas, respacing, learned-range variance, hybrid loss, DDPM and DDIM steps);
`diffusers_schedulers`: diffusers' DDIM / DDPM schedulers (the text-to-video and
text-to-image samplers)."""

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
from skipdit_jax.diffusion.diffusers_schedulers import DiffusersDDIM, DiffusersDDPM

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "Diffusion",
    "DiffusersDDIM",
    "DiffusersDDPM",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "linear_betas",
    "normal_kl",
    "respacing_for",
    "space_timesteps",
]
