"""Text-to-video sampling with a Latte-T2V(-skip): prompts (or cached embeddings) -> videos,
as the official Latte / Skip-DiT `LattePipeline` samples (`sample_t2v.py`, `sample_t2v_vbench.py`).

What the official sampling does, and what this module does the same way:
  * the scheduler is diffusers' DDIM (50 steps) from the pipeline folder's
    `scheduler/scheduler_config.json`, with the sampling config's overrides (linear betas
    1e-4..0.02, clip_sample off); without that file the same settings on diffusers' defaults
    (leading spacing, steps_offset 0: timesteps 980, 960, ..., 0), which is Latte-1's config;
  * classifier-free guidance 7.5 with the negative prompt ("" by default) as the unconditional
    branch, the prompt embedding and its mask as LattePipeline's `mask_feature=True` builds them
    (`skipdit_jax.encoders.text.text_condition`);
  * decoding through SVD's temporal VAE decoder in chunks of 14 frames (`vae_temporal_decoder/`)
    or the SD VAE frame by frame (`vae/`), then `((x / 2 + 0.5).clamp(0, 1) * 255).to(uint8)`.
What differs: the initial noise. Video j's noise is `normal(key(seeds[j]), (F, h, w, 4))` from
JAX's PRNG, independent of the batch it is drawn in (torch's generator cannot be reproduced);
the official VBench script seeds video i of every prompt with seed + i, and so can the caller.

The denoising loop is the one jitted `lax.scan` sampler (`skipdit_jax.sampling.build_sampler`):
no host sync per step; an optional Skip-Cache (`skipdit_jax.cache.parse_cache_spec`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax import images, paths
from skipdit_jax.diffusion.diffusers_schedulers import DiffusersDDIM, DiffusersDDPM
from skipdit_jax.errors import UserError
from skipdit_jax.models.families import family_of
from skipdit_jax.pipelines.common import build_text_sampler, compiled_for, make_noise  # noqa: F401 (re-exported)

LATTE_FPS = 8.0
LATTE_STEPS, LATTE_CFG = 50, 7.5
TEMPORAL_CHUNK = 14  # LattePipeline's decode_latents_with_temporal_decoder
# What the official sampling configs pass to `DDIMScheduler.from_pretrained(..., subfolder="scheduler")`.
SCHEDULER_OVERRIDES = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)


# ---- the scheduler -------------------------------------------------------------------------
def load_scheduler(folder: paths.PathLike | None = None, kind: str = "ddim"):
    """diffusers' DDIM (or DDPM, learned-range variance as the official configs) scheduler of a
    Latte pipeline folder (`scheduler/scheduler_config.json`), with the official overrides; the
    same settings on diffusers' defaults when the folder or the file is absent."""
    if kind not in ("ddim", "ddpm"):
        raise UserError(f"unknown scheduler {kind!r}: use ddim (Latte's) or ddpm")
    cls, extra = (DiffusersDDIM, {}) if kind == "ddim" else (DiffusersDDPM, {"variance_type": "learned_range"})
    if folder is not None:
        cfg = paths.as_path(folder) / "scheduler" / "scheduler_config.json"
        if cfg.exists():
            return cls.from_config(cfg, **SCHEDULER_OVERRIDES, **extra)
    return cls(**SCHEDULER_OVERRIDES, **extra)


# ---- text ----------------------------------------------------------------------------------
def _t5_width(spec: str) -> int | None:
    """d_model from the T5 folder's config.json (also under text_encoder/), before any weights load."""
    if spec.startswith("hf://"):
        return None
    p = paths.as_path(spec)
    for cfg in (p / "config.json", p / "text_encoder" / "config.json"):
        if p.is_dir() and cfg.exists():
            try:
                return int(json.loads(cfg.read_text())["d_model"])
            except (ValueError, KeyError, TypeError):
                return None
    return None


def _width_error(width: int, caption_channels: int, what: str) -> UserError:
    return UserError(
        f"the text encoder's width {width} ({what}) does not match the model's caption projection "
        f"(caption_channels {caption_channels}): use the T5 the model was trained with (T5 v1.1 XXL: 4096)"
    )


