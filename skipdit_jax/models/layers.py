"""Layers shared by every model family: affine-free float32 LayerNorm, adaLN modulation,
sin-cos position and timestep features, timm-style attention and MLP, and the
initialisers of the official code. Channels-last; Dense layers see 2-D inputs.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LN_EPS = 1e-6

def layer_norm(x: jax.Array) -> jax.Array:
    """Affine-free LayerNorm (eps 1e-6), computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + LN_EPS)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None]) + shift[:, None]


def get_2d_sincos_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """MAE's 2-D sin-cos table, (grid_size**2, dim), float64, row-major (h, w) tokens.

    Matches the `pos_embed` stored in official checkpoints: the first dim/2 channels encode
    the column index, the last dim/2 the row index, each half laid out [sin, cos].
    """

    def one_axis(pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))
    return np.concatenate([one_axis(grid_w), one_axis(grid_h)], axis=1)


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """GLIDE sinusoidal features [cos, sin] of (original-scale, 0..999) timesteps, float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# Initialisers of DiT's `initialize_weights`.
xavier = nn.initializers.xavier_uniform()
normal002 = nn.initializers.normal(0.02)
zeros = nn.initializers.zeros


def torch_default_bias(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)



class Attention(nn.Module):
    """timm-style multi-head self-attention: fused qkv (q|k|v, heads contiguous), proj."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        # Dense layers see (B*N, D): XLA's CPU backend runs the weight gradient of a 2-D
        # matmul several times faster than one contracting over both batch and tokens.
        qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=xavier, name="qkv")(x.reshape(b * n, d))
        q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads), 2, 0)
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        return nn.Dense(d, dtype=self.dtype, kernel_init=xavier, name="proj")(out.reshape(b * n, d)).reshape(b, n, d)


class Mlp(nn.Module):
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = x.shape
        h = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=xavier, name="fc1")(x.reshape(-1, shape[-1]))
        h = nn.gelu(h, approximate=True)
        return nn.Dense(shape[-1], dtype=self.dtype, kernel_init=xavier, name="fc2")(h).reshape(shape)

