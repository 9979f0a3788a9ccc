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

import dataclasses
import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.models.config import ModelConfig
from skipdit_jax.models.family import ClassConditionalFamily
from skipdit_jax.models.layers import (
    Attention,
    Mlp,
    get_2d_sincos_pos_embed,
    layer_norm,
    modulate,
    normal002,
    timestep_features,
    zeros,
)
from skipdit_jax.models.skip import SkipFusion, remat, scan_blocks, stacked_init


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += g1 * Attn(mod(LN(x))); x += g2 * MLP(mod(LN(x))).

    Besides the plain call, the block exposes its pieces for the cache baselines
    (`skipdit_jax.cache.baselines`): the adaLN modulation and the raw (pre-gate) outputs
    of its attention and MLP branches.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        dt = cfg.compute_dtype
        self.adaLN_modulation = nn.Dense(6 * cfg.hidden_size, dtype=dt, kernel_init=zeros)
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


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) + LN + Linear(D -> p*p*out_channels), zero-initialised."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, c):
        cfg = self.config
        mod = nn.Dense(2 * cfg.hidden_size, dtype=cfg.compute_dtype, kernel_init=zeros, name="adaLN_modulation")(
            nn.silu(c)
        )
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(layer_norm(x), shift, scale)
        out_dim = cfg.patch_size**2 * cfg.out_channels
        return nn.Dense(out_dim, dtype=cfg.compute_dtype, kernel_init=zeros, name="linear")(x)



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
        self.t_mlp_0 = nn.Dense(d, dtype=dt, kernel_init=normal002, name="t_embedder_mlp_0")
        self.t_mlp_2 = nn.Dense(d, dtype=dt, kernel_init=normal002, name="t_embedder_mlp_2")
        if cfg.num_classes:
            self.y_embedder = nn.Embed(cfg.num_classes + 1, d, embedding_init=normal002, name="y_embedder")
        x_ex = jnp.zeros((1, cfg.num_patches, d), dt)
        c_ex = jnp.zeros((1, d), dt)
        n_enc = cfg.num_encoder_blocks
        block = DiTBlock(cfg, parent=None)  # detached: only its init is used here
        self.encoder_blocks = self.param("encoder_blocks", stacked_init(block, n_enc, x_ex, c_ex))
        self.decoder_blocks = self.param("decoder_blocks", stacked_init(block, cfg.depth - n_enc, x_ex, c_ex))
        if cfg.long_skip:
            self.skip_fusions = self.param("skip_fusions", stacked_init(_skip_fusion(cfg), n_enc, x_ex, x_ex))
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
        return remat(fn, self.config.remat_policy)

    def run_encoder(self, h, c, lo: int, hi: int):
        """Encoder blocks lo..hi-1; returns (h, their outputs stacked) -- the skip features."""
        if hi <= lo:
            return h, None
        block = self._block_fn()
        keep = self.config.long_skip

        def step(h, p, _):
            h = block(p, h, c)
            return h, (h if keep else None)

        return scan_blocks(step, h, self.encoder_blocks, lo, hi, unroll=self.config.scan_unroll)

    def run_decoder(self, h, c, lo: int, hi: int, skips):
        """Decoder blocks half+lo..half+hi-1. `skips` are the outputs of encoder blocks
        half-hi..half-1-lo in encoder order; block half+j fuses the one of block half-1-j."""
        if hi <= lo:
            return h
        block = self._block_fn()
        if not self.config.long_skip:
            return scan_blocks(
                lambda h, p, _: (block(p, h, c), None), h, self.decoder_blocks, lo, hi, unroll=self.config.scan_unroll
            )[0]
        fusion = _skip_fusion(self.config)
        fuse = lambda p, a, b: fusion.apply({"params": p}, a, b)  # noqa: E731

        def step(h, p, skip):
            p_block, p_fuse = p
            return block(p_block, fuse(p_fuse, h, skip), c), None

        stacked = (self.decoder_blocks, self.skip_fusions)
        return scan_blocks(step, h, stacked, lo, hi, extra_xs=skips[::-1], unroll=self.config.scan_unroll)[0]

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


def _skip_fusion(cfg: ModelConfig) -> SkipFusion:
    return SkipFusion(cfg.hidden_size, cfg.skip_init, cfg.compute_dtype, parent=None)


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


# The logical axes of every DiT parameter for `skipdit_jax.sharding` (FSDP shards "embed"); the
# first matching pattern wins. Optimizer state (".../mu/encoder_blocks/...") matches by its tail.
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"(encoder|decoder)_blocks/mlp/fc2/kernel", ("layers", "hidden", "embed")),
    (r"(encoder|decoder)_blocks/.*/kernel", ("layers", "embed", "hidden")),
    (r"(encoder|decoder)_blocks/.*/bias", ("layers", "hidden")),
    (r"skip_fusions/linear/kernel", ("layers", "hidden", "embed")),
    (r"skip_fusions/.*", ("layers", "hidden")),
    (r"y_embedder/embedding", ("vocab", "embed")),
    (r"x_embedder/kernel", (None, None, None, "embed")),
    (r"t_embedder_mlp_0/kernel", ("hidden", "embed")),
    (r"(t_embedder_mlp_2|final_layer/adaLN_modulation)/kernel", ("embed", "hidden")),
    (r"final_layer/linear/kernel", ("embed", None)),
]


