"""Latte and Latte-skip (class-to-video) in Flax linen, channels-last.

A video (B, F, H, W, C) becomes per-frame patch tokens (+ the 2-D sin-cos position table);
the transformer is a sequence of P *pairs* of adaLN-Zero blocks (`DiTBlock`):

    spatial block   on (B*F, T, D)  -- the T tokens of one frame attend to each other
    temporal block  on (B*T, F, D)  -- one token position attends across the F frames

The frozen 1-D sin-cos `temp_embed` (F, D) is added once, after the spatial block of pair 0.
Spatial blocks and the final layer take c = t_emb (+ y_emb) per frame, temporal blocks the
same vector per token position. Hidden states between pairs are in the spatial layout.

Joint image-video training (the official `latte_img.py`): an input may hold more frames
than `num_frames`; the first `num_frames` are the video, the rest independent images.
Images go through every spatial block (and the fusions and the final layer) but not the
temporal blocks and get no `temp_embed`: after each spatial block they are split off and
put back behind the video frames. They are part of the skip features.

Parameters are stacked over pairs: `encoder_pairs` holds pairs 0..P/2-1, `decoder_pairs`
the rest, each as {"spatial": block, "temporal": block} with a leading pair axis; Latte-skip
adds `skip_fusions`, one per decoder pair. Decoder pair P/2 + j first fuses its input with
the output of encoder pair P/2-1-j (pair p <-> pair P-1-p), `Linear(LN(concat([x, skip])))`
in the spatial layout, before its spatial block. At 28 blocks this is the official
hard-coded `skip_linears[(i - 14) // 2]`.

The deep-feature cache counts pairs: the deep feature is the hidden state entering pair P-k
(before its fusion), stored as (B, F, T, D); a shallow pass runs pairs 0..k-1, then pairs
P-k..P-1 from the cached feature, each fusing its fresh shallow skip.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.errors import ConfigError, UserError
from skipdit_jax.models.config import ArchitectureConfig
from skipdit_jax.models.dit import DiTBlock, FinalLayer
from skipdit_jax.models.family import ClassConditionalFamily
from skipdit_jax.models.layers import get_2d_sincos_pos_embed, layer_norm, modulate, normal002, timestep_features
from skipdit_jax.models.skip import SkipFusion, remat, scan_blocks, stacked_init

# (depth in blocks, hidden_size, num_heads) of the Latte presets (Latte_models).
_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
_SKIP_INITS = ("xavier", "torch_default")


def get_1d_sincos_temp_embed(dim: int, length: int) -> np.ndarray:
    """Latte's frame table (length, dim), float64: [sin(f w), cos(f w)], w_i = 10000^(-i/(dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.arange(length, dtype=np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@dataclasses.dataclass(frozen=True)
