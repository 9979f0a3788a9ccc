"""The Hunyuan-DiT family: what the sampler, the caches and the trainer may ask of the
text-to-image Hunyuan-DiT (see `skipdit_jax.models.family`).

The condition (`condition_kind = "text"`) is a dict of arrays with the batch leading, both
text encoders' outputs and each sample's unconditional (empty or negative prompt) caption:

    {"clip_emb": (B, text_len, cross_attention_dim) float32, "clip_mask": (B, text_len) int32,
     "t5_emb": (B, text_len_t5, cross_attention_dim_t5) float32, "t5_mask": (B, text_len_t5) int32,
     "null_clip_emb", "null_clip_mask", "null_t5_emb", "null_t5_mask": the same shapes}

With `use_style_cond_and_image_meta_size` (v1.0/v1.1) the dict also holds

    {"image_meta_size": (B, 6) float32, "style": (B,) int32,
     "null_image_meta_size", "null_style": the same shapes (and normally the same values:
     the official sampler gives the unconditional branch the same sizes and style)}

and only then: v1.2's dict is exactly the eight keys above.

`null_condition` swaps the null caption (and null extras) in, so generic classifier-free
guidance and condition dropout need no text encoder.

Caches. Units are blocks (`depth_units` = depth). Skip-Cache uses the native long skips
(`forward_full` / `forward_shallow`: a cached step runs blocks 0..k-1 and D-k..D-1). The
unit pieces of the other caches (FORA, PAB, Delta-DiT, TeaCache) honour the skips: the
hidden state between units is the model's *unit state* (E + 1, B, T, D), E = depth/2 - 1,
row 0 the hidden state and row 1 + i the output of encoder block i, so `run_units` over
any block range, and `unit_with_branches` / `unit_from_branches` inside a scan, fuse each
decoder block's skip from the state (`units_carry_skips`). What that means per cache:

  * FORA / PAB (`BranchCache`): a full step stores each block's self-attention,
    cross-attention and MLP outputs (`branch_shapes` = (3, B, T, D)). A cached step runs
    the embedders and, block by block, the skip fusion (a decoder block's hidden state is
    *replaced* by Linear(LN([h, skip])), so it is recomputed from the rebuilt stream and
    the rebuilt encoder outputs), then adds the three stored outputs. Hunyuan-DiT has no
    adaLN gates (the conditioning only shifts self-attention's input), so "re-gated with
    the current gates" is the identity: the stored outputs are added unscaled. The
    fusion Linears are not counted in the unit-count plan (0 blocks per cached step).
  * Delta-DiT: the cached change is one of unit states, so the late regime (the front's
    change reused, the last m blocks run) fuses the encoder outputs of the last full step.
  * TeaCache: the probe is block 0's self-attention input LN(h) + shift(temb) (float32);
    the reused residual is row 0's (the other rows only feed blocks a cached step skips).
  * PAB-video does not apply (no temporal attention).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.errors import UserError
from skipdit_jax.models.family import ModelFamily
from skipdit_jax.models.hunyuan import (
    LATENT_DOWNSCALE,
    META_SIZE_NUMBERS,
    HunyuanBlock,
    HunyuanConfig,
    HunyuanDiT,
    init_hunyuan_params,
)

TEXT_KEYS = ("clip_emb", "clip_mask", "t5_emb", "t5_mask")
CONDITION_KEYS = TEXT_KEYS + tuple(f"null_{k}" for k in TEXT_KEYS)
EXTRA_KEYS = ("image_meta_size", "style")  # v1.0/v1.1 only (use_style_cond_and_image_meta_size)
_INT_KEYS = ("clip_mask", "t5_mask", "style")


@dataclasses.dataclass(frozen=True)
class HunyuanFamily(ModelFamily):
    """Hunyuan-DiT: samples (H, W, C); the two-encoder text condition dict above (plus
    the size and style conditions for v1.0/v1.1)."""

    config: HunyuanConfig

    name: ClassVar[str] = "hunyuan"
    config_cls: ClassVar[type] = HunyuanConfig
    condition_kind: ClassVar[str] = "text"
    # The unit pieces carry the long-skip features in the unit state, so the unit-based
    # cache baselines apply although the model has long skips (it has no skip-free form).
    units_carry_skips: ClassVar[bool] = True

    @property
    def module(self) -> HunyuanDiT:
        return HunyuanDiT(self.config)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        c = self.config
        return (*c.latent_hw, c.in_channels)

    # ---- the condition ------------------------------------------------------------------
    @property
    def is_conditional(self) -> bool:
        return True

    @property
    def _keys(self) -> tuple[str, ...]:
        """The condition's keys without their null_ counterparts."""
        return TEXT_KEYS + (EXTRA_KEYS if self.config.use_style_cond_and_image_meta_size else ())

    @property
    def condition_keys(self) -> tuple[str, ...]:
        return self._keys + tuple(f"null_{k}" for k in self._keys)

    @staticmethod
    def _dtype(key: str):
        return jnp.int32 if key.endswith(_INT_KEYS) else jnp.float32

    def _shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        c = self.config
        one = {
            "clip_emb": (batch, c.text_len, c.cross_attention_dim),
            "clip_mask": (batch, c.text_len),
            "t5_emb": (batch, c.text_len_t5, c.cross_attention_dim_t5),
            "t5_mask": (batch, c.text_len_t5),
        }
        if c.use_style_cond_and_image_meta_size:
            one.update(image_meta_size=(batch, META_SIZE_NUMBERS), style=(batch,))
        return {**one, **{f"null_{k}": v for k, v in one.items()}}

    def check_condition(self, condition, batch: int) -> None:
        keys = self.condition_keys
        if not isinstance(condition, dict):
            raise UserError(
                f"a Hunyuan-DiT takes a condition dict with keys {', '.join(keys)} (encode the prompts with "
                f"CLIP and T5 first), got {type(condition).__name__}"
            )
        missing = [k for k in keys if k not in condition]
        if missing:
            raise UserError(f"the text condition lacks {', '.join(missing)}; it needs {', '.join(keys)}")
        if not self.config.use_style_cond_and_image_meta_size:
            extra = [k for k in condition if k.removeprefix("null_") in EXTRA_KEYS]
            if extra:
                raise UserError(
                    f"the text condition holds {', '.join(extra)}, which this Hunyuan-DiT "
                    "(use_style_cond_and_image_meta_size=False, v1.2) does not take"
                )
        for key, want in self._shapes(batch).items():
            got = tuple(np.shape(condition[key]))
            if got != want:
                raise UserError(f"{key} must have shape {want} (batch, tokens[, width]) for this model, got {got}")

    def null_condition(self, condition):
        null = {k: condition[f"null_{k}"] for k in self._keys}
        return {**null, **{f"null_{k}": v for k, v in null.items()}}

    def condition_from_batch(self, batch: dict):
        return {k: jnp.asarray(batch[k], self._dtype(k)) for k in self.condition_keys}

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """ "image": (B, H, W, C) clean latents, and the eight (v1.0/v1.1: twelve) condition arrays."""
        spec = {"image": jax.ShapeDtypeStruct((batch_size, *self.sample_shape), jnp.float32)}
        for key, shape in self._shapes(batch_size).items():
            spec[key] = jax.ShapeDtypeStruct(shape, self._dtype(key))
        return spec

    def example_condition(self, num: int):
        """A prompt-free condition for `num` previews (numpy): zero embeddings with only the
        first token of each caption unmasked, as both text and null caption (it shows the
        unconditional model); v1.0/v1.1 also get the sample's pixel size as image, target
        and uncropped size (crop 0, 0) and style 0. Encode real prompts for text-conditioned
        previews."""
        out = {}
        h, w = (n * LATENT_DOWNSCALE for n in self.config.latent_hw)
        for key, shape in self._shapes(num).items():
            arr = np.zeros(shape, self._dtype(key))
            if key.endswith("_mask"):
                arr[:, 0] = 1
            if key.endswith("image_meta_size"):
                arr[:] = (h, w, h, w, 0, 0)
            out[key] = arr
        return out

    def _text(self, condition):
        return tuple(condition[k] for k in TEXT_KEYS)

    def _extra(self, condition) -> dict:
        """The keyword conditions of v1.0/v1.1 ({} for v1.2)."""
        if not self.config.use_style_cond_and_image_meta_size:
            return {}
        return {k: condition[k] for k in EXTRA_KEYS}

    # ---- passes -------------------------------------------------------------------------
    def apply(self, params, x, t, condition):
        return self.module.apply({"params": params}, x, t, *self._text(condition), **self._extra(condition))

    @property
    def has_long_skips(self) -> bool:
        return True

    @property
    def cache_units(self) -> int:
        return self.config.depth // 2

    @property
    def depth_units(self) -> int:
        return self.config.depth

    def forward_full(self, params, x, t, condition, shallow_units: int):
        return self.module.apply(
            {"params": params}, x, t, *self._text(condition), shallow_units, method=HunyuanDiT.forward_full,
            **self._extra(condition),
        )

    def forward_shallow(self, params, x, t, condition, deep_feature, shallow_units: int):
        return self.module.apply(
            {"params": params}, x, t, *self._text(condition), deep_feature, shallow_units, method=HunyuanDiT.forward_shallow,
            **self._extra(condition),
        )

    def deep_feature_shape(self, batch: int) -> tuple[int, ...]:
        c = self.config
        return (batch, c.num_patches, c.hidden_size)

    # ---- pieces for the other cache strategies (units = blocks; see the module docstring) --
    # h is the unit state (E + 1, B, T, D); c = (temb (B, D), caption (B, L, Dc), cos, sin).
    def embed(self, params, x, t, condition):
        return self.module.apply(
            {"params": params}, x, t, *self._text(condition), method=HunyuanDiT.unit_embed, **self._extra(condition)
        )

    def _grid(self, tokens: int) -> tuple[int, int]:
        c = self.config
        grid = tuple(n // c.patch_size for n in c.latent_hw)
        if grid[0] * grid[1] != tokens:
            raise UserError(f"a unit state of {tokens} tokens does not fit this model's {c.latent_hw} latents")
        return grid

    def head(self, params, h, c):
        return self.module.apply({"params": params}, h[0], c, self._grid(h.shape[2]), method=HunyuanDiT.head)

    def hidden_shape(self, batch: int) -> tuple[int, ...]:
        c = self.config
        return (c.num_encoder_blocks + 1, batch, c.num_patches, c.hidden_size)

    def unit_stacks(self, params) -> tuple:
        return params["encoder_blocks"], params["middle_blocks"], params["decoder_blocks"]

    def run_units(self, params, h, c, lo: int, hi: int):
        return self.module.apply({"params": params}, h, c, lo, hi, method=HunyuanDiT.run_units)

    def branch_shapes(self, batch: int):
        """(self-attention, cross-attention, MLP) outputs stacked: (3, B, T, D)."""
        return (3, *self.deep_feature_shape(batch))

    def _unit(self, unit_params, h, index, method, *args):
        """One block (global `index`, traced) on the unit state: a decoder block (its
        parameters hold skip_linear) fuses row 2E + 2 - index (encoder D-1-index); an
        encoder block writes its output to row 1 + index (the middle blocks' rows are out
        of range and dropped)."""
        decoder = "skip_linear" in unit_params
        row = 2 * self.config.num_encoder_blocks + 2 - index
        skip = (jax.lax.dynamic_index_in_dim(h, row, keepdims=False),) if decoder else ()
        out = HunyuanBlock(self.config, decoder, parent=None).apply({"params": unit_params}, h[0], *args, *skip, method=method)
        hidden = out[0] if isinstance(out, tuple) else out
        h = h.at[0].set(hidden)
        if not decoder:
            h = h.at[1 + index].set(hidden, mode="drop")
        return h, out

    def unit_with_branches(self, unit_params, h, c, index):
        h, (_, branches) = self._unit(unit_params, h, index, HunyuanBlock.forward_with_branches, *c)
        return h, jnp.stack(branches)

    def unit_from_branches(self, unit_params, h, c, index, branches):
        """No gates to apply (see the module docstring): fuse, then add the stored outputs."""
        return self._unit(unit_params, h, index, HunyuanBlock.forward_from_branches, tuple(branches))[0]

    def probe(self, params, h, c):
        p0 = jax.tree.map(lambda a: a[0], params["encoder_blocks"])
        block = HunyuanBlock(self.config, parent=None)
        return block.apply({"params": p0}, h[0], c[0], method=HunyuanBlock.modulated_input).astype(jnp.float32)

    def probe_shape(self, batch: int) -> tuple[int, ...]:
        return self.deep_feature_shape(batch)

    @property
    def param_axes(self):
        from skipdit_jax.models.hunyuan_sharding import PARAM_AXES

        return PARAM_AXES

    # ---- parameters and conversion ------------------------------------------------------
    def init_params(self, rng: jax.Array | int = 0):
        return init_hunyuan_params(self.config, rng)

    @classmethod
    def from_torch(cls, state_dict: dict, **kwargs):
        from skipdit_jax.convert.hunyuan import hunyuan_from_torch

        return hunyuan_from_torch(state_dict, **kwargs)

    def to_torch(self, params) -> dict[str, np.ndarray]:
        from skipdit_jax.convert.hunyuan import hunyuan_to_torch

        return hunyuan_to_torch(self.config, params)

    @classmethod
    def recognises(cls, state_dict: dict) -> bool:
        diffusers = ("text_embedding_padding", "time_extra_emb.pooler.c_proj.weight", "blocks.0.norm1.linear.weight")
        official = ("text_embedding_padding", "pooler.c_proj.weight", "blocks.0.attn1.Wqkv.weight")
        return any(all(k in state_dict for k in keys) for keys in (diffusers, official))

    def describe(self) -> str:
        c = self.config
        size = "x".join(map(str, c.latent_hw)) + " latents"
        return f"Hunyuan-DiT {c.depth} blocks width {c.hidden_size}, {size}: {self.count_params():,} parameters"
