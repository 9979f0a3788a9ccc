"""The Hunyuan-DiT family: what the sampler, the caches and the trainer may ask of the
text-to-image Hunyuan-DiT (see `skipdit_jax.models.family`).

The condition (`condition_kind = "text"`) is a dict of arrays with the batch leading, both
text encoders' outputs and each sample's unconditional (empty or negative prompt) caption:

    {"clip_emb": (B, text_len, cross_attention_dim) float32, "clip_mask": (B, text_len) int32,
     "t5_emb": (B, text_len_t5, cross_attention_dim_t5) float32, "t5_mask": (B, text_len_t5) int32,
     "null_clip_emb", "null_clip_mask", "null_t5_emb", "null_t5_mask": the same shapes}

`null_condition` swaps the null caption in, so generic classifier-free guidance and
condition dropout need no text encoder. Cache units are blocks; the model's native long
skips are what Skip-Cache uses.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.errors import UserError
from skipdit_jax.models.family import ModelFamily
from skipdit_jax.models.hunyuan import HunyuanConfig, HunyuanDiT, init_hunyuan_params

TEXT_KEYS = ("clip_emb", "clip_mask", "t5_emb", "t5_mask")
CONDITION_KEYS = TEXT_KEYS + tuple(f"null_{k}" for k in TEXT_KEYS)


@dataclasses.dataclass(frozen=True)
class HunyuanFamily(ModelFamily):
    """Hunyuan-DiT v1.2: samples (H, W, C); the two-encoder text condition dict above."""

    config: HunyuanConfig

    name: ClassVar[str] = "hunyuan"
    config_cls: ClassVar[type] = HunyuanConfig
    condition_kind: ClassVar[str] = "text"

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

    def _shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        c = self.config
        one = {
            "clip_emb": (batch, c.text_len, c.cross_attention_dim),
            "clip_mask": (batch, c.text_len),
            "t5_emb": (batch, c.text_len_t5, c.cross_attention_dim_t5),
            "t5_mask": (batch, c.text_len_t5),
        }
        return {**one, **{f"null_{k}": v for k, v in one.items()}}

    def check_condition(self, condition, batch: int) -> None:
        if not isinstance(condition, dict):
            raise UserError(
                f"a Hunyuan-DiT takes a condition dict with keys {', '.join(CONDITION_KEYS)} (encode the prompts with "
                f"CLIP and T5 first), got {type(condition).__name__}"
            )
        missing = [k for k in CONDITION_KEYS if k not in condition]
        if missing:
            raise UserError(f"the text condition lacks {', '.join(missing)}; it needs {', '.join(CONDITION_KEYS)}")
        for key, want in self._shapes(batch).items():
            got = tuple(np.shape(condition[key]))
            if got != want:
                raise UserError(f"{key} must have shape {want} (batch, tokens[, width]) for this model, got {got}")

    def null_condition(self, condition):
        null = {k: condition[f"null_{k}"] for k in TEXT_KEYS}
        return {**null, **{f"null_{k}": v for k, v in null.items()}}

    def condition_from_batch(self, batch: dict):
        return {k: jnp.asarray(batch[k], jnp.int32 if k.endswith("_mask") else jnp.float32) for k in CONDITION_KEYS}

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """ "image": (B, H, W, C) clean latents, and the eight condition arrays."""
        spec = {"image": jax.ShapeDtypeStruct((batch_size, *self.sample_shape), jnp.float32)}
        for key, shape in self._shapes(batch_size).items():
            spec[key] = jax.ShapeDtypeStruct(shape, jnp.int32 if key.endswith("_mask") else jnp.float32)
        return spec

    def example_condition(self, num: int):
        """A prompt-free condition for `num` previews (numpy): zero embeddings with only the
        first token of each caption unmasked, as both text and null caption (it shows the
        unconditional model). Encode real prompts for text-conditioned previews."""
        out = {}
        for key, shape in self._shapes(num).items():
            arr = np.zeros(shape, np.int32 if key.endswith("_mask") else np.float32)
            if key.endswith("_mask"):
                arr[:, 0] = 1
            out[key] = arr
        return out

    def _text(self, condition):
        return tuple(condition[k] for k in TEXT_KEYS)

    # ---- passes -------------------------------------------------------------------------
    def apply(self, params, x, t, condition):
        return self.module.apply({"params": params}, x, t, *self._text(condition))

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
            {"params": params}, x, t, *self._text(condition), shallow_units, method=HunyuanDiT.forward_full
        )

    def forward_shallow(self, params, x, t, condition, deep_feature, shallow_units: int):
        return self.module.apply(
            {"params": params}, x, t, *self._text(condition), deep_feature, shallow_units, method=HunyuanDiT.forward_shallow
        )

    def deep_feature_shape(self, batch: int) -> tuple[int, ...]:
        c = self.config
        return (batch, c.num_patches, c.hidden_size)

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
