"""Stable Diffusion's `AutoencoderKL` (the KL-regularised VAE) in Flax linen, channels-last.

The architecture and the parameter names follow diffusers' `AutoencoderKL` (the VAE of
stabilityai/sd-vae-ft-mse and sd-vae-ft-ema), so a diffusers checkpoint converts by a
mechanical renaming: a Flax module called `down_blocks_0` holds what diffusers stores under
`down_blocks.0`, and `kernel`/`scale` are diffusers' `weight`. Everything runs NHWC.

    encoder:  conv_in -> down_blocks[i] (resnets, stride-2 downsampler except the last)
              -> mid_block (resnet, self-attention, resnet) -> norm, SiLU -> conv_out
    quant_conv (1x1) -> (mean, logvar) of the latent posterior
    post_quant_conv (1x1) -> decoder: conv_in -> mid_block -> up_blocks[i] (resnets,
              nearest-2x upsampler except the last) -> norm, SiLU -> conv_out

Typical use:

    config, params = load_vae("hf://stabilityai/sd-vae-ft-mse")
    latents = encode_to_latents(params, config, images_nhwc_in_minus1_1)   # * 0.18215
    images = decode_latents(params, config, latents)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from skipdit_jax import hub, paths
from skipdit_jax.errors import CheckpointError, ConfigError

__all__ = [
    "VAEConfig",
    "AutoencoderKL",
    "diffusers_key_shapes",
    "vae_params_from_diffusers",
    "load_vae",
    "encode_to_latents",
    "decode_latents",
    "decode_video_latents",
]

_NORM_EPS = 1e-6  # every GroupNorm of the SD VAE (resnets, attention, norm_out)
_COMPUTE_DTYPES = ("float32", "bfloat16")
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


# ---- configuration ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of an `AutoencoderKL`, named as in diffusers' `config.json`.

    The defaults are the Stable Diffusion VAE (sd-vae-ft-mse / sd-vae-ft-ema). The config is
    hashable, so it can be a static argument of `jax.jit`.

    Attributes:
      in_channels / out_channels: image channels.
      latent_channels: channels of the latent (the encoder emits twice as many: mean, logvar).
      block_out_channels: width of each resolution level; the image is downsampled by
        2 ** (len(block_out_channels) - 1).
      layers_per_block: resnets per encoder level (the decoder has one more per level).
      norm_num_groups: GroupNorm groups (must divide every width).
      scaling_factor / shift_factor: latents = (z - shift_factor) * scaling_factor.
      use_quant_conv / use_post_quant_conv / mid_block_add_attention: as in diffusers
        (all True for the SD VAE; later VAEs drop some of them).
      dtype: compute dtype, "float32" or "bfloat16". Parameters stay float32 and the
        GroupNorms and the attention softmax always run in float32.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        # JSON gives lists; a tuple keeps the config hashable (a jit static argument).
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        self.validate()

    @classmethod
    def sd_vae(cls, **overrides) -> VAEConfig:
        """The Stable Diffusion VAE: widths (128, 256, 512, 512), 2 resnets per level,
        4 latent channels, 32 groups, scaling factor 0.18215 (8x downsampling)."""
        return cls(**overrides)

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], **overrides) -> VAEConfig:
        """Reads a diffusers `AutoencoderKL` `config.json` dict; `overrides` (e.g. dtype)
        win. Keys that do not affect the computation (sample_size, force_upcast, ...) are
        ignored; architecture options this module does not implement raise ConfigError."""
        name = config.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise ConfigError(f"VAE config is for {name!r}; only diffusers' AutoencoderKL is supported")
        n = len(config.get("block_out_channels", cls.block_out_channels))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            got = list(config.get(key, [want] * n))
            if got != [want] * n:
                raise ConfigError(f"VAE config {key}={got}: only {n} x {want!r} is supported")
        if config.get("act_fn", "silu") != "silu":
            raise ConfigError(f"VAE config act_fn={config['act_fn']!r}: only 'silu' is supported")

        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in config and f.name != "dtype" and config[f.name] is not None:
                kwargs[f.name] = config[f.name]
        kwargs.update(overrides)
        return cls(**kwargs)

    # ---- derived quantities / validation ----------------------------------------------------
    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        def bad(msg):
            raise ConfigError(f"invalid VAE config: {msg}")

        if not self.block_out_channels:
            bad("block_out_channels is empty")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        for c in self.block_out_channels:
            if c < 1 or c % self.norm_num_groups:
                bad(f"block width {c} is not a positive multiple of norm_num_groups={self.norm_num_groups}")
        if self.dtype not in _COMPUTE_DTYPES:
            bad(f"dtype must be one of {_COMPUTE_DTYPES}, got {self.dtype!r}")
        if not self.scaling_factor:
            bad("scaling_factor must be non-zero")

    def replace(self, **changes) -> VAEConfig:
        return dataclasses.replace(self, **changes)


# ---- building blocks ----------------------------------------------------------------------
def _conv(features: int, kernel: int, dtype, name: str | None = None, stride: int = 1, padding="SAME") -> nn.Conv:
    """A kernel x kernel conv with float32 params; 'SAME' equals torch's padding=k//2 here."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _group_norm(x: jax.Array, groups: int, name: str, eps: float = _NORM_EPS) -> jax.Array:
    """GroupNorm (eps 1e-6 unless given, affine) computed in float32, returned in x's dtype.
    Statistics span every non-batch axis of x (per group of channels), so a (B, F, H, W, C)
    input is normalised over frames and pixels together, like torch's GroupNorm on NCFHW.

    The two-pass variance (use_fast_variance=False) matches torch and avoids the
    cancellation E[x^2] - E[x]^2 suffers on the large activations of the decoder.
    """
    y = nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        name=name,
    )(x.astype(jnp.float32))
    return y.astype(x.dtype)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding:
    x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 `conv_shortcut` on x when
    the width changes. (Dropout is 0 in the VAE and is omitted.)"""

    out_channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(_group_norm(x, self.groups, "norm1"))
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        h = nn.silu(_group_norm(h, self.groups, "norm2"))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels, with a GroupNorm in front and a residual.

    The head is as wide as the block (diffusers sets attention_head_dim to the width), so the
    logit scale is 1/sqrt(channels). `jax.nn.dot_product_attention` forms the logits and the
    softmax in float32 even for bfloat16 inputs, like diffusers' upcast_softmax=True.
    """

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = _group_norm(x, self.groups, "group_norm").reshape(b, h * w, 1, c)  # (B, T, heads=1, C)

        def dense(name):
            return nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name=name)

        q, k, v = dense("to_q")(y), dense("to_k")(y), dense("to_v")(y)
        out = jax.nn.dot_product_attention(q, k, v)
        out = dense("to_out_0")(out.reshape(b, h * w, c))
        return x + out.reshape(b, h, w, c)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right only, as diffusers
    (and the original LDM code) do; a symmetric 'SAME' pad would shift the sampling grid."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, self.dtype, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.dtype, "conv")(x)


