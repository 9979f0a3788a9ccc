"""PAB's published video form (Zhao et al. 2024, "Real-Time Video Generation with Pyramid
Attention Broadcast"), as its reference implementation (VideoSys `core/pab_mgr.py` and the
Latte transformer there) runs it, on video families (Latte: units are (spatial, temporal)
pairs; `attention_kinds` must include "temporal").

Per step s (counted from 0 at the first sampling step) with timestep t:
  * spatial attention is *broadcast* (reused) when s % spatial_range != 0 and
    window[0] < t < window[1]; temporal attention likewise with temporal_range; otherwise
    it is computed and stored. What is stored and reused is the attention's residual term
    after its adaLN gate (gate_msa * attn), as the reference keeps it.
  * MLPs are computed, except the published Latte MLP broadcast: at a step whose t is one of
    `mlp_timesteps` the MLPs of the pairs in `mlp_units` are computed and stored, and the
    next `mlp_skip` steps reuse them (gated output, spatial and temporal blocks alike).
    A key absent from the sampling timesteps broadcasts nothing (as the reference).
  * Cross-attention broadcast (range 6 in the published config) has nothing to act on in
    class-conditional Latte, which has no cross-attention.

The published Latte settings (VideoSys `LattePABConfig`): spatial range 2, temporal range 3,
window (100, 800) for both, MLP broadcast at t = 720, 640, 560, 480, 400 for blocks 0-4 with
skip_count 2 (keys on the DDIM-50 grid t = 980, 960, ..., 0). Those are the defaults here.

In the jitted sampler: `full_steps` (host) marks the steps where nothing is reused; on the
others the cached pass decides per branch on the device, from the step counter and the MLP
countdown it carries (the same rule as the host `schedule`), and `lax.cond` runs only what
is computed. Where two MLP keys lie within `mlp_skip` steps of each other the latest key
wins (the reference takes the first listed); the published keys are 4 steps apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from skipdit_jax.cache.baselines.common import Baseline, check_interval, stacked_zeros, unit_indices
from skipdit_jax.cache.plan import CachePlan
from skipdit_jax.errors import ConfigError
from skipdit_jax.models.families import as_family
from skipdit_jax.models.family import ModelFamily

PUBLISHED_LATTE = dict(
    spatial_range=2,
    temporal_range=3,
    window=(100, 800),
    mlp_timesteps=(720, 640, 560, 480, 400),
    mlp_skip=2,
    mlp_units=(0, 1, 2, 3, 4),
)


@dataclasses.dataclass(frozen=True)
class PABVideo(Baseline):
    """PAB with spatial / temporal attention broadcast ranges inside a timestep window.

    Args:
      spatial_range, temporal_range: a spatial (temporal) attention output is reused on the
        steps s with s % range != 0 inside the window (1 = never reused).
      window: (lo, hi): broadcasting only where lo < t < hi (original 0..999 timesteps).
      mlp_timesteps, mlp_skip, mlp_units: the MLP broadcast (empty timesteps = MLPs always
        computed).
    """

    spatial_range: int = PUBLISHED_LATTE["spatial_range"]
    temporal_range: int = PUBLISHED_LATTE["temporal_range"]
    window: tuple[int, int] = PUBLISHED_LATTE["window"]
    mlp_timesteps: tuple[int, ...] = PUBLISHED_LATTE["mlp_timesteps"]
    mlp_skip: int = PUBLISHED_LATTE["mlp_skip"]
    mlp_units: tuple[int, ...] = PUBLISHED_LATTE["mlp_units"]

    name = "pab-video"

    def __post_init__(self):
        check_interval(self.spatial_range)
        check_interval(self.temporal_range)
        object.__setattr__(self, "window", tuple(int(w) for w in self.window))
        object.__setattr__(self, "mlp_timesteps", tuple(int(t) for t in self.mlp_timesteps))
        object.__setattr__(self, "mlp_units", tuple(int(u) for u in self.mlp_units))
        if len(self.window) != 2 or self.window[0] >= self.window[1]:
            raise ConfigError(f"pab-video window must be (lo, hi) with lo < hi, got {self.window}")
        if int(self.mlp_skip) != self.mlp_skip or self.mlp_skip < 0:
            raise ConfigError(f"pab-video mlp_skip must be an integer >= 0, got {self.mlp_skip}")
        if any(u < 0 for u in self.mlp_units):
            raise ConfigError(f"pab-video mlp_units must be unit indices >= 0, got {self.mlp_units}")

    def check_model(self, model) -> None:
        super().check_model(model)
        family = as_family(model)
        if "temporal" not in family.attention_kinds:
            raise ConfigError(
                f"pab-video broadcasts spatial and temporal attention and needs a video model; the {family.name} "
                "family has no temporal attention (use 'pab')"
            )

    # ---- host-side schedule ----------------------------------------------------------------
    def schedule(self, timesteps: Sequence[int]) -> dict[str, np.ndarray]:
        """Per step, True where the branch is computed: "spatial" / "temporal" attention and
        "mlp" (of the units in `mlp_units`; other MLPs are always computed). Written from the
        reference's rules: count % range != 0 inside the window broadcasts; an MLP key t_k
        computes, and the next mlp_skip sampling timesteps after it broadcast."""
        t = np.asarray([int(v) for v in timesteps])
        step = np.arange(len(t))
        inside = (self.window[0] < t) & (t < self.window[1])
        out = {
            "spatial": ~((step % self.spatial_range != 0) & inside),
            "temporal": ~((step % self.temporal_range != 0) & inside),
        }
        mlp = np.ones(len(t), bool)
        listed = list(t)
        for i, ti in enumerate(listed):
            if ti in self.mlp_timesteps:
                continue  # a key step computes (and stores)
            for key in self.mlp_timesteps:
                if key in listed:
                    j = listed.index(key)
                    if ti in listed[j : j + 1 + self.mlp_skip]:
                        mlp[i] = False
                        break
        out["mlp"] = mlp
        return out

    def full_steps(self, timesteps):
        s = self.schedule(timesteps)
        return s["spatial"] & s["temporal"] & s["mlp"]

    def step_flags(self, t, count, mlp_left):
        """The device rule, one step: (spatial fresh, temporal fresh, MLP fresh, next MLP
        countdown) from the step's timestep, its index and the carried countdown."""
        inside = (self.window[0] < t) & (t < self.window[1])
        spatial = ~((count % self.spatial_range != 0) & inside)
        temporal = ~((count % self.temporal_range != 0) & inside)
        keys = jnp.asarray(self.mlp_timesteps if self.mlp_timesteps else (-1,), jnp.int32)
        is_key = jnp.any(t == keys)
        reuse_mlp = ~is_key & (mlp_left > 0)
        left = jnp.where(is_key, self.mlp_skip, jnp.maximum(mlp_left - 1, 0)).astype(jnp.int32)
        return spatial, temporal, ~reuse_mlp, left

    # ---- cost ----------------------------------------------------------------------------
    def branch_shares(self, model=None) -> dict[str, float]:
        """Fractions of one unit's cost: "spatial_attn", "spatial_mlp", "temporal_attn",
        "temporal_mlp" (sum 1). Counted in multiply-adds per token: attention 4 D^2 (qkv,
        proj) + 2 L D (scores, weighted sum over a sequence of L: tokens per frame for
        spatial, frames for temporal), MLP 2 r D^2. Without a model the L terms are dropped
        and r = 4: each block is 1/3 attention, 2/3 MLP. Embedders, adaLN, LayerNorms and the
        final layer are ignored."""
        if model is None:
            d, r, lengths = 1.0, 4.0, {"spatial": 0, "temporal": 0}
        else:
            cfg = as_family(model).config
            d, r = float(cfg.hidden_size), float(cfg.mlp_ratio)
            lengths = {"spatial": cfg.num_patches, "temporal": cfg.num_frames}
        costs = {}
        for kind, length in lengths.items():
            costs[f"{kind}_attn"] = 4 * d * d + 2 * length * d
            costs[f"{kind}_mlp"] = 2 * r * d * d
        total = sum(costs.values())
        return {k: v / total for k, v in costs.items()}

    def step_costs(self, timesteps, depth: int, model=None) -> np.ndarray:
        """Units computed per step: `depth` per step with nothing reused."""
        s, w = self.schedule(timesteps), self.branch_shares(model)
        k = sum(1 for u in set(self.mlp_units) if u < depth)
        attn = depth * (w["spatial_attn"] * s["spatial"] + w["temporal_attn"] * s["temporal"])
        mlp = (w["spatial_mlp"] + w["temporal_mlp"]) * (depth - k + k * s["mlp"])
        return attn + mlp

    def plan(self, timesteps, depth: int, model=None) -> CachePlan:
        """The all-computed steps and the predicted speedup from `step_costs` (a model, config
        or family, refines the attention / MLP shares)."""
        cost = self.step_costs(timesteps, depth, model)
        return CachePlan(full=self.full_steps(timesteps), predicted_speedup=float(len(cost) * depth / max(cost.sum(), 1e-9)))

    def units_per_cached_step(self, model) -> int:
        raise ConfigError("pab-video's cost differs from step to step; use its plan(timesteps, depth, model)")

    # ---- device-side passes ----------------------------------------------------------------
    def init_carry(self, family: ModelFamily, batch: int):
        """(step counter, MLP countdown, per unit stack the gated attention / MLP outputs)."""
        zero = jnp.zeros((), jnp.int32)
        return zero, zero, stacked_zeros(family, batch, family.compute_dtype)

    def _run(self, family, params, x, t, cond, carry, computed):
        count, mlp_left, stored = carry
        spatial, temporal, mlp, left = self.step_flags(t[0], count, mlp_left)
        total = sum(jax.tree.leaves(s)[0].shape[0] for s in family.unit_stacks(params))
        in_mlp = jnp.asarray([u in self.mlp_units for u in range(total)])
        h, c = family.embed(params, x, t, cond)

        def body(h, xs):
            p, i, st = xs
            if computed:
                fresh = {kind: (True, True) for kind in st}
            else:
                mlp_u = mlp | ~in_mlp[i]
                attn = {"spatial": spatial, "temporal": temporal}
                fresh = {kind: (attn[kind], mlp_u) for kind in st}
            return family.unit_broadcast(p, h, c, i, st, fresh)

        new = []
        for stack, index, st in zip(family.unit_stacks(params), unit_indices(family, params), stored, strict=True):
            h, s = jax.lax.scan(body, h, (stack, index, st))
            new.append(s)
        return family.head(params, h, c), (count + 1, left, tuple(new))

    def full_pass(self, family, params, x, t, cond, carry):
        return self._run(family, params, x, t, cond, carry, computed=True)

    def cached_pass(self, family, params, x, t, cond, carry):
        return self._run(family, params, x, t, cond, carry, computed=False)
