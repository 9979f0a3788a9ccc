"""The Latte-T2V family: what the sampler, the caches and the trainer may ask of a
text-to-video Latte (see `skipdit_jax.models.family`).

The condition (`condition_kind = "text"`) is a dict of arrays with the batch leading:

    {"text_emb": (B, L, caption_channels) float32, "text_mask": (B, L) int32,
     "null_emb": (B, L, caption_channels) float32, "null_mask": (B, L) int32}

"null_*" is each sample's unconditional (empty or negative prompt) caption, so that
`null_condition` -- the text swapped for the null caption -- and `drop_condition` need no
text encoder. Cache units are (spatial, temporal) pairs.

A joint image-video training batch (`joint_images` I > 0) adds the images' captions,
"image_text_emb" (B, I, L, caption_channels) and "image_text_mask" (B, I, L); the null
condition gives every image the sample's null caption. Sampling and the caches see videos
only.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.errors import UserError
from skipdit_jax.models.family import ModelFamily
from skipdit_jax.models.latte_t2v import LatteT2V, LatteT2VConfig, init_latte_t2v_params

CONDITION_KEYS = ("text_emb", "text_mask", "null_emb", "null_mask")
IMAGE_KEYS = ("image_text_emb", "image_text_mask")

# Logical axes for `skipdit_jax.sharding` (as Latte's; kernels are (in, out)).
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"(encoder|decoder)_pairs/(spatial|temporal)/scale_shift_table", ("layers", None, "embed")),
    (r"(encoder|decoder)_pairs/(spatial|temporal)/mlp/fc2/kernel", ("layers", "hidden", "embed")),
    (r"(encoder|decoder)_pairs/(spatial|temporal)/.*/kernel", ("layers", "embed", "hidden")),
    (r"(encoder|decoder)_pairs/(spatial|temporal)/.*/bias", ("layers", "hidden")),
    (r"skip_fusions/linear/kernel", ("layers", "hidden", "embed")),
    (r"skip_fusions/.*", ("layers", "hidden")),
    (r"x_embedder/kernel", (None, None, None, "embed")),
    (r"caption_projection/linear_1/kernel", (None, "embed")),
    (r"(t_embedder/linear_1)/kernel", (None, "embed")),
    (r"(t_embedder/linear_2|caption_projection/linear_2|adaln_single)/kernel", ("embed", "hidden")),
    (r"final_layer/proj_out/kernel", ("embed", None)),
    (r"final_layer/scale_shift_table", (None, "embed")),
]


@dataclasses.dataclass(frozen=True)
class LatteT2VFamily(ModelFamily):
    """Latte-T2V / -skip: samples (F, H, W, C); the text condition dict above."""

    config: LatteT2VConfig

    name: ClassVar[str] = "latte_t2v"
    config_cls: ClassVar[type] = LatteT2VConfig
    condition_kind: ClassVar[str] = "text"

    @property
    def module(self) -> LatteT2V:
        return LatteT2V(self.config)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        c = self.config
        return (c.num_frames, c.input_size, c.input_size, c.in_channels)

    # ---- the condition ------------------------------------------------------------------
    @property
    def is_conditional(self) -> bool:
        return True

    def check_condition(self, condition, batch: int) -> None:
        cc = self.config.caption_channels
        if not isinstance(condition, dict):
            raise UserError(
                f"a text-to-video model takes a condition dict with keys {', '.join(CONDITION_KEYS)} "
                f"(encode the prompts first), got {type(condition).__name__}"
            )
        missing = [k for k in CONDITION_KEYS if k not in condition]
        if missing:
            raise UserError(f"the text condition lacks {', '.join(missing)}; it needs {', '.join(CONDITION_KEYS)}")
        for prefix in ("text", "null"):
            emb, mask = condition[f"{prefix}_emb"], condition[f"{prefix}_mask"]
            shape, mshape = tuple(np.shape(emb)), tuple(np.shape(mask))
            if len(shape) != 3 or shape[0] != batch:
                raise UserError(f"{prefix}_emb must have shape ({batch}, tokens, {cc}) to match the noise batch, got {shape}")
            if shape[2] != cc:
                raise UserError(
                    f"the text encoder's width D={shape[2]} ({prefix}_emb) does not match the model's caption "
                    f"projection (caption_channels {cc})"
                )
            if mshape != shape[:2]:
                raise UserError(
                    f"{prefix}_mask must have shape {shape[:2]} (one 0/1 flag per token of {prefix}_emb), got {mshape}"
                )
        if "image_text_emb" in condition:
            shape, mshape = tuple(np.shape(condition["image_text_emb"])), tuple(np.shape(condition.get("image_text_mask")))
            if len(shape) != 4 or shape[0] != batch or shape[3] != cc or mshape != shape[:3]:
                raise UserError(
                    f"image_text_emb must have shape ({batch}, images, tokens, {cc}) and image_text_mask (batch, images, "
                    f"tokens), got {shape} and {mshape}"
                )
        if np.shape(condition["null_emb"]) != np.shape(condition["text_emb"]):
            raise UserError(
                f"null_emb must have the shape of text_emb {tuple(np.shape(condition['text_emb']))} (guidance batches "
                f"them together), got {tuple(np.shape(condition['null_emb']))}: pad both to one length"
            )

    def null_condition(self, condition):
        """text_* replaced by null_*; joint images' captions by the sample's null caption
        (which must have the images' token length)."""
        null = {
            "text_emb": condition["null_emb"],
            "text_mask": condition["null_mask"],
            "null_emb": condition["null_emb"],
            "null_mask": condition["null_mask"],
        }
        if "image_text_emb" in condition:
            shape = condition["image_text_emb"].shape
            null["image_text_emb"] = jnp.broadcast_to(condition["null_emb"][:, None], shape)
            null["image_text_mask"] = jnp.broadcast_to(condition["null_mask"][:, None], shape[:3])
        return null

    def condition_from_batch(self, batch: dict):
        keys = CONDITION_KEYS + (IMAGE_KEYS if self.config.joint_images else ())
        return {k: jnp.asarray(batch[k], jnp.int32 if k.endswith("_mask") else jnp.float32) for k in keys}

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """ "image": (B, F + I, H, W, C) clean latents (the video, then I = joint_images
        images), and the condition, captions of text_len tokens; with I > 0 also the images'
        captions "image_text_emb" (B, I, text_len, caption_channels), "image_text_mask"."""
        c = self.config
        b, n_img = batch_size, c.joint_images
        emb = jax.ShapeDtypeStruct((b, c.text_len, c.caption_channels), jnp.float32)
        mask = jax.ShapeDtypeStruct((b, c.text_len), jnp.int32)
        frames = (c.num_frames + n_img, *self.sample_shape[1:])
        spec = {
            "image": jax.ShapeDtypeStruct((b, *frames), jnp.float32),
            "text_emb": emb,
            "text_mask": mask,
            "null_emb": emb,
            "null_mask": mask,
        }
        if n_img:
            spec["image_text_emb"] = jax.ShapeDtypeStruct((b, n_img, c.text_len, c.caption_channels), jnp.float32)
            spec["image_text_mask"] = jax.ShapeDtypeStruct((b, n_img, c.text_len), jnp.int32)
        return spec

    def example_condition(self, num: int):
        """A prompt-free condition for `num` preview samples (numpy): zero embeddings of
        text_len tokens with only the first token unmasked, as both text and null caption
        -- it stands for "no prompt", so previews show the unconditional model. Encode real
        prompts (`skipdit_jax.encoders.text.encode_prompts`) for text-conditioned previews."""
        c = self.config
        emb = np.zeros((num, c.text_len, c.caption_channels), np.float32)
        mask = np.zeros((num, c.text_len), np.int32)
        mask[:, 0] = 1
        return {"text_emb": emb, "text_mask": mask, "null_emb": emb.copy(), "null_mask": mask.copy()}

    # ---- passes -------------------------------------------------------------------------
    def apply(self, params, x, t, condition):
        """The plain forward; a condition with image_text_emb / image_text_mask (a joint
        training batch) takes x with num_frames + I frames."""
        images = [condition[k] for k in IMAGE_KEYS] if "image_text_emb" in condition else []
        return self.module.apply({"params": params}, x, t, condition["text_emb"], condition["text_mask"], *images)

    @property
    def has_long_skips(self) -> bool:
        return self.config.long_skip

    @property
    def cache_units(self) -> int:
        return self.config.num_encoder_pairs

    @property
    def depth_units(self) -> int:
        return self.config.num_pairs

    def forward_full(self, params, x, t, condition, shallow_units: int):
        return self.module.apply(
            {"params": params}, x, t, condition["text_emb"], condition["text_mask"], shallow_units, method=LatteT2V.forward_full
        )

    def forward_shallow(self, params, x, t, condition, deep_feature, shallow_units: int):
        return self.module.apply(
            {"params": params},
            x,
            t,
            condition["text_emb"],
            condition["text_mask"],
            deep_feature,
            shallow_units,
            method=LatteT2V.forward_shallow,
        )

    def deep_feature_shape(self, batch: int) -> tuple[int, ...]:
        c = self.config
        return (batch, c.num_frames, c.num_patches, c.hidden_size)

    @property
    def param_axes(self):
        return PARAM_AXES

    # ---- pieces for the other cache strategies (units = pairs; no per-branch pieces) ----
    # The hidden state between pairs is (B, F, T, D); c is the tuple (modulation (B, 6, D),
    # timestep embedding (B, D), projected caption (B, L, D), key bias (B, 1, 1, L)).
    def embed(self, params, x, t, condition):
        return self.module.apply({"params": params}, x, t, condition["text_emb"], condition["text_mask"], method=LatteT2V.embed)

    def head(self, params, h, c):
        return self.module.apply({"params": params}, h, c, method=LatteT2V.head)

    def hidden_shape(self, batch: int) -> tuple[int, ...]:
        return self.deep_feature_shape(batch)

    def unit_stacks(self, params) -> tuple:
        return params["encoder_pairs"], params["decoder_pairs"]

    def run_units(self, params, h, c, lo: int, hi: int):
        if self.config.long_skip:
            self._no_pieces("run_units for a model with long skips")
        return self.module.apply({"params": params}, h, c, lo, hi, method=LatteT2V.run_units)

    def probe(self, params, h, c):
        return self.module.apply({"params": params}, h, c, method=LatteT2V.probe)

    def probe_shape(self, batch: int) -> tuple[int, ...]:
        return self.hidden_shape(batch)

    # ---- parameters and conversion ------------------------------------------------------
    def init_params(self, rng: jax.Array | int = 0):
        return init_latte_t2v_params(self.config, rng)

    @classmethod
    def from_torch(cls, state_dict: dict, **kwargs):
        from skipdit_jax.convert.latte_t2v import latte_t2v_from_torch

        return latte_t2v_from_torch(state_dict, **kwargs)

    def to_torch(self, params) -> dict[str, np.ndarray]:
        from skipdit_jax.convert.latte_t2v import latte_t2v_to_torch

        return latte_t2v_to_torch(self.config, params)

    @classmethod
    def recognises(cls, state_dict: dict) -> bool:
        keys = ("temporal_transformer_blocks.0.attn1.to_q.weight", "caption_projection.linear_1.weight")
        return all(k in state_dict for k in keys)

    def describe(self) -> str:
        c = self.config
        kind = "Latte-T2V-skip" if c.long_skip else "Latte-T2V"
        return f"{kind} {c.num_pairs} pairs width {c.hidden_size}, {c.num_frames} frames: {self.count_params():,} parameters"
