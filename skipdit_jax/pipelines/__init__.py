"""Sampling pipelines that put a model together with its encoders and decoders
(`text_to_video`: prompts -> Latte-T2V(-skip) -> videos; `text_to_image`: prompts ->
Hunyuan-DiT v1.2 -> images; `common`: the noise, sampler and compilation they share)."""

from skipdit_jax.pipelines.common import build_text_sampler, compiled_for, make_noise
from skipdit_jax.pipelines.text_to_video import (
    LATTE_FPS,
    VideoDecoder,
    build_t2v_sampler,
    frames_to_uint8,
    generate_videos,
    load_decoder,
    load_scheduler,
    prompt_embeddings,
    text_condition_for,
)

__all__ = [
    "LATTE_FPS",
    "VideoDecoder",
    "build_t2v_sampler",
    "build_text_sampler",
    "compiled_for",
    "frames_to_uint8",
    "generate_videos",
    "load_decoder",
    "load_scheduler",
    "make_noise",
    "prompt_embeddings",
    "text_condition_for",
]
