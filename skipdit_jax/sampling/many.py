"""Large sample sets for FID / FVD: deterministic per sample, sharded, resumable, .npz out.

Sample i is a function of (seed, i) alone: with `key_i = fold_in(key(seed), i)` its
initial noise is `normal(fold_in(key_i, NOISE))`, its class label
`randint(fold_in(key_i, LABEL))` (uniform over the classes, as the official
sample_ddp.py draws them) and its sampler noise at step index s
`normal(fold_in(fold_in(key_i, STEP), s))` (the per-sample keys of
`skipdit_jax.sampling.build_sampler`). So which batch, device or process draws a sample
does not change its inputs; the outputs are equal up to XLA's numerics for different
program shapes (the tests measure this). An adaptive cache (TeaCache) decides per batch,
so with it a sample also depends on the other samples of its batch (fixed by the seed
and the batch size, so runs and resumes stay reproducible).

One jitted function per global batch maps sample indices to finished uint8 images or
videos (and labels): noise and labels are drawn on the device, then sampling, the VAE
decode (frame chunk by frame chunk for videos) and the official conversion
`clip(127.5 * x + 128, 0, 255) -> uint8` run fused, batch-sharded over a mesh of every
device of every process. The host only gathers uint8 batches and writes.

The output directory (`skipdit_jax.sampling.shards`; process 0 writes, every process
computes) holds settings.json, the shards, the final .npz (images: ADM's
`samples_{N}x{H}x{W}x3.npz`; videos: `samples.npz` with arr_0 (N, F, H, W, 3)), optional
PNGs / MP4s and summary.json. A re-run with the same settings redoes only missing or
unreadable shards and writes the same bytes; other settings are one `UserError` that
touches nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import skipdit_jax
from skipdit_jax import paths, sharding
from skipdit_jax.errors import UserError
from skipdit_jax.models.families import config_to_dict, family_of
from skipdit_jax.sampling.sampler import build_sampler, check_settings, resolve_respacing, sampling_timesteps
from skipdit_jax.sampling.shards import (  # noqa: F401  (public names of this module before the split)
    PNG_DIR,
    SETTINGS_FILE,
    SHARDS_DIR,
    SUMMARY_FILE,
    VIDEO_DIR,
    VIDEO_NPZ,
    ZIP_DATE,
    Plan,
    _assemble,
    _barrier,
    _write_pngs,
    _write_videos,
    fingerprint,
    npz_bytes,
    prepare_out_dir,
    save_npz,
    video_name,
    write_npz,
)

# The official FID-50K settings (DiT / Skip-DiT sample_ddp.py): 250 DDPM steps, guidance
# 1.5 on the first 3 eps channels, labels uniform over the classes, SD VAE (ft-EMA) decode.
FID_PRESET = {
    "sampler": "ddpm",
    "steps": 250,
    "cfg_scale": 1.5,
    "cfg_channels": 3,
    "num": 50000,
    "vae": "hf://stabilityai/sd-vae-ft-ema",
}
# The official c2v FVD setting (class-to-video sample_ddp.py with the sample configs and
# scripts, StyleGAN-V's fvd2048_16f): 2048 videos, 250 DDPM steps, guidance 7.0 on all 4
# eps channels for UCF-101 (the c2v forward_with_cfg guides [:, :, :4]), none for the
# unconditional models (Sky / Taichi / FFS: cfg 1.0), labels uniform over the classes,
# sd-vae-ft-ema decode.
FVD_PRESET = {
    "sampler": "ddpm",
    "steps": 250,
    "cfg_scale": 7.0,
    "cfg_channels": None,
    "num": 2048,
    "vae": "hf://stabilityai/sd-vae-ft-ema",
}
PRESETS = {"fid50k": FID_PRESET, "fvd2048": FVD_PRESET}
PRESET_KINDS = {"fid50k": "image", "fvd2048": "video"}
_UNCONDITIONAL = {"fvd2048": {"cfg_scale": 1.0}}  # what a preset sets for an unconditional model

# What each per-sample key is folded with, per purpose.
NOISE, LABEL, STEP = 0, 1, 2


def get_preset(name: str | None, config=None) -> dict:
    """The settings of preset `name` ({} for None). With a model config, also checks
    that the preset fits the model (image vs video) and applies its per-model values."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    preset = dict(PRESETS[name])
    if config is not None:
        family = family_of(config)
        kind = "video" if len(family.sample_shape) == 4 else "image"
        if PRESET_KINDS[name] != kind:
            fits = [n for n, k in PRESET_KINDS.items() if k == kind]
            raise UserError(f"--preset {name} is for {PRESET_KINDS[name]} models; this is a {kind} model (use {', '.join(fits)})")
        if not family.is_conditional:
            preset.update(_UNCONDITIONAL.get(name, {}))
    return preset


