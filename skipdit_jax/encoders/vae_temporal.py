"""Stable Video Diffusion's temporal VAE (diffusers' `AutoencoderKLTemporalDecoder`) in Flax, channels-last.

Latte's text-to-video pipeline decodes with this VAE by default (`enable_vae_temporal_decoder=True`,
the `vae_temporal_decoder` folder of maxin-cn/Latte-1). Its encoder is the plain Stable Diffusion
encoder (reused from `vae.py`); its decoder is the SD decoder with video layers added:

    conv_in -> mid_block (st-resnet, self-attention, st-resnet) -> up_blocks[i] (layers_per_block + 1
    st-resnets, nearest-2x upsampler except the last) -> GroupNorm, SiLU -> conv_out -> time_conv_out

where an st-resnet is a per-frame resnet followed by a temporal resnet (GroupNorm over frames and
pixels, convs with a (3, 1, 1) kernel along time) blended with it by a learned scalar:
out = (1 - sigmoid(m)) * spatial + sigmoid(m) * temporal. `time_conv_out` is a (3, 1, 1) conv too.
So every output frame depends on its neighbours and on normalisation statistics of all frames
decoded together: the result depends on how the frames are chunked, and
`decode_video_latents_temporal` chunks exactly as Latte's pipeline does (14 frames per call).
Differences from the SD VAE: no post_quant_conv, and every GroupNorm has 32 groups (diffusers
hard-codes it). Parameter names follow diffusers (`up_blocks_0` holds `up_blocks.0`).

    config, params = load_temporal_vae("hf://maxin-cn/Latte-1/vae_temporal_decoder")
    video = decode_video_latents_temporal(params, config, latents)   # (B, F, H, W, 3), ~[-1, 1]
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from skipdit_jax import hub, paths
from skipdit_jax.encoders import vae as sd_vae
from skipdit_jax.errors import CheckpointError, ConfigError, UserError

__all__ = [
    "TemporalVAEConfig",
    "AutoencoderKLTemporalDecoder",
    "temporal_vae_key_shapes",
    "temporal_vae_params_from_diffusers",
    "temporal_vae_params_to_diffusers",
    "load_temporal_vae",
    "decode_video_latents_temporal",
    "encode_video_to_latents",
]

_GROUPS = 32  # diffusers' TemporalDecoder hard-codes 32 groups in every GroupNorm
_TEMPORAL_EPS = 1e-5  # the temporal resnets' GroupNorms (the spatial ones use 1e-6)
_SUBFOLDER = "vae_temporal_decoder"  # where Latte's pipeline folder keeps this VAE
# diffusers' constructor defaults, used for keys a config.json leaves out (as diffusers does).
_DIFFUSERS_DEFAULTS = dict(block_out_channels=(64,), layers_per_block=1)


@dataclasses.dataclass(frozen=True)
class TemporalVAEConfig:
    """Architecture of an `AutoencoderKLTemporalDecoder`, named as in diffusers' `config.json`.

    Defaults are SVD's (and Latte-1's `vae_temporal_decoder`): widths (128, 256, 512, 512), 2 resnets
    per level, 4 latent channels, scaling factor 0.18215, 8x downsampling. Widths must be multiples
    of 32 (the fixed GroupNorm group count). Hashable, so it can be a static argument of `jax.jit`.
    `dtype` is the compute dtype ("float32" or "bfloat16"); params and GroupNorms stay float32.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    scaling_factor: float = 0.18215
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        try:  # the SD VAE's checks: positive sizes, widths multiples of the 32 groups, dtype, scaling factor
            self.encoder_config  # noqa: B018
        except ConfigError as e:
            raise ConfigError(str(e).replace("invalid VAE config", "invalid temporal VAE config")) from None

    @classmethod
    def svd(cls, **overrides) -> TemporalVAEConfig:
        """The SVD / Latte-1 temporal VAE."""
        return cls(**overrides)

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], **overrides) -> TemporalVAEConfig:
        """Reads a diffusers `AutoencoderKLTemporalDecoder` config.json dict; `overrides` (e.g. dtype) win."""
        name = config.get("_class_name", "AutoencoderKLTemporalDecoder")
        if name != "AutoencoderKLTemporalDecoder":
            hint = " (an AutoencoderKL loads with skipdit_jax.encoders.vae.load_vae)" if name == "AutoencoderKL" else ""
            raise ConfigError(f"VAE config is for {name!r}, not diffusers' AutoencoderKLTemporalDecoder{hint}")
        merged = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        n = len(merged["block_out_channels"])
        got = list(merged.get("down_block_types", ["DownEncoderBlock2D"] * n))
        if got != ["DownEncoderBlock2D"] * n:
            raise ConfigError(f"temporal VAE config down_block_types={got}: only {n} x 'DownEncoderBlock2D' is supported")
        kwargs = {f.name: merged[f.name] for f in dataclasses.fields(cls) if f.name in merged and f.name != "dtype"}
        return cls(**{**kwargs, **overrides})

    @property
    def encoder_config(self) -> sd_vae.VAEConfig:
        """The SD VAE config whose encoder + quant_conv this VAE shares."""
        return sd_vae.VAEConfig(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            latent_channels=self.latent_channels,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            norm_num_groups=_GROUPS,
            scaling_factor=self.scaling_factor,
            use_post_quant_conv=False,
            dtype=self.dtype,
        )

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def replace(self, **changes) -> TemporalVAEConfig:
        return dataclasses.replace(self, **changes)


