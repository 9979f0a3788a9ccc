"""DiT and Skip-DiT in Flax linen, channels-last.

The transformer blocks are stored *stacked*: `encoder_blocks` holds the first depth//2
blocks with a leading layer axis, `decoder_blocks` the rest, and (Skip-DiT only)
`skip_fusions` one fusion module per decoder block. Blocks run under `lax.scan`, so compile
time does not grow with depth, and any contiguous range of blocks can run on its own,
which is what the Skip-Cache needs:

    full pass:     embed -> enc[0:k] -> enc[k:half] -> dec[0:half-k] -> dec[half-k:half] -> final
                                        \\______ deep part _________/ ^ deep feature
    shallow pass:  embed -> enc[0:k] ---------- cached deep feature --> dec[half-k:half] -> final

Decoder block `half + j` first fuses its input with the output of encoder block
`half - 1 - j` (LIFO, as the official code pops its skip stack):
`x = Linear(LayerNorm(concat([x, skip])))` -- the projection *replaces* x, no residual.
On a model without long skips the shallow pass is the same minus the fusion.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.model_config import ModelConfig

# Re-exported so `skipdit_jax.models.ModelConfig` works as well.
__all__ = ["DiT", "ModelConfig", "DiTBlock", "SkipFusion", "get_2d_sincos_pos_embed"]

_LN_EPS = 1e-6


def layer_norm(x: jax.Array) -> jax.Array:
    """Affine-free LayerNorm (eps 1e-6), computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + _LN_EPS)).astype(x.dtype)


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
_xavier = nn.initializers.xavier_uniform()
_normal002 = nn.initializers.normal(0.02)
_zeros = nn.initializers.zeros


def _torch_default_bias(fan_in: int):
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
        qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=_xavier, name="qkv")(x.reshape(b * n, d))
        q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads), 2, 0)
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        return nn.Dense(d, dtype=self.dtype, kernel_init=_xavier, name="proj")(out.reshape(b * n, d)).reshape(b, n, d)


class Mlp(nn.Module):
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = x.shape
        h = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_xavier, name="fc1")(x.reshape(-1, shape[-1]))
        h = nn.gelu(h, approximate=True)
        return nn.Dense(shape[-1], dtype=self.dtype, kernel_init=_xavier, name="fc2")(h).reshape(shape)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += g1 * Attn(mod(LN(x))); x += g2 * MLP(mod(LN(x))).

    Besides the plain call, the block exposes its pieces for the cache baselines
    (`skipdit_jax.cache_baselines`): the adaLN modulation and the raw (pre-gate) outputs
    of its attention and MLP branches.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        dt = cfg.compute_dtype
        self.adaLN_modulation = nn.Dense(6 * cfg.hidden_size, dtype=dt, kernel_init=_zeros)
        self.attn = Attention(cfg.num_heads, dt, cfg.attention_impl)
        self.mlp = Mlp(int(cfg.hidden_size * cfg.mlp_ratio), dt)

    def modulation(self, c):
        """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each (B, D)."""
        return tuple(jnp.split(self.adaLN_modulation(nn.silu(c)), 6, axis=-1))

    def forward_with_branches(self, x, c):
        """(output, (attention, MLP) branch outputs before their gates, (gate_msa, gate_mlp))."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        attn = self.attn(modulate(layer_norm(x), shift_msa, scale_msa))
        x = x + gate_msa[:, None] * attn
        mlp = self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))
        return x + gate_mlp[:, None] * mlp, (attn, mlp), (gate_msa, gate_mlp)

    def __call__(self, x, c):
        return self.forward_with_branches(x, c)[0]


class SkipFusion(nn.Module):
    """Long-skip fusion: Linear_{2D->D}(LayerNorm_{2D}(concat([deep, skip]))), LN in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, deep, skip):
        cfg = self.config
        h = jnp.concatenate([deep, skip], axis=-1)
        h = nn.LayerNorm(
            epsilon=_LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False, name="norm"
        )(h.astype(jnp.float32)).astype(deep.dtype)
        fan_in = 2 * cfg.hidden_size
        if cfg.skip_init == "xavier":
            kernel_init, bias_init = _xavier, _zeros
        else:  # PyTorch's nn.Linear default: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
            kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
            bias_init = _torch_default_bias(fan_in)
        return nn.Dense(
            cfg.hidden_size, dtype=cfg.compute_dtype, kernel_init=kernel_init, bias_init=bias_init, name="linear"
        )(h)


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) + LN + Linear(D -> p*p*out_channels), zero-initialised."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, c):
        cfg = self.config
        mod = nn.Dense(2 * cfg.hidden_size, dtype=cfg.compute_dtype, kernel_init=_zeros, name="adaLN_modulation")(
            nn.silu(c)
        )
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(layer_norm(x), shift, scale)
        out_dim = cfg.patch_size**2 * cfg.out_channels
        return nn.Dense(out_dim, dtype=cfg.compute_dtype, kernel_init=_zeros, name="linear")(x)