@dataclasses.dataclass(frozen=True)
class DiTFamily(ClassConditionalFamily):
    """DiT / Skip-DiT (class-to-image): condition = class ids (B,), int32; `num_classes`
    is the null label; an unconditional model (num_classes == 0) takes None."""

    config: ModelConfig

    name: ClassVar[str] = "dit"
    config_cls: ClassVar[type] = ModelConfig

    module_cls: ClassVar[type] = DiT

    @property
    def sample_shape(self) -> tuple[int, ...]:
        c = self.config
        return (c.input_size, c.input_size, c.in_channels)

    @property
    def cache_units(self) -> int:
        return self.config.num_encoder_blocks

    @property
    def depth_units(self) -> int:
        return self.config.depth

    def deep_feature_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.config.num_patches, self.config.hidden_size)

    @property
    def param_axes(self):
        return PARAM_AXES

    # ---- pieces for the other cache strategies (units = blocks; no long skips) ----------
    attention_kinds: ClassVar[tuple[str, ...]] = ("spatial",)

    def embed(self, params, x, t, condition):
        """(tokens h (B, T, D), conditioning vector c (B, D))."""
        return self.module.apply({"params": params}, x, t, condition, method=DiT.embed)

    def head(self, params, h, c):
        return self.module.apply({"params": params}, h, c, method=DiT.head)

    def hidden_shape(self, batch: int) -> tuple[int, ...]:
        return self.deep_feature_shape(batch)

    def block_stacks(self, params) -> tuple:
        """The stacked block parameters, in order (every block appears once)."""
        return params["encoder_blocks"], params["decoder_blocks"]

    unit_stacks = block_stacks

    def block_with_branches(self, block_params, h, c):
        """(output, (attention, MLP) before their gates, (gate_msa, gate_mlp)) of one block."""
        return DiTBlock(self.config, parent=None).apply({"params": block_params}, h, c, method=DiTBlock.forward_with_branches)

    def block_modulation(self, block_params, c):
        """The six adaLN vectors of one block: (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)."""
        return DiTBlock(self.config, parent=None).apply({"params": block_params}, c, method=DiTBlock.modulation)

    def branch_shapes(self, batch: int):
        """(attention, MLP) stacked: (2, B, T, D)."""
        return (2, *self.hidden_shape(batch))

    def unit_with_branches(self, unit_params, h, c, index):
        out, (attn, mlp), _ = self.block_with_branches(unit_params, h, c)
        return out, jnp.stack([attn, mlp])

    def unit_from_branches(self, unit_params, h, c, index, branches):
        gate_msa, gate_mlp = self.block_modulation(unit_params, c)[2::3]
        h = h + gate_msa[:, None] * branches[0]
        return h + gate_mlp[:, None] * branches[1]

    def probe(self, params, h, c):
        p0 = jax.tree.map(lambda a: a[0], params["encoder_blocks"])
        shift, scale = self.block_modulation(p0, c)[:2]
        return modulate(layer_norm(h), shift, scale).astype(jnp.float32)

    def probe_shape(self, batch: int) -> tuple[int, ...]:
        return self.hidden_shape(batch)

    def run_units(self, params, h, c, lo: int, hi: int):
        """Blocks lo..hi-1 (global indices) of a model without long skips."""
        n_enc = self.config.num_encoder_blocks

        def run(module, h, c):
            if lo < n_enc:
                h, _ = module.run_encoder(h, c, lo, min(hi, n_enc))
            if hi > n_enc:
                h = module.run_decoder(h, c, max(lo, n_enc) - n_enc, hi - n_enc, None)
            return h

        return self.module.apply({"params": params}, h, c, method=run)

    # ---- parameters and conversion ------------------------------------------------------
    def init_params(self, rng: jax.Array | int = 0):
        return init_params(self.config, rng)

    @classmethod
    def from_torch(cls, state_dict: dict, **kwargs):
        from skipdit_jax.convert.dit import dit_from_torch

        return dit_from_torch(state_dict, **kwargs)

    def to_torch(self, params) -> dict[str, np.ndarray]:
        from skipdit_jax.convert.dit import dit_to_torch

        return dit_to_torch(self.config, params)

    @classmethod
    def recognises(cls, state_dict: dict) -> bool:
        # DiT blocks are single blocks with a fused qkv; Latte has temp_embed, diffusers
        # layouts have transformer_blocks, Hunyuan has blocks.N.attn1.
        keys = ("x_embedder.proj.weight", "blocks.0.attn.qkv.weight")
        return all(k in state_dict for k in keys) and "temp_embed" not in state_dict

    def describe(self) -> str:
        c = self.config
        kind = "Skip-DiT" if c.long_skip else "DiT"
        return f"{kind} depth {c.depth} width {c.hidden_size}: {self.count_params():,} parameters"
