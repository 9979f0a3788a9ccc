"""`skipdit calibrate MODEL`: fit TeaCache's rescaling polynomial for a model.

Runs uncached guided DDIM from random noise over random classes, records per step the
relative L1 change of block 0's modulated input and of the model output, and fits a
polynomial (input change -> output change). Use the coefficients with
`TeaCache(threshold, coefficients)` or `cache_tradeoff.py`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from absl import flags

from skipdit_jax import checkpoints
from skipdit_jax.cache_baselines import calibrate_teacache
from skipdit_jax.errors import UserError

USAGE = "MODEL [--out coefficients.json]"


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("steps", 50, "DDIM steps", flag_values=fv)
    flags.DEFINE_float("cfg_scale", 4.0, "guidance scale (1 = none)", flag_values=fv)
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
    config, params = checkpoints.load_model(args[0], num_heads=fv.num_heads)
    if config.long_skip:
        raise UserError("TeaCache is a baseline for DiT without long skips; this model has long skips (use Skip-Cache)")
    k1, k2 = jax.random.split(jax.random.key(fv.seed))
    noise = jax.random.normal(k1, (fv.num, config.input_size, config.input_size, config.in_channels))
    labels = jax.random.randint(k2, (fv.num,), 0, max(config.num_classes, 1))
    cfg = fv.cfg_scale if config.num_classes else 1.0
    coeffs = calibrate_teacache(config, params, noise, labels.astype(jnp.int32), num_steps=fv.steps, cfg_scale=cfg, degree=fv.degree)
    text = json.dumps({"coefficients": coeffs, "steps": fv.steps, "cfg_scale": cfg, "num": fv.num})
    print(text)
    if fv.out:
        tmp = fv.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, fv.out)
    return 0
