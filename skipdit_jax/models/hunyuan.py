"""Hunyuan-DiT (v1.2, and v1.0/v1.1 with their style and image-size conditions), the
text-to-image transformer whose native long skips Skip-DiT caches, channels-last.

Conditioning: the timestep embedding plus a projection of the attention-pooled T5
caption (v1.0/v1.1: concatenated with the sinusoidal features of the six image-size
numbers and a learned style embedding) gives one vector `temb` (B, D) per sample; each
block only *shifts* its first normed input by a Linear of it. Every block runs
self-attention (2-D RoPE on q and k, LayerNorm on q and k per head), cross-attention to
the concatenated [CLIP; projected T5] caption (RoPE on q only; masked caption tokens are
replaced by a learned padding table, there is no attention mask) and a tanh-GELU MLP,
with float32 affine LayerNorms.

Native long skips over an even depth D: blocks 0..D/2-2 ("encoder") keep their outputs,
blocks D/2-1 and D/2 ("middle") neither keep nor fuse, and block l > D/2 ("decoder")
first replaces its input by Linear(LayerNorm(concat([h, skip of block D-1-l]))). The
three groups are stored as three stacks of blocks (a leading layer axis) and scanned.

Skip-Cache works in blocks: `forward_full(.., k)` also returns the input of block D-k
(before its fusion); `forward_shallow(.., deep, k)` runs the embedders, the first k
blocks (for their skips) and blocks D-k..D-1 starting from that cached input.

The other caches (FORA, PAB, Delta-DiT, TeaCache) run ranges of blocks (`run_units`) on a
"unit state" that carries the encoder outputs beside the hidden state, so every decoder
block still fuses its skip; `HunyuanBlock` exposes its fusion and branch outputs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.errors import ConfigError, UserError
from skipdit_jax.models.config import ArchitectureConfig
from skipdit_jax.models.layers import timestep_features
from skipdit_jax.models.skip import remat, scan_blocks, stacked_init

NORM_EPS = 1e-6
POOLER_HEADS = 8  # fixed in the reference's attention pooler
ROPE_BASE_PIXELS = 512  # the pipelines place the RoPE grid in a 512 px (64 latent) frame
LATENT_DOWNSCALE = 8
NUM_STYLES = 1  # the style table of v1.0/v1.1 (official `nn.Embedding(1, hidden_size)`, diffusers alike)
META_SIZE_NUMBERS = 6  # image_meta_size: (height, width, target height, target width, crop top, crop left)
META_SIZE_FEATURES = 256  # sinusoidal features per number


@dataclasses.dataclass(frozen=True)
class HunyuanConfig(ArchitectureConfig):
    """Architecture of a Hunyuan-DiT.

    Attributes:
      input_size: latent height (128 for 1024 px); the model takes any height and width
        divisible by patch_size (the RoPE grid follows the input), this only fixes the
        sample shape the sampler and trainer use.
      input_width: latent width; 0 means square (input_size).
      patch_size, in_channels, learn_sigma: 2, 4, True (8 output channels).
      depth, hidden_size, num_heads, mlp_ratio: blocks, width, heads, MLP ratio (the MLP
        width is int(hidden_size * mlp_ratio)); depth must be even (long skips).
      text_len, text_len_t5: CLIP and T5 caption tokens (77, 256); the learned padding
        table and the pooler's position table have these lengths, so inputs must too.
      cross_attention_dim, cross_attention_dim_t5: CLIP and T5 widths (1024, 2048).
      pooled_projection_dim: width of the pooled T5 caption (1024).
      use_style_cond_and_image_meta_size: True for v1.0/v1.1 (False for v1.2, which
        dropped these conditions): the model then also takes the keyword arguments
        `image_meta_size` (B, 6) float, the pixel (height, width, target height, target
        width, crop top, crop left), and `style` (B,) int in 0..NUM_STYLES-1 (the released
        table has one entry, so 0), and its extra embedder reads [pooled T5 (pooled_
        projection_dim); 256 sinusoidal features of each of the six sizes; style embedding
        (hidden_size)] as diffusers' `HunyuanCombinedTimestepTextSizeStyleEmbedding`.
      dtype, remat_policy, scan_unroll: as `ModelConfig`.
    """

    input_size: int = 128
    input_width: int = 0
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1408
    depth: int = 40
    num_heads: int = 16
    mlp_ratio: float = 4.3637
    text_len: int = 77
    text_len_t5: int = 256
    cross_attention_dim: int = 1024
    cross_attention_dim_t5: int = 2048
    pooled_projection_dim: int = 1024
    use_style_cond_and_image_meta_size: bool = False
    learn_sigma: bool = True
    skip_init: str = "torch_default"
    dtype: str = "float32"
    remat_policy: str = "none"
    scan_unroll: int = 1

    num_classes: ClassVar[int] = 0
    family: ClassVar[str] = "hunyuan"
    config_label: ClassVar[str] = "Hunyuan-DiT"
    positive_fields: ClassVar[tuple[str, ...]] = (
        "input_size",
        "patch_size",
        "in_channels",
        "hidden_size",
        "depth",
        "num_heads",
        "text_len",
        "text_len_t5",
        "cross_attention_dim",
        "cross_attention_dim_t5",
        "pooled_projection_dim",
    )

    @property
    def latent_hw(self) -> tuple[int, int]:
        """(height, width) of the latent sample."""
        return (self.input_size, self.input_width or self.input_size)

    @property
    def num_patches(self) -> int:
        h, w = self.latent_hw
        return (h // self.patch_size) * (w // self.patch_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_encoder_blocks(self) -> int:
        """Blocks that keep their output for a long skip (and, as many, that fuse one)."""
        return self.depth // 2 - 1

    def validate_layout(self) -> None:
        if self.input_width < 0 or self.input_width % self.patch_size:
            self._invalid(
                f"input_width {self.input_width} must be 0 (square) or a positive multiple of patch_size {self.patch_size}"
            )
        if self.depth < 4 or self.depth % 2:
            self._invalid(f"depth must be even and >= 4 (block l > depth/2 fuses block depth-1-l), got {self.depth}")
        if self.head_dim % 4:
            self._invalid(f"the head width hidden_size/num_heads = {self.head_dim} must be divisible by 4 (2-D RoPE)")
        if self.cross_attention_dim_t5 % POOLER_HEADS:
            self._invalid(f"cross_attention_dim_t5 {self.cross_attention_dim_t5} must be divisible by {POOLER_HEADS}")


_PRESETS = {
    "DiT-g/2": dict(depth=40, hidden_size=1408, num_heads=16, mlp_ratio=4.3637),
    "DiT-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, mlp_ratio=4.0),
}


def hunyuan_preset_names() -> list[str]:
    return list(_PRESETS)


def hunyuan_preset(name: str, **overrides) -> HunyuanConfig:
    """ "DiT-g/2" (Hunyuan-DiT v1.2: 40 blocks, width 1408, 16 heads) or "DiT-XL/2" (28,
    1152, 16), patch 2, 128x128x4 latents, CLIP 77x1024 and T5 256x2048 captions."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown Hunyuan-DiT preset {name!r}; known presets: {', '.join(_PRESETS)}")
    return HunyuanConfig(**{**_PRESETS[name], **overrides})