class LatteConfig(ArchitectureConfig):
    """Architecture of a Latte / Latte-skip (the fields mean what they mean in `ModelConfig`).

    Attributes beyond DiT's:
      depth: transformer *blocks* (2 per pair; even). Latte-skip needs an even number of pairs.
      num_frames: F, the length of the frozen temporal table (16 in the releases): the
        video frames of an input (any further frames are joint-training images).
      joint_images: images per video in a training batch (joint image-video training, the
        official `use_image_num`); only `LatteFamily.batch_spec` uses it.
      num_classes: 101 for UCF-101 (+ the null label); 0 = unconditional (no label table).
      skip_init: "xavier" (the official c2v code: xavier-uniform weight, zero bias) or
        "torch_default".
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_frames: int = 16
    joint_images: int = 0
    num_classes: int = 101
    learn_sigma: bool = True
    long_skip: bool = False
    skip_init: str = "xavier"
    dtype: str = "float32"
    attention_impl: str | None = None
    remat_policy: str = "none"
    scan_unroll: int = 1

    family: ClassVar[str] = "latte"
    config_label: ClassVar[str] = "Latte"
    positive_fields: ClassVar[tuple[str, ...]] = (
        "input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_frames",
    )
    skip_inits: ClassVar[tuple[str, ...]] = _SKIP_INITS
    remat_before_mlp_ratio: ClassVar[bool] = False

    # ---- derived quantities -------------------------------------------------------------
    @property
    def num_pairs(self) -> int:
        return self.depth // 2

    @property
    def num_encoder_pairs(self) -> int:
        return self.num_pairs // 2

    def validate_layout(self) -> None:
        if self.depth % 2 or self.depth < 4:
            self._invalid(f"depth counts blocks, two per (spatial, temporal) pair: it must be even and >= 4, got {self.depth}")
        if self.long_skip and self.num_pairs % 2:
            self._invalid(
                f"long skips pair pair p with pair P-1-p, so the number of pairs must be even, "
                f"got {self.num_pairs} (depth {self.depth})"
            )
        if int(self.joint_images) != self.joint_images or self.joint_images < 0:
            self._invalid(f"joint_images must be an integer >= 0, got {self.joint_images}")


_PRESET_RE = re.compile(r"^Latte-(S|B|L|XL)/(2|4|8)(-skip)?$")


def latte_preset_names() -> list[str]:
    return [f"Latte-{size}/{p}{s}" for s in ("", "-skip") for size in _SIZES for p in (2, 4, 8)]


def latte_preset(name: str, **overrides) -> LatteConfig:
    """`LatteConfig` of "Latte-XL/2", "Latte-XL/2-skip", ... ("Latte-skip" = "Latte-XL/2-skip").

    Presets are the official UCF-101 setting: 16 frames of 32x32x4 latents, 101 classes,
    learned sigma; pass num_classes=0 for the unconditional (Sky, Taichi, FFS) models.
    """
    if name == "Latte-skip":
        name = "Latte-XL/2-skip"
    m = _PRESET_RE.match(name)
    if not m:
        raise ConfigError(f"unknown Latte preset {name!r}; known presets: {', '.join(latte_preset_names())}")
    depth, width, heads = _SIZES[m.group(1)]
    kw = dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=int(m.group(2)), long_skip=bool(m.group(3)))
    kw.update(overrides)
    return LatteConfig(**kw)


class Latte(nn.Module):
    """Latte / Latte-skip. `apply({"params": p}, x, t, y) -> (B, F_total, H, W, out_channels)`.

    x: (B, F_total, H, W, C) channels-last, F_total >= num_frames: the first num_frames
    frames are the video, any further frames independent images (joint training, see the
    module docstring); t: (B,) timesteps on the 0..999 scale; y: class ids (num_classes =
    the null label), None for an unconditional model. `y_images` (B, F_total - num_frames),
    optional, are the images' own class ids (the official `y_image`); by default an image
    takes its video's label. Output float32.
    """

    config: LatteConfig

    def setup(self):
        cfg = self.config
        d, p = cfg.hidden_size, cfg.patch_size
        dt = cfg.compute_dtype
        self.x_embedder = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dt,
            kernel_init=nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
            name="x_embedder",
        )
        self.t_mlp_0 = nn.Dense(d, dtype=dt, kernel_init=normal002, name="t_embedder_mlp_0")
        self.t_mlp_2 = nn.Dense(d, dtype=dt, kernel_init=normal002, name="t_embedder_mlp_2")
        if cfg.num_classes:
            self.y_embedder = nn.Embed(cfg.num_classes + 1, d, embedding_init=normal002, name="y_embedder")
        n_enc = cfg.num_encoder_pairs
        pair = _Pair(cfg, parent=None)
        x_ex = jnp.zeros((1, cfg.num_patches, d), dt)
        c_ex = jnp.zeros((1, d), dt)
        self.encoder_pairs = self.param("encoder_pairs", stacked_init(pair, n_enc, x_ex, c_ex))
        self.decoder_pairs = self.param("decoder_pairs", stacked_init(pair, cfg.num_pairs - n_enc, x_ex, c_ex))
        if cfg.long_skip:
            self.skip_fusions = self.param("skip_fusions", stacked_init(_skip_fusion(cfg), n_enc, x_ex, x_ex))
        self.final_layer = FinalLayer(cfg, name="final_layer")
        self.pos_embed = jnp.asarray(get_2d_sincos_pos_embed(d, cfg.grid_size), jnp.float32)[None]
        self.temp_embed = jnp.asarray(get_1d_sincos_temp_embed(d, cfg.num_frames), jnp.float32)[None]

    # ---- pieces ------------------------------------------------------------------------
    def check_input(self, x):
        cfg = self.config
        want = (cfg.input_size, cfg.input_size, cfg.in_channels)
        if x.ndim != 5 or tuple(x.shape[2:]) != want or x.shape[1] < cfg.num_frames:
            raise UserError(
                f"a Latte model takes video latents of shape (batch, frames, {', '.join(map(str, want))}) "
                f"(batch, frames, height, width, channels) with frames >= {cfg.num_frames} (the video; "
                f"any further frames are joint-training images), got {tuple(x.shape)}"
            )

    def embed(self, x, t, y):
        """Tokens h (B*F_total, T, D), spatial layout, and the conditioning vector c (B, D)."""
        h = self.tokens(x)
        return h, self.condition(t, y)

    def tokens(self, x):
        cfg = self.config
        self.check_input(x)
        b, f = x.shape[:2]
        frames = x.reshape(b * f, *x.shape[2:]).astype(cfg.compute_dtype)
        tokens = self.x_embedder(frames).reshape(b * f, cfg.num_patches, cfg.hidden_size)
        return (tokens.astype(jnp.float32) + self.pos_embed).astype(cfg.compute_dtype)

    def condition(self, t, y, y_images=None):
        """c = t_emb (+ y_emb), (B, D); with `y_images` (B, I) also the images' own vectors
        t_emb + y_image_emb, (B, I, D)."""
        t_emb = self.t_mlp_2(nn.silu(self.t_mlp_0(timestep_features(t))))
        if not self.config.num_classes:
            return t_emb if y_images is None else (t_emb, None)
        c = t_emb + self.y_embedder(y).astype(t_emb.dtype)
        if y_images is None:
            return c
        return c, t_emb[:, None] + self.y_embedder(y_images).astype(t_emb.dtype)

    def frame_conditions(self, c, c_images, frames: int):
        """The per-frame vector of spatial blocks and the final layer, (B*frames, D): the
        video frames take c, the images their own vectors (c when there are none)."""
        if c_images is None:
            return jnp.repeat(c, frames, axis=0)
        b, f = c.shape[0], self.config.num_frames
        per_frame = jnp.concatenate([jnp.broadcast_to(c[:, None], (b, f, c.shape[-1])), c_images.astype(c.dtype)], axis=1)
        return per_frame.reshape(b * frames, -1)

    def head(self, h, c, c_s=None):
        """Final layer on the spatial layout (B*F, T, D) -> (B, F, H, W, out_channels), f32;
        `c_s` (B*F, D) overrides the per-frame vector (c repeated over the frames)."""
        cfg = self.config
        b = c.shape[0]
        f = h.shape[0] // b
        tokens = self.final_layer(h, jnp.repeat(c, f, axis=0) if c_s is None else c_s)
        g, p, ch = cfg.grid_size, cfg.patch_size, cfg.out_channels
        x = tokens.reshape(b, f, g, g, p, p, ch).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, f, g * p, g * p, ch).astype(jnp.float32)

    def _pair_fn(self, c, c_s=None):
        cfg = self.config
        c_t = jnp.repeat(c, cfg.num_patches, axis=0)
        temp = self.temp_embed

        def fn(p, h, first):
            cs = jnp.repeat(c, h.shape[0] // c.shape[0], axis=0) if c_s is None else c_s
            return _Pair(cfg, parent=None).apply({"params": p}, h, cs, c_t, temp, first)

        return remat(fn, cfg.remat_policy)

    def run_encoder(self, h, c, lo: int, hi: int, c_s=None):
        """Encoder pairs lo..hi-1; returns (h, their outputs stacked) -- the skip features."""
        if hi <= lo:
            return h, None
        pair = self._pair_fn(c, c_s)
        keep = self.config.long_skip

        def step(h, p, first):
            h = pair(p, h, first)
            return h, (h if keep else None)

        firsts = jnp.arange(lo, hi) == 0
        return scan_blocks(step, h, self.encoder_pairs, lo, hi, extra_xs=firsts, unroll=self.config.scan_unroll)

    def run_decoder(self, h, c, lo: int, hi: int, skips, c_s=None):
        """Decoder pairs P/2+lo..P/2+hi-1; `skips` are the outputs of encoder pairs
        P/2-hi..P/2-1-lo in encoder order (pair P/2+j fuses the one of pair P/2-1-j)."""
        if hi <= lo:
            return h
        pair = self._pair_fn(c, c_s)
        no = jnp.asarray(False)
        if not self.config.long_skip:
            return scan_blocks(
                lambda h, p, _: (pair(p, h, no), None), h, self.decoder_pairs, lo, hi, unroll=self.config.scan_unroll
            )[0]
        fusion = _skip_fusion(self.config)

        def step(h, p, skip):
            p_pair, p_fuse = p
            return pair(p_pair, fusion.apply({"params": p_fuse}, h, skip), no), None

        stacked = (self.decoder_pairs, self.skip_fusions)
        return scan_blocks(step, h, stacked, lo, hi, extra_xs=skips[::-1], unroll=self.config.scan_unroll)[0]

    def _to_deep(self, h, batch: int):
        cfg = self.config
        return h.reshape(batch, -1, cfg.num_patches, cfg.hidden_size)

    def _from_deep(self, deep):
        cfg = self.config
        return deep.reshape(-1, cfg.num_patches, cfg.hidden_size)

    # ---- passes ------------------------------------------------------------------------
    def __call__(self, x, t, y=None, y_images=None):
        h = self.tokens(x)
        frames = x.shape[1]
        n_images = frames - self.config.num_frames
        if y_images is not None:
            if tuple(y_images.shape) != (x.shape[0], n_images):
                raise UserError(
                    f"y_images must have shape ({x.shape[0]}, {n_images}) (one class id per image), got {tuple(y_images.shape)}"
                )
            c, c_images = self.condition(t, y, y_images)
            c_s = self.frame_conditions(c, c_images, frames)
        else:
            c, c_s = self.condition(t, y), None
        n_enc, n_dec = self.config.num_encoder_pairs, self.config.num_pairs - self.config.num_encoder_pairs
        h, skips = self.run_encoder(h, c, 0, n_enc, c_s)
        h = self.run_decoder(h, c, 0, n_dec, skips, c_s)
        return self.head(h, c, c_s)

    def forward_full(self, x, t, y, shallow_pairs: int):
        """Full pass; also returns the deep feature (B, F, T, D): the hidden state entering
        pair P-k, before its fusion."""
        k = shallow_pairs
        cfg = self.config
        n_enc, n_dec = cfg.num_encoder_pairs, cfg.num_pairs - cfg.num_encoder_pairs
        h, c = self.embed(x, t, y)
        h, shallow_skips = self.run_encoder(h, c, 0, k)
        h, deep_skips = self.run_encoder(h, c, k, n_enc)
        deep = self.run_decoder(h, c, 0, n_dec - k, deep_skips)
        h = self.run_decoder(deep, c, n_dec - k, n_dec, shallow_skips)
        return self.head(h, c), self._to_deep(deep, x.shape[0])

    def forward_shallow(self, x, t, y, deep_feature, shallow_pairs: int):
        """The first k and last k pairs, the decoder side starting from a cached deep feature."""
        k = shallow_pairs
        cfg = self.config
        n_dec = cfg.num_pairs - cfg.num_encoder_pairs
        h, c = self.embed(x, t, y)
        _, shallow_skips = self.run_encoder(h, c, 0, k)
        h = self.run_decoder(self._from_deep(deep_feature).astype(h.dtype), c, n_dec - k, n_dec, shallow_skips)
        return self.head(h, c)


class _Pair(nn.Module):
    """One (spatial, temporal) pair on the spatial layout (B*F_total, T, D); only the first
    num_frames frames of each sample (the video) pass the temporal block."""

    config: LatteConfig

    def setup(self):
        self.spatial = DiTBlock(self.config)
        self.temporal = DiTBlock(self.config)

    def __call__(self, h, c_s, c_t=None, temp=None, first=None):
        cfg = self.config
        if c_t is None:  # initialisation: one frame, one token position
            return self.temporal(self.spatial(h, c_s), c_s)
        f, n, d = cfg.num_frames, cfg.num_patches, cfg.hidden_size
        b = c_t.shape[0] // n
        frames = h.shape[0] // b
        h = self.spatial(h, c_s).reshape(b, frames, n, d)
        video = h[:, :f] if frames > f else h
        v = video.transpose(0, 2, 1, 3).reshape(b * n, f, d)
        v = jnp.where(first, (v.astype(jnp.float32) + temp).astype(v.dtype), v)
        v = self.temporal(v, c_t).reshape(b, n, f, d).transpose(0, 2, 1, 3)
        if frames > f:  # the images skip the temporal block
            v = jnp.concatenate([v, h[:, f:]], axis=1)
        return v.reshape(b * frames, n, d)

def _skip_fusion(cfg: LatteConfig) -> SkipFusion:
    return SkipFusion(cfg.hidden_size, cfg.skip_init, cfg.compute_dtype, parent=None)


@functools.lru_cache(maxsize=16)
def _jitted_init(config: LatteConfig):
    x = np.zeros((1, config.num_frames, config.input_size, config.input_size, config.in_channels), np.float32)
    t = np.zeros((1,), np.int32)
    y = np.zeros((1,), np.int32) if config.num_classes else None
    return jax.jit(lambda rng: Latte(config).init(rng, x, t, y)["params"])


def init_latte_params(config: LatteConfig, rng: jax.Array | int = 0):
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return _jitted_init(config)(rng)


# Logical axes for `skipdit_jax.sharding` (as DiT's, with the pair level in the paths).
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"(encoder|decoder)_pairs/(spatial|temporal)/mlp/fc2/kernel", ("layers", "hidden", "embed")),
    (r"(encoder|decoder)_pairs/(spatial|temporal)/.*/kernel", ("layers", "embed", "hidden")),
    (r"(encoder|decoder)_pairs/(spatial|temporal)/.*/bias", ("layers", "hidden")),
    (r"skip_fusions/linear/kernel", ("layers", "hidden", "embed")),
    (r"skip_fusions/.*", ("layers", "hidden")),
    (r"y_embedder/embedding", ("vocab", "embed")),
    (r"x_embedder/kernel", (None, None, None, "embed")),
    (r"t_embedder_mlp_0/kernel", ("hidden", "embed")),
    (r"(t_embedder_mlp_2|final_layer/adaLN_modulation)/kernel", ("embed", "hidden")),
    (r"final_layer/linear/kernel", ("embed", None)),
]


@dataclasses.dataclass(frozen=True)
class LatteFamily(ClassConditionalFamily):
    """Latte / Latte-skip (class-to-video): samples (F, H, W, C); condition = class ids (B,)
    int32 with `num_classes` the null label, or None for an unconditional model. Cache
    units are (spatial, temporal) pairs. Training batches hold num_frames + joint_images
    frames (the video, then its joint images); sampling and the caches see videos only."""

    config: LatteConfig

    name: ClassVar[str] = "latte"
    config_cls: ClassVar[type] = LatteConfig

    module_cls: ClassVar[type] = Latte

    @property
    def sample_shape(self) -> tuple[int, ...]:
        c = self.config
        return (c.num_frames, c.input_size, c.input_size, c.in_channels)

    # ---- the condition (as DiT's) -------------------------------------------------------
    @property
    def _images_have_labels(self) -> bool:
        # Joint training of a class-conditional model: every image is conditioned on its
        # own class, as the official `y_image` (images come from videos of any class).
        return self.is_conditional and self.config.joint_images > 0

    def condition_from_batch(self, batch: dict):
        """Class ids (B,); with joint images of a class-conditional model, {"label": (B,),
        "image_labels": (B, joint_images)}. Condition dropout (`drop_condition`) drops a
        video's label and its images' labels together (the official code drops each
        image label independently)."""
        if not self.is_conditional:
            return None
        label = batch["label"].astype(jnp.int32)
        if self._images_have_labels:
            return {"label": label, "image_labels": batch["image_labels"].astype(jnp.int32)}
        return label

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """"image": (B, num_frames + joint_images, H, W, C), the video then its joint images;
        "label" (B,); "image_labels" (B, joint_images) for a class-conditional model with
        joint images."""
        c = self.config
        frames = c.num_frames + c.joint_images
        spec = {
            "image": jax.ShapeDtypeStruct((batch_size, frames, *self.sample_shape[1:]), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
        }
        if self._images_have_labels:
            spec["image_labels"] = jax.ShapeDtypeStruct((batch_size, c.joint_images), jnp.int32)
        return spec

    # ---- passes -------------------------------------------------------------------------
    def apply(self, params, x, t, condition):
        if isinstance(condition, dict):  # a joint image-video training batch
            return self.module.apply({"params": params}, x, t, condition["label"], condition["image_labels"])
        return self.module.apply({"params": params}, x, t, condition)

    @property
    def cache_units(self) -> int:
        return self.config.num_encoder_pairs

    @property
    def depth_units(self) -> int:
        return self.config.num_pairs

    def deep_feature_shape(self, batch: int) -> tuple[int, ...]:
        c = self.config
        return (batch, c.num_frames, c.num_patches, c.hidden_size)

    @property
    def param_axes(self):
        return PARAM_AXES

    # ---- pieces for the other cache strategies (units = (spatial, temporal) pairs) ------
    # Between pairs the hidden state is in the spatial layout (B*F, T, D); a pair's spatial
    # block sees c per frame, its temporal block (on (B*T, F, D)) c per token position, and
    # pair 0 adds temp_embed between the two. Caches see videos only (no joint images).
    attention_kinds: ClassVar[tuple[str, ...]] = ("spatial", "temporal")

    def embed(self, params, x, t, condition):
        """(tokens h (B*F, T, D) in the spatial layout, conditioning vector c (B, D))."""
        return self.module.apply({"params": params}, x, t, condition, method=Latte.embed)

    def head(self, params, h, c):
        return self.module.apply({"params": params}, h, c, method=Latte.head)

    def hidden_shape(self, batch: int) -> tuple[int, ...]:
        c = self.config
        return (batch * c.num_frames, c.num_patches, c.hidden_size)

    def unit_stacks(self, params) -> tuple:
        return params["encoder_pairs"], params["decoder_pairs"]

    def run_units(self, params, h, c, lo: int, hi: int):
        """Pairs lo..hi-1 (global indices) of a model without long skips."""
        n_enc = self.config.num_encoder_pairs

        def run(module, h, c):
            if lo < n_enc:
                h, _ = module.run_encoder(h, c, lo, min(hi, n_enc))
            if hi > n_enc:
                h = module.run_decoder(h, c, max(lo, n_enc) - n_enc, hi - n_enc, None)
            return h

        return self.module.apply({"params": params}, h, c, method=run)

    def branch_shapes(self, batch: int):
        """Per block of the pair, (attention, MLP) stacked: spatial (2, B*F, T, D), temporal (2, B*T, F, D)."""
        c = self.config
        return {
            "spatial": (2, batch * c.num_frames, c.num_patches, c.hidden_size),
            "temporal": (2, batch * c.num_patches, c.num_frames, c.hidden_size),
        }

    def _block(self, block_params, *args, method):
        return DiTBlock(self.config, parent=None).apply({"params": block_params}, *args, method=method)

    def _pair_conditions(self, c):
        cfg = self.config
        return jnp.repeat(c, cfg.num_frames, axis=0), jnp.repeat(c, cfg.num_patches, axis=0)

    def _to_temporal(self, h, index):
        """Spatial -> temporal layout, adding temp_embed at pair 0 (`index` may be traced)."""
        cfg = self.config
        f, n, d = cfg.num_frames, cfg.num_patches, cfg.hidden_size
        b = h.shape[0] // f
        h = h.reshape(b, f, n, d).transpose(0, 2, 1, 3).reshape(b * n, f, d)
        temp = jnp.asarray(get_1d_sincos_temp_embed(d, f), jnp.float32)[None]
        return jnp.where(index == 0, (h.astype(jnp.float32) + temp).astype(h.dtype), h)

    def _to_spatial(self, h):
        cfg = self.config
        f, n, d = cfg.num_frames, cfg.num_patches, cfg.hidden_size
        b = h.shape[0] // n
        return h.reshape(b, n, f, d).transpose(0, 2, 1, 3).reshape(b * f, n, d)

    def unit_with_branches(self, unit_params, h, c, index):
        c_s, c_t = self._pair_conditions(c)
        method = DiTBlock.forward_with_branches
        h, (sa, sm), _ = self._block(unit_params["spatial"], h, c_s, method=method)
        h, (ta, tm), _ = self._block(unit_params["temporal"], self._to_temporal(h, index), c_t, method=method)
        return self._to_spatial(h), {"spatial": jnp.stack([sa, sm]), "temporal": jnp.stack([ta, tm])}

    def unit_from_branches(self, unit_params, h, c, index, branches):
        c_s, c_t = self._pair_conditions(c)

        def regate(p, h, c, two):
            gate_msa, gate_mlp = self._block(p, c, method=DiTBlock.modulation)[2::3]
            h = h + gate_msa[:, None] * two[0]
            return h + gate_mlp[:, None] * two[1]

        h = regate(unit_params["spatial"], h, c_s, branches["spatial"])
        h = regate(unit_params["temporal"], self._to_temporal(h, index), c_t, branches["temporal"])
        return self._to_spatial(h)

    def unit_broadcast(self, unit_params, h, c, index, stored, fresh):
        c_s, c_t = self._pair_conditions(c)
        h, s = self._block_broadcast(unit_params["spatial"], h, c_s, stored["spatial"], fresh["spatial"])
        h = self._to_temporal(h, index)
        h, t = self._block_broadcast(unit_params["temporal"], h, c_t, stored["temporal"], fresh["temporal"])
        return self._to_spatial(h), {"spatial": s, "temporal": t}

    def _block_broadcast(self, p, x, c, stored, fresh):
        """One adaLN-Zero block whose attention / MLP residual terms (after their gates, as
        PAB broadcasts them) are computed when `fresh` says so, else taken from `stored`."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._block(p, c, method=DiTBlock.modulation)

        def attn():
            y = self._block(p, modulate(layer_norm(x), shift_msa, scale_msa), method=lambda m, y: m.attn(y))
            return gate_msa[:, None] * y

        # A Python True (a pass that computes everything) needs no conditional.
        a = attn() if fresh[0] is True else jax.lax.cond(fresh[0], attn, lambda: stored[0].astype(x.dtype))
        x = x + a

        def mlp():
            y = self._block(p, modulate(layer_norm(x), shift_mlp, scale_mlp), method=lambda m, y: m.mlp(y))
            return gate_mlp[:, None] * y

        m = mlp() if fresh[1] is True else jax.lax.cond(fresh[1], mlp, lambda: stored[1].astype(x.dtype))
        return x + m, jnp.stack([a, m]).astype(stored.dtype)

    def probe(self, params, h, c):
        """The modulated input of pair 0's spatial block, (B*F, T, D)."""
        p0 = jax.tree.map(lambda a: a[0], params["encoder_pairs"]["spatial"])
        shift, scale = self._block(p0, self._pair_conditions(c)[0], method=DiTBlock.modulation)[:2]
        return modulate(layer_norm(h), shift, scale).astype(jnp.float32)

    def probe_shape(self, batch: int) -> tuple[int, ...]:
        return self.hidden_shape(batch)

    # ---- parameters and conversion ------------------------------------------------------
    def init_params(self, rng: jax.Array | int = 0):
        return init_latte_params(self.config, rng)

    @classmethod
    def from_torch(cls, state_dict: dict, **kwargs):
        from skipdit_jax.convert.latte import latte_from_torch

        return latte_from_torch(state_dict, **kwargs)

    def to_torch(self, params) -> dict[str, np.ndarray]:
        from skipdit_jax.convert.latte import latte_to_torch

        return latte_to_torch(self.config, params)

    @classmethod
    def recognises(cls, state_dict: dict) -> bool:
        return "temp_embed" in state_dict and "x_embedder.proj.weight" in state_dict and "blocks.0.attn.qkv.weight" in state_dict

    def describe(self) -> str:
        c = self.config
        kind = "Latte-skip" if c.long_skip else "Latte"
        return f"{kind} {c.num_pairs} pairs width {c.hidden_size}, {c.num_frames} frames: {self.count_params():,} parameters"
