"""Latte-T2V(-skip) with a small T5 encoder trained jointly from scratch: text-to-video
without downloaded text-encoder weights (the tiny CPU run on captioned moving digits,
configs/text_moving_digits.py).

The model is the Latte-T2V family's (`skipdit_jax.models.latte_t2v`) fed by a T5 v1.1
encoder (`skipdit_jax.encoders.t5`) whose width is the model's `caption_channels`. The
condition is token ids instead of embeddings (`condition_kind = "text_tokens"`):

    {"ids": (B, L) int32, "mask": (B, L) int32, "null_ids": (B, L) int32, "null_mask": (B, L) int32}

"null_*" is each sample's unconditional prompt (the empty caption: just the end-of-sequence
token), so `null_condition` and the trainer's `drop_condition` work on ids. Every pass
encodes the ids with the encoder first, so gradients reach it. Parameters:
{"text_encoder": T5 parameters, "model": Latte-T2V parameters}; "model/skip_fusions" are
the skip modules (`train.trainable="skip_only"` trains only them).

Tokens: `skipdit_jax.data.text_video.tokenize_words` over `WORD_VOCAB` (the moving-digit
caption grammar's words after T5's pad / eos / unk ids), so `text_vocab_size` defaults to
its size. There is no official checkpoint of this family: no PyTorch conversion.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.errors import ConfigError, UserError
from skipdit_jax.models.family import ModelFamily
from skipdit_jax.models.latte_t2v import LatteT2VConfig
from skipdit_jax.models.latte_t2v_family import PARAM_AXES as MODEL_AXES
from skipdit_jax.models.latte_t2v_family import LatteT2VFamily

TOKEN_KEYS = ("ids", "mask", "null_ids", "null_mask")
_WORD_VOCAB_SIZE = 20  # len(skipdit_jax.data.text_video.WORD_VOCAB): 3 special ids + 17 words


@dataclasses.dataclass(frozen=True)
class LatteT2VJointConfig(LatteT2VConfig):
    """A `LatteT2VConfig` (caption_channels = the encoder's width) plus the T5 encoder's
    sizes: text_vocab_size, text_layers, text_heads, text_d_kv (per head), text_d_ff, and its
    relative-position buckets / max distance."""

    caption_channels: int = 64
    text_len: int = 8
    text_vocab_size: int = _WORD_VOCAB_SIZE
    text_layers: int = 2
    text_heads: int = 4
    text_d_kv: int = 16
    text_d_ff: int = 128
    text_buckets: int = 8
    text_max_distance: int = 16

    family: ClassVar[str] = "latte_t2v_joint"
    config_label: ClassVar[str] = "Latte-T2V joint"
    positive_fields: ClassVar[tuple[str, ...]] = LatteT2VConfig.positive_fields + (
        "text_vocab_size", "text_layers", "text_heads", "text_d_kv", "text_d_ff",
    )

    def validate_layout(self) -> None:
        super().validate_layout()
        try:
            self.text_config  # T5's own checks (buckets vs distance, ...)
        except ConfigError as e:
            self._invalid(str(e))

    @property
    def text_config(self):
        from skipdit_jax.encoders.t5 import T5Config

        return T5Config(
            vocab_size=self.text_vocab_size, d_model=self.caption_channels, d_kv=self.text_d_kv, d_ff=self.text_d_ff,
            num_layers=self.text_layers, num_heads=self.text_heads, relative_attention_num_buckets=self.text_buckets,
            relative_attention_max_distance=self.text_max_distance, dtype=self.dtype, remat_policy=self.remat_policy,
        )

    @property
    def latte_config(self) -> LatteT2VConfig:
        return LatteT2VConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LatteT2VConfig)})


@dataclasses.dataclass(frozen=True)
class LatteT2VJointFamily(ModelFamily):
    """Latte-T2V(-skip) + a jointly trained T5 encoder; the token condition above."""

    config: LatteT2VJointConfig

    name: ClassVar[str] = "latte_t2v_joint"
    config_cls: ClassVar[type] = LatteT2VJointConfig
    condition_kind: ClassVar[str] = "text_tokens"

    @property
    def inner(self) -> LatteT2VFamily:
        return LatteT2VFamily(self.config.latte_config)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.inner.sample_shape

    @property
    def learn_sigma(self) -> bool:
        return self.config.learn_sigma

    # ---- the condition ------------------------------------------------------------------
    @property
    def is_conditional(self) -> bool:
        return True

    def check_condition(self, condition, batch: int) -> None:
        if not isinstance(condition, dict) or any(k not in condition for k in TOKEN_KEYS):
            raise UserError(f"this model takes a condition dict of token ids with keys {', '.join(TOKEN_KEYS)} (tokenize the prompts)")
        shape = tuple(np.shape(condition["ids"]))
        if len(shape) != 2 or shape[0] != batch:
            raise UserError(f"ids must have shape ({batch}, tokens) to match the noise batch, got {shape}")
        for k in TOKEN_KEYS:
            if tuple(np.shape(condition[k])) != shape:
                raise UserError(f"{k} must have the shape of ids {shape}, got {tuple(np.shape(condition[k]))}")
            if not np.issubdtype(np.dtype(condition[k].dtype), np.integer):
                raise UserError(f"{k} must be integers, got dtype {condition[k].dtype}")
        for k in ("ids", "null_ids"):
            ids = condition[k]
            if isinstance(ids, jax.Array) and not ids.is_fully_addressable:
                continue
            ids = np.asarray(ids)
            if ids.size and (ids.min() < 0 or ids.max() >= self.config.text_vocab_size):
                raise UserError(f"{k} must be token ids in 0..{self.config.text_vocab_size - 1}, got {ids.min()}..{ids.max()}")

    def null_condition(self, condition):
        return {"ids": condition["null_ids"], "mask": condition["null_mask"], "null_ids": condition["null_ids"], "null_mask": condition["null_mask"]}

    def condition_from_batch(self, batch: dict):
        return {k: jnp.asarray(batch[k], jnp.int32) for k in TOKEN_KEYS}

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        tokens = jax.ShapeDtypeStruct((batch_size, self.config.text_len), jnp.int32)
        return {"image": jax.ShapeDtypeStruct((batch_size, *self.sample_shape), jnp.float32), **{k: tokens for k in TOKEN_KEYS}}

    def tokens(self, prompts) -> dict[str, np.ndarray]:
        """The condition of `prompts` (numpy): word tokens (`tokenize_words`) of text_len,
        with the empty prompt as the null one."""
        from skipdit_jax.data.text_video import tokenize_words

        out = tokenize_words(list(prompts), self.config.text_len)
        null = tokenize_words([""] * len(prompts), self.config.text_len)
        return {"ids": out["ids"], "mask": out["mask"], "null_ids": null["ids"], "null_mask": null["mask"]}

    def example_condition(self, num: int):
        """Moving-digit prompts for `num` previews: digit i % 10, the 8 directions in turn."""
        dirs = ("right", "down and right", "down", "down and left", "left", "up and left", "up", "up and right")
        return self.tokens([f"a {i % 10} moving {dirs[(i // 10) % 8]}" for i in range(num)])

    # ---- passes -------------------------------------------------------------------------
    def encode_text(self, params, condition) -> dict:
        """The Latte-T2V condition of a token condition: the encoder's output for ids (the
        null fields repeat it; no pass of the model reads them)."""
        from skipdit_jax.encoders.t5 import encode

        emb = encode(self.config.text_config, params["text_encoder"], condition["ids"], condition["mask"])
        mask = condition["mask"].astype(jnp.int32)
        return {"text_emb": emb, "text_mask": mask, "null_emb": emb, "null_mask": mask}

    def apply(self, params, x, t, condition):
        return self.inner.apply(params["model"], x, t, self.encode_text(params, condition))

    @property
    def has_long_skips(self) -> bool:
        return self.config.long_skip

    @property
    def cache_units(self) -> int:
        return self.inner.cache_units

    @property
    def depth_units(self) -> int:
        return self.inner.depth_units

    def forward_full(self, params, x, t, condition, shallow_units: int):
        return self.inner.forward_full(params["model"], x, t, self.encode_text(params, condition), shallow_units)

    def forward_shallow(self, params, x, t, condition, deep_feature, shallow_units: int):
        return self.inner.forward_shallow(params["model"], x, t, self.encode_text(params, condition), deep_feature, shallow_units)

    def deep_feature_shape(self, batch: int) -> tuple[int, ...]:
        return self.inner.deep_feature_shape(batch)

    @property
    def param_axes(self):
        from skipdit_jax.encoders.t5 import PARAM_AXES as TEXT_AXES

        return [(f"text_encoder/{p}", a) for p, a in TEXT_AXES] + [(f"model/{p}", a) for p, a in MODEL_AXES]

    # ---- parameters ---------------------------------------------------------------------
    def init_params(self, rng: jax.Array | int = 0):
        from skipdit_jax.encoders.t5 import T5Encoder

        if isinstance(rng, int):
            rng = jax.random.key(rng)
        k_text, k_model = jax.random.split(rng)
        ids = jnp.zeros((1, self.config.text_len), jnp.int32)
        text = T5Encoder(self.config.text_config).init(k_text, ids, ids)["params"]
        return {"text_encoder": text, "model": self.inner.init_params(k_model)}

    @classmethod
    def from_torch(cls, state_dict: dict, **kwargs):
        raise ConfigError("the latte_t2v_joint family has no official PyTorch checkpoint to convert")

    def to_torch(self, params) -> dict[str, np.ndarray]:
        raise ConfigError("the latte_t2v_joint family has no official PyTorch layout")

    @classmethod
    def recognises(cls, state_dict: dict) -> bool:
        return False

    def describe(self) -> str:
        c = self.config
        kind = "Latte-T2V-skip" if c.long_skip else "Latte-T2V"
        n_text = self.count_params(self.abstract_params()["text_encoder"])
        return (
            f"{kind} {c.num_pairs} pairs width {c.hidden_size}, {c.num_frames} frames + a {c.text_layers}-layer T5 of width "
            f"{c.caption_channels} trained jointly: {self.count_params():,} parameters ({n_text:,} in the text encoder)"
        )