# ---- fixed tables ---------------------------------------------------------------------
def crop_region(grid_h: int, grid_w: int, base: int):
    """The pipelines' placement of a (grid_h, grid_w) token grid in a base x base frame:
    resized to fit (aspect kept), centred; ((top, left), (bottom, right))."""
    if grid_h / grid_w > 1:
        rh, rw = base, int(round(base / grid_h * grid_w))
    else:
        rw, rh = base, int(round(base / grid_w * grid_h))
    top, left = int(round((base - rh) / 2.0)), int(round((base - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rope_tables(head_dim: int, grid_h: int, grid_w: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (grid_h*grid_w, head_dim) float32: the 2-D RoPE of the token grid.

    Positions are the crop region's coordinates sampled at grid_h x grid_w points (end
    excluded); the first head_dim/2 channels rotate with the column coordinate, the rest
    with the row coordinate, each as adjacent (even, odd) channel pairs."""
    base = ROPE_BASE_PIXELS // LATENT_DOWNSCALE // patch_size
    (top, left), (bottom, right) = crop_region(grid_h, grid_w, base)
    rows = np.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, dtype=np.float32)
    cols = np.linspace(left, right * (grid_w - 1) / grid_w, grid_w, dtype=np.float32)
    col_pos, row_pos = np.meshgrid(cols, rows)  # (grid_h, grid_w), row-major token order
    half = head_dim // 2
    freqs = 1.0 / (10000.0 ** (np.arange(0, half, 2, dtype=np.float32) / half))

    def one_axis(pos):
        angles = np.outer(pos.reshape(-1), freqs).astype(np.float32)
        return np.repeat(np.cos(angles), 2, axis=1), np.repeat(np.sin(angles), 2, axis=1)

    (cw, sw), (ch, sh) = one_axis(col_pos), one_axis(row_pos)
    return np.concatenate([cw, ch], 1).astype(np.float32), np.concatenate([sw, sh], 1).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the (even, odd) channel pairs of x (B, S, H, hd) by the angles of (S, hd)."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x.astype(jnp.float32) * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


# ---- layers -----------------------------------------------------------------------------
def _ln(name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=NORM_EPS, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False, name=name)


def fp32_norm(x, name: str):
    """The reference's FP32LayerNorm (affine): computed in float32, returned in x's dtype."""
    return _ln(name)(x.astype(jnp.float32)).astype(x.dtype)


def _plain_norm(x):
    """Affine-free LayerNorm in float32 (the output layer's), returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + NORM_EPS)).astype(x.dtype)


class _Projection(nn.Module):
    """linear_2(silu(linear_1(x))), the silu in float32."""

    hidden: int
    out: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden, dtype=self.dtype, name="linear_1")(x)
        h = nn.silu(h.astype(jnp.float32)).astype(self.dtype)
        return nn.Dense(self.out, dtype=self.dtype, name="linear_2")(h)


class _Attention(nn.Module):
    """Multi-head attention with per-head q/k LayerNorm; RoPE on q (and on k when
    self-attending). Parameters to_q, to_k, to_v, norm_q, norm_k, to_out."""

    num_heads: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, context, cos, sin):
        b, s, d = x.shape
        h, hd = self.num_heads, d // self.num_heads
        src = x if context is None else context
        q = nn.Dense(d, dtype=self.dtype, name="to_q")(x).reshape(b, s, h, hd)
        k = nn.Dense(d, dtype=self.dtype, name="to_k")(src).reshape(b, src.shape[1], h, hd)
        v = nn.Dense(d, dtype=self.dtype, name="to_v")(src).reshape(b, src.shape[1], h, hd)
        q = _ln("norm_q")(q.astype(jnp.float32)).astype(self.dtype)
        k = _ln("norm_k")(k.astype(jnp.float32)).astype(self.dtype)
        q = apply_rope(q, cos, sin)
        if context is None:
            k = apply_rope(k, cos, sin)
        out = jax.nn.dot_product_attention(q, k, v)
        return nn.Dense(d, dtype=self.dtype, name="to_out")(out.reshape(b, s, d))


class HunyuanBlock(nn.Module):
    """One block on (B, T, D): [skip fusion], shift-modulated self-attention,
    cross-attention, MLP. `skip` (a static bool) gives it skip_norm / skip_linear.

    Besides the plain call it exposes its pieces for the cache baselines: `fuse` (the long
    skip fusion, which *replaces* the hidden state), `modulated_input` (self-attention's
    input LN(h) + shift, TeaCache's probe), `forward_with_branches` (also returning the
    outputs of its three residual branches: self-attention, cross-attention, MLP) and
    `forward_from_branches` (the residual stream rebuilt from stored branch outputs after
    a fresh fusion; no attention, MLP or their norms run). There are no adaLN gates: the
    conditioning only shifts self-attention's input, so a branch output is added as is.
    """

    config: HunyuanConfig
    skip: bool = False

    def setup(self):
        cfg = self.config
        d, dt = cfg.hidden_size, cfg.compute_dtype
        if self.skip:
            self.skip_norm = _ln()
            self.skip_linear = nn.Dense(d, dtype=dt)
        self.shift = nn.Dense(d, dtype=dt)
        self.norm1 = _ln()
        self.attn1 = _Attention(cfg.num_heads, dt)
        self.norm2 = _ln()
        self.attn2 = _Attention(cfg.num_heads, dt)
        self.norm3 = _ln()
        self.fc1 = nn.Dense(cfg.mlp_hidden, dtype=dt)
        self.fc2 = nn.Dense(d, dtype=dt)

    @staticmethod
    def _norm(norm, x):
        return norm(x.astype(jnp.float32)).astype(x.dtype)

    def fuse(self, h, skip_feature):
        """Linear(LayerNorm(concat([h, skip]))): the decoder block's new hidden state."""
        return self.skip_linear(self._norm(self.skip_norm, jnp.concatenate([h, skip_feature.astype(h.dtype)], axis=-1)))

    def modulated_input(self, h, temb):
        """Self-attention's input: LN(h) + Linear(silu(temb)) (a shift; no scale)."""
        dt = self.config.compute_dtype
        shift = self.shift(nn.silu(temb.astype(jnp.float32)).astype(dt))
        return self._norm(self.norm1, h) + shift[:, None]

    def forward_with_branches(self, h, temb, context, cos, sin, skip_feature=None):
        """(output, (self-attention, cross-attention, MLP) outputs, each (B, T, D))."""
        if self.skip:
            h = self.fuse(h, skip_feature)
        attn = self.attn1(self.modulated_input(h, temb), None, cos, sin)
        h = h + attn
        cross = self.attn2(self._norm(self.norm2, h), context, cos, sin)
        h = h + cross
        mlp = self.fc2(nn.gelu(self.fc1(self._norm(self.norm3, h)), approximate=True))
        return h + mlp, (attn, cross, mlp)

    def forward_from_branches(self, h, branches, skip_feature=None):
        """The output with the three branch outputs taken from `branches` (e.g. stored at an
        earlier step): fuse (decoder blocks, with the given skip), then add each in order."""
        if self.skip:
            h = self.fuse(h, skip_feature)
        for branch in branches:
            h = h + branch.astype(h.dtype)
        return h

    def __call__(self, h, temb, context, cos, sin, skip_feature=None):
        return self.forward_with_branches(h, temb, context, cos, sin, skip_feature)[0]


class _Pooler(nn.Module):
    """Attention pooling of the T5 caption (B, L, C) -> (B, out): the mean token, plus a
    learned position table, queries all L+1 tokens with POOLER_HEADS heads."""

    seq_len: int
    out: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        b, n, c = x.shape
        pos = self.param("positional_embedding", nn.initializers.normal(c**-0.5), (self.seq_len + 1, c))
        x = jnp.concatenate([x.mean(1, keepdims=True), x], axis=1) + pos.astype(x.dtype)
        h, hd = POOLER_HEADS, c // POOLER_HEADS
        q = nn.Dense(c, dtype=self.dtype, name="q_proj")(x[:, :1]).reshape(b, 1, h, hd)
        k = nn.Dense(c, dtype=self.dtype, name="k_proj")(x).reshape(b, n + 1, h, hd)
        v = nn.Dense(c, dtype=self.dtype, name="v_proj")(x).reshape(b, n + 1, h, hd)
        out = jax.nn.dot_product_attention(q, k, v).reshape(b, c)
        return nn.Dense(self.out, dtype=self.dtype, name="c_proj")(out)


class HunyuanDiT(nn.Module):
    """Hunyuan-DiT v1.2. `apply({"params": p}, x, t, clip_emb, clip_mask, t5_emb, t5_mask)
    -> (B, H, W, out_channels)` float32.

    x: (B, H, W, in_channels) latents (H, W divisible by patch_size); t: (B,) timesteps
    (0..999 scale); clip_emb (B, text_len, cross_attention_dim) and t5_emb (B, text_len_t5,
    cross_attention_dim_t5) the two encoders' outputs; clip_mask / t5_mask (B, len) 1 for
    real tokens, 0 for padding (replaced by the learned padding table).

    With `config.use_style_cond_and_image_meta_size` (v1.0/v1.1) every pass also takes
    the keyword arguments `image_meta_size` (B, 6) float and `style` (B,) int (see
    `HunyuanConfig`); without it they must be left out.
    """

    config: HunyuanConfig

    def setup(self):
        cfg = self.config
        d, p, dt = cfg.hidden_size, cfg.patch_size, cfg.compute_dtype
        self.patch_embed = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=dt, name="patch_embed")
        self.timestep_embedder = _Projection(d, d, dt, name="timestep_embedder")
        self.pooler = _Pooler(cfg.text_len_t5, cfg.pooled_projection_dim, dt, name="pooler")
        self.extra_embedder = _Projection(4 * d, d, dt, name="extra_embedder")
        if cfg.use_style_cond_and_image_meta_size:
            self.style_embedder = nn.Embed(NUM_STYLES, d, dtype=dt, embedding_init=nn.initializers.normal(1.0))
        self.text_embedder = _Projection(4 * cfg.cross_attention_dim_t5, cfg.cross_attention_dim, dt, name="text_embedder")
        self.text_embedding_padding = self.param(
            "text_embedding_padding", nn.initializers.normal(1.0), (cfg.text_len + cfg.text_len_t5, cfg.cross_attention_dim)
        )
        ex = (
            jnp.zeros((1, 1, d), dt),
            jnp.zeros((1, d), dt),
            jnp.zeros((1, 1, cfg.cross_attention_dim), dt),
            jnp.ones((1, cfg.head_dim), jnp.float32),
            jnp.zeros((1, cfg.head_dim), jnp.float32),
        )
        n_enc = cfg.num_encoder_blocks
        self.encoder_blocks = self.param("encoder_blocks", stacked_init(HunyuanBlock(cfg, parent=None), n_enc, *ex))
        self.middle_blocks = self.param("middle_blocks", stacked_init(HunyuanBlock(cfg, parent=None), 2, *ex))
        self.decoder_blocks = self.param(
            "decoder_blocks", stacked_init(HunyuanBlock(cfg, True, parent=None), n_enc, *ex, ex[0])
        )
        self.norm_out = nn.Dense(2 * d, dtype=dt, name="norm_out")
        self.proj_out = nn.Dense(p * p * cfg.out_channels, dtype=dt, name="proj_out")

    # ---- pieces ------------------------------------------------------------------------
    def check_inputs(self, x, clip_emb, clip_mask, t5_emb, t5_mask, image_meta_size=None, style=None):
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels or x.shape[1] % cfg.patch_size or x.shape[2] % cfg.patch_size:
            raise UserError(
                f"a Hunyuan-DiT takes latents (batch, height, width, {cfg.in_channels}) with sides divisible by "
                f"{cfg.patch_size}, got {tuple(x.shape)}"
            )
        b = x.shape[0]
        for name, emb, mask, n, c in (
            ("clip", clip_emb, clip_mask, cfg.text_len, cfg.cross_attention_dim),
            ("t5", t5_emb, t5_mask, cfg.text_len_t5, cfg.cross_attention_dim_t5),
        ):
            if tuple(emb.shape) != (b, n, c):
                raise UserError(f"{name}_emb must have shape ({b}, {n}, {c}), got {tuple(emb.shape)}")
            if tuple(mask.shape) != (b, n):
                raise UserError(f"{name}_mask must have shape ({b}, {n}) (one 0/1 flag per token), got {tuple(mask.shape)}")
        self.check_extra_conditions(b, image_meta_size, style)

    def check_extra_conditions(self, b: int, image_meta_size, style):
        """v1.0/v1.1's keyword conditions: both required with the flag, both absent without."""
        given = [n for n, v in (("image_meta_size", image_meta_size), ("style", style)) if v is not None]
        if not self.config.use_style_cond_and_image_meta_size:
            if given:
                raise UserError(
                    f"this Hunyuan-DiT (use_style_cond_and_image_meta_size=False, v1.2) takes no {' or '.join(given)}; "
                    "leave it out"
                )
            return
        missing = [n for n in ("image_meta_size", "style") if n not in given]
        if missing:
            raise UserError(
                f"this Hunyuan-DiT (use_style_cond_and_image_meta_size=True, v1.0/v1.1) needs the keyword arguments "
                f"image_meta_size ({b}, {META_SIZE_NUMBERS}) float and style ({b},) int; missing {', '.join(missing)}"
            )
        if tuple(np.shape(image_meta_size)) != (b, META_SIZE_NUMBERS):
            raise UserError(
                f"image_meta_size must have shape ({b}, {META_SIZE_NUMBERS}) (height, width, target height, target width, "
                f"crop top, crop left per sample), got {tuple(np.shape(image_meta_size))}"
            )
        if tuple(np.shape(style)) != (b,) or not jnp.issubdtype(jnp.result_type(style), jnp.integer):
            raise UserError(
                f"style must be ({b},) integers in 0..{NUM_STYLES - 1}, got shape {tuple(np.shape(style))} "
                f"dtype {jnp.result_type(style)}"
            )

    def embed(self, x, t, clip_emb, clip_mask, t5_emb, t5_mask, image_meta_size=None, style=None):
        """(tokens (B, T, D), cond): cond = (temb (B, D), context (B, Lc+Lt, Dc), cos, sin)."""
        cfg = self.config
        self.check_inputs(x, clip_emb, clip_mask, t5_emb, t5_mask, image_meta_size, style)
        dt = cfg.compute_dtype
        b, gh, gw = x.shape[0], x.shape[1] // cfg.patch_size, x.shape[2] // cfg.patch_size
        h = self.patch_embed(x.astype(dt)).reshape(b, gh * gw, cfg.hidden_size)
        t5 = t5_emb.astype(dt)
        extra = self.pooler(t5)
        if cfg.use_style_cond_and_image_meta_size:  # [pooled; sizes' features; style], diffusers' order
            sizes = timestep_features(jnp.reshape(image_meta_size, (-1,)), META_SIZE_FEATURES).astype(dt)
            sizes = sizes.reshape(b, META_SIZE_NUMBERS * META_SIZE_FEATURES)
            extra = jnp.concatenate([extra, sizes, self.style_embedder(style).astype(dt)], axis=1)
        temb = self.timestep_embedder(timestep_features(t).astype(dt)) + self.extra_embedder(extra)
        context = jnp.concatenate([clip_emb.astype(dt), self.text_embedder(t5)], axis=1)
        keep = jnp.concatenate([clip_mask, t5_mask], axis=1).astype(bool)[..., None]
        context = jnp.where(keep, context, self.text_embedding_padding.astype(dt))
        cos, sin = (jnp.asarray(a) for a in rope_tables(cfg.head_dim, gh, gw, cfg.patch_size))
        return h, (temb, context, cos, sin)

    def head(self, h, cond, grid: tuple[int, int]):
        """(B, T, D) -> (B, H, W, out_channels) float32: proj_out(LN(h) * (1 + scale) + shift)."""
        cfg = self.config
        temb = cond[0]
        scale, shift = jnp.split(self.norm_out(nn.silu(temb.astype(jnp.float32)).astype(h.dtype)), 2, axis=-1)
        x = _plain_norm(h) * (1 + scale[:, None]) + shift[:, None]
        tokens = self.proj_out(x)
        (gh, gw), p, ch = grid, cfg.patch_size, cfg.out_channels
        out = tokens.reshape(-1, gh, gw, p, p, ch).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(-1, gh * p, gw * p, ch).astype(jnp.float32)

    def _block_fn(self, cond, skip: bool):
        blk = HunyuanBlock(self.config, skip, parent=None)
        return remat(lambda p, h, *s: blk.apply({"params": p}, h, *cond, *s), self.config.remat_policy)

    def run_encoder(self, h, cond, lo: int, hi: int):
        """Encoder blocks lo..hi-1; returns (h, their outputs stacked (hi-lo, B, T, D))."""
        if hi <= lo:
            return h, jnp.zeros((0, *h.shape), h.dtype)
        fn = self._block_fn(cond, False)
        return scan_blocks(lambda h, p, _: (fn(p, h),) * 2, h, self.encoder_blocks, lo, hi, unroll=self.config.scan_unroll)

    def run_middle(self, h, cond, lo: int, hi: int):
        if hi <= lo:
            return h
        fn = self._block_fn(cond, False)
        return scan_blocks(lambda h, p, _: (fn(p, h), None), h, self.middle_blocks, lo, hi, unroll=self.config.scan_unroll)[0]

    def run_decoder(self, h, cond, lo: int, hi: int, skips):
        """Decoder blocks lo..hi-1 (block D/2+1+j is decoder j); `skips` are the outputs of
        encoder blocks E-hi..E-1-lo (E = D/2-1) in encoder order: decoder j fuses encoder E-1-j."""
        if hi <= lo:
            return h
        fn = self._block_fn(cond, True)
        step = lambda h, p, s: (fn(p, h, s), None)  # noqa: E731
        return scan_blocks(step, h, self.decoder_blocks, lo, hi, extra_xs=skips[::-1], unroll=self.config.scan_unroll)[0]

    # ---- passes ------------------------------------------------------------------------
    def __call__(self, x, t, clip_emb, clip_mask, t5_emb, t5_mask, *, image_meta_size=None, style=None):
        out, _ = self.forward_full(x, t, clip_emb, clip_mask, t5_emb, t5_mask, 0, image_meta_size=image_meta_size, style=style)
        return out

    def forward_full(
        self, x, t, clip_emb, clip_mask, t5_emb, t5_mask, shallow_units: int, *, image_meta_size=None, style=None
    ):
        """Full pass; also returns the deep feature (B, T, D): the input of block D-k
        (before its fusion), k = shallow_units in 0..D/2 (k = 0: the final hidden state)."""
        cfg, k = self.config, shallow_units
        n_enc = cfg.num_encoder_blocks
        h, cond = self.embed(x, t, clip_emb, clip_mask, t5_emb, t5_mask, image_meta_size, style)
        grid = (x.shape[1] // cfg.patch_size, x.shape[2] // cfg.patch_size)
        h, skips = self.run_encoder(h, cond, 0, n_enc)
        if k > n_enc:  # the deep feature enters middle block D/2, the second one
            deep = self.run_middle(h, cond, 0, 1)
            h = self.run_middle(deep, cond, 1, 2)
        else:
            h = self.run_middle(h, cond, 0, 2)
        cut = n_enc - min(k, n_enc)
        h = self.run_decoder(h, cond, 0, cut, skips[min(k, n_enc) :])
        if k <= n_enc:
            deep = h
        h = self.run_decoder(h, cond, cut, n_enc, skips[: min(k, n_enc)])
        return self.head(h, cond, grid), deep

    def forward_shallow(
        self, x, t, clip_emb, clip_mask, t5_emb, t5_mask, deep_feature, shallow_units: int, *, image_meta_size=None, style=None
    ):
        """The cached pass: blocks 0..k-1 for their skips, then blocks D-k..D-1 from
        `deep_feature` (of `forward_full` with the same k), each fusing a fresh skip. At
        k = D/2 block D/2-1 is not run: its output would be replaced by the cache."""
        cfg, k = self.config, shallow_units
        n_enc = cfg.num_encoder_blocks
        if not 1 <= k <= cfg.depth // 2:
            raise UserError(f"shallow_units must be in 1..{cfg.depth // 2} for a depth-{cfg.depth} Hunyuan-DiT, got {k}")
        h, cond = self.embed(x, t, clip_emb, clip_mask, t5_emb, t5_mask, image_meta_size, style)
        grid = (x.shape[1] // cfg.patch_size, x.shape[2] // cfg.patch_size)
        _, skips = self.run_encoder(h, cond, 0, min(k, n_enc))
        h = deep_feature.astype(h.dtype)
        if k > n_enc:
            h = self.run_middle(h, cond, 1, 2)
        h = self.run_decoder(h, cond, n_enc - min(k, n_enc), n_enc, skips)
        return self.head(h, cond, grid)

    # ---- units: the cache baselines' pieces ------------------------------------------------
    # The baselines run any contiguous range of blocks, so the state between blocks must
    # carry the long-skip features: a "unit state" (E + 1, B, T, D), E = D/2 - 1, holds the
    # hidden state in row 0 and the output of encoder block i in row 1 + i (zeros until run).
    def unit_embed(self, x, t, clip_emb, clip_mask, t5_emb, t5_mask, *, image_meta_size=None, style=None):
        """(unit state entering block 0, cond) as `embed`."""
        h, cond = self.embed(x, t, clip_emb, clip_mask, t5_emb, t5_mask, image_meta_size, style)
        state = jnp.zeros((self.config.num_encoder_blocks + 1, *h.shape), h.dtype)
        return state.at[0].set(h), cond

    def run_units(self, state, cond, lo: int, hi: int):
        """Blocks lo..hi-1 (global indices, 0 <= lo <= hi <= depth) on a unit state: encoder
        blocks record their outputs, decoder block l fuses row 1 + (D-1-l), whatever run put
        it there (this call, an earlier one, or a stored state)."""
        n_enc, depth = self.config.num_encoder_blocks, self.config.depth
        if not 0 <= lo <= hi <= depth:
            raise UserError(f"block range {lo}..{hi} is outside 0..{depth}")
        h = state[0]
        if lo < n_enc:
            h, outs = self.run_encoder(h, cond, lo, min(hi, n_enc))
            state = state.at[1 + lo : 1 + min(hi, n_enc)].set(outs)
        if max(lo, n_enc) < min(hi, n_enc + 2):
            h = self.run_middle(h, cond, max(lo, n_enc) - n_enc, min(hi, n_enc + 2) - n_enc)
        a, b = max(lo, n_enc + 2) - n_enc - 2, hi - n_enc - 2
        if a < b:  # decoder j fuses encoder E-1-j: the rows of encoders E-b..E-1-a, in encoder order
            h = self.run_decoder(h, cond, a, b, state[1 + n_enc - b : 1 + n_enc - a])
        return state.at[0].set(h)


@functools.lru_cache(maxsize=16)
def _jitted_init(config: HunyuanConfig):
    x = np.zeros((1, 2 * config.patch_size, 2 * config.patch_size, config.in_channels), np.float32)
    clip = np.zeros((1, config.text_len, config.cross_attention_dim), np.float32)
    t5 = np.zeros((1, config.text_len_t5, config.cross_attention_dim_t5), np.float32)
    masks = (np.ones((1, config.text_len), np.int32), np.ones((1, config.text_len_t5), np.int32))
    t = np.zeros((1,), np.int32)
    extra = {}
    if config.use_style_cond_and_image_meta_size:
        extra = dict(image_meta_size=np.zeros((1, META_SIZE_NUMBERS), np.float32), style=np.zeros((1,), np.int32))
    return jax.jit(lambda rng: HunyuanDiT(config).init(rng, x, t, clip, masks[0], t5, masks[1], **extra)["params"])


def init_hunyuan_params(config: HunyuanConfig, rng: jax.Array | int = 0):
    """Fresh parameters (flax default inits; randn padding table, pooler positions and
    style table as the reference). For fine-tuning start from converted released weights instead."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return _jitted_init(config)(rng)
