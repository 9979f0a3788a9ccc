"""`skipdit sample MODEL`: a PNG grid and the raw samples from a (Skip-)DiT.

MODEL is a model directory (`skipdit convert`), an official checkpoint file or an
`hf://org/repo/file` path. With `--vae` the latents are decoded to images; without it a
latent model's grid shows latent channels 0-2 (said on stdout), while a pixel-space model
(1 or 3 channels) shows its samples directly.
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
from skipdit_jax.errors import UserError
from skipdit_jax.models.families import family_of
from skipdit_jax.sampling import build_sampler, check_settings, resolve_respacing, sampling_timesteps, validate_inputs

USAGE = "MODEL [--labels 207,360,...] [--sampler ddpm|ddim] [--steps N] [--cfg_scale S] [--cache N[,k[,start,close]]] [--vae SPEC] [--out DIR]"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "labels", None, "comma-separated class ids (default: DiT's 8 demo classes for ImageNet, else 0..min(C,16)-1)", flag_values=fv
    )
    flags.DEFINE_integer("seed", 0, "seed of the initial noise and the sampler's noise", flag_values=fv)
    flags.DEFINE_enum("sampler", "ddpm", ["ddpm", "ddim"], "ancestral DDPM or DDIM (eta 0)", flag_values=fv)
    flags.DEFINE_integer("steps", 250, "sampling steps (ADM respacing 'N' for ddpm, 'ddimN' for ddim)", flag_values=fv)
    flags.DEFINE_float("cfg_scale", 4.0, "classifier-free guidance scale (1 = off)", flag_values=fv)
    flags.DEFINE_integer(
        "cfg_channels", None, "guide only the first C output channels (3 = official DiT); default: all", flag_values=fv
    )
    flags.DEFINE_string("cache", None, "Skip-Cache spec N[,shallow_blocks[,start_t,close_t]], e.g. 2 or 3,4,1000,20", flag_values=fv)
    flags.DEFINE_string("vae", None, "SD VAE to decode latents: a diffusers folder, .safetensors or hf://org/repo", flag_values=fv)
    flags.DEFINE_string("out", "samples", "output directory", flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "samples per device call", flag_values=fv)
    flags.DEFINE_integer("num", 8, "samples to draw from an unconditional model", flag_values=fv)
    flags.DEFINE_integer("num_heads", None, "attention heads, for an official checkpoint file", flag_values=fv)
    flags.DEFINE_string("preset", None, "model preset, for an official checkpoint file (e.g. DiT-XL/2)", flag_values=fv)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "compute dtype (default: the model's)", flag_values=fv)
    flags.DEFINE_bool("clip_denoised", False, "clip the x0 prediction to [-1, 1] (pixel-space models)", flag_values=fv)
    flags.DEFINE_bool("compare", True, "with --cache, also time the uncached sampler for the measured speedup", flag_values=fv)


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
    if labels is None:
        labels = _default_labels(config.num_classes) if family.is_conditional else np.zeros((fv.num,), np.int32)
    # The noise is built with the model's sample shape, so this checks the labels (range, count).
    noise = jax.ShapeDtypeStruct((labels.size, *family.sample_shape), jnp.float32)
    validate_inputs(config, noise, labels if family.is_conditional else None)
    guided = check_settings(config, cache=cache, cfg_scale=fv.cfg_scale, cfg_channels=fv.cfg_channels)
    return family, labels, guided


def main(args: list[str], fv: flags.FlagValues) -> int:
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
    if fv.cfg_channels is not None and fv.cfg_channels < 1:
        raise UserError(f"--cfg_channels must be >= 1 (or unset for all channels), got {fv.cfg_channels}")
    cache = parse_cache_spec(fv.cache)
    respacing = resolve_respacing(fv.sampler, fv.steps, None)
    out = paths.as_path(fv.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    config = model_store.read_model_config(args[0]) if model_store.has_model_config(args[0]) else None
    if config is not None:
        _settle(config, fv, labels, cache)

    config, params = model_store.load_model(args[0], num_heads=fv.num_heads, preset=fv.preset)
    if fv.dtype:
        config = config.replace(dtype=fv.dtype)
    family, labels, guided = _settle(config, fv, labels, cache)
    vae = None
    if fv.vae:
        from skipdit_jax.encoders import vae as vae_lib

        vae = vae_lib.load_vae(fv.vae)

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

    outs, sample_s = [], 0.0
    for i, (z, y) in enumerate(tqdm(batches, desc="sampling", unit="batch")):
        x, dt = _timed(compiled[len(z)], params, z, y, scale, jax.random.fold_in(sample_key, i))
        outs.append(np.asarray(x))
        sample_s += dt
    samples = np.concatenate(outs)
    report = {
        "model": args[0],
        "labels": None if cond is None else labels.tolist(),
        "seed": fv.seed,
        "sampler": fv.sampler,
        "respacing": respacing,
        "cfg_scale": fv.cfg_scale,
        "cfg_channels": fv.cfg_channels,
        "cache": None if cache is None else dataclasses.asdict(cache),
        "compile_seconds": round(compile_s, 3),
        "sampling_seconds": round(sample_s, 3),
    }
    print(f"sampled {num} x {shape[1:]} in {sample_s:.2f} s ({compile_s:.1f} s compiling)")

    if cache is not None:
        plan = cache.plan(sampling_timesteps(fv.sampler, fv.steps), family.depth_units)
        report.update(full_steps=plan.num_full, cached_steps=plan.num_cached, predicted_speedup=round(plan.predicted_speedup, 3))
        line = f"Skip-Cache N={cache.interval} k={cache.shallow_blocks}: {plan.num_full} full / {plan.num_cached} cached steps, predicted speedup {plan.predicted_speedup:.2f}x"
        if fv.compare:
            z, y = batches[0]
            full_fn = make(None).lower(params, z, y, scale, sample_key).compile()
            _, t_full = _timed(full_fn, params, z, y, scale, sample_key)
            _, t_cached = _timed(compiled[len(z)], params, z, y, scale, sample_key)
            report.update(measured_speedup=round(t_full / t_cached, 3), full_seconds_first_batch=round(t_full, 3))
            line += f", measured {t_full / t_cached:.2f}x ({t_full:.2f} s full vs {t_cached:.2f} s cached, first batch)"
        print(line)

    if vae is not None:
        from skipdit_jax.encoders import vae as vae_lib

        vae_config, vae_params = vae
        pictures = np.concatenate(
            [np.asarray(vae_lib.decode_latents(vae_params, vae_config, jnp.asarray(samples[i : i + bs]))) for i in range(0, len(samples), bs)]
        )
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
