"""TeaCache (Liu et al. 2024), adaptive: accumulate the rescaled relative L1 change of
block 0's modulated input between steps and, while the sum stays below the threshold,
reuse the previous step's residual of the whole block stack. One decision per step for
the whole batch, made on the device; the first and last steps are always full.
`calibrate_teacache` fits the rescaling polynomial on the sampler's own trajectory."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.cache.baselines.common import Baseline
from skipdit_jax.errors import ConfigError
from skipdit_jax.models.family import ModelFamily


@dataclasses.dataclass(frozen=True)
class TeaCache(Baseline):
    threshold: float
    # Rescaling polynomial (highest power first, np.polyval order) from the relative L1
    # change of block 0's modulated input to that of the model output; fit it for a model
    # with `calibrate_teacache`. The default (identity) uses the input change as is.
    coefficients: tuple[float, ...] = (1.0, 0.0)

    name = "teacache"
    adaptive = True

    def __post_init__(self):
        if not self.threshold > 0:
            raise ConfigError(f"teacache threshold must be > 0, got {self.threshold}")
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))

    def full_steps(self, timesteps):
        """The *forced* full steps (first and last); the rest is decided while sampling."""
        full = np.zeros(len(timesteps), bool)
        full[[0, -1]] = True
        return full

    def plan(self, timesteps, depth):
        raise ConfigError("TeaCache decides while sampling; its plan comes from the realised schedule (plan_from_schedule)")

    def init_carry(self, family: ModelFamily, batch: int):
        probe, residual = jnp.zeros(family.probe_shape(batch), jnp.float32), jnp.zeros(family.hidden_shape(batch), jnp.float32)
        return (jnp.zeros((), jnp.float32), probe, residual)  # (accumulated distance, previous modulated input, residual)

    def decide(self, family, params, x, t, cond, forced_full, carry):
        # The embedding computed here is computed again by the pass that follows; it is a
        # patch conv and two small MLPs, negligible beside one block.
        acc, prev, residual = carry
        mod = modulated_input(family, params, x, t, cond)
        rel = jnp.mean(jnp.abs(mod - prev)) / jnp.maximum(jnp.mean(jnp.abs(prev)), 1e-12)
        # A fitted polynomial can dip below zero between its data points; a distance that
        # shrinks the accumulator would let the cache run on indefinitely.
        acc = acc + jnp.maximum(jnp.polyval(jnp.asarray(self.coefficients, jnp.float32), rel), 0.0)
        full = forced_full | (acc >= self.threshold)
        return full, (jnp.where(full, 0.0, acc), mod, residual)

    def full_pass(self, family, params, x, t, cond, carry):
        acc, prev, _ = carry
        h0, c = family.embed(params, x, t, cond)
        h = family.run_units(params, h0, c, 0, family.depth_units)
        return family.head(params, h, c), (acc, prev, (h - h0).astype(jnp.float32))

    def cached_pass(self, family, params, x, t, cond, carry):
        h, c = family.embed(params, x, t, cond)
        return family.head(params, h + carry[2].astype(h.dtype), c), carry


def modulated_input(family: ModelFamily, params, x, t, cond) -> jax.Array:
    """Block 0's modulated input LN(h) * (1 + scale) + shift, float32: TeaCache's signal
    (the family's `probe`; for Latte, the spatial block of pair 0)."""
    h, c = family.embed(params, x, t, cond)
    return family.probe(params, h, c)


@dataclasses.dataclass(frozen=True)
class _CalibrationProbe:
    """A strategy for calibration only: every step full, and the carry records each step's
    modulated input and raw model output (the guidance batch, before guidance)."""

    num_steps: int

    name = "teacache-probe"
    adaptive = False

    def check_model(self, family: ModelFamily) -> None:
        pass

    def full_steps(self, timesteps):
        return np.ones(len(timesteps), bool)

    def init_carry(self, family: ModelFamily, batch: int):
        out_shape = (batch, *family.sample_shape[:-1], family.eps_channels * (2 if family.learn_sigma else 1))
        return (
            jnp.zeros((), jnp.int32),
            jnp.zeros((self.num_steps, *family.probe_shape(batch)), jnp.float32),
            jnp.zeros((self.num_steps, *out_shape), jnp.float32),
        )

    def full_pass(self, family, params, x, t, cond, carry):
        step, mods, outs = carry
        out = family.apply(params, x, t, cond)
        mods = mods.at[step].set(modulated_input(family, params, x, t, cond))
        return out, (step + 1, mods, outs.at[step].set(out.astype(jnp.float32)))

    cached_pass = full_pass


def calibrate_teacache(
    config,
    params,
    noise,
    labels,
    *,
    sampler: str = "ddim",
    num_steps: int = 50,
    respacing: str | None = None,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    clip_denoised: bool = False,
    eta: float = 0.0,
    degree: int = 1,
):
    """Fit TeaCache's rescaling polynomial for a model, on the trajectory of exactly the
    sampler it will accelerate (same sampler, steps, guidance scale and guided channels,
    clipping and eta), run uncached from `noise`.

    Per step it records the relative L1 change of block 0's modulated input and of the raw
    model output, and fits output change ~ polyval(coefficients, input change) by least
    squares (numpy.polyfit, highest power first). Returns the coefficients as a tuple.
    The default degree is 1: TeaCache's published fits are degree 4, but on the ~50 points
    of one short run a quartic overfits and swings far outside the data (measured on the
    MNIST DiT: coefficients of order 1e4 and a schedule not monotone in the threshold), and
    even a line is pulled up by the last step's large output change, so check the realised
    schedule (`return_schedule=True`) before trusting a fitted polynomial.
    """
    from skipdit_jax.sampling import build_sampler, check_settings, resolve_respacing, sampling_timesteps, validate_inputs

    validate_inputs(config, noise, labels)
    guided = check_settings(config, cfg_scale=cfg_scale, cfg_channels=cfg_channels)
    respacing = resolve_respacing(sampler, num_steps, respacing)
    steps = len(sampling_timesteps(sampler, num_steps, respacing))
    if steps < 2:
        raise ConfigError(f"calibration needs at least 2 sampling steps, got {steps}")
    probe = _CalibrationProbe(steps)
    run = build_sampler(
        config, sampler, respacing, guided, cfg_channels, probe, float(eta), bool(clip_denoised), return_carry=True
    )
    _, _, (_, mods, outs) = run(params, noise, labels, jnp.float32(cfg_scale), jax.random.key(0))

    def rel_l1(seq):
        seq = np.asarray(seq, np.float64)
        num = np.abs(seq[1:] - seq[:-1]).reshape(len(seq) - 1, -1).mean(axis=1)
        den = np.abs(seq[:-1]).reshape(len(seq) - 1, -1).mean(axis=1)
        return num / np.maximum(den, 1e-12)

    x_rel, y_rel = rel_l1(mods), rel_l1(outs)
    deg = int(min(degree, max(1, len(x_rel) - 1)))
    return tuple(float(c) for c in np.polyfit(x_rel, y_rel, deg))