def _stacked_init(module: nn.Module, count: int, *example_args):
    """Initialiser of `count` independent copies of `module`, stacked on a leading axis."""

    def init(key):
        keys = jax.random.split(key, count)
        return jax.vmap(lambda k: module.init(k, *example_args)["params"])(keys)

    return init


def _scan_blocks(body, h, stacked, lo: int, hi: int, extra_xs=None, unroll: int = 1):
    """`lax.scan` of `body(h, block_params, extra) -> (h, y)` over blocks lo..hi-1 of
    `stacked` (a pytree with a leading block axis).

    Over the whole stack the weights are the scan's xs. Over part of it (the cached passes)
    the loop indexes the full stack instead: slicing `stacked[lo:hi]` first would copy
    those weights on every call, which on CPU costs as much as several blocks' compute.
    Only sampling scans part of a stack, so the index path needs no efficient gradient.
    """
    count = jax.tree.leaves(stacked)[0].shape[0]
    unroll = True if unroll == 0 else unroll
    if lo == 0 and hi == count:
        return jax.lax.scan(lambda h, xs: body(h, *xs), h, (stacked, extra_xs), unroll=unroll)

    def step(h, xs):
        i, extra = xs
        return body(h, jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked), extra)

    return jax.lax.scan(step, h, (jnp.arange(lo, hi), extra_xs), unroll=unroll)