# ---- per-sample randomness and pixels (traceable) ---------------------------------------------
def sample_keys(seed: int, indices: jax.Array) -> jax.Array:
    """key_i = fold_in(key(seed), i) for every index: (B,) typed keys."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)


def sample_inputs(seed: int, indices: jax.Array, sample_shape: tuple[int, ...], classes=None, num_classes: int = 0):
    """(noise (B, *sample_shape) float32, labels (B,) int32 or None, step keys (B,)) of the
    given sample indices. Labels are uniform over `classes` (default: 0..num_classes-1);
    none when num_classes == 0."""
    keys = sample_keys(seed, indices)
    fold = lambda purpose: jax.vmap(lambda k: jax.random.fold_in(k, purpose))(keys)  # noqa: E731
    noise = jax.vmap(lambda k: jax.random.normal(k, sample_shape, jnp.float32))(fold(NOISE))
    labels = None
    if num_classes:
        pool = jnp.arange(num_classes, dtype=jnp.int32) if classes is None else jnp.asarray(classes, jnp.int32)
        labels = pool[jax.vmap(lambda k: jax.random.randint(k, (), 0, pool.shape[0]))(fold(LABEL))]
    return noise, labels, fold(STEP)


def to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] images -> uint8 exactly as the official sample_ddp.py:
    `torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)` (truncation)."""
    return jnp.clip(127.5 * x.astype(jnp.float32) + 128.0, 0, 255).astype(jnp.uint8)


def rgb(x: jax.Array) -> jax.Array:
    """3 channels for the ADM format: a 1-channel image repeated; a latent's channels 0-2
    (undecoded latents: only for tests and benchmarks without a VAE)."""
    return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]


def pixel_note(channels: int, vae: bool) -> str:
    if vae:
        return "decoded with the VAE"
    if channels in (1, 3):
        return "pixel-space samples" + (" (1 channel repeated to RGB)" if channels == 1 else "")
    return f"latent channels 0-2 of {channels}, NOT decoded images (pass a VAE to decode)"


