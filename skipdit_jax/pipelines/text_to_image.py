"""Text-to-image sampling with Hunyuan-DiT v1.2 (and Skip-Cache): prompts -> images, as the
official HunyuanDiT / Skip-DiT inference (`hydit/inference.py`, `sample_t2i.py`) samples.

What the official sampling does, and what this module does the same way:
  * diffusers' DDPMScheduler with the official sampler's settings (scaled_linear betas
    0.00085..0.02, v-prediction, steps_offset 1, no clipping): 100 steps walk t = 991, 981,
    ..., 1 (`DiffusersDDPM.hunyuan()`), whatever the folder layout, so both layouts give the
    same images; `from_folder=True` reads a diffusers folder's `scheduler/scheduler_config.json`
    instead, as diffusers' HunyuanDiTPipeline does (its beta_end may differ from 0.02: the
    v1.2 weights were trained with 0.018, the official sampler uses 0.02);
  * the learned-sigma half of the output is dropped, then classifier-free guidance 6.0 with
    the negative prompt (default: the official Chinese one) as the unconditional branch;
  * Skip-Cache as `HunYuanDiT_cache`: a full step every N steps, always full while t >= 700,
    the cache dropped after t <= 50, a cached step running the first and last
    `cache_at_branch` blocks (`SkipCache(N, k, 700, 50)`);
  * the SDXL VAE (`sdxl-vae-fp16-fix`, scaling factor 0.13025 from its config) decodes
    `latents / scaling_factor`, and pixels are diffusers' `round(clamp(x / 2 + 0.5, 0, 1) * 255)`;
  * the official list of resolutions (`RESOLUTIONS`), latents of (height/8, width/8).
What differs: the initial and per-step noise come from JAX's PRNG (image j's noise is a
function of seeds[j] alone, whatever else is in the batch), and the computation runs in
float32 (or bfloat16) rather than float16.

The denoising loop is the one jitted `lax.scan` sampler (`skipdit_jax.sampling.build_sampler`).

Folder layouts `find_hunyuan_folder` reads:
  * diffusers (Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers): transformer/ (HunyuanDiT2DModel),
    vae/, scheduler/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/;
  * official (Tencent-Hunyuan/HunyuanDiT-v1.2, the folder holding t2i/, or t2i/ itself):
    t2i/model/pytorch_model_ema.pt, t2i/sdxl-vae-fp16-fix/, t2i/clip_text_encoder/,
    t2i/tokenizer/, t2i/mt5/.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from skipdit_jax import images, model_store, paths
from skipdit_jax.cache import SkipCache
from skipdit_jax.diffusion.diffusers_schedulers import DiffusersDDIM, DiffusersDDPM
from skipdit_jax.errors import CheckpointError, ConfigError, UserError
from skipdit_jax.models.families import family_of
from skipdit_jax.pipelines.common import build_text_sampler, compiled_for, make_noise

# (height, width) of the official ResolutionGroup (hydit/inference.py), which lists them as
# Resolution(width, height): 1:1, 4:3, 3:4, 16:9, 9:16.
RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (1280, 1280),
    (768, 1024),
    (864, 1152),
    (960, 1280),
    (1024, 768),
    (1152, 864),
    (1280, 960),
    (768, 1280),
    (1280, 768),
)
HUNYUAN_STEPS, HUNYUAN_CFG = 100, 6.0
CACHE_START_T, CACHE_CLOSE_T = 700, 50  # HunYuanDiT_cache: full while t >= 700, reset after t <= 50
VAE_DOWNSCALE = 8
OFFICIAL_WEIGHTS = "pytorch_model_ema.pt"  # the official sampler's default --load-key ema


# ---- settings ------------------------------------------------------------------------------
def check_resolution(height: int, width: int) -> tuple[int, int]:
    """(height, width) when it is one of the official resolutions, else one UserError line."""
    if (int(height), int(width)) not in RESOLUTIONS:
        listed = ", ".join(f"{h}x{w}" for h, w in RESOLUTIONS)
        raise UserError(f"unsupported resolution {height}x{width} (height x width); Hunyuan-DiT v1.2 supports {listed}")
    return int(height), int(width)


def latent_size(height: int, width: int) -> dict[str, int]:
    """The HunyuanConfig fields of a resolution: input_size (latent height) and input_width
    (latent width, 0 when square)."""
    h, w = height // VAE_DOWNSCALE, width // VAE_DOWNSCALE
    return {"input_size": h, "input_width": 0 if w == h else w}


def hunyuan_skip_cache(interval: int | None, cache_at_branch: int = 1) -> SkipCache | None:
    """The official `--cache --cache-step N --cache-at-branch k`: SkipCache(N, k, 700, 50);
    None or 0 -> no cache."""
    if not interval:
        return None
    return SkipCache(int(interval), int(cache_at_branch), CACHE_START_T, CACHE_CLOSE_T)


def parse_t2i_cache(spec: str | None, cache_at_branch: int = 1) -> SkipCache | None:
    """`--cache` for Hunyuan-DiT: "N" -> SkipCache(N, cache_at_branch, 700, 50); the general
    forms keep their meaning ("N,k" with Hunyuan's thresholds, "N,k,start,close" as given,
    "N2-700-50" with cache_at_branch blocks). None/""/"none"/"off" -> None."""
    from skipdit_jax.cache import parse_cache_spec

    if spec is None or str(spec).strip().lower() in ("", "none", "off", "0"):
        return None
    text = str(spec).strip()
    parts = text.split(",")
    if all(p.strip().isdigit() for p in parts) and len(parts) in (1, 2):
        k = int(parts[1]) if len(parts) == 2 else int(cache_at_branch)
        return SkipCache(int(parts[0]), k, CACHE_START_T, CACHE_CLOSE_T)
    cache = parse_cache_spec(text)
    if cache is not None and text[:1] in ("N", "_", "L"):  # the t2v form names no k
        cache = dataclasses.replace(cache, shallow_blocks=int(cache_at_branch))
    return cache


# ---- the folder ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HunyuanFolder:
    """Where a HunyuanDiT-v1.2 download keeps its parts.

    layout: "diffusers" or "official"; transformer: the transformer folder (diffusers) or the
    weight file (official); vae: the VAE folder; scheduler_config: the diffusers scheduler
    config (None: Hunyuan's settings); text_root: what `load_hunyuan_text_encoders` reads."""

    root: epath.Path
    layout: str
    transformer: epath.Path
    vae: epath.Path
    scheduler_config: epath.Path | None
    text_root: epath.Path


def _official_root(p):
    """The t2i/ folder of an official download (given as its parent or as t2i/), or None."""
    for cand in (p / "t2i", p):
        parts = (cand / "clip_text_encoder", cand / "sdxl-vae-fp16-fix")
        if (cand / "model" / OFFICIAL_WEIGHTS).exists() or any(part.is_dir() for part in parts):
            return cand
    return None


# What sampling reads from a Hub repo of either layout (the official one also holds other models).
_HUB_PATTERNS = (
    "model_index.json",
    "transformer/*",
    "vae/*",
    "scheduler/*",
    "text_encoder/*",
    "text_encoder_2/*",
    "tokenizer/*",
    "tokenizer_2/*",
    f"t2i/model/{OFFICIAL_WEIGHTS}",
    "t2i/sdxl-vae-fp16-fix/*",
    "t2i/clip_text_encoder/*",
    "t2i/tokenizer/*",
    "t2i/mt5/*",
)


def fetch_hunyuan_folder(spec: str, revision: str | None = None) -> epath.Path:
    """The local snapshot of "hf://Tencent-Hunyuan/HunyuanDiT-v1.2[-Diffusers]" with only the
    parts sampling reads (about 20 GB); one HubUnavailableError line when the Hub cannot be
    reached and nothing is cached."""
    from huggingface_hub import snapshot_download

    from skipdit_jax import hub
    from skipdit_jax.errors import HubUnavailableError

    repo, sub = hub.parse_hub_spec(spec, "hf://Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers")
    prefix = f"{sub}/" if sub else ""
    try:
        root = snapshot_download(repo, revision=revision, allow_patterns=[prefix + p for p in _HUB_PATTERNS])
    except Exception as e:
        if hub.is_network_error(e):
            raise HubUnavailableError(
                f"could not fetch {spec} from the Hugging Face Hub ({type(e).__name__}); download it with huggingface-cli "
                "and pass the local folder"
            ) from None
        raise
    return paths.as_path(root) / sub if sub else paths.as_path(root)


def find_hunyuan_folder(folder: paths.PathLike) -> HunyuanFolder:
    """The layout of a HunyuanDiT-v1.2 folder (see the module docstring), local, remote or
    "hf://org/repo" (fetched); one UserError line when it is neither."""
    if isinstance(folder, str) and folder.startswith("hf://"):
        folder = fetch_hunyuan_folder(folder)
    p = paths.as_path(folder)
    if not p.is_dir():
        raise UserError(f"{p} is not a folder (expected a HunyuanDiT-v1.2-Diffusers or HunyuanDiT-v1.2 download)")
    if (p / "transformer" / "config.json").exists() or (p / "text_encoder_2").is_dir():
        sched = p / "scheduler" / "scheduler_config.json"
        return HunyuanFolder(p, "diffusers", p / "transformer", p / "vae", sched if sched.exists() else None, p)
    t2i = _official_root(p)
    if t2i is not None:
        return HunyuanFolder(p, "official", t2i / "model" / OFFICIAL_WEIGHTS, t2i / "sdxl-vae-fp16-fix", None, t2i)
    raise UserError(
        f"{p} is not a Hunyuan-DiT folder: expected transformer/, vae/, text_encoder/ ... (HunyuanDiT-v1.2-Diffusers) "
        "or t2i/model/, t2i/sdxl-vae-fp16-fix/, t2i/clip_text_encoder/ ... (HunyuanDiT-v1.2)"
    )


def is_hunyuan_folder(spec: str) -> bool:
    """Whether `spec` is a folder in either HunyuanDiT-v1.2 layout (a Hunyuan-DiT transformer
    in a diffusers folder, or an official t2i/ folder), or an hf:// HunyuanDiT repo."""
    if spec.startswith("hf://"):
        return "/hunyuandit" in spec.lower() and not spec.endswith((".pt", ".safetensors"))
    if model_store.has_model_config(spec):
        return False
    p = paths.as_path(spec)
    if not p.is_dir():
        return False
    cfg = p / "transformer" / "config.json"
    if cfg.exists():
        try:
            return json.loads(cfg.read_text()).get("_class_name") == "HunyuanDiT2DModel"
        except (ValueError, AttributeError):
            return False
    return _official_root(p) is not None


# ---- the transformer -----------------------------------------------------------------------
def _transformer_state(spec: str) -> dict[str, np.ndarray]:
    from skipdit_jax.convert.torch_io import (
        load_torch_checkpoint,
        read_diffusers_folder_state,  # diffusers folder weights, sharded or not
    )

    p = None if spec.startswith("hf://") else paths.as_path(spec)
    if p is not None and p.is_dir():
        found = find_hunyuan_folder(p) if not (p / "config.json").exists() else None
        where = found.transformer if found is not None else p
        if found is not None and found.layout == "official":
            if not where.exists():
                raise CheckpointError(f"the official Hunyuan-DiT weights {where} are missing")
            return load_torch_checkpoint(where)
        cfg = where / "config.json"
        if not cfg.exists():
            raise CheckpointError(f"no config.json in the transformer folder {where}")
        try:
            name = json.loads(cfg.read_text()).get("_class_name")
        except (ValueError, AttributeError):
            raise CheckpointError(f"{cfg} is not a JSON object") from None
        if name not in (None, "HunyuanDiT2DModel"):
            raise CheckpointError(f"{where} holds a {name}, not a Hunyuan-DiT (HunyuanDiT2DModel)")
        return read_diffusers_folder_state(where)
    return load_torch_checkpoint(spec)


def load_transformer(spec: paths.PathLike, height: int = 1024, width: int = 1024, *, dtype: str | None = None, mesh=None):
    """(config, params) of a Hunyuan-DiT v1.2 for images of height x width: a model directory
    (`skipdit convert`), a folder in either layout (or its transformer/ folder), or a weight
    file (`pytorch_model_ema.pt`, .safetensors; local, gs:// or hf://org/repo/file). Weights of
    another family: one CheckpointError line. With `mesh` (`sharding.make_mesh`) the parameters
    are placed on their FSDP shardings (a weight file's straight from the conversion)."""
    from skipdit_jax.convert.hunyuan import hunyuan_from_torch

    spec = str(spec)
    sizes = latent_size(height, width)
    if model_store.has_model_config(spec):
        config, params = model_store.load_model(spec)
        if family_of(config).name != "hunyuan":
            raise CheckpointError(f"{spec} is a {family_of(config).name} model, not a Hunyuan-DiT")
        config = config.replace(**sizes)
        params = place_params(config, params, mesh)
    else:
        config, params = hunyuan_from_torch(_transformer_state(spec), mesh=mesh, **sizes)
    if dtype:
        config = config.replace(dtype=dtype)
    return config, params


def place_params(config, params, mesh=None):
    """`params` on the family's FSDP shardings over `mesh`; on the default device without one."""
    if mesh is None:
        return jax.device_put(params)
    from skipdit_jax import sharding

    return jax.device_put(params, sharding.param_shardings(params, mesh, param_axes=family_of(config).param_axes))


# ---- scheduler, VAE ------------------------------------------------------------------------
_HUNYUAN_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.02,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    steps_offset=1,
    clip_sample=False,
)


