"""Latte-T2V and Latte-T2V-skip (text-to-video) in Flax linen, channels-last.

The model of diffusers' `LatteTransformer3DModel` (the Latte-0 / Latte-1 `transformer/`)
and of the official Skip-DiT `LatteT2V_skip`: a video (B, F, H, W, C) becomes per-frame
patch tokens (+ diffusers' 2-D sin-cos table); a caption embedding (B, L, caption_channels)
is projected to the width D once; the transformer is a sequence of P *pairs* (`depth`):

    spatial block   on (B, F, T, D): self-attention over the T tokens of a frame,
                    cross-attention to the caption (key mask: text_mask), feed-forward
    temporal block  on (B, T, F, D): self-attention across the F frames, feed-forward

both adaLN-single blocks (`skipdit_jax.models.text_blocks`) modulated by one shared
vector of the timestep. The frozen 1-D sin-cos frame table is added once, after the
spatial block of pair 0 (when F > 1). The output layer adds its own (2, D) table to the
timestep embedding for shift/scale, then projects to p*p*out_channels (2*C: learned sigma).

Parameters are stacked over pairs: `encoder_pairs` holds pairs 0..P/2-1, `decoder_pairs`
the rest, each {"spatial": block, "temporal": block} with a leading pair axis. The skip
variant adds `skip_fusions` (P/2 of them): decoder pair P/2 + j first replaces its input by
`Linear(LN_f32(concat([x, skip])))` where skip is the output of pair P/2-1-j (pair p <->
pair P-1-p), before its spatial block -- the official `skip_linears[i - 14]` at 28 pairs.

The deep-feature cache counts pairs: the deep feature is the hidden state entering pair P-k
(before its fusion), (B, F, T, D); a shallow pass runs pairs 0..k-1, then pairs P-k..P-1
from the cached feature, each fusing its fresh shallow skip (the official
`LatteT2V_skip_cache` with `skip_at_branch = k`).

Joint image-video training (the official `use_image_num`): the plain pass may take I more
frames than `num_frames`, independent images, each with its own caption (`image_text_emb`
(B, I, L, C), `image_text_mask` (B, I, L)). Images get the 2-D position table, the shared
timestep modulation, every spatial block (cross-attending to their own caption), the skip
fusions and the output layer; no temporal block and no frame table. They are carried as a
separate (B*I, 1, T, D) stream beside the video's (B, F, T, D), so the video's output is
exactly that of the video alone.
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
from skipdit_jax.models.latte import get_1d_sincos_temp_embed
from skipdit_jax.models.layers import normal002, timestep_features, zeros
from skipdit_jax.models.skip import SkipFusion, remat, scan_blocks, stacked_init
from skipdit_jax.models.text_blocks import (
    AdaSingleBlock,
    CaptionProjection,
    key_mask_bias,
    layer_norm_eps,
    patch_pos_embed,
    scale_shift_init,
)

FINAL_NORM_EPS = 1e-6  # the output LayerNorm's epsilon is fixed in the reference


@dataclasses.dataclass(frozen=True)
class LatteT2VConfig(ArchitectureConfig):
    """Architecture of a Latte-T2V / Latte-T2V-skip.

    Attributes:
      input_size: side of the square latent frame (64 for 512 px videos).
      num_frames: F, frames of a video (the length of the frozen frame table; 16).
      in_channels: latent channels; learn_sigma doubles the output channels.
      patch_size, hidden_size, num_heads, mlp_ratio: as DiT's (Latte-0: 2, 1152, 16, 4).
      depth: (spatial, temporal) *pairs* (28 in Latte-0).
      caption_channels: width of the text encoder's output (4096, T5-v1.1-XXL).
      text_len: caption tokens of a training batch (120); only `batch_spec` uses it, the
        model takes any length.
      long_skip: the Skip-DiT long skips (pair p <-> pair depth-1-p); needs an even depth.
      norm_eps: epsilon of the blocks' LayerNorms (1e-6 in Latte-0).
      skip_init: init of the skip Linear: "torch_default" (the official T2V code) or "xavier".
      joint_images: I, images per video of a training batch (joint image-video training);
        only `batch_spec` uses it, the model takes any I. Sampling sees videos only.
      dtype, attention_impl, remat_policy, scan_unroll: as `ModelConfig`.
    """

    input_size: int = 64
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_frames: int = 16
    caption_channels: int = 4096
    text_len: int = 120
    joint_images: int = 0
    learn_sigma: bool = True
    long_skip: bool = False
    norm_eps: float = 1e-6
    skip_init: str = "torch_default"
    dtype: str = "float32"
    attention_impl: str | None = None
    remat_policy: str = "none"
    scan_unroll: int = 1

    num_classes: ClassVar[int] = 0  # text-conditioned: no label table
    family: ClassVar[str] = "latte_t2v"
    config_label: ClassVar[str] = "Latte-T2V"
    positive_fields: ClassVar[tuple[str, ...]] = (
        "input_size",
        "patch_size",
        "in_channels",
        "hidden_size",
        "depth",
        "num_heads",
        "num_frames",
        "caption_channels",
        "text_len",
    )

    @property
    def num_pairs(self) -> int:
        return self.depth

    @property
    def num_encoder_pairs(self) -> int:
        return self.depth // 2

    @property
    def interpolation_scale(self) -> float:
        """diffusers' position-table scale: sample_size // 64, at least 1."""
        return float(max(self.input_size // 64, 1))

    def validate_layout(self) -> None:
        if self.depth < 2:
            self._invalid(f"depth counts (spatial, temporal) pairs and must be >= 2, got {self.depth}")
        if self.long_skip and self.depth % 2:
            self._invalid(f"long skips pair pair p with pair depth-1-p, so depth must be even, got {self.depth}")
        if int(self.joint_images) != self.joint_images or self.joint_images < 0:
            self._invalid(f"joint_images must be an integer >= 0, got {self.joint_images}")
        if not 0 < self.norm_eps < 1:
            self._invalid(f"norm_eps must be in (0, 1), got {self.norm_eps}")


_PRESETS = {"Latte-T2V": False, "Latte-T2V-skip": True}


def latte_t2v_preset_names() -> list[str]:
    return list(_PRESETS)


def latte_t2v_preset(name: str, **overrides) -> LatteT2VConfig:
    """ "Latte-T2V" (Latte-0: 28 pairs, width 1152, 16 heads, patch 2, 64x64x4 latents,
    16 frames, T5-XXL captions) or "Latte-T2V-skip" (the same with long skips)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown Latte-T2V preset {name!r}; known presets: {', '.join(_PRESETS)}")
    return LatteT2VConfig(**{"long_skip": _PRESETS[name], **overrides})


def _block(cfg: LatteT2VConfig, cross: bool) -> AdaSingleBlock:
    return AdaSingleBlock(
        cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cross, cfg.compute_dtype, cfg.attention_impl, parent=None
    )


class _Pair(nn.Module):
    """One (spatial, temporal) pair on (B, F, T, D); `temp` (F, D) is added between the two
    blocks where `first` (a traced bool: pair 0) holds."""

    config: LatteT2VConfig

    def setup(self):
        self.spatial = _block(self.config, True)
        self.temporal = _block(self.config, False)

    def __call__(self, h, mod, context, bias, temp=None, first=None):
        h = self.spatial(h, mod, context, bias)
        v = h.transpose(0, 2, 1, 3)  # (B, T, F, D)
        if temp is not None and v.shape[2] > 1:  # the reference adds no table to single frames
            v = jnp.where(first, (v.astype(jnp.float32) + temp).astype(v.dtype), v)
        return self.temporal(v, mod).transpose(0, 2, 1, 3)

    def image(self, h, mod, context, bias):
        """The pair on joint images (B*I, 1, T, D): its spatial block only."""
        return self.spatial(h, mod, context, bias)


class _FinalLayer(nn.Module):
    """shift, scale = scale_shift_table + emb; proj_out(LN(x) * (1 + scale) + shift)."""

    config: LatteT2VConfig

    @nn.compact
    def __call__(self, h, emb):
        cfg = self.config
        d, dt = cfg.hidden_size, cfg.compute_dtype
        table = self.param("scale_shift_table", scale_shift_init(d), (2, d))
        ss = (table[None] + emb.astype(jnp.float32)[:, None]).astype(dt)
        x = layer_norm_eps(h, FINAL_NORM_EPS) * (1 + ss[:, 1, None, None]) + ss[:, 0, None, None]
        return nn.Dense(cfg.patch_size**2 * cfg.out_channels, dtype=dt, kernel_init=zeros, name="proj_out")(x)


class _TimestepEmbedder(nn.Module):
    hidden_size: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, t):
        h = nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=normal002, name="linear_1")(timestep_features(t))
        return nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=normal002, name="linear_2")(nn.silu(h))


class LatteT2V(nn.Module):
    """Latte-T2V / -skip. `apply({"params": p}, x, t, text_emb, text_mask) -> (B, F, H, W, out_channels)`.

    x: (B, F, H, W, C) channels-last, F == num_frames; t: (B,) timesteps (0..999 scale);
    text_emb: (B, L, caption_channels) text-encoder output; text_mask: (B, L), 1 for the
    tokens to attend to, 0 for padding (a key mask of the cross-attention). Output float32.

    Joint images (the plain pass only): x holds num_frames + I frames, the last I images
    captioned by image_text_emb (B, I, L', caption_channels) / image_text_mask (B, I, L');
    the output then has num_frames + I frames, its first num_frames those of x[:, :num_frames]
    alone.
    """

    config: LatteT2VConfig

    def setup(self):
        cfg = self.config
        d, p, dt = cfg.hidden_size, cfg.patch_size, cfg.compute_dtype
        self.x_embedder = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dt,
            kernel_init=nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
            name="x_embedder",
        )
        self.t_embedder = _TimestepEmbedder(d, dt, name="t_embedder")
        self.adaln_single = nn.Dense(6 * d, dtype=dt, kernel_init=normal002, name="adaln_single")
        self.caption_projection = CaptionProjection(d, dt, name="caption_projection")
        n_enc = cfg.num_encoder_pairs
        ex = (jnp.zeros((1, 1, 1, d), dt), jnp.zeros((1, 6, d), dt), jnp.zeros((1, 1, d), dt), jnp.zeros((1, 1, 1, 1), dt))
        pair = _Pair(cfg, parent=None)
        self.encoder_pairs = self.param("encoder_pairs", stacked_init(pair, n_enc, *ex))
        self.decoder_pairs = self.param("decoder_pairs", stacked_init(pair, cfg.num_pairs - n_enc, *ex))
        if cfg.long_skip:
            self.skip_fusions = self.param("skip_fusions", stacked_init(_skip_fusion(cfg), n_enc, ex[0], ex[0]))
        self.final_layer = _FinalLayer(cfg, name="final_layer")
        self.pos_embed = jnp.asarray(patch_pos_embed(d, cfg.grid_size, cfg.interpolation_scale), jnp.float32)
        self.temp_embed = jnp.asarray(get_1d_sincos_temp_embed(d, cfg.num_frames), jnp.float32)

    # ---- pieces ------------------------------------------------------------------------
    def check_inputs(self, x, text_emb, text_mask, image_text_emb=None, image_text_mask=None):
        cfg = self.config
        n_img = 0 if image_text_emb is None else image_text_emb.shape[1]
        want = (cfg.num_frames + n_img, cfg.input_size, cfg.input_size, cfg.in_channels)
        if x.ndim != 5 or tuple(x.shape[1:]) != want:
            more = f" (num_frames {cfg.num_frames} + {n_img} joint images)" if n_img else ""
            raise UserError(
                f"a Latte-T2V model takes video latents of shape (batch, {', '.join(map(str, want))}) "
                f"(batch, frames{more}, height, width, channels), got {tuple(x.shape)}"
            )
        b = x.shape[0]
        if image_text_emb is not None:
            shape = tuple(image_text_emb.shape)
            if len(shape) != 4 or shape[0] != b or shape[3] != cfg.caption_channels:
                raise UserError(
                    f"image_text_emb must have shape ({b}, images, tokens, {cfg.caption_channels}) "
                    f"(one caption per joint image), got {shape}"
                )
            if image_text_mask is None or tuple(image_text_mask.shape) != shape[:3]:
                got = None if image_text_mask is None else tuple(image_text_mask.shape)
                raise UserError(f"image_text_mask must have shape {shape[:3]} (one flag per token of image_text_emb), got {got}")
        if text_emb.ndim != 3 or text_emb.shape[0] != b:
            raise UserError(f"text_emb must have shape ({b}, tokens, {cfg.caption_channels}), got {tuple(text_emb.shape)}")
        if text_emb.shape[-1] != cfg.caption_channels:
            raise UserError(
                f"the text encoder's width D={text_emb.shape[-1]} does not match the model's caption projection "
                f"(caption_channels {cfg.caption_channels})"
            )
        if tuple(text_mask.shape) != tuple(text_emb.shape[:2]):
            raise UserError(
                f"text_mask must have shape {tuple(text_emb.shape[:2])} (one flag per token), got {tuple(text_mask.shape)}"
            )

    def _tokens(self, x):
        """(B, F, H, W, C) -> patch tokens + the 2-D position table, (B, F, T, D)."""
        cfg = self.config
        b, f = x.shape[:2]
        frames = x.reshape(b * f, *x.shape[2:]).astype(cfg.compute_dtype)
        tokens = self.x_embedder(frames).reshape(b, f, cfg.num_patches, cfg.hidden_size)
        return (tokens.astype(jnp.float32) + self.pos_embed).astype(cfg.compute_dtype)

    def embed(self, x, t, text_emb, text_mask, image_text_emb=None, image_text_mask=None):
        """(tokens (B, F, T, D), cond): cond = (mod (B, 6, D), emb (B, D), context (B, L, D),
        key bias (B, 1, 1, L)), what every block and the output layer take.

        With joint images: (tokens, image tokens (B*I, 1, T, D)) and cond with a fifth entry,
        the images' own (mod, emb, context, bias) with B*I rows (image i of sample b at row
        b*I + i)."""
        cfg = self.config
        self.check_inputs(x, text_emb, text_mask, image_text_emb, image_text_mask)
        b, f = x.shape[0], cfg.num_frames
        h = self._tokens(x[:, :f] if image_text_emb is not None else x)
        emb = self.t_embedder(t)
        mod = self.adaln_single(nn.silu(emb)).reshape(b, 6, cfg.hidden_size)
        context = self.caption_projection(text_emb.astype(cfg.compute_dtype))
        cond = (mod, emb, context, key_mask_bias(text_mask, cfg.compute_dtype))
        if image_text_emb is None:
            return h, cond
        n_img, n_tok = image_text_emb.shape[1:3]
        h_img = self._tokens(x[:, f:]).reshape(b * n_img, 1, cfg.num_patches, cfg.hidden_size)
        ctx_img = self.caption_projection(image_text_emb.reshape(b * n_img, n_tok, -1).astype(cfg.compute_dtype))
        bias_img = key_mask_bias(image_text_mask.reshape(b * n_img, n_tok), cfg.compute_dtype)
        rows = functools.partial(jnp.repeat, repeats=n_img, axis=0)
        return (h, h_img), (*cond, (rows(mod), rows(emb), ctx_img, bias_img))

    def _head(self, h, emb):
        cfg = self.config
        b, f = h.shape[:2]
        tokens = self.final_layer(h, emb)
        g, p, ch = cfg.grid_size, cfg.patch_size, cfg.out_channels
        x = tokens.reshape(b, f, g, g, p, p, ch).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, f, g * p, g * p, ch).astype(jnp.float32)

    def head(self, h, cond):
        """Output layer on (B, F, T, D) -> (B, F, H, W, out_channels), float32 (with joint
        images: the video's frames, then the images)."""
        if not isinstance(h, tuple):
            return self._head(h, cond[1])
        video = self._head(h[0], cond[1])
        images = self._head(h[1], cond[4][1])
        return jnp.concatenate([video, images.reshape(video.shape[0], -1, *images.shape[2:])], axis=1)

    def _pair_fn(self, cond):
        cfg = self.config
        mod, _, context, bias = cond[:4]
        image_cond = cond[4] if len(cond) > 4 else None
        temp = self.temp_embed[None, None]

        def fn(p, h, first):
            pair = _Pair(cfg, parent=None)
            if image_cond is None:
                return pair.apply({"params": p}, h, mod, context, bias, temp, first)
            i_mod, _, i_context, i_bias = image_cond
            video = pair.apply({"params": p}, h[0], mod, context, bias, temp, first)
            return video, pair.apply({"params": p}, h[1], i_mod, i_context, i_bias, method=_Pair.image)

        return remat(fn, cfg.remat_policy)

    def run_encoder(self, h, cond, lo: int, hi: int):
        """Encoder pairs lo..hi-1; returns (h, their outputs stacked) -- the skip features."""
        if hi <= lo:
            return h, None
        pair = self._pair_fn(cond)
        keep = self.config.long_skip

        def step(h, p, first):
            h = pair(p, h, first)
            return h, (h if keep else None)

        firsts = jnp.arange(lo, hi) == 0
        return scan_blocks(step, h, self.encoder_pairs, lo, hi, extra_xs=firsts, unroll=self.config.scan_unroll)

    def run_decoder(self, h, cond, lo: int, hi: int, skips):
        """Decoder pairs P/2+lo..P/2+hi-1; `skips` are the outputs of encoder pairs
        P/2-hi..P/2-1-lo in encoder order (pair P/2+j fuses the one of pair P/2-1-j)."""
        if hi <= lo:
            return h
        pair = self._pair_fn(cond)
        no = jnp.asarray(False)
        unroll = self.config.scan_unroll
        if not self.config.long_skip:
            return scan_blocks(lambda h, p, _: (pair(p, h, no), None), h, self.decoder_pairs, lo, hi, unroll=unroll)[0]
        fusion = _skip_fusion(self.config)

        def step(h, p, skip):
            p_pair, p_fuse = p
            fused = jax.tree.map(lambda a, s: fusion.apply({"params": p_fuse}, a, s), h, skip)  # video, images apart
            return pair(p_pair, fused, no), None

        stacked = (self.decoder_pairs, self.skip_fusions)
        return scan_blocks(step, h, stacked, lo, hi, extra_xs=jax.tree.map(lambda s: s[::-1], skips), unroll=unroll)[0]

    # ---- passes ------------------------------------------------------------------------
    def __call__(self, x, t, text_emb, text_mask, image_text_emb=None, image_text_mask=None):
        cfg = self.config
        h, cond = self.embed(x, t, text_emb, text_mask, image_text_emb, image_text_mask)
        n_enc = cfg.num_encoder_pairs
        h, skips = self.run_encoder(h, cond, 0, n_enc)
        h = self.run_decoder(h, cond, 0, cfg.num_pairs - n_enc, skips)
        return self.head(h, cond)

    def forward_full(self, x, t, text_emb, text_mask, shallow_units: int):
        """Full pass; also returns the deep feature (B, F, T, D): the hidden state entering
        pair P-k, before its fusion."""
        k, cfg = shallow_units, self.config
        n_enc, n_dec = cfg.num_encoder_pairs, cfg.num_pairs - cfg.num_encoder_pairs
        h, cond = self.embed(x, t, text_emb, text_mask)
        h, shallow_skips = self.run_encoder(h, cond, 0, k)
        h, deep_skips = self.run_encoder(h, cond, k, n_enc)
        deep = self.run_decoder(h, cond, 0, n_dec - k, deep_skips)
        h = self.run_decoder(deep, cond, n_dec - k, n_dec, shallow_skips)
        return self.head(h, cond), deep

    def forward_shallow(self, x, t, text_emb, text_mask, deep_feature, shallow_units: int):
        """The first k and last k pairs, the decoder side starting from a cached deep feature."""
        k, cfg = shallow_units, self.config
        n_dec = cfg.num_pairs - cfg.num_encoder_pairs
        h, cond = self.embed(x, t, text_emb, text_mask)
        _, shallow_skips = self.run_encoder(h, cond, 0, k)
        h = self.run_decoder(deep_feature.astype(h.dtype), cond, n_dec - k, n_dec, shallow_skips)
        return self.head(h, cond)

    def run_units(self, h, cond, lo: int, hi: int):
        """Pairs lo..hi-1 (global indices) of a model without long skips."""
        n_enc = self.config.num_encoder_pairs
        if lo < n_enc:
            h, _ = self.run_encoder(h, cond, lo, min(hi, n_enc))
        if hi > n_enc:
            h = self.run_decoder(h, cond, max(lo, n_enc) - n_enc, hi - n_enc, None)
        return h

    def probe(self, h, cond):
        """TeaCache's signal: pair 0's spatial block's modulated input, float32."""
        p0 = jax.tree.map(lambda a: a[0], self.encoder_pairs["spatial"])
        block = _block(self.config, True)
        shift, scale = block.apply({"params": p0}, cond[0], method=AdaSingleBlock.modulation)[:2]
        return (layer_norm_eps(h, self.config.norm_eps) * (1 + scale) + shift).astype(jnp.float32)


def _skip_fusion(cfg: LatteT2VConfig) -> SkipFusion:
    return SkipFusion(cfg.hidden_size, cfg.skip_init, cfg.compute_dtype, parent=None)


@functools.lru_cache(maxsize=16)
def _jitted_init(config: LatteT2VConfig):
    x = np.zeros((1, config.num_frames, config.input_size, config.input_size, config.in_channels), np.float32)
    text = np.zeros((1, 1, config.caption_channels), np.float32)
    mask = np.ones((1, 1), np.int32)
    return jax.jit(lambda rng: LatteT2V(config).init(rng, x, np.zeros((1,), np.int32), text, mask)["params"])


def init_latte_t2v_params(config: LatteT2VConfig, rng: jax.Array | int = 0):
    """Fresh parameters (PixArt-style init: xavier Linears, N(0, 0.02) embedders, zero
    cross-attention and output projections, randn/sqrt(D) modulation tables)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return _jitted_init(config)(rng)
