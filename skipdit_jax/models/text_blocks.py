"""Building blocks of the text-conditioned video transformer (Latte-T2V), channels-last.

Latte-T2V uses PixArt-alpha's "adaLN-single" conditioning: one Linear of the timestep
embedding gives a (6, D) modulation per sample, shared by every block; each block adds its
own learned `scale_shift_table` (6, D) and splits the sum into shift/scale/gate for the
self-attention and the feed-forward. Spatial blocks also cross-attend to the projected
caption (no norm, no gate on that branch, as in PixArt); temporal blocks do not.

Blocks see the hidden state as (B, G, N, D): attention runs over the N tokens of each of
the G groups (frames for a spatial block, token positions for a temporal one), and the
per-sample modulation broadcasts over both, so it is never repeated per frame. The
cross-attention treats all G*N tokens of a sample as queries of that sample's caption,
which equals the reference's per-frame repetition of the caption without building it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.models.layers import Attention, Mlp, normal002, xavier, zeros

# The additive key-mask bias of the reference (diffusers / Latte): (1 - mask) * -10000.
MASK_BIAS = -10000.0


def layer_norm_eps(x: jax.Array, eps: float) -> jax.Array:
    """Affine-free LayerNorm with epsilon `eps`, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def key_mask_bias(mask: jax.Array, dtype) -> jax.Array:
    """(B, L) 1 = attend / 0 = ignore -> the additive attention bias (B, 1, 1, L).

    A bias (not a boolean mask) keeps the reference's behaviour exactly, including a row
    with every token masked: its softmax is then the unmasked one, shifted by a constant."""
    return ((1.0 - mask.astype(jnp.float32)) * MASK_BIAS).astype(dtype)[:, None, None, :]


def patch_pos_embed(dim: int, grid_size: int, interpolation_scale: float = 1.0) -> np.ndarray:
    """diffusers' `PatchEmbed` table (grid_size**2, dim), float64: MAE's 2-D sin-cos table of
    the positions arange(grid) / interpolation_scale (the base size is the grid itself)."""
    pos = np.arange(grid_size, dtype=np.float64) / interpolation_scale
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def one_axis(p):
        out = np.einsum("m,d->md", p.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(pos, pos)  # the column index first, as MAE
    return np.concatenate([one_axis(grid_w), one_axis(grid_h)], axis=1)


def scale_shift_init(dim: int):
    """`torch.randn(n, dim) / dim**0.5`, the reference's init of every scale_shift_table."""
    return nn.initializers.normal(dim**-0.5)


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, S, D) to a context (B, L, D) under an additive key bias
    (B, 1, 1, L). Parameters: q (D -> D), kv (D -> 2D; k | v, heads contiguous), proj."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, context, bias):
        b, s, d = x.shape
        n_ctx = context.shape[1]
        h, hd = self.num_heads, d // self.num_heads
        q = nn.Dense(d, dtype=self.dtype, kernel_init=xavier, name="q")(x.reshape(b * s, d)).reshape(b, s, h, hd)
        kv = nn.Dense(2 * d, dtype=self.dtype, kernel_init=xavier, name="kv")(context.reshape(b * n_ctx, -1))
        k, v = jnp.moveaxis(kv.reshape(b, n_ctx, 2, h, hd), 2, 0)
        if self.attention_impl == "cudnn":  # the fused kernel wants the bias over every query
            bias = jnp.broadcast_to(bias, (b, 1, s, n_ctx))
        out = jax.nn.dot_product_attention(q, k, v.astype(q.dtype), bias=bias.astype(q.dtype), implementation=self.attention_impl)
        # Zero-initialised output projection (PixArt): a fresh block starts without text.
        return nn.Dense(d, dtype=self.dtype, kernel_init=zeros, name="proj")(out.reshape(b * s, d)).reshape(b, s, d)


class AdaSingleBlock(nn.Module):
    """One adaLN-single transformer block on (B, G, N, D):

        shift1, scale1, gate1, shift2, scale2, gate2 = scale_shift_table + mod   (each (B, D))
        x += gate1 * SelfAttn_N(LN(x) * (1 + scale1) + shift1)
        x += CrossAttn(x, context)                       (spatial blocks only; no norm, no gate)
        x += gate2 * FF(LN(x) * (1 + scale2) + shift2)   (FF: Linear, GELU-tanh, Linear)

    `mod` (B, 6, D) is the shared adaLN-single output; LN is affine-free with `norm_eps`.
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    norm_eps: float
    cross: bool
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        d = self.hidden_size
        self.scale_shift_table = self.param("scale_shift_table", scale_shift_init(d), (6, d))
        self.attn = Attention(self.num_heads, self.dtype, self.attention_impl)
        if self.cross:
            self.cross_attn = CrossAttention(self.num_heads, self.dtype, self.attention_impl)
        self.mlp = Mlp(int(d * self.mlp_ratio), self.dtype)

    def modulation(self, mod):
        """The six (B, 1, 1, D) terms, in the input's compute dtype."""
        table = (self.scale_shift_table[None] + mod.astype(jnp.float32)).astype(self.dtype)
        return tuple(table[:, i, None, None, :] for i in range(6))

    def __call__(self, x, mod, context=None, bias=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(mod)
        b, g, n, d = x.shape
        y = layer_norm_eps(x, self.norm_eps) * (1 + scale1) + shift1
        x = x + gate1 * self.attn(y.reshape(b * g, n, d)).reshape(b, g, n, d)
        if self.cross:
            x = x + self.cross_attn(x.reshape(b, g * n, d), context, bias).reshape(b, g, n, d)
        y = layer_norm_eps(x, self.norm_eps) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(y)


class CaptionProjection(nn.Module):
    """PixArt-alpha's caption projection: Linear(C -> D), GELU (tanh), Linear(D -> D)."""

    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, text_emb):
        b, n, c = text_emb.shape
        h = nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=normal002, name="linear_1")(text_emb.reshape(b * n, c))
        h = nn.gelu(h, approximate=True)
        return nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=normal002, name="linear_2")(h).reshape(b, n, -1)