class MidBlock(nn.Module):
    """resnet -> (self-attention) -> resnet at the lowest resolution."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = Attention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class ResolutionBlock(nn.Module):
    """`num_resnets` resnets followed by an optional resampler: diffusers' DownEncoderBlock2D
    (`resample="down"`, module `downsamplers_0`) or UpDecoderBlock2D (`"up"`, `upsamplers_0`)."""

    channels: int
    num_resnets: int
    groups: int
    resample: str | None = None  # None, "down" or "up"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_resnets):
            x = ResnetBlock(self.channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.resample == "down":
            x = Downsample(self.channels, self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample(self.channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) -> posterior moments (B, H/f, W/f, 2 * latent_channels)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.config.compute_dtype
        widths = cfg.block_out_channels
        h = _conv(widths[0], 3, dt, "conv_in")(x)
        for i, width in enumerate(widths):
            resample = "down" if i < len(widths) - 1 else None
            h = ResolutionBlock(
                width, cfg.layers_per_block, cfg.norm_num_groups, resample, dt, name=f"down_blocks_{i}"
            )(h)
        h = MidBlock(widths[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, dt, name="mid_block")(h)
        h = nn.silu(_group_norm(h, cfg.norm_num_groups, "conv_norm_out"))
        return _conv(2 * cfg.latent_channels, 3, dt, "conv_out")(h)


class Decoder(nn.Module):
    """Latent (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels).

    The levels run from the widest (lowest resolution) up: up_blocks_0 has width
    block_out_channels[-1], and each level has layers_per_block + 1 resnets.
    """

    config: VAEConfig

    @nn.compact
    def __call__(self, z):
        cfg, dt = self.config, self.config.compute_dtype
        widths = tuple(reversed(cfg.block_out_channels))
        h = _conv(widths[0], 3, dt, "conv_in")(z)
        h = MidBlock(widths[0], cfg.norm_num_groups, cfg.mid_block_add_attention, dt, name="mid_block")(h)
        for i, width in enumerate(widths):
            resample = "up" if i < len(widths) - 1 else None
            h = ResolutionBlock(
                width, cfg.layers_per_block + 1, cfg.norm_num_groups, resample, dt, name=f"up_blocks_{i}"
            )(h)
        h = nn.silu(_group_norm(h, cfg.norm_num_groups, "conv_norm_out"))
        return _conv(cfg.out_channels, 3, dt, "conv_out")(h)


class AutoencoderKL(nn.Module):
    """The KL autoencoder. `apply({"params": p}, x, method="encode")` -> (mean, logvar);
    `method="decode"` maps a latent back to an image; `__call__` (used by `init`)
    reconstructs x from the posterior mean. Inputs may be any float dtype; outputs are
    float32 whatever the compute dtype."""

    config: VAEConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, 1, cfg.compute_dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, 1, cfg.compute_dtype)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: (B, H, W, in_channels) in [-1, 1] -> (mean, logvar) of the latent posterior.

        logvar is clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution does, so
        exp(0.5 * logvar) can neither underflow to 0 nor overflow.
        """
        moments = self.encoder(x.astype(self.config.compute_dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """z: (B, h, w, latent_channels), unscaled -> image (B, h*f, w*f, out_channels)."""
        z = z.astype(self.config.compute_dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        mean, _ = self.encode(x)
        return self.decode(mean)


# ---- encode / decode helpers ----------------------------------------------------------------
def encode_to_latents(vae_params, config: VAEConfig, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Images (B, H, W, C) in [-1, 1] -> diffusion-model latents (z - shift) * scaling_factor.

    z is a sample of the posterior when `rng` is given, else its mean. Jittable with
    `config` static, e.g. `jax.jit(encode_to_latents, static_argnums=1)`. Float32 output.
    """
    mean, logvar = AutoencoderKL(config).apply({"params": vae_params}, images, method=AutoencoderKL.encode)
    z = mean
    if rng is not None:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return (z - config.shift_factor) * config.scaling_factor


def decode_latents(vae_params, config: VAEConfig, latents: jax.Array) -> jax.Array:
    """Diffusion-model latents -> images (B, H, W, C), nominally in [-1, 1].

    Undoes the scaling first (z = latents / scaling_factor + shift). Like diffusers, the
    output is not clipped: clip when converting to pixels. Jittable with `config` static.
    """
    z = latents / config.scaling_factor + config.shift_factor
    return AutoencoderKL(config).apply({"params": vae_params}, z, method=AutoencoderKL.decode)


def decode_video_latents(vae_params, config: VAEConfig, latents: jax.Array, frames_per_call: int = 16) -> jax.Array:
    """Video latents (B, F, h, w, C) -> frames (B, F, H, W, C_out), decoded frame by frame
    (the SD VAE is an image VAE) in chunks along the frame axis.

    Each decoder call takes `frames_per_call` frames of every sample (B * frames_per_call
    images; a last partial chunk is zero-padded and dropped), the chunks one after another
    (`lax.map`), so peak memory is that of one chunk whatever F is. The batch axis stays the
    leading axis of every call, so a batch-sharded input stays sharded. Jittable with
    `config` and `frames_per_call` static.
    """
    if latents.ndim != 5:
        raise ValueError(f"video latents must be (B, F, h, w, C), got shape {latents.shape}")
    b, f = latents.shape[:2]
    c = max(1, min(int(frames_per_call), f))
    n = -(-f // c)
    x = latents
    if n * c != f:
        x = jnp.pad(x, ((0, 0), (0, n * c - f), (0, 0), (0, 0), (0, 0)))
    chunks = jnp.swapaxes(x.reshape(b, n, c, *x.shape[2:]), 0, 1)  # (n, B, c, h, w, C)

    def decode_chunk(z):
        y = decode_latents(vae_params, config, z.reshape(b * c, *z.shape[2:]))
        return y.reshape(b, c, *y.shape[1:])

    y = decode_chunk(chunks[0])[None] if n == 1 else jax.lax.map(decode_chunk, chunks)
    y = jnp.swapaxes(y, 0, 1)
    return y.reshape(b, n * c, *y.shape[3:])[:, :f]


# ---- diffusers weights -> Flax params ----------------------------------------------------------
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# diffusers < 0.14 named the VAE attention's projections differently (sd-vae-ft-mse's files
# on the Hub still use these names); diffusers renames them on load, and so do we.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTENTION_RE = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")


def _flax_param_shapes(config: VAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened path -> shape of the params of AutoencoderKL(config), traced, not computed."""
    side = 2 * config.downsample_factor
    x = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda x: AutoencoderKL(config).init(jax.random.key(0), x)["params"], x)
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(shapes).items()}


def _torch_key(path: tuple[str, ...]) -> str:
    """('encoder', 'down_blocks_0', 'resnets_1', 'conv1', 'kernel') ->
    'encoder.down_blocks.0.resnets.1.conv1.weight' (Flax names list entries `name_i`)."""
    parts = []
    for name in path[:-1]:
        m = re.fullmatch(r"(.+)_(\d+)", name)
        parts.extend(m.groups() if m else [name])
    return ".".join(parts + [_LEAF_TO_TORCH[path[-1]]])


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape diffusers stores a Flax param under: conv HWIO -> OIHW, Dense (in, out) -> (out, in)."""
    if len(flax_shape) == 4:
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if len(flax_shape) == 2:
        return tuple(reversed(flax_shape))
    return flax_shape


def diffusers_key_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict keys (new attention naming) and torch shapes of a diffusers
    AutoencoderKL with this config: exactly what `vae_params_from_diffusers` expects."""
    return {_torch_key(p): _torch_shape(s) for p, s in _flax_param_shapes(config).items()}


def _list_for_error(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def vae_params_from_diffusers(state_dict: dict[str, Any], config: VAEConfig) -> dict:
    """Converts a diffusers AutoencoderKL state dict (name -> array) into Flax params.

    Conv weights go OIHW -> HWIO and Linear weights (out, in) -> (in, out). Both attention
    namings are accepted (`to_q/to_k/to_v/to_out.0` and the old `query/key/value/proj_attn`),
    as are attention weights stored as (out, in, 1, 1) 1x1-conv kernels. Every expected key
    must be present with the right shape and no other key may be present, otherwise a
    CheckpointError (a ValueError) names the offending keys. Returns float32 jax arrays.
    """
    renamed: dict[str, np.ndarray] = {}
    duplicates = []
    for key, value in state_dict.items():
        m = _OLD_ATTENTION_RE.match(key)
        new_key = f"{m[1]}{_OLD_ATTENTION_NAMES[m[2]]}.{m[3]}" if m else key
        if new_key in renamed:
            duplicates.append(f"{key} (also given as {new_key})")
        renamed[new_key] = np.asarray(value)

    flax_shapes = _flax_param_shapes(config)
    expected = {_torch_key(p): p for p in flax_shapes}
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))

    params: dict[tuple[str, ...], np.ndarray] = {}
    wrong_shape = []
    for key in sorted(set(expected) & set(renamed)):
        path, value = expected[key], renamed[key]
        want = flax_shapes[path]
        if len(want) == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # attention projection saved as a 1x1 conv
        if value.shape != _torch_shape(want):
            wrong_shape.append(f"{key}: got {tuple(value.shape)}, expected {_torch_shape(want)}")
            continue
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif value.ndim == 2:
            value = value.T  # (out, in) -> (in, out)
        params[path] = value.astype(np.float32)

    problems = []
    if missing:
        problems.append(f"missing keys: {_list_for_error(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list_for_error(unexpected)}")
    if wrong_shape:
        problems.append(f"wrongly shaped keys: {_list_for_error(wrong_shape)}")
    if duplicates:
        problems.append(f"keys given under both attention namings: {_list_for_error(duplicates)}")
    if problems:
        hint = ""
        if any(k.startswith("first_stage_model.") or ".down.0.block." in k for k in unexpected):
            hint = " (this looks like an original LDM/CompVis checkpoint; convert it to the diffusers layout first)"
        raise CheckpointError(
            f"VAE weights do not fit the diffusers AutoencoderKL layout of {config}{hint}: " + "; ".join(problems)
        )
    return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(params))


