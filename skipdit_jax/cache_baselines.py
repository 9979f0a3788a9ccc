"""Other DiT caching methods, as drop-in strategies for the one jitted sampler.

Each strategy has the interface `skipdit_jax.cache` describes (a host-side full/cached
schedule, a carry, a full and a cached pass; `TeaCache` decides on the device instead)
and runs on a DiT *without* long skips, which is where these methods were proposed.
Skip-Cache itself, and its ablation on a vanilla DiT, are `cache.SkipCache` and
`cache.ShallowCache`.

  FORA(N)       on full steps store every block's gated attention and MLP outputs; on
                cached steps (all but every N-th) add them back without computing any block.
  PAB(N)        the authors' Pyramid-Attention-Broadcast variant for DiT: reuse every
                block's attention and MLP outputs, re-gated with the *current* adaLN gates;
                steps 0 and 1 and steps with t <= 10 are always full.
  DeltaDiT(N)   Delta-DiT: cache the change across a block range. While t > switch_t the
                first m blocks run and the cached change of the rest (output - their input)
                is added; later the change of the first depth-m blocks is added to the
                embedding and the last m blocks run (m = depth // 4). Same cadence as PAB.
  TeaCache(th)  adaptive: accumulate the rescaled relative L1 change of block 0's modulated
                input between steps and, while the sum stays below th, reuse the previous
                step's residual of the whole block stack. One decision per step for the
                whole batch; the first and last steps are always full.

Block-count costs (for the predicted speedup): a full step runs depth blocks, a cached
step `cached_blocks` (0 for FORA, PAB and TeaCache, whose adaLN/gating work is ignored;
m for Delta-DiT).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.cache import CachePlan, ShallowCache, SkipCache
from skipdit_jax.errors import ConfigError
from skipdit_jax.model_config import ModelConfig
from skipdit_jax.models import DiT, DiTBlock, layer_norm, modulate


def _check_interval(interval) -> None:
    if int(interval) != interval or interval < 1:
        raise ConfigError(f"cache interval must be an integer >= 1, got {interval}")


def _block_fn(config: ModelConfig):
    """apply(block_params, h, c) -> (out, (attn, mlp), (gate_msa, gate_mlp))."""
    return lambda p, h, c: DiTBlock(config, parent=None).apply({"params": p}, h, c, method=DiTBlock.forward_with_branches)


def _gates(config: ModelConfig, p, c):
    mod = DiTBlock(config, parent=None).apply({"params": p}, c, method=DiTBlock.modulation)
    return mod[2], mod[5]


def _stacks(params):
    return params["encoder_blocks"], params["decoder_blocks"]


def _embed(config, params, x, t, y):
    return DiT(config).apply({"params": params}, x, t, y, method=DiT.embed)


def _head(config, params, h, c):
    return DiT(config).apply({"params": params}, h, c, method=DiT.head)


@dataclasses.dataclass(frozen=True)
class _Baseline:
    """Shared parts: model check and block-count plan (from the subclass's `full_steps`)."""

    name = "baseline"
    adaptive = False

    def check_model(self, config: ModelConfig) -> None:
        if config.long_skip:
            raise ConfigError(
                f"{self.name} is a baseline for DiT without long skips; on a Skip-DiT use Skip-Cache "
                "(method 'skip-cache'), or give a DiT checkpoint"
            )

    def blocks_per_cached_step(self, depth: int) -> int:
        return 0

    def cached_blocks(self, config: ModelConfig) -> int:
        return self.blocks_per_cached_step(config.depth)

    def plan(self, timesteps: Sequence[int], depth: int) -> CachePlan:
        return plan_from_schedule(self.full_steps(timesteps), depth, self.blocks_per_cached_step(depth))


@dataclasses.dataclass(frozen=True)
class _IntervalBaseline(_Baseline):
    interval: int

    def __post_init__(self):
        _check_interval(self.interval)


def _record_branches(config, params, x, t, y, per_block):
    """Run every block of a vanilla DiT; `per_block(attn, mlp, gates)` says what to keep
    of each. Returns (output, (kept for the encoder stack, kept for the decoder stack))."""
    block = _block_fn(config)
    h, c = _embed(config, params, x, t, y)

    def body(h, p):
        out, (attn, mlp), gates = block(p, h, c)
        return out, per_block(attn, mlp, gates)

    kept = []
    for stack in _stacks(params):
        h, k = jax.lax.scan(body, h, stack)
        kept.append(k)
    return _head(config, params, h, c), tuple(kept)


def plan_from_schedule(full: np.ndarray, depth: int, cached_blocks: int) -> CachePlan:
    full = np.asarray(full, bool)
    cost = full.sum() * depth + (~full).sum() * cached_blocks
    return CachePlan(full=full, predicted_speedup=float(len(full) * depth / max(cost, 1e-9)))


@dataclasses.dataclass(frozen=True)
class FORA(_IntervalBaseline):
    name = "fora"

    def full_steps(self, timesteps):
        return np.arange(len(timesteps)) % self.interval == 0

    def init_carry(self, config: ModelConfig, batch: int):
        def zeros(n):
            return jnp.zeros((n, batch, config.num_patches, config.hidden_size), config.compute_dtype)

        n_enc, n_dec = config.num_encoder_blocks, config.depth - config.num_encoder_blocks
        return (zeros(n_enc), zeros(n_dec))  # per block: gated attention + gated MLP output

    def full_pass(self, config, params, x, t, y, carry):
        def gated_sum(attn, mlp, gates):
            return (gates[0][:, None] * attn + gates[1][:, None] * mlp).astype(carry[0].dtype)

        return _record_branches(config, params, x, t, y, gated_sum)

    def cached_pass(self, config, params, x, t, y, carry):
        # x_{i+1} = x_i + attn_i + mlp_i with every term cached: the blocks collapse to a sum.
        h, c = _embed(config, params, x, t, y)
        h = h + sum(s.sum(axis=0) for s in carry).astype(h.dtype)
        return _head(config, params, h, c), carry


def _pab_cadence(timesteps, interval: int) -> np.ndarray:
    """Full unless (counter % N != 0 and counter > 1 and 10 < t < 1000): the authors' DiT PAB."""
    counter = np.arange(len(timesteps))
    t = np.asarray(timesteps)
    cached = (counter % interval != 0) & (counter > 1) & (t > 10) & (t < 1000)
    return ~cached


@dataclasses.dataclass(frozen=True)
class PAB(_IntervalBaseline):
    name = "pab"

    def full_steps(self, timesteps):
        return _pab_cadence(timesteps, self.interval)

    def init_carry(self, config: ModelConfig, batch: int):
        def zeros(n):
            return jnp.zeros((n, 2, batch, config.num_patches, config.hidden_size), config.compute_dtype)

        n_enc, n_dec = config.num_encoder_blocks, config.depth - config.num_encoder_blocks
        return (zeros(n_enc), zeros(n_dec))  # per block: (attention, MLP) before the gates

    def full_pass(self, config, params, x, t, y, carry):
        return _record_branches(config, params, x, t, y, lambda attn, mlp, _: jnp.stack([attn, mlp]).astype(carry[0].dtype))

    def cached_pass(self, config, params, x, t, y, carry):
        h, c = _embed(config, params, x, t, y)

        def body(h, xs):
            p, branches = xs
            g1, g2 = _gates(config, p, c)
            return h + g1[:, None] * branches[0] + g2[:, None] * branches[1], None

        for stack, stored in zip(_stacks(params), carry):
            h, _ = jax.lax.scan(body, h, (stack, stored.astype(h.dtype)))
        return _head(config, params, h, c), carry


@dataclasses.dataclass(frozen=True)
class DeltaDiT(_IntervalBaseline):
    blocks: int | None = None  # m; None = depth // 4
    switch_t: int = 600

    name = "delta-dit"

    def __post_init__(self):
        super().__post_init__()
        if self.blocks is not None and (int(self.blocks) != self.blocks or self.blocks < 1):
            raise ConfigError(f"delta-dit blocks must be an integer >= 1, got {self.blocks}")

    def m(self, config: ModelConfig) -> int:
        return self.blocks_per_cached_step(config.depth)

    def blocks_per_cached_step(self, depth: int) -> int:
        return self.blocks if self.blocks is not None else max(1, depth // 4)

    def check_model(self, config):
        super().check_model(config)
        half = config.num_encoder_blocks
        if not 1 <= self.m(config) <= min(half, config.depth - half):
            raise ConfigError(f"delta-dit blocks must be in 1..{half} for depth {config.depth}, got {self.m(config)}")

    def full_steps(self, timesteps):
        return _pab_cadence(timesteps, self.interval)

    def init_carry(self, config: ModelConfig, batch: int):
        z = jnp.zeros((batch, config.num_patches, config.hidden_size), config.compute_dtype)
        return (z, z)  # (change across the rear blocks, change across the front blocks)

    def full_pass(self, config, params, x, t, y, carry):
        m, n_enc = self.m(config), config.num_encoder_blocks
        n_dec = config.depth - n_enc

        def run(module, x, t, y):
            h0, c = module.embed(x, t, y)
            h1, _ = module.run_encoder(h0, c, 0, m)  # after the first m blocks
            h2, _ = module.run_encoder(h1, c, m, n_enc)
            h3 = module.run_decoder(h2, c, 0, n_dec - m, None)  # before the last m blocks
            h4 = module.run_decoder(h3, c, n_dec - m, n_dec, None)
            return module.head(h4, c), (h4 - h1, h3 - h0)

        out, deltas = DiT(config).apply({"params": params}, x, t, y, method=run)
        return out, jax.tree.map(lambda d, z: d.astype(z.dtype), deltas, carry)

    def cached_pass(self, config, params, x, t, y, carry):
        m, n_enc = self.m(config), config.num_encoder_blocks
        n_dec = config.depth - n_enc
        rear_delta, front_delta = carry

        def run(module, x, t, y):
            h0, c = module.embed(x, t, y)

            def early(h0):  # front blocks computed, the rear's change reused
                return module.run_encoder(h0, c, 0, m)[0] + rear_delta.astype(h0.dtype)

            def late(h0):  # the front's change reused, rear blocks computed
                return module.run_decoder(h0 + front_delta.astype(h0.dtype), c, n_dec - m, n_dec, None)

            h = jax.lax.cond(t[0] > self.switch_t, early, late, h0)
            return module.head(h, c)

        return DiT(config).apply({"params": params}, x, t, y, method=run), carry


@dataclasses.dataclass(frozen=True)
class TeaCache(_Baseline):
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

    def init_carry(self, config: ModelConfig, batch: int):
        z = jnp.zeros((batch, config.num_patches, config.hidden_size), jnp.float32)
        return (jnp.zeros((), jnp.float32), z, z)  # (accumulated distance, previous modulated input, residual)

    def modulated_input(self, config, params, x, t, y):
        h, c = _embed(config, params, x, t, y)
        p0 = jax.tree.map(lambda a: a[0], params["encoder_blocks"])
        shift, scale = DiTBlock(config, parent=None).apply({"params": p0}, c, method=DiTBlock.modulation)[:2]
        return modulate(layer_norm(h), shift, scale).astype(jnp.float32)

    def decide(self, config, params, x, t, y, forced_full, carry):
        # The embedding computed here is computed again by the pass that follows; it is a
        # patch conv and two small MLPs, negligible beside one block.
        acc, prev, residual = carry
        mod = self.modulated_input(config, params, x, t, y)
        rel = jnp.mean(jnp.abs(mod - prev)) / jnp.maximum(jnp.mean(jnp.abs(prev)), 1e-12)
        # A fitted polynomial can dip below zero between its data points; a distance that
        # shrinks the accumulator would let the cache run on indefinitely.
        acc = acc + jnp.maximum(jnp.polyval(jnp.asarray(self.coefficients, jnp.float32), rel), 0.0)
        full = forced_full | (acc >= self.threshold)
        return full, (jnp.where(full, 0.0, acc), mod, residual)

    def full_pass(self, config, params, x, t, y, carry):
        acc, prev, _ = carry

        def run(module, x, t, y):
            h0, c = module.embed(x, t, y)
            h, _ = module.run_encoder(h0, c, 0, config.num_encoder_blocks)
            h = module.run_decoder(h, c, 0, config.depth - config.num_encoder_blocks, None)
            return module.head(h, c), (h - h0).astype(jnp.float32)

        out, residual = DiT(config).apply({"params": params}, x, t, y, method=run)
        return out, (acc, prev, residual)

    def cached_pass(self, config, params, x, t, y, carry):
        h, c = _embed(config, params, x, t, y)
        return _head(config, params, h + carry[2].astype(h.dtype), c), carry


METHODS = {
    "skip-cache": "SkipCache(N): Skip-DiT's static cache (needs a model with long skips)",
    "shallow-cache": "ShallowCache(N): the same static cache on a DiT without long skips (the ablation)",
    "fora": "FORA(N)",
    "pab": "PAB(N)",
    "delta-dit": "DeltaDiT(N)",
    "teacache": "TeaCache(threshold)",
}


def make_cache(method: str, setting: float, shallow_blocks: int = 4, coefficients=None):
    """A strategy from a method name and its one setting (N, or TeaCache's threshold)."""
    method = method.strip().lower()
    if method not in METHODS:
        raise ConfigError(f"unknown cache method {method!r}; choose from {', '.join(METHODS)}")
    if method == "teacache":
        return TeaCache(float(setting), tuple(coefficients) if coefficients is not None else (1.0, 0.0))
    if float(setting) != int(setting):
        raise ConfigError(f"{method} takes an integer interval N >= 1, got {setting}")
    n = int(setting)
    if method == "skip-cache":
        return SkipCache(n, shallow_blocks)
    if method == "shallow-cache":
        return ShallowCache(n, shallow_blocks)
    return {"fora": FORA, "pab": PAB, "delta-dit": DeltaDiT}[method](n)


def calibrate_teacache(config: ModelConfig, params, noise, labels, *, num_steps: int = 50, cfg_scale: float = 1.0, degree: int = 1):
    """Fit TeaCache's rescaling polynomial for a model (DDIM, uncached run from `noise`).

    Per step it records the relative L1 change of block 0's modulated input and of the
    model output, and fits output change ~ polyval(coefficients, input change) by least
    squares (numpy.polyfit, highest power first). Returns the coefficients as a tuple.
    The default degree is 1: TeaCache's published fits are degree 4, but on the ~50 points
    of one short run a quartic overfits and swings far outside the data (measured on the
    MNIST DiT: coefficients of order 1e4 and a schedule not monotone in the threshold), and
    even a line is pulled up by the last step's large output change, so check the realised
    schedule (`return_schedule=True`) before trusting a fitted polynomial.
    """
    from skipdit_jax.diffusion import Diffusion
    from skipdit_jax.sampling import guide

    diffusion = Diffusion(f"ddim{int(num_steps)}", learn_sigma=config.learn_sigma)
    indices = np.arange(diffusion.num_steps, dtype=np.int32)[::-1]
    timesteps = diffusion.timestep_map[indices]
    guided = cfg_scale != 1.0
    probe = TeaCache(1.0)

    @jax.jit
    def run(params, noise, labels):
        y = jnp.concatenate([labels, jnp.full_like(labels, config.null_label)]) if guided else labels

        def step(x, xs):
            i, t_orig = xs
            x_in = jnp.concatenate([x, x]) if guided else x
            t = jnp.full((x_in.shape[0],), t_orig, jnp.int32)
            mod = probe.modulated_input(config, params, x_in, t, y)
            out = DiT(config).apply({"params": params}, x_in, t, y)
            raw = out
            if guided:
                out = guide(out, cfg_scale, config.in_channels, None)
            x = diffusion.ddim_step(out, x, jnp.full((x.shape[0],), i, jnp.int32), None, 0.0, True)
            return x, (mod, raw)

        _, (mods, outs) = jax.lax.scan(step, noise.astype(jnp.float32), (jnp.asarray(indices), jnp.asarray(timesteps, jnp.int32)))
        return mods, outs

    mods, outs = run(params, noise, labels)

    def rel_l1(seq):
        seq = np.asarray(seq, np.float64)
        num = np.abs(seq[1:] - seq[:-1]).reshape(len(seq) - 1, -1).mean(axis=1)
        den = np.abs(seq[:-1]).reshape(len(seq) - 1, -1).mean(axis=1)
        return num / np.maximum(den, 1e-12)

    x_rel, y_rel = rel_l1(mods), rel_l1(outs)
    deg = int(min(degree, max(1, len(x_rel) - 1)))
    return tuple(float(c) for c in np.polyfit(x_rel, y_rel, deg))
