"""skipdit-jax: Skip-DiT and its Skip-Cache sampler in JAX/Flax."""

__version__ = "0.1.0"
