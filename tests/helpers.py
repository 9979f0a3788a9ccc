"""Small shared test utilities: tiny configs and random (non-zero) parameters."""

from __future__ import annotations

import jax
import numpy as np

from skipdit_jax.models.config import ModelConfig
from skipdit_jax.models import init_params


def tiny_config(**overrides) -> ModelConfig:
    kw = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=4, num_classes=10, long_skip=True)
    kw.update(overrides)
    return ModelConfig(**kw)


def random_params(config: ModelConfig, seed: int = 0, scale: float = 0.05):
    """Initialised parameters plus noise everywhere, so zero-initialised layers (adaLN,
    final layer) take part and a wrong wiring shows up in the outputs."""
    params = init_params(config, seed)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed + 1)
    noisy = [np.asarray(a) + scale * rng.standard_normal(a.shape).astype(np.float32) for a in leaves]
    return jax.tree.unflatten(treedef, noisy)