# ---- modules (video tensors are (B, F, H, W, C)) ----------------------------------------------------
def _per_frame(fn, x: jax.Array) -> jax.Array:
    """Applies an image function (N, H, W, C) -> (N, H', W', C') to every frame of x."""
    b, f = x.shape[:2]
    y = fn(x.reshape(b * f, *x.shape[2:]))
    return y.reshape(b, f, *y.shape[1:])


def _time_conv(features: int, dtype, name: str) -> nn.Conv:
    """torch's Conv3d(kernel (3, 1, 1), padding (1, 0, 0)): mixes each frame with its two neighbours,
    zero-padded at the ends of the chunk."""
    return nn.Conv(features, (3, 1, 1), padding=((1, 1), (0, 0), (0, 0)), dtype=dtype, param_dtype=jnp.float32, name=name)


class TemporalResnetBlock(nn.Module):
    """diffusers' TemporalResnetBlock without a time embedding (width preserving, as in the decoder)."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(sd_vae._group_norm(x, _GROUPS, "norm1", _TEMPORAL_EPS))
        h = _time_conv(self.channels, self.dtype, "conv1")(h)
        h = nn.silu(sd_vae._group_norm(h, _GROUPS, "norm2", _TEMPORAL_EPS))
        return x + _time_conv(self.channels, self.dtype, "conv2")(h)


class TimeMixer(nn.Module):
    """diffusers' AlphaBlender, merge_strategy "learned", switch_spatial_to_temporal_mix=True."""

    @nn.compact
    def __call__(self, spatial, temporal):
        mix = self.param("mix_factor", nn.initializers.zeros, (1,), jnp.float32)  # diffusers' merge_factor=0
        alpha = (1.0 - jax.nn.sigmoid(mix)).astype(spatial.dtype)
        return alpha * spatial + (1.0 - alpha) * temporal


