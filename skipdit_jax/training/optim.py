"""Optimizer, learning-rate schedule, trainable-parameter masks and EMA, all from optax.

The official recipe is AdamW at a constant 1e-4, weight decay 0, betas (0.9, 0.999), no
clipping, EMA 0.9999. Warmup, cosine/linear decay and global-norm clipping are options.
The update guard of the text-to-video recipe (skip an update whose gradient norm is not
finite or above a threshold) lives in the train step, which counts what it skips.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from skipdit_jax.errors import ConfigError

TRAINABLE = ("all", "skip_only")


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """cfg: lr, warmup_steps, decay ("constant" | "cosine" | "linear"), steps, end_lr_factor."""
    peak, warmup, steps = cfg.lr, cfg.get("warmup_steps", 0), cfg.steps
    decay = cfg.get("decay", "constant")
    end = peak * cfg.get("end_lr_factor", 0.0)
    if decay == "constant":
        after = optax.constant_schedule(peak)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(peak, max(steps - warmup, 1), alpha=end / peak if peak else 0.0)
    elif decay == "linear":
        after = optax.linear_schedule(peak, end, max(steps - warmup, 1))
    else:
        raise ConfigError(f"unknown optimizer.decay {decay!r}; expected constant, cosine or linear")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def is_skip_param(path: str) -> bool:
    """A long-skip fusion parameter: under a top-level "skip_fusions" module, or one nested
    in a composite model's part (e.g. "model/skip_fusions/..." of latte_t2v_joint)."""
    return path.startswith("skip_fusions/") or "/skip_fusions/" in path


def trainable_mask(params, trainable: str):
    """True where a parameter trains. "skip_only" = stage 1 of the two-stage fine-tune."""
    if trainable not in TRAINABLE:
        raise ConfigError(f"train.trainable must be one of {TRAINABLE}, got {trainable!r}")

    def keep(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return trainable == "all" or is_skip_param(name)

    mask = jax.tree_util.tree_map_with_path(keep, params)
    if not any(jax.tree.leaves(mask)):
        raise ConfigError("train.trainable='skip_only' but the model has no skip modules (model.long_skip=False)")
    return mask


class ClipAfterState(NamedTuple):
    count: jax.Array  # updates seen so far (int32)


def clip_by_global_norm_after(max_norm: float, after_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping to `max_norm` from update number `after_steps` on (0-based):
    the first `after_steps` updates pass unclipped (Latte's `start_clip_iter`: it clips
    when its step counter, the updates done before this one, is >= start_clip_iter).
    Inside the jitted update: a select on the counter, no recompilation."""
    clip = optax.clip_by_global_norm(max_norm)

    def init(params):
        del params
        return ClipAfterState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        clipped, _ = clip.update(updates, optax.EmptyState())
        on = state.count >= after_steps
        out = jax.tree.map(lambda c, u: jnp.where(on, c, u), clipped, updates)
        return out, ClipAfterState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: ml_collections.ConfigDict, params, trainable: str = "all") -> optax.GradientTransformation:
    """AdamW (+ optional clipping) on the trainable parameters; frozen ones get zero updates
    and carry no Adam moments."""
    if cfg.name != "adamw":
        raise ConfigError(f"unknown optimizer.name {cfg.name!r}; only 'adamw' is supported")
    steps = []
    if cfg.get("grad_clip"):
        after = cfg.get("clip_after_steps", 0)
        if after < 0:
            raise ConfigError(f"optimizer.clip_after_steps must be >= 0, got {after}")
        steps.append(clip_by_global_norm_after(cfg.grad_clip, after) if after else optax.clip_by_global_norm(cfg.grad_clip))
    steps.append(
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.get("b1", 0.9),
            b2=cfg.get("b2", 0.999),
            eps=cfg.get("eps", 1e-8),
            weight_decay=cfg.get("weight_decay", 0.0),
        )
    )
    tx = optax.chain(*steps)
    if trainable == "all":
        return tx
    mask = trainable_mask(params, trainable)
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def ema_update(ema_params, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params, in float32."""
    return optax.incremental_update(params, ema_params, step_size=1.0 - decay)


def global_norm(tree) -> jax.Array:
    return optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), tree))

