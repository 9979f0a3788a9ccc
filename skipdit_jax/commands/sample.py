"""`skipdit sample MODEL`: a PNG grid (images) or one MP4 + GIF per sample (videos), and
the raw samples, from a (Skip-)DiT or a Latte(-skip).

MODEL is a model directory (`skipdit convert`), an official checkpoint file or an
`hf://org/repo/file` path. With `--vae` the latents are decoded to images (a video's
frames `--decode_frames` at a time); without it a latent model's output shows latent
channels 0-2 (said on stdout), while a pixel-space model (1 or 3 channels) shows its
samples directly.

A text-to-video model (Latte-T2V(-skip)) samples from prompts instead of labels: see
`skipdit_jax.commands.sample_t2v` (--prompt / --prompts / --embeddings, --pipeline, --t5,
--tokenizer, --scheduler, --temporal_vae). A Hunyuan-DiT v1.2 (text-to-image: `--model hunyuan
--pipeline DIR`, a HunyuanDiT-v1.2(-Diffusers) folder or a hunyuan model directory) samples one
image per prompt: see `skipdit_jax.commands.sample_t2i` (--height/--width, --cache N
--cache_at_branch k, --prompts FILE for the COCO-captions mode).
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from tqdm import tqdm

from skipdit_jax import images, model_store, paths
from skipdit_jax.cache import parse_cache_spec
from skipdit_jax.commands import sample_t2i, sample_t2v
from skipdit_jax.errors import UserError
from skipdit_jax.models.families import family_of
from skipdit_jax.sampling import build_sampler, check_settings, resolve_respacing, sampling_timesteps, validate_inputs

USAGE = (
    "MODEL [--labels 207,360,... | --num N] [--sampler ddpm|ddim] [--steps N] [--cfg_scale S] [--cfg_channels C] "
    "[--cache N[,k[,start,close]]] [--vae SPEC] [--decode_frames 16] [--fps 8] [--out DIR]\n"
    "       (text-to-video) MODEL --prompt TEXT [--prompt ...] | --prompts FILE | --embeddings FILE [--pipeline LATTE_DIR] "
    "[--t5 SPEC --tokenizer DIR] [--cache N2-700-50] [--temporal_vae SPEC | --vae SPEC] [--seed S] [--out DIR]\n"
    "       (text-to-image) [MODEL] --model hunyuan --pipeline HUNYUAN_DIR --prompt TEXT [--prompt ...] | --prompts FILE "
    "[--height 1024 --width 1024] [--cache N [--cache_at_branch k]] [--steps 100] [--cfg_scale 6] [--negative_prompt TEXT] "
    "[--seed S] [--out DIR]"
)
T2I_FLAGS = ("height", "width", "any_resolution", "cache_at_branch", "clip", "clip_tokenizer", "folder_scheduler", "fsdp")


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "labels", None,
        "comma-separated class ids (default: DiT's 8 demo classes for ImageNet, else 0..min(C,16)-1; video models 0..min(C,4)-1)",
        flag_values=fv,
    )
    flags.DEFINE_integer("seed", 0, "seed of the initial noise and the sampler's noise", flag_values=fv)
    flags.DEFINE_enum("sampler", "ddpm", ["ddpm", "ddim"], "ancestral DDPM or DDIM (eta 0)", flag_values=fv)
    flags.DEFINE_integer("steps", 250, "sampling steps (ADM respacing 'N' for ddpm, 'ddimN' for ddim)", flag_values=fv)
    flags.DEFINE_float("cfg_scale", 4.0, "classifier-free guidance scale (1 = off)", flag_values=fv)
    flags.DEFINE_integer(
        "cfg_channels", None, "guide only the first C output channels (3 = official DiT); default: all", flag_values=fv
    )
    flags.DEFINE_string(
        "cache", None, "Skip-Cache spec N[,shallow_blocks[,start_t,close_t]], e.g. 2 or 3,4,1000,20", flag_values=fv
    )
    flags.DEFINE_string(
        "vae", None, "SD VAE to decode latents: a diffusers folder, .safetensors or hf://org/repo", flag_values=fv
    )
    flags.DEFINE_string("out", "samples", "output directory", flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "samples per device call", flag_values=fv)
    flags.DEFINE_integer("num", 8, "samples to draw from an unconditional model (video models: 4 unless given)", flag_values=fv)
    flags.DEFINE_integer("decode_frames", 16, "video models: frames per VAE decoder call (bounds memory)", flag_values=fv)
    flags.DEFINE_float("fps", 8.0, "video models: frame rate of the MP4s and GIFs", flag_values=fv)
    flags.DEFINE_integer("num_heads", None, "attention heads, for an official checkpoint file", flag_values=fv)
    flags.DEFINE_string("preset", None, "model preset, for an official checkpoint file (e.g. DiT-XL/2)", flag_values=fv)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "compute dtype (default: the model's)", flag_values=fv)
    flags.DEFINE_bool("clip_denoised", False, "clip the x0 prediction to [-1, 1] (pixel-space models)", flag_values=fv)
    flags.DEFINE_bool("compare", True, "with --cache, also time the uncached sampler for the measured speedup", flag_values=fv)
    sample_t2v.define_text_flags(fv)
    sample_t2i.define_t2i_flags(fv)


def _parse_labels(text: str) -> np.ndarray:
    try:
        return np.asarray([int(v) for v in text.split(",") if v.strip()], np.int32)
    except ValueError:
        raise UserError(f"--labels must be comma-separated integers, got {text!r}") from None


def _default_labels(num_classes: int) -> np.ndarray:
    if num_classes == 1000:  # ImageNet: the classes of DiT's sample.py grid
        return np.asarray([207, 360, 387, 974, 88, 979, 417, 279], np.int32)
    return np.arange(max(1, min(num_classes, 16)), dtype=np.int32) % max(num_classes, 1)


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def _settle(config, fv, labels, cache):
    """Check every sampling setting against the model config (cheap, before any heavy
    work); returns (family, labels, guided)."""
    family = family_of(config)
    if not family.is_conditional and fv.labels is not None:
        raise UserError("this model is unconditional: drop --labels (use --num for the sample count)")
    video = len(family.sample_shape) == 4
    if labels is None and video:  # a few videos by default: each is F images
        num = fv.num if fv["num"].present else 4
        labels = np.arange(min(config.num_classes, 4), dtype=np.int32) if family.is_conditional else np.zeros((num,), np.int32)
    elif labels is None:
        labels = _default_labels(config.num_classes) if family.is_conditional else np.zeros((fv.num,), np.int32)
    # The noise is built with the model's sample shape, so this checks the labels (range, count).
    noise = jax.ShapeDtypeStruct((labels.size, *family.sample_shape), jnp.float32)
    validate_inputs(config, noise, labels if family.is_conditional else None)
    guided = check_settings(config, cache=cache, cfg_scale=fv.cfg_scale, cfg_channels=fv.cfg_channels)
    return family, labels, guided


def _is_text(config) -> bool:
    return family_of(config).condition_kind == "text"


def _no_text_flags(config, fv) -> None:
    t2i_given = [f"--{n}" for n in T2I_FLAGS if fv[n].present]
    if t2i_given:
        raise UserError(f"{t2i_given[0]} is for text-to-image models (Hunyuan-DiT); this is a {family_of(config).name} model")
    given = sample_t2v.text_flags_given(fv)
    if given:
        raise UserError(
            f"{given[0]} is for text-to-video models; this is a {family_of(config).name} model "
            f"({'use --labels' if family_of(config).is_conditional else 'unconditional'})"
        )


def main(args: list[str], fv: flags.FlagValues) -> int:
    if sample_t2i.wants_t2i(args, fv):
        return sample_t2i.main_t2i(args, fv)
    if len(args) != 1:
        raise UserError(f"expected one MODEL argument; usage: skipdit sample {USAGE}")
    # Flags that can be checked without the model first, then the model's config (read on
    # its own for a model directory or training workdir), all before loading weights, the
    # VAE or compiling anything.
    labels = _parse_labels(fv.labels) if fv.labels is not None else None
    if labels is not None and labels.size == 0:
        raise UserError("--labels is empty")
    if fv.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {fv.batch_size}")
    if fv.num < 1:
        raise UserError(f"--num must be >= 1, got {fv.num}")
    if fv.decode_frames < 1:
        raise UserError(f"--decode_frames must be >= 1, got {fv.decode_frames}")
    if fv.fps <= 0:
        raise UserError(f"--fps must be > 0, got {fv.fps}")
    if fv.cfg_channels is not None and fv.cfg_channels < 1:
        raise UserError(f"--cfg_channels must be >= 1 (or unset for all channels), got {fv.cfg_channels}")
    cache = parse_cache_spec(fv.cache)
    respacing = resolve_respacing(fv.sampler, fv.steps, None)
    out = paths.as_path(fv.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    config = model_store.read_model_config(args[0]) if model_store.has_model_config(args[0]) else None
    if (config is not None and _is_text(config)) or (config is None and sample_t2v.is_diffusers_folder(args[0])):
        return sample_t2v.main_text(args, fv, cache)
    if config is not None:
        _no_text_flags(config, fv)
        _settle(config, fv, labels, cache)

    config, params = model_store.load_model(args[0], num_heads=fv.num_heads, preset=fv.preset)
    if family_of(config).name == "hunyuan":  # a Hunyuan-DiT weight file
        return sample_t2i.main_t2i(args, fv, loaded=(config, params))
    if _is_text(config):
        return sample_t2v.main_text(args, fv, cache, loaded=(config, params))
    _no_text_flags(config, fv)
    if fv.dtype:
        config = config.replace(dtype=fv.dtype)
    family, labels, guided = _settle(config, fv, labels, cache)
    vae = None
    if fv.vae:
        from skipdit_jax.encoders import vae as vae_lib

        vae = vae_lib.load_vae(fv.vae)
        if vae[0].latent_channels != family.eps_channels:
            raise UserError(
                f"the VAE's {vae[0].latent_channels} latent channels do not fit the model's {family.eps_channels} channels"
            )

    key = jax.random.key(fv.seed)
    noise_key, sample_key = jax.random.split(key)
    num = labels.size
    shape = (num, *family.sample_shape)
    noise = jax.random.normal(noise_key, shape, jnp.float32)
    cond = labels if family.is_conditional else None
    make = lambda c: build_sampler(config, fv.sampler, respacing, guided, fv.cfg_channels, c, 0.0, fv.clip_denoised)  # noqa: E731
    scale = jnp.float32(fv.cfg_scale)

    bs = min(fv.batch_size, num)
    batches = [(noise[i : i + bs], None if cond is None else jnp.asarray(cond[i : i + bs])) for i in range(0, num, bs)]
    t0 = time.perf_counter()
    compiled = {}
    for z, y in batches:
        if len(z) not in compiled:
            compiled[len(z)] = make(cache).lower(params, z, y, scale, sample_key).compile()
    compile_s = time.perf_counter() - t0

    outs, sample_s, first_s = [], 0.0, None
    for i, (z, y) in enumerate(tqdm(batches, desc="sampling", unit="batch")):
        x, dt = _timed(compiled[len(z)], params, z, y, scale, jax.random.fold_in(sample_key, i))
        outs.append(np.asarray(x))
        sample_s += dt
        first_s = dt if first_s is None else first_s
    samples = np.concatenate(outs)
    report = {
        "model": args[0],
        "labels": None if cond is None else labels.tolist(),
        "seed": fv.seed,
        "sampler": fv.sampler,
        "respacing": respacing,
        "cfg_scale": fv.cfg_scale,
        "cfg_channels": fv.cfg_channels,
        "guided_channels": (fv.cfg_channels or family.eps_channels) if guided else 0,
        "cache": None if cache is None else dataclasses.asdict(cache),
        "compile_seconds": round(compile_s, 3),
        "sampling_seconds": round(sample_s, 3),
    }
    print(f"sampled {num} x {shape[1:]} in {sample_s:.2f} s ({compile_s:.1f} s compiling)")

    if cache is not None:
        plan = cache.plan(sampling_timesteps(fv.sampler, fv.steps), family.depth_units)
        report.update(full_steps=plan.num_full, cached_steps=plan.num_cached, predicted_speedup=round(plan.predicted_speedup, 3))
        line = (
            f"Skip-Cache N={cache.interval} k={cache.shallow_blocks}: {plan.num_full} full / {plan.num_cached} cached steps, "
            f"predicted speedup {plan.predicted_speedup:.2f}x"
        )
        if fv.compare:
            z, y = batches[0]
            full_fn = make(None).lower(params, z, y, scale, sample_key).compile()
            _, t_full = _timed(full_fn, params, z, y, scale, sample_key)
            t_cached = first_s  # the cached program's first call, as this is the full one's
            report.update(measured_speedup=round(t_full / t_cached, 3), full_seconds_first_batch=round(t_full, 3))
            line += f", measured {t_full / t_cached:.2f}x ({t_full:.2f} s full vs {t_cached:.2f} s cached, first batch)"
        print(line)

    if len(family.sample_shape) == 4:
        return _write_videos(out, samples, vae, family, report, fv)
    return _write_images(out, samples, vae, family, report, bs)


def _write_images(out, samples, vae, family, report, bs) -> int:
    if vae is not None:
        from skipdit_jax.encoders import vae as vae_lib

        vae_config, vae_params = vae
        pictures = np.concatenate([
            np.asarray(vae_lib.decode_latents(vae_params, vae_config, jnp.asarray(samples[i : i + bs])))
            for i in range(0, len(samples), bs)
        ])
        note = "decoded with the VAE"
    elif family.eps_channels in (1, 3):
        pictures, note = samples, "pixel-space samples"
    else:
        pictures, note = images.latents_for_display(samples), "latent channels 0-2, NOT decoded images (pass --vae to decode)"
    report["grid"] = note
    # Everything is computed before the first write, and each file is written atomically.
    paths.save_npy(out / "samples.npy", samples)
    images.save_grid(pictures, out / "samples.png", upscale=max(1, 128 // pictures.shape[1]))
    paths.atomic_write_text(out / "samples.json", json.dumps(report, indent=2))
    print(f"wrote {out / 'samples.png'} ({note}), {out / 'samples.npy'} (raw samples, NHWC float32) and samples.json")
    return 0


def decode_video_frames(vae, latents: np.ndarray, frames_per_call: int) -> np.ndarray:
    """Video latents (N, F, h, w, C) -> frames (N, F, H, W, C_out) in [-1, 1], decoded
    `frames_per_call` frames per VAE call (one compiled program: the last chunk is padded)."""
    from skipdit_jax.encoders import vae as vae_lib

    vae_config, vae_params = vae
    flat = latents.reshape(-1, *latents.shape[2:])
    n = min(frames_per_call, len(flat))
    decode = jax.jit(vae_lib.decode_latents, static_argnums=1)
    out = []
    for i in range(0, len(flat), n):
        chunk = flat[i : i + n]
        padded = np.concatenate([chunk, np.zeros((n - len(chunk), *chunk.shape[1:]), chunk.dtype)]) if len(chunk) < n else chunk
        out.append(np.asarray(decode(vae_params, vae_config, jnp.asarray(padded)))[: len(chunk)])
    frames = np.concatenate(out)
    return frames.reshape(*latents.shape[:2], *frames.shape[1:])


def _write_videos(out, samples, vae, family, report, fv) -> int:
    """One MP4 and one GIF per sample (OUT/sample_{i:03d}.mp4/.gif at --fps) plus the raw
    latents (samples.npy, (N, F, h, w, C) float32) and samples.json."""
    from skipdit_jax import videos

    n, f = samples.shape[:2]
    if vae is not None:
        frames, note = decode_video_frames(vae, samples, fv.decode_frames), "decoded with the VAE"
    elif family.eps_channels in (1, 3):
        frames, note = samples, "pixel-space samples"
    else:
        flat = images.latents_for_display(samples.reshape(n * f, *samples.shape[2:]))
        frames, note = flat.reshape(n, f, *flat.shape[1:]), "latent channels 0-2, NOT decoded frames (pass --vae to decode)"
    clips = videos.video_to_uint8(frames)
    if clips.shape[-1] == 1:
        clips = np.repeat(clips, 3, axis=-1)
    up = max(1, 128 // clips.shape[2])  # small (latent) frames: nearest-neighbour upscaled for viewing
    if up > 1:
        clips = clips.repeat(up, axis=2).repeat(up, axis=3)
    report.update(videos=note, fps=fv.fps, frames=int(f))
    names = [f"sample_{i:03d}" for i in range(n)]
    for name, clip in zip(names, clips, strict=True):
        videos.write_mp4(out / f"{name}.mp4", clip, fps=fv.fps)
        videos.write_gif(out / f"{name}.gif", clip, fps=fv.fps)
    paths.save_npy(out / "samples.npy", samples)
    paths.atomic_write_text(out / "samples.json", json.dumps(report, indent=2))
    print(
        f"wrote {n} videos of {f} frames at {fv.fps:g} fps ({note}): {out / names[0]}.mp4/.gif ... {names[-1]}.mp4/.gif, "
        f"{out / 'samples.npy'} (raw samples, NFHWC float32) and samples.json"
    )
    return 0