class SpatioTemporalResBlock(nn.Module):
    """Per-frame SD resnet, then a temporal resnet on its output, blended by the time mixer."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        spatial = _per_frame(sd_vae.ResnetBlock(self.channels, _GROUPS, self.dtype, name="spatial_res_block"), x)
        temporal = TemporalResnetBlock(self.channels, self.dtype, name="temporal_res_block")(spatial)
        return TimeMixer(name="time_mixer")(spatial, temporal)


class MidBlockTemporalDecoder(nn.Module):
    """st-resnet -> per-frame self-attention -> st-resnet.

    diffusers builds `num_layers` resnets and one attention but its forward runs only resnets[0]
    and, when num_layers >= 2, attention + resnets[1]. The modules it never runs are created at
    init only, so the params mirror the checkpoint and nothing they hold affects the output.
    """

    channels: int
    num_layers: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        resnets = [SpatioTemporalResBlock(self.channels, self.dtype, name=f"resnets_{j}") for j in range(self.num_layers)]
        attention = sd_vae.Attention(_GROUPS, self.dtype, name="attentions_0")
        x = resnets[0](x)
        if self.num_layers >= 2:
            x = resnets[1](_per_frame(attention, x))
        elif self.is_initializing():
            _per_frame(attention, x)
        if self.is_initializing():
            for dead in resnets[2:]:
                dead(x)
        return x


class UpBlockTemporalDecoder(nn.Module):
    """`num_resnets` st-resnets, then (unless the last level) a per-frame nearest-2x upsampler + conv."""

    channels: int
    num_resnets: int
    upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_resnets):
            x = SpatioTemporalResBlock(self.channels, self.dtype, name=f"resnets_{j}")(x)
        if self.upsample:
            x = _per_frame(sd_vae.Upsample(self.channels, self.dtype, name="upsamplers_0"), x)
        return x


class TemporalDecoder(nn.Module):
    """Unscaled latent video (B, F, h, w, latent) -> video (B, F, h*f, w*f, out_channels), all F frames
    decoded together (the temporal layers see exactly these frames)."""

    config: TemporalVAEConfig

    @nn.compact
    def __call__(self, z):
        cfg, dt = self.config, self.config.compute_dtype
        widths = tuple(reversed(cfg.block_out_channels))
        h = _per_frame(sd_vae._conv(widths[0], 3, dt, "conv_in"), z)
        h = MidBlockTemporalDecoder(widths[0], cfg.layers_per_block, dt, name="mid_block")(h)
        for i, width in enumerate(widths):
            h = UpBlockTemporalDecoder(width, cfg.layers_per_block + 1, i < len(widths) - 1, dt, name=f"up_blocks_{i}")(h)
        h = _per_frame(lambda y: nn.silu(sd_vae._group_norm(y, _GROUPS, "conv_norm_out")), h)
        h = _per_frame(sd_vae._conv(cfg.out_channels, 3, dt, "conv_out"), h)
        return _time_conv(cfg.out_channels, dt, "time_conv_out")(h)


class AutoencoderKLTemporalDecoder(nn.Module):
    """`method="encode"`: images (N, H, W, C) -> (mean, logvar) (the SD encoder, per image);
    `method="decode"`: unscaled latents (B, F, h, w, C) -> video, float32; `__call__` (for init)
    reconstructs a video (B, F, H, W, C) from the posterior means."""

    config: TemporalVAEConfig

    def setup(self):
        self.encoder = sd_vae.Encoder(self.config.encoder_config)
        self.quant_conv = sd_vae._conv(2 * self.config.latent_channels, 1, self.config.compute_dtype)
        self.decoder = TemporalDecoder(self.config)

    def encode(self, x):
        moments = self.quant_conv(self.encoder(x.astype(self.config.compute_dtype)))
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution

    def decode(self, z):
        return self.decoder(z.astype(self.config.compute_dtype)).astype(jnp.float32)

    def __call__(self, video):
        return self.decode(_per_frame(lambda x: self.encode(x)[0], video))


# ---- encode / decode ----------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=1)
def _decode_chunk(params, config: TemporalVAEConfig, latents):
    # The pipeline multiplies by 1 / scaling_factor (not a division): same rounding here.
    z = latents * (1.0 / config.scaling_factor)
    return AutoencoderKLTemporalDecoder(config).apply({"params": params}, z, method=AutoencoderKLTemporalDecoder.decode)


def decode_video_latents_temporal(
    params, config: TemporalVAEConfig, latents: jax.Array, chunk_frames: int = 14, *, flatten_batch: bool = False
) -> jax.Array:
    """Scaled video latents (B, F, h, w, latent) -> video (B, F, H, W, out_channels), float32, nominally
    in [-1, 1] and not clipped (clip when converting to pixels, as the pipeline does).

    Frames are decoded in consecutive chunks of `chunk_frames` (the last may be shorter), each chunk
    one decoder call whose temporal layers see only its frames, exactly like Latte's
    `decode_latents_with_temporal_decoder` (chunk 14, num_frames = frames in the chunk). By default
    each video is chunked on its own, which is the pipeline's behaviour for one video per call.
    `flatten_batch=True` reproduces the pipeline for B > 1 too: it chunks the flattened (B*F) frame
    axis, so a chunk may hold the end of one video and the start of the next. Each chunk shape is
    jitted once; the chunks are dispatched without waiting for one another.
    """
    if latents.ndim != 5 or latents.shape[-1] != config.latent_channels:
        raise UserError(f"video latents must be (B, F, h, w, {config.latent_channels}), got shape {tuple(latents.shape)}")
    if int(chunk_frames) < 1:
        raise UserError(f"chunk_frames must be >= 1, got {chunk_frames}")
    b, f = latents.shape[:2]
    x = latents.reshape(1, b * f, *latents.shape[2:]) if flatten_batch else latents
    n = x.shape[1]
    chunks = [_decode_chunk(params, config, x[:, s : s + chunk_frames]) for s in range(0, n, int(chunk_frames))]
    y = chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, axis=1)
    return y.reshape(b, f, *y.shape[2:])


@functools.partial(jax.jit, static_argnums=1)
def encode_video_to_latents(params, config: TemporalVAEConfig, video: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Video (B, F, H, W, C) in [-1, 1] -> scaled latents (B, F, h, w, latent), frame by frame (the
    encoder is the image encoder): z * scaling_factor, z the posterior sample with `rng`, else its mean.
    Jitted (one compile per input shape)."""
    model = AutoencoderKLTemporalDecoder(config)
    mean, logvar = model.apply(
        {"params": params}, video.reshape(-1, *video.shape[2:]), method=AutoencoderKLTemporalDecoder.encode
    )
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return (z * config.scaling_factor).reshape(*video.shape[:2], *z.shape[1:])