# ---- loading -----------------------------------------------------------------------------------
def _read_weights(path: epath.Path) -> dict[str, np.ndarray]:
    """A diffusers weight file (local or remote) as float32 arrays; every unreadable file
    gives one CheckpointError line. No code from the file runs (see convert.torch_io)."""
    from skipdit_jax.convert.torch_io import load_torch_checkpoint

    if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
        raise CheckpointError(f"unsupported VAE weight file {path}: expected .safetensors or .bin")
    return load_torch_checkpoint(path)


def _find_weights(directory: epath.Path) -> epath.Path:
    for name in _WEIGHT_FILES:
        if (directory / name).exists():
            return directory / name
    raise CheckpointError(f"no VAE weights in {directory}: expected one of {', '.join(_WEIGHT_FILES)}")


def read_diffusers_config(path: epath.Path, config_cls, class_name: str, **overrides):
    """`config_cls.from_diffusers_config` of the JSON object in `path`; a file that is not
    JSON, not an object or not a `class_name` config is one ConfigError line."""
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} does not hold a JSON object (found {type(config).__name__})")
    try:
        return config_cls.from_diffusers_config(config, **overrides)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path} is not a diffusers {class_name} config: {e}") from None


def _read_config(path: epath.Path, **overrides) -> VAEConfig:
    return read_diffusers_config(path, VAEConfig, "AutoencoderKL", **overrides)