# ---- the jitted batch function ----------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def make_batch_fn(
    config,
    mesh,
    *,
    seed: int,
    sampler: str,
    respacing: str,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    cache=None,
    eta: float = 0.0,
    clip_denoised: bool = False,
    classes=None,
    vae_config=None,
    decode_frames: int = 16,
):
    """A jitted `fn(params, vae_params, indices (B,) int32) -> (images uint8 (B, H, W, 3)
    or videos uint8 (B, F, H, W, 3), labels int32 (B,))`, batch-sharded over `mesh`. The
    weights keep whatever sharding they have (replicated, or FSDP-sharded EMA weights during
    training). Labels are -1 for an unconditional model. `vae_params` is None without a
    VAE. A video model's frames go through the VAE about `decode_frames` frames per device
    at a time (`encoders.vae.decode_video_latents`; the chunking does not change the
    result). Cached per setting (all arguments hashable: `classes` a tuple), so a repeated
    run reuses the compiled program."""
    family = family_of(config)
    guided = check_settings(config, cache=cache, cfg_scale=cfg_scale, cfg_channels=cfg_channels)
    run = build_sampler(config, sampler, respacing, guided, cfg_channels, cache, float(eta), bool(clip_denoised))
    num_classes = config.num_classes if family.is_conditional else 0

    def fn(params, vae_params, indices):
        noise, labels, step_keys = sample_inputs(seed, indices, family.sample_shape, classes, num_classes)
        x = run(params, noise, labels, jnp.float32(cfg_scale), step_keys)
        if vae_config is not None:
            from skipdit_jax.encoders.vae import decode_latents, decode_video_latents

            if x.ndim == 5:
                per_device = max(1, x.shape[0] // mesh.size)
                x = decode_video_latents(vae_params, vae_config, x, max(1, int(decode_frames) // per_device))
            else:
                x = decode_latents(vae_params, vae_config, x)
        if labels is None:
            labels = jnp.full(indices.shape, -1, jnp.int32)
        return to_uint8(rgb(x)), labels

    batch = sharding.batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(None, None, batch), out_shardings=(batch, batch))


def to_global(tree, array_sharding):
    """Host arrays every process holds whole -> global arrays (works across processes)."""

    def put(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, array_sharding, lambda idx: a[idx])

    return jax.tree.map(put, tree)


def gather(x: jax.Array) -> np.ndarray:
    """The whole of a batch-sharded array, on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---- the run ------------------------------------------------------------------------------------
def sample_many(
    config,
    params,
    out,
    *,
    num: int,
    seed: int = 0,
    sampler: str = "ddpm",
    num_steps: int | None = 250,
    respacing: str | None = None,
    eta: float = 0.0,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    cache=None,
    vae=None,
    vae_spec: str | None = None,
    classes=None,
    clip_denoised: bool = False,
    batch_size: int = 32,
    png: bool = False,
    videos: bool = False,
    fps: float = 8,
    decode_frames: int = 16,
    compare: bool = True,
    keep_shards: bool = False,
    model: str | None = None,
    progress: bool = True,
    mesh=None,
    _stop_after: int | None = None,
) -> dict:
    """Draw `num` samples into the directory `out` (see the module docstring) and return
    the summary (also written to OUT/summary.json).

    `vae` is (VAEConfig, params) or None; `vae_spec` names it in the settings. `classes`
    restricts the labels to these class ids (default: all). `batch_size` is the global
    batch (a multiple of the device count), also the shard size. With a cache and
    `compare`, one batch is timed with and without the cache for the measured speedup.
    `progress`: a progress bar and a line on what the directory already holds (process
    0). `keep_shards`: keep OUT/shards once the final .npz is written. `_stop_after`
    (tests) raises after that many batches, as a crash would.

    A video model (samples (F, h, w, C)) gives `samples.npz` with arr_0 uint8
    (N, F, H, W, 3); its VAE decode takes about `decode_frames` frames per device at a
    time. `png` (images) writes OUT/png/{i:06d}.png, `videos` (videos) writes
    OUT/videos/sample_{i:06d}.mp4 at `fps`; both only for samples without their file.
    """
    family = family_of(config)
    respacing = resolve_respacing(sampler, num_steps, respacing)
    settings = check_run(
        config, num=num, seed=seed, batch_size=batch_size, cfg_scale=cfg_scale, cfg_channels=cfg_channels, cache=cache,
        classes=classes, eta=eta, sampler=sampler, png=png, videos=videos,
    )
    if int(decode_frames) < 1:
        raise UserError(f"--decode_frames must be >= 1, got {decode_frames}")
    vae_config, vae_params = vae if vae is not None else (None, None)
    if vae_config is not None and vae_config.latent_channels != family.eps_channels:
        raise UserError(
            f"the VAE's {vae_config.latent_channels} latent channels do not fit the model's {family.eps_channels} channels"
        )
    *frames, h, w, _ = family.sample_shape  # frames: [F] for a video model
    if vae_config is not None:
        h, w = h * vae_config.downsample_factor, w * vae_config.downsample_factor
    plan = Plan(num, batch_size, (*frames, h, w, 3))
    settings.update(
        model_family=family.name,
        model_config=_jsonable(config_to_dict(config)),
        model_fingerprint=fingerprint(params),
        sampler=sampler,
        respacing=respacing,
        eta=float(eta),
        clip_denoised=bool(clip_denoised),
        vae=vae_spec if vae_config is not None else None,
        vae_config=_jsonable(dataclasses.asdict(vae_config)) if vae_config is not None else None,
        vae_fingerprint=fingerprint(vae_params) if vae_config is not None else None,
        image_shape=list(plan.image_shape),
        pixels=pixel_note(family.eps_channels, vae_config is not None),
        platform=jax.devices()[0].platform,
        jax_version=jax.__version__,
    )
    out = paths.as_path(out)
    todo, final_done = prepare_out_dir(out, settings, plan, family.is_conditional)
    main = jax.process_index() == 0
    if main and progress:
        have = plan.num_batches - int(todo.sum())
        print(f"{out}: {have} of {plan.num_batches} shards present" + (", final .npz present" if final_done else ""))

    mesh = mesh or sharding.make_mesh()
    rep, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    classes = None if classes is None else tuple(int(c) for c in classes)
    kw = dict(seed=seed, sampler=sampler, respacing=respacing, cfg_scale=cfg_scale, cfg_channels=cfg_channels, eta=eta,
              clip_denoised=clip_denoised, classes=classes, vae_config=vae_config, decode_frames=int(decode_frames))
    summary = {"num": num, "devices": jax.device_count(), "processes": jax.process_count(), "batch_size": batch_size,
               "images": 0, "seconds": 0.0, "images_per_s": None, "compile_seconds": 0.0, "outside_fraction": None,
               "pixels": settings["pixels"], "model": model, "videos": plan.is_video}
    if todo.any():
        g_params, g_vae = to_global(params, rep), to_global(vae_params, rep)
        idx0 = _indices(plan, int(np.argmax(todo)), batch)
        t0 = time.perf_counter()
        fn = make_batch_fn(config, mesh, cache=cache, **kw).lower(g_params, g_vae, idx0).compile()
        summary["compile_seconds"] = round(time.perf_counter() - t0, 3)
        summary.update(_draw(fn, g_params, g_vae, plan, todo, out, batch, main, progress, _stop_after))
        if cache is not None and compare:
            summary.update(_compare(fn, make_batch_fn(config, mesh, cache=None, **kw), g_params, g_vae, idx0))
            if not getattr(cache, "adaptive", False):  # an adaptive cache's schedule is only known while sampling
                plan_ = cache.plan(sampling_timesteps(sampler, None, respacing), family.depth_units)
                summary["predicted_speedup"] = round(plan_.predicted_speedup, 3)
    if not final_done:
        t0 = time.perf_counter()
        if main:
            _assemble(out, plan, family.is_conditional)
        _barrier("assembled")
        summary["assemble_seconds"] = round(time.perf_counter() - t0, 3)
    if main:
        if png:
            summary["png_written"] = _write_pngs(out, plan)
        if videos:
            summary["videos_written"] = _write_videos(out, plan, fps)
        if not keep_shards and (out / SHARDS_DIR).exists():
            paths.remove_dir_quietly(out / SHARDS_DIR)  # the final .npz holds them all
        summary["npz"] = str(out / plan.final_name)
        paths.atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def check_run(
    config, *, num, seed, batch_size, cfg_scale, cfg_channels, cache, classes, eta, sampler, png=False, videos=False
) -> dict:
    """Every cheap check of a run's settings (before loading weights or compiling); returns
    the settings that do not need the weights."""
    family = family_of(config)
    if int(num) != num or num < 1:
        raise UserError(f"--num must be >= 1, got {num}")
    if not 0 <= int(seed) < 2**31:
        raise UserError(f"--seed must be in 0..2**31-1, got {seed}")
    n_dev = jax.device_count()
    if batch_size < 1 or batch_size % n_dev:
        lower, upper = batch_size // n_dev * n_dev, (batch_size // n_dev + 1) * n_dev
        hint = f"{upper}" if lower < 1 else f"{lower} or {upper}"
        raise UserError(f"--batch_size {batch_size} is not a positive multiple of the {n_dev} devices; use {hint}")
    if len(family.sample_shape) not in (3, 4):
        raise UserError(f"sample-many draws images or videos; this model's samples have shape {family.sample_shape}")
    is_video = len(family.sample_shape) == 4
    if png and is_video:
        raise UserError("--png writes images; this is a video model (use --videos for one MP4 per sample)")
    if videos and not is_video:
        raise UserError("--videos writes videos; this is an image model (use --png for one PNG per sample)")
    if family.is_conditional and family.condition_kind != "class":
        raise UserError(f"sample-many draws class labels; the {family.name} family is conditioned on {family.condition_kind}")
    if classes is not None:
        if not family.is_conditional:
            raise UserError("this model is unconditional: drop --classes")
        bad = [c for c in classes if not 0 <= int(c) < config.num_classes]
        if not len(classes) or bad:
            raise UserError(f"--classes must be class ids in 0..{config.num_classes - 1}, got {list(classes)}")
    if eta and sampler != "ddim":
        raise UserError("--eta applies to the ddim sampler only")
    if eta < 0:
        raise UserError(f"--eta must be >= 0, got {eta}")
    check_settings(config, cache=cache, cfg_scale=cfg_scale, cfg_channels=cfg_channels)
    settings = {
        "num": int(num),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "cfg_scale": float(cfg_scale),
        "cfg_channels": cfg_channels,
        "cache": None if cache is None else {"method": cache.name, **_jsonable(dataclasses.asdict(cache))},
        "classes": None if classes is None else [int(c) for c in classes],
        "labels": "uniform over classes (per-sample key)" if family.is_conditional else None,
        "conversion": "clip(127.5 * x + 128, 0, 255) -> uint8",
        "version": skipdit_jax.__version__,
    }
    return settings


def _jsonable(d):
    return json.loads(json.dumps(d, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def _indices(plan: Plan, k: int, batch_sharding) -> jax.Array:
    # Past the end the indices go on (those samples are drawn and dropped), so every batch
    # has the compiled shape.
    lo = k * plan.batch_size
    return to_global(np.arange(lo, lo + plan.batch_size, dtype=np.int32), batch_sharding)


def _draw(fn, params, vae_params, plan: Plan, todo, out, batch_sharding, main: bool, progress: bool, stop_after) -> dict:
    from tqdm import tqdm

    done = sum(plan.bounds(k)[1] - plan.bounds(k)[0] for k in np.flatnonzero(~todo))
    unit = "video" if plan.is_video else "img"
    bar = tqdm(total=plan.num, initial=done, unit=unit, desc="sampling", disable=not (main and progress), smoothing=0.1)
    inside, images, start = 0.0, 0, time.perf_counter()
    for n, k in enumerate(np.flatnonzero(todo)):
        if stop_after is not None and n >= stop_after:
            raise RuntimeError(f"stopped after {n} batches (test hook)")
        idx = _indices(plan, int(k), batch_sharding)
        t0 = time.perf_counter()
        x, y = jax.block_until_ready(fn(params, vae_params, idx))
        inside += time.perf_counter() - t0
        lo, hi = plan.bounds(int(k))
        x, y = gather(x)[: hi - lo], gather(y)[: hi - lo]
        if main:
            save_npz(out / SHARDS_DIR / plan.shard_name(int(k)), {"images": x, "labels": y, "indices": np.arange(lo, hi)})
        images += hi - lo
        bar.update(hi - lo)
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 3) if seconds > 0 else None,
        "inside_seconds": round(inside, 3),
        "outside_fraction": round(1 - inside / seconds, 4) if seconds > 0 else None,
    }


def _compare(cached_fn, make_uncached, params, vae_params, idx, repeats: int = 3) -> dict:
    """Seconds of one batch without and with the cache (both compiled beforehand), each
    the median of `repeats` runs taken in turns, so a passing load hits both alike."""
    full_fn = make_uncached.lower(params, vae_params, idx).compile()

    def timed(f):
        t0 = time.perf_counter()
        jax.block_until_ready(f(params, vae_params, idx))
        return time.perf_counter() - t0

    runs = [(timed(full_fn), timed(cached_fn)) for _ in range(repeats)]
    t_full, t_cached = (float(np.median(column)) for column in zip(*runs, strict=True))
    return {
        "full_seconds_batch": round(t_full, 4),
        "cached_seconds_batch": round(t_cached, 4),
        "measured_speedup": round(t_full / t_cached, 3),
    }