# ---- diffusers weights <-> Flax params -----------------------------------------------------------------
@functools.lru_cache(maxsize=8)  # tracing the whole model takes a second; configs are hashable
def _flax_param_shapes(config: TemporalVAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened Flax path -> shape (read only: the dict is shared between calls)."""
    side = 2 * config.downsample_factor
    x = jax.ShapeDtypeStruct((1, 1, side, side, config.in_channels), jnp.float32)
    tree = jax.eval_shape(lambda x: AutoencoderKLTemporalDecoder(config).init(jax.random.key(0), x)["params"], x)
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(tree).items()}


def _torch_key(path: tuple[str, ...]) -> str:
    """Flax path -> diffusers key, as in vae.py plus the time mixers' `mix_factor`."""
    if path[-1] == "mix_factor":
        return sd_vae._torch_key((*path[:-1], "bias"))[: -len("bias")] + "mix_factor"
    return sd_vae._torch_key(path)


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 5:  # (3, 1, 1, in, out) -> torch Conv3d (out, in, 3, 1, 1)
        return (shape[4], shape[3], *shape[:3])
    return sd_vae._torch_shape(shape)


def temporal_vae_key_shapes(config: TemporalVAEConfig) -> dict[str, tuple[int, ...]]:
    """diffusers state-dict keys and torch shapes of an AutoencoderKLTemporalDecoder with this config."""
    return {_torch_key(p): _torch_shape(s) for p, s in _flax_param_shapes(config).items()}


def temporal_vae_params_from_diffusers(state_dict: dict[str, Any], config: TemporalVAEConfig) -> dict:
    """diffusers AutoencoderKLTemporalDecoder state dict -> Flax params (float32).

    Every key of the model must be present with its exact shape and no other key may be present,
    else one CheckpointError line names the missing / unexpected / wrongly shaped keys. The old
    attention names (query/key/value/proj_attn) and 1x1-conv attention kernels are accepted.
    """
    renamed: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        m = sd_vae._OLD_ATTENTION_RE.match(key)
        renamed[f"{m[1]}{sd_vae._OLD_ATTENTION_NAMES[m[2]]}.{m[3]}" if m else key] = np.asarray(value)
    shapes = _flax_param_shapes(config)
    expected = {_torch_key(p): p for p in shapes}
    missing, unexpected = set(expected) - set(renamed), set(renamed) - set(expected)
    params, wrong = {}, []
    for key in sorted(set(expected) & set(renamed)):
        path, value = expected[key], renamed[key]
        want = _torch_shape(shapes[path])
        if len(want) == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        if tuple(value.shape) != want:
            wrong.append(f"{key}: got {tuple(value.shape)}, expected {want}")
            continue
        axes = {5: (2, 3, 4, 1, 0), 4: (2, 3, 1, 0), 2: (1, 0)}.get(value.ndim)
        params[path] = (value.transpose(axes) if axes else value).astype(np.float32)
    problems = [
        f"{what}: {sd_vae._list_for_error(keys)}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrongly shaped keys", wrong))
        if keys
    ]
    if problems:
        hint = ""
        if "post_quant_conv.weight" in unexpected or any(".resnets.0.conv1." in k for k in unexpected):
            hint = " (these look like plain AutoencoderKL weights: load them with skipdit_jax.encoders.vae.load_vae)"
        raise CheckpointError(
            f"weights do not fit the diffusers AutoencoderKLTemporalDecoder of {config}{hint}: " + "; ".join(problems)
        )
    return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(params))