def load_scheduler(folder: HunyuanFolder | None = None, kind: str = "ddpm", from_folder: bool = False):
    """The official sampler's DDPM (or DDIM, its other SAMPLER_FACTORY entry, same settings);
    with `from_folder`, a diffusers folder's scheduler config (one UserError line without one)."""
    if kind not in ("ddpm", "ddim"):
        raise UserError(f"unknown scheduler {kind!r}: use ddpm (Hunyuan-DiT's) or ddim")
    cls = DiffusersDDPM if kind == "ddpm" else DiffusersDDIM
    if from_folder:
        if folder is None or folder.scheduler_config is None:
            where = "no folder given" if folder is None else f"{folder.root} has no scheduler/scheduler_config.json"
            raise UserError(f"the folder's scheduler was asked for, but {where}")
        sched = cls.from_config(folder.scheduler_config)
    else:
        sched = cls(**_HUNYUAN_SCHEDULER) if kind == "ddim" else DiffusersDDPM.hunyuan()
    if getattr(sched, "variance_type", "fixed_small") == "learned_range":
        raise ConfigError("Hunyuan-DiT samples with a fixed-variance scheduler; learned_range is not what it was trained for")
    return sched


def load_image_vae(folder: HunyuanFolder | None = None, vae: str | None = None, latent_channels: int = 4):
    """(VAEConfig, params) of `vae` (any load_vae spec) or the folder's SDXL VAE; one
    UserError line when there is none."""
    from skipdit_jax.encoders.vae import load_vae

    if vae is None:
        if folder is None:
            raise UserError("decoding needs a VAE: give --vae or --pipeline with the SDXL VAE (vae/ or t2i/sdxl-vae-fp16-fix/)")
        if not (folder.vae / "config.json").exists():
            raise UserError(f"the VAE {folder.vae} is missing (no config.json); give --vae SPEC")
        vae = str(folder.vae)
    config, params = load_vae(vae)
    if config.latent_channels != latent_channels:
        raise UserError(f"the VAE's {config.latent_channels} latent channels do not fit the model's {latent_channels} channels")
    return config, params


