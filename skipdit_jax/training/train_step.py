"""The training state and the pure, jitted train step.

One step: sample t ~ U{0..999} and noise, drop the condition (class labels become the
null label) with probability `label_dropout` (for classifier-free guidance), as the model's
family says; compute the hybrid loss in float32
(optionally Min-SNR weighted), take the gradient, and apply AdamW and the EMA (optionally
with warm-up) -- unless the update guard trips (gradient norm not finite, or above
`grad_skip_threshold`), in which case the state is kept and the skip is counted.
With `grad_accum_steps` > 1 the batch is split into that many equal micro-batches whose
float32 gradients are averaged in a `lax.scan` before the one update: t, noise and the
dropout mask are drawn for the whole batch first, so the step equals the big-batch step.
Randomness comes from `fold_in(rng, step)`, so a resumed run draws exactly what an
uninterrupted one would, whatever the device count.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from skipdit_jax.diffusion import NUM_TRAIN_TIMESTEPS, Diffusion
from skipdit_jax.models.families import family_of
from skipdit_jax.training.optim import ema_update, global_norm, trainable_mask


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (skipped ones included)
    params: Any
    ema_params: Any
    opt_state: Any
    skipped_updates: jax.Array  # int32 scalar


def init_train_state(params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        # A real copy: the EMA must not share buffers with params (both are donated).
        ema_params=jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params),
        opt_state=tx.init(params),
        skipped_updates=jnp.zeros((), jnp.int32),
    )


def min_snr_weight(snr: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-gamma weight of an eps-prediction MSE: min(SNR, gamma) / SNR (<= 1)."""
    return jnp.minimum(snr, gamma) / snr


def make_train_step(
    config,
    tx: optax.GradientTransformation,
    *,
    ema_decay: float,
    ema_warmup: bool = False,
    label_dropout: float = 0.1,
    grad_skip_threshold: float | None = None,
    min_snr_gamma: float | None = None,
    grad_accum_steps: int = 1,
    trainable: str = "all",
):
    """`train_step(state, batch, rng) -> (state, metrics)`, pure; jit it with shardings.
    The batch size must be divisible by `grad_accum_steps` (times the devices, for even
    sharding of every micro-batch). With `trainable="skip_only"` the frozen parameters
    are held constant (no gradient is computed for them), and the gradient norm (metric
    and update guard) is over the trainable ones only, as the official t2v script's
    norm over the parameters that have gradients."""
    family = family_of(config)
    diffusion = Diffusion(None, learn_sigma=family.learn_sigma)

    def loss_fn(params, x0, t, noise, cond):
        if trainable != "all":
            # Frozen parameters are constants: XLA drops their weight gradients.
            mask = trainable_mask(params, trainable)
            params = jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)
        terms = diffusion.training_losses(lambda xt, tt: family.apply(params, xt, tt, cond), x0, t, noise)
        loss = terms["loss"]
        if min_snr_gamma is not None:
            # Min-SNR-gamma weighting of the eps-MSE (Hang et al. 2023): weight
            # min(SNR, gamma) / SNR, so the many easy low-noise steps stop dominating
            # the gradient; the vb term is unchanged. Not in the official recipe.
            loss = loss + (min_snr_weight(diffusion.snr(t), min_snr_gamma) - 1.0) * terms["mse"]
        return loss.mean(), {"mse": terms["mse"].mean(), "vb": terms["vb"].mean()}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulated_grad(params, inputs):
        """`grad_fn` over `grad_accum_steps` equal micro-batches: the means of the losses
        and of the float32 gradients (equal sizes, so these are the full-batch means)."""
        n = grad_accum_steps
        # Micro-batch k = rows k, k+n, k+2n, ...: each device's contiguous block of the
        # sharded batch holds rows of every micro-batch, so all devices work on each one.
        micro = jax.tree.map(lambda a: jnp.swapaxes(a.reshape(a.shape[0] // n, n, *a.shape[1:]), 0, 1), inputs)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

        def body(carry, mb):
            (loss, aux), g = grad_fn(params, *mb)
            acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), carry, g)
            return acc, (loss, aux)

        total, (losses, auxs) = jax.lax.scan(body, zeros, micro)
        grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), total, params)
        return (losses.mean(), jax.tree.map(jnp.mean, auxs)), grads

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        key_t, key_noise, key_drop = jax.random.split(jax.random.fold_in(rng, state.step), 3)
        x0 = batch["image"].astype(jnp.float32)
        cond = family.condition_from_batch(batch)
        b = x0.shape[0]
        t = jax.random.randint(key_t, (b,), 0, NUM_TRAIN_TIMESTEPS)
        noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
        if family.is_conditional and label_dropout > 0:
            cond = family.drop_condition(cond, jax.random.bernoulli(key_drop, label_dropout, (b,)))

        inputs = (x0, t, noise, cond)
        if grad_accum_steps == 1:
            (loss, terms), grads = grad_fn(state.params, *inputs)
        else:
            (loss, terms), grads = accumulated_grad(state.params, inputs)
        if trainable == "all":
            grad_norm = global_norm(grads)
        else:
            mask = trainable_mask(grads, trainable)
            grad_norm = global_norm([g for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)) if m])
        ok = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
        if grad_skip_threshold is not None:
            ok &= grad_norm <= grad_skip_threshold
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay
        if ema_warmup:
            # min(decay, (1 + n) / (10 + n)) after n updates: without it a short run's EMA
            # keeps decay**n of the random initialisation (14% after 2,000 steps at 0.999).
            n = state.step.astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
        ema = ema_update(state.ema_params, params, decay)

        def keep_if_skipped(new, old):
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        new_state = TrainState(
            step=state.step + 1,
            params=keep_if_skipped(params, state.params),
            ema_params=keep_if_skipped(ema, state.ema_params),
            opt_state=keep_if_skipped(opt_state, state.opt_state),
            skipped_updates=state.skipped_updates + (~ok).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "mse": terms["mse"],
            "vb": terms["vb"],
            "grad_norm": grad_norm,
            "skipped_updates": new_state.skipped_updates,
        }
        return new_state, metrics

    return train_step