def prompt_embeddings(
    prompts: Sequence[str],
    negative_prompt: str = "",
    *,
    embeddings: paths.PathLike | None = None,
    t5: str | None = None,
    tokenizer: paths.PathLike | None = None,
    caption_channels: int | None = None,
    t5_dtype: str = "float32",
    max_length: int = 120,
    batch_size: int = 8,
):
    """A `TextEmbeddings` (skipdit_jax.encoders.text) holding every prompt and the negative
    prompt: read from an `embeddings` file (`skipdit encode-text`), or encoded here with the T5
    encoder `t5` and the tokenizer folder `tokenizer` (Latte's lower-casing, 120 tokens). With
    `caption_channels`, a T5 of another width is one UserError (checked on the T5's config.json
    before its weights load, when it has one)."""
    from skipdit_jax.encoders import text

    wanted = list(dict.fromkeys([*prompts, negative_prompt]))
    if embeddings is not None:
        emb = text.load_text_embeddings(embeddings)
        if caption_channels is not None and emb.text_emb.shape[2] != caption_channels:
            raise _width_error(emb.text_emb.shape[2], caption_channels, f"the embeddings in {embeddings}")
        emb.lookup(wanted)  # one line naming a missing prompt
        return emb
    if t5 is None or tokenizer is None:
        raise UserError("encoding prompts needs --t5 and --tokenizer (or --embeddings FILE from skipdit encode-text)")
    tok = text.load_tokenizer(tokenizer)  # cheap checks before the (large) encoder loads
    width = _t5_width(str(t5))
    if caption_channels is not None and width is not None and width != caption_channels:
        raise _width_error(width, caption_channels, f"d_model of {t5}")
    from skipdit_jax.encoders.t5 import load_t5

    cfg, params = load_t5(str(t5), dtype=t5_dtype, param_dtype=t5_dtype)
    if caption_channels is not None and cfg.d_model != caption_channels:
        raise _width_error(cfg.d_model, caption_channels, f"d_model of {t5}")
    enc = text.encode_prompts(wanted, tok, cfg, params, max_length, batch_size=batch_size)
    return text.TextEmbeddings(wanted, enc["text_emb"], enc["text_mask"], {"t5": str(t5)})


def text_condition_for(emb, prompts: Sequence[str], negative_prompt: str = "") -> dict[str, np.ndarray]:
    """The model's condition dict (numpy) for `prompts`, the unconditional row being the
    negative prompt's embedding under each prompt's mask (LattePipeline's mask_feature)."""
    from skipdit_jax.encoders.text import text_condition

    return text_condition(emb, list(prompts), negative_prompt, null_mask="official")


# ---- sampling ------------------------------------------------------------------------------
def build_t2v_sampler(config, scheduler, num_steps: int = LATTE_STEPS, cfg_scale: float = LATTE_CFG, cache=None):
    """`build_text_sampler` with Latte's defaults (DDIM-50, guidance 7.5)."""
    return build_text_sampler(config, scheduler, num_steps, cfg_scale, cache)


# ---- decoding ------------------------------------------------------------------------------
@dataclasses.dataclass
class VideoDecoder:
    """Latents (B, F, h, w, 4) -> frames (B, F, H, W, 3) float in ~[-1, 1].

    kind: "temporal" (SVD's temporal decoder, chunks of 14 frames per video), "sd" (the SD VAE,
    frame by frame, `frames_per_call` frames of each video per call) or "latents" (no VAE:
    latent channels 0-2 standardised, for a look at a model without its VAE)."""

    kind: str
    config: Any = None
    params: Any = None
    frames_per_call: int = 16

    def __call__(self, latents) -> np.ndarray:
        if self.kind == "temporal":
            from skipdit_jax.encoders.vae_temporal import decode_video_latents_temporal

            return np.asarray(decode_video_latents_temporal(self.params, self.config, jnp.asarray(latents), TEMPORAL_CHUNK))
        if self.kind == "sd":
            return np.asarray(_sd_decode(self.params, self.config, jnp.asarray(latents), int(self.frames_per_call)))
        return images.latents_for_display(np.asarray(latents))

    @property
    def note(self) -> str:
        return {
            "temporal": "decoded with the temporal VAE decoder (14-frame chunks)",
            "sd": "decoded with the SD VAE frame by frame",
        }.get(self.kind, "latent channels 0-2, NOT decoded frames (give a VAE to decode)")