@functools.cache
def _decode_fn():
    from skipdit_jax.encoders.vae import decode_latents

    return jax.jit(decode_latents, static_argnums=1)


def images_to_uint8(pictures) -> np.ndarray:
    """Decoded images in [-1, 1] -> uint8 as diffusers' image processor:
    round(clamp(x / 2 + 0.5, 0, 1) * 255)."""
    x = np.asarray(pictures, np.float32)
    return np.round(np.clip(x / 2.0 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)


def decode_images(vae, latents, batch_size: int = 1) -> np.ndarray:
    """Latents (B, h, w, 4) -> uint8 images (B, 8h, 8w, 3), `batch_size` per VAE call (the
    last call padded, so one program serves every call); `vae` None shows latent channels
    0-2 instead (not decoded)."""
    latents = np.asarray(latents, np.float32)
    if vae is None:
        return images_to_uint8(images.latents_for_display(latents))
    config, params = vae
    n = max(1, min(int(batch_size), len(latents)))
    out = []
    for i in range(0, len(latents), n):
        chunk = latents[i : i + n]
        pad = np.zeros((n - len(chunk), *chunk.shape[1:]), chunk.dtype)
        decoded = _decode_fn()(params, config, jnp.asarray(np.concatenate([chunk, pad]) if len(pad) else chunk))
        out.append(np.asarray(decoded, np.float32)[: len(chunk)])
    return images_to_uint8(np.concatenate(out))


# ---- sampling ------------------------------------------------------------------------------
def build_t2i_sampler(config, scheduler=None, num_steps: int = HUNYUAN_STEPS, cfg_scale: float = HUNYUAN_CFG, cache=None):
    """The jitted `fn(params, noise, condition, cfg_scale, keys) -> latents`: the shared scan
    sampler under the scheduler (default Hunyuan's DDPM), guidance on the 4 latent channels
    (the learned-sigma half is not guided and not read by a fixed-variance scheduler)."""
    if family_of(config).name != "hunyuan":
        raise UserError(f"this is a {family_of(config).name} model, not a Hunyuan-DiT")
    scheduler = scheduler if scheduler is not None else DiffusersDDPM.hunyuan()
    return build_text_sampler(config, scheduler, num_steps, cfg_scale, cache)


def sample_latents(
    config,
    params,
    condition: dict,
    seeds: Sequence[int],
    *,
    scheduler=None,
    num_steps: int = HUNYUAN_STEPS,
    cfg_scale: float = HUNYUAN_CFG,
    cache=None,
    sharding=None,
    compiled: bool = False,
) -> jax.Array:
    """Latents (B, h, w, 4) for the 8-key condition (`hunyuan_condition`) and one seed per
    image: image j starts from `normal(key(seeds[j]))` and draws its step noise from that key.
    `sharding` places the batch (the parameters must already be placed); `compiled` reuses
    an ahead-of-time compiled program per setting and shapes."""
    family = family_of(config)
    keys, noise = make_noise(seeds, family.sample_shape)
    cond = {k: jnp.asarray(v) for k, v in condition.items()}
    family.check_condition(cond, noise.shape[0])
    if sharding is not None:
        keys, noise, cond = jax.device_put((keys, noise, cond), sharding)
    else:
        params = jax.device_put(params)  # a no-op for arrays already on the device
    fn = build_t2i_sampler(config, scheduler, num_steps, cfg_scale, cache)
    args = (params, noise, cond, jnp.float32(cfg_scale), keys)
    return (compiled_for(fn, *args) if compiled else fn)(*args)


def generate_images(
    model_config,
    params,
    condition: dict,
    seeds: Sequence[int],
    *,
    num_steps: int = HUNYUAN_STEPS,
    cfg_scale: float = HUNYUAN_CFG,
    cache=None,
    scheduler=None,
    vae=None,
    decode_batch: int = 1,
    sharding=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(latents (B, h, w, 4) float32, images (B, 8h, 8w, 3) uint8) of Hunyuan-DiT for a text
    condition (the 8 keys of `models.hunyuan_family.CONDITION_KEYS`, e.g. from
    `encoders.hunyuan_text.hunyuan_condition`) and one seed per image: DDPM-100 v-prediction
    (or `scheduler`), guidance `cfg_scale` with the condition's null_* caption, an optional
    Skip-Cache (`hunyuan_skip_cache`), decoded by `vae` ((VAEConfig, params); None: latent
    channels shown, not decoded)."""
    latents = sample_latents(
        model_config,
        params,
        condition,
        seeds,
        scheduler=scheduler,
        num_steps=num_steps,
        cfg_scale=cfg_scale,
        cache=cache,
        sharding=sharding,
    )
    latents = np.asarray(latents, np.float32)
    return latents, decode_images(vae, latents, decode_batch)