def load_vae(
    path_or_spec: paths.PathLike,
    *,
    dtype: str = "float32",
    revision: str | None = None,
    cache_dir: str | None = None,
) -> tuple[VAEConfig, dict]:
    """Loads a diffusers AutoencoderKL checkpoint -> (VAEConfig, Flax params).

    `path_or_spec` is one of
      - a directory (local or remote, e.g. gs://) in diffusers layout: config.json + diffusion_pytorch_model.safetensors
        (or .bin); a pipeline directory with a `vae/` subfolder also works;
      - a single .safetensors (or .bin) file: its config is a config.json beside it, else the
        SD VAE preset;
      - "hf://org/repo" or "hf://org/repo/subfolder" (e.g. "hf://stabilityai/sd-vae-ft-mse"),
        fetched with huggingface_hub (only the config and one weight file). HubUnavailableError
        (a RuntimeError and a UserError) if the
        Hub cannot be reached and the files are not cached.
    `dtype` is the compute dtype recorded in the returned config.
    """
    spec = str(path_or_spec) if isinstance(path_or_spec, epath.Path) else os.fspath(path_or_spec)
    if hub.is_hub_spec(spec):
        repo, sub = hub.parse_hub_spec(spec, "hf://stabilityai/sd-vae-ft-mse")
        path = hub.fetch_folder(
            repo, sub, [[name] for name in _WEIGHT_FILES], revision=revision, cache_dir=cache_dir,
            instead="a local path: a diffusers VAE directory (config.json + diffusion_pytorch_model.safetensors) "
            "or a .safetensors file",
        )
    else:
        path = paths.as_path(spec)
        if not path.exists():
            raise CheckpointError(f"VAE checkpoint {path} does not exist")

    if path.is_dir():
        if not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
            path = path / "vae"
        if not (path / "config.json").exists():
            raise CheckpointError(f"no config.json in VAE directory {path}")
        config = _read_config(path / "config.json", dtype=dtype)
        weights = _find_weights(path)
    else:
        beside = path.parent / "config.json"
        config = _read_config(beside, dtype=dtype) if beside.exists() else VAEConfig.sd_vae(dtype=dtype)
        weights = path
    return config, vae_params_from_diffusers(_read_weights(weights), config)