def temporal_vae_params_to_diffusers(params) -> dict[str, np.ndarray]:
    """Flax params -> diffusers state dict (torch layouts, float32 numpy), loadable with strict=True."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value, np.float32)
        axes = {5: (4, 3, 0, 1, 2), 4: (3, 2, 0, 1), 2: (1, 0)}.get(value.ndim)
        out[_torch_key(path)] = np.ascontiguousarray(value.transpose(axes) if axes else value)
    return out


# ---- loading ----------------------------------------------------------------------------------------
def _read_config(path: epath.Path, **overrides) -> TemporalVAEConfig:
    return sd_vae.read_diffusers_config(path, TemporalVAEConfig, "AutoencoderKLTemporalDecoder", **overrides)


def load_temporal_vae(
    path_or_spec: paths.PathLike, *, dtype: str = "float32", revision: str | None = None, cache_dir: str | None = None
) -> tuple[TemporalVAEConfig, dict]:
    """Loads a diffusers AutoencoderKLTemporalDecoder -> (TemporalVAEConfig, Flax params).

    `path_or_spec`: a diffusers folder (config.json + diffusion_pytorch_model.safetensors or .bin,
    local or remote), a pipeline folder holding `vae_temporal_decoder/`, a single weight file (config.json
    beside it, else the SVD preset), or "hf://org/repo/subfolder" such as
    "hf://maxin-cn/Latte-1/vae_temporal_decoder" (only config.json and one weight file are fetched;
    HubUnavailableError when offline and not cached). `dtype` is the compute dtype.
    """
    spec = str(path_or_spec) if isinstance(path_or_spec, epath.Path) else os.fspath(path_or_spec)
    if hub.is_hub_spec(spec):
        repo, sub = hub.parse_hub_spec(spec, f"hf://maxin-cn/Latte-1/{_SUBFOLDER}")
        try:
            path = hub.fetch_folder(
                repo, sub, [[name] for name in sd_vae._WEIGHT_FILES], revision=revision, cache_dir=cache_dir,
                instead=f"a local path (download the {_SUBFOLDER}/ folder elsewhere)",
            )
        except CheckpointError as e:
            if sub or isinstance(e, RuntimeError):  # RuntimeError: HubUnavailableError
                raise
            raise CheckpointError(
                f"{e} (in a pipeline repo, name the VAE's subfolder: {spec.rstrip('/')}/{_SUBFOLDER})"
            ) from None
    else:
        path = paths.as_path(spec)
        if not path.exists():
            raise CheckpointError(f"temporal VAE checkpoint {path} does not exist")
    if path.is_dir():
        if not (path / "config.json").exists() and (path / _SUBFOLDER / "config.json").exists():
            path = path / _SUBFOLDER
        if not (path / "config.json").exists():
            raise CheckpointError(f"no config.json in temporal VAE folder {path}")
        config, weights = _read_config(path / "config.json", dtype=dtype), sd_vae._find_weights(path)
    else:
        beside = path.parent / "config.json"
        config = _read_config(beside, dtype=dtype) if beside.exists() else TemporalVAEConfig.svd(dtype=dtype)
        weights = path
    return config, temporal_vae_params_from_diffusers(sd_vae._read_weights(weights), config)
