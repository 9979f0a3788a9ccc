"""`skipdit calibrate MODEL`: fit TeaCache's rescaling polynomial for a model.

Runs the uncached sampler with exactly the settings TeaCache will accelerate (sampler,
steps, guidance scale and guided channels, clipping) from random noise over random
classes, records per step the relative L1 change of block 0's modulated input and of the
model output, and fits a polynomial (input change -> output change). Use the
coefficients with `TeaCache(threshold, coefficients)` or `cache_tradeoff.py`.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from absl import flags

from skipdit_jax import model_store, paths
from skipdit_jax.cache import calibrate_teacache
from skipdit_jax.errors import UserError
from skipdit_jax.models.families import family_of

USAGE = "MODEL [--sampler ddim] [--steps 50] [--cfg_scale 4] [--cfg_channels C] [--clip_denoised] [--out coefficients.json]"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum("sampler", "ddim", ["ddpm", "ddim"], "the sampler TeaCache will run with", flag_values=fv)
    flags.DEFINE_integer("steps", 50, "sampling steps", flag_values=fv)
    flags.DEFINE_float("cfg_scale", 4.0, "guidance scale (1 = none)", flag_values=fv)
    flags.DEFINE_integer("cfg_channels", None, "guide only the first C eps channels (3 = official DiT); default all", flag_values=fv)
    flags.DEFINE_bool("clip_denoised", False, "clip the x0 prediction to [-1, 1], as the sampler will", flag_values=fv)
    flags.DEFINE_integer("num", 8, "trajectories (random classes)", flag_values=fv)
    flags.DEFINE_integer("degree", 1, "polynomial degree (4 overfits one short run; see calibrate_teacache)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "noise and label seed", flag_values=fv)
    flags.DEFINE_string("out", None, "write the coefficients as JSON here", flag_values=fv)
    flags.DEFINE_integer("num_heads", None, "heads, for official checkpoints of a non-preset width", flag_values=fv)


def main(args: list[str], fv: flags.FlagValues) -> int:
    if len(args) != 1:
        raise UserError(f"usage: skipdit calibrate {USAGE}")
    if fv.steps < 2 or fv.num < 1 or fv.degree < 1:
        raise UserError("--steps must be >= 2, --num and --degree >= 1")
    config, params = model_store.load_model(args[0], num_heads=fv.num_heads)
    family = family_of(config)
    if family.has_long_skips:
        raise UserError("TeaCache is a baseline for models without long skips; this model has long skips (use Skip-Cache)")
    k1, k2 = jax.random.split(jax.random.key(fv.seed))
    noise = jax.random.normal(k1, (fv.num, *family.sample_shape))
    labels = jax.random.randint(k2, (fv.num,), 0, max(config.num_classes, 1)).astype(jnp.int32) if family.is_conditional else None
    cfg = fv.cfg_scale if family.is_conditional else 1.0
    settings = dict(sampler=fv.sampler, num_steps=fv.steps, cfg_scale=cfg, cfg_channels=fv.cfg_channels, clip_denoised=fv.clip_denoised)
    coeffs = calibrate_teacache(config, params, noise, labels, degree=fv.degree, **settings)
    text = json.dumps({"coefficients": coeffs, **settings, "num": fv.num, "degree": fv.degree})
    print(text)
    if fv.out:
        paths.atomic_write_text(fv.out, text + "\n")
    return 0