@functools.cache
def _sd_decode_fn():
    from skipdit_jax.encoders.vae import decode_video_latents

    return jax.jit(decode_video_latents, static_argnums=(1, 3))


def _sd_decode(params, config, latents, frames_per_call):
    return _sd_decode_fn()(params, config, latents, frames_per_call)


def load_decoder(
    folder: paths.PathLike | None = None,
    *,
    vae: str | None = None,
    temporal_vae: str | None = None,
    frames_per_call: int = 16,
    latent_channels: int = 4,
) -> VideoDecoder:
    """The decoder to use: `temporal_vae` or `vae` when given (not both), else the pipeline
    folder's `vae_temporal_decoder/` (the official default), else its `vae/`, else none."""
    if vae and temporal_vae:
        raise UserError("give --vae (SD VAE, per frame) or --temporal_vae (SVD temporal decoder), not both")
    if not vae and not temporal_vae and folder is not None:
        p = paths.as_path(folder)
        if (p / "vae_temporal_decoder" / "config.json").exists():
            temporal_vae = str(p / "vae_temporal_decoder")
        elif (p / "vae" / "config.json").exists():
            vae = str(p / "vae")
    if temporal_vae:
        from skipdit_jax.encoders.vae_temporal import load_temporal_vae

        config, params = load_temporal_vae(temporal_vae)
        dec = VideoDecoder("temporal", config, params)
    elif vae:
        from skipdit_jax.encoders.vae import load_vae

        config, params = load_vae(vae)
        dec = VideoDecoder("sd", config, params, frames_per_call)
    else:
        return VideoDecoder("latents")
    if config.latent_channels != latent_channels:
        raise UserError(f"the VAE's {config.latent_channels} latent channels do not fit the model's {latent_channels} channels")
    return dec


def frames_to_uint8(frames) -> np.ndarray:
    """Frames in [-1, 1] -> uint8 as LattePipeline: ((x / 2 + 0.5).clamp(0, 1) * 255), truncated."""
    x = np.asarray(frames, np.float32)
    return (np.clip(x / 2.0 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---- all of it -----------------------------------------------------------------------------
def generate_videos(
    config,
    params,
    condition: dict,
    seeds: Sequence[int],
    *,
    scheduler=None,
    num_steps: int = LATTE_STEPS,
    cfg_scale: float = LATTE_CFG,
    cache=None,
    decoder: VideoDecoder | None = None,
    sharding=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(latents (B, F, h, w, 4) float32, videos (B, F, H, W, 3) uint8) for a text condition
    (`text_condition_for`) and one seed per video. `sharding` (e.g. a NamedSharding over the
    local devices' batch axis) places the batch; the parameters must already be placed."""
    family = family_of(config)
    scheduler = scheduler if scheduler is not None else load_scheduler(None)
    keys, noise = make_noise(seeds, family.sample_shape)
    cond = {k: jnp.asarray(v) for k, v in condition.items()}
    family.check_condition(cond, noise.shape[0])
    if sharding is not None:
        keys, noise, cond = jax.device_put((keys, noise, cond), sharding)
    fn = build_t2v_sampler(config, scheduler, num_steps, cfg_scale, cache)
    latents = fn(params, noise, cond, jnp.float32(cfg_scale), keys)
    decoder = decoder if decoder is not None else VideoDecoder("latents")
    frames = decoder(latents)
    if decoder.kind == "latents":
        frames = np.clip(frames, -1.0, 1.0)
    return np.asarray(latents, np.float32), frames_to_uint8(frames)