class DiT(nn.Module):
    """DiT / Skip-DiT. `apply({"params": p}, x_nhwc, t, y) -> (B, H, W, out_channels)`.

    `t` holds timesteps on the original 0..999 scale; `y` class ids in 0..num_classes
    (num_classes = the null label), ignored for unconditional models (num_classes == 0).
    The output is float32 whatever the compute dtype.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        d, p = cfg.hidden_size, cfg.patch_size
        dt = cfg.compute_dtype
        # The patch conv is xavier-initialised as a (C*p*p -> D) matrix, as in DiT.
        self.x_embedder = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dt,
            kernel_init=nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
            name="x_embedder",
        )
        self.t_mlp_0 = nn.Dense(d, dtype=dt, kernel_init=_normal002, name="t_embedder_mlp_0")
        self.t_mlp_2 = nn.Dense(d, dtype=dt, kernel_init=_normal002, name="t_embedder_mlp_2")
        if cfg.num_classes:
            self.y_embedder = nn.Embed(cfg.num_classes + 1, d, embedding_init=_normal002, name="y_embedder")
        x_ex = jnp.zeros((1, cfg.num_patches, d), dt)
        c_ex = jnp.zeros((1, d), dt)
        n_enc = cfg.num_encoder_blocks
        block = DiTBlock(cfg, parent=None)  # detached: only its init is used here
        self.encoder_blocks = self.param("encoder_blocks", _stacked_init(block, n_enc, x_ex, c_ex))
        self.decoder_blocks = self.param("decoder_blocks", _stacked_init(block, cfg.depth - n_enc, x_ex, c_ex))
        if cfg.long_skip:
            self.skip_fusions = self.param("skip_fusions", _stacked_init(SkipFusion(cfg, parent=None), n_enc, x_ex, x_ex))
        self.final_layer = FinalLayer(cfg, name="final_layer")
        self.pos_embed = jnp.asarray(get_2d_sincos_pos_embed(d, cfg.grid_size), jnp.float32)[None]

    # ---- pieces ------------------------------------------------------------------------
    def embed(self, x, t, y):
        """Patch tokens (+ position) and the conditioning vector c = t_emb + y_emb."""
        cfg = self.config
        b = x.shape[0]
        tokens = self.x_embedder(x.astype(cfg.compute_dtype)).reshape(b, cfg.num_patches, cfg.hidden_size)
        h = (tokens.astype(jnp.float32) + self.pos_embed).astype(cfg.compute_dtype)
        c = self.t_mlp_2(nn.silu(self.t_mlp_0(timestep_features(t))))
        if cfg.num_classes:
            c = c + self.y_embedder(y).astype(c.dtype)
        return h, c

    def unpatchify(self, tokens):
        """(B, T, p*p*C) with (p, q, c) order inside a token -> (B, H, W, C)."""
        cfg = self.config
        b, g, p, ch = tokens.shape[0], cfg.grid_size, cfg.patch_size, cfg.out_channels
        x = tokens.reshape(b, g, g, p, p, ch).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, g * p, g * p, ch)

    def _block_fn(self):
        fn = lambda p, h, c: DiTBlock(self.config, parent=None).apply({"params": p}, h, c)  # noqa: E731
        return jax.checkpoint(fn) if self.config.remat else fn

    def run_encoder(self, h, c, lo: int, hi: int):
        """Encoder blocks lo..hi-1; returns (h, their outputs stacked) -- the skip features."""
        if hi <= lo:
            return h, None
        block = self._block_fn()
        keep = self.config.long_skip

        def step(h, p, _):
            h = block(p, h, c)
            return h, (h if keep else None)

        return _scan_blocks(step, h, self.encoder_blocks, lo, hi, unroll=self.config.scan_unroll)

    def run_decoder(self, h, c, lo: int, hi: int, skips):
        """Decoder blocks half+lo..half+hi-1. `skips` are the outputs of encoder blocks
        half-hi..half-1-lo in encoder order; block half+j fuses the one of block half-1-j."""
        if hi <= lo:
            return h
        block = self._block_fn()
        if not self.config.long_skip:
            return _scan_blocks(
                lambda h, p, _: (block(p, h, c), None), h, self.decoder_blocks, lo, hi, unroll=self.config.scan_unroll
            )[0]
        fuse = lambda p, a, b: SkipFusion(self.config, parent=None).apply({"params": p}, a, b)  # noqa: E731

        def step(h, p, skip):
            p_block, p_fuse = p
            return block(p_block, fuse(p_fuse, h, skip), c), None

        stacked = (self.decoder_blocks, self.skip_fusions)
        return _scan_blocks(step, h, stacked, lo, hi, extra_xs=skips[::-1], unroll=self.config.scan_unroll)[0]

    def head(self, h, c):
        return self.unpatchify(self.final_layer(h, c)).astype(jnp.float32)

    # ---- passes ------------------------------------------------------------------------
    def __call__(self, x, t, y=None):
        out, _ = self.forward_full(x, t, y, 0)
        return out

    def forward_full(self, x, t, y, shallow_blocks: int):
        """Full pass. Also returns the deep feature: the hidden state entering decoder block
        depth-k (before its fusion), which the shallow pass of later steps reuses."""
        k = shallow_blocks
        cfg = self.config
        n_enc, n_dec = cfg.num_encoder_blocks, cfg.depth - cfg.num_encoder_blocks
        h, c = self.embed(x, t, y)
        h, shallow_skips = self.run_encoder(h, c, 0, k)
        h, deep_skips = self.run_encoder(h, c, k, n_enc)
        deep = self.run_decoder(h, c, 0, n_dec - k, deep_skips)
        h = self.run_decoder(deep, c, n_dec - k, n_dec, shallow_skips)
        return self.head(h, c), deep

    def forward_shallow(self, x, t, y, deep_feature, shallow_blocks: int):
        """Shallow pass: the first k encoder and last k decoder blocks, starting the decoder
        from a cached deep feature; every decoder block still fuses its fresh shallow skip."""
        k = shallow_blocks
        cfg = self.config
        n_dec = cfg.depth - cfg.num_encoder_blocks
        h, c = self.embed(x, t, y)
        _, shallow_skips = self.run_encoder(h, c, 0, k)
        h = self.run_decoder(deep_feature.astype(h.dtype), c, n_dec - k, n_dec, shallow_skips)
        return self.head(h, c)


@functools.lru_cache(maxsize=16)
def _jitted_init(config: ModelConfig):
    # NumPy examples: this cached function may first be built inside another trace.
    x = np.zeros((1, config.input_size, config.input_size, config.in_channels), np.float32)
    t = np.zeros((1,), np.int32)
    y = np.zeros((1,), np.int32)
    return jax.jit(lambda rng: DiT(config).init(rng, x, t, y)["params"])


def init_params(config: ModelConfig, rng: jax.Array | int = 0):
    """Freshly initialised parameters (a plain pytree) for `config`."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return _jitted_init(config)(rng)


def count_params(params) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
