"""FORA (Selvaraju et al. 2024, "FORA: Fast-Forward Caching in Diffusion Transformer
Acceleration"), matched to the authors' DiT code (github.com/prathebaselva/FORA,
src/models.py `DiTBlock.forward`, mode 'boost_infer_static', driven by
src/diffusion/gaussian_diffusion.py `p_sample_loop_progressive`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from skipdit_jax.cache.baselines.common import BranchCache


@dataclasses.dataclass(frozen=True)
class FORA(BranchCache):
    """FORA with a static interval N.

    What is cached (reference `DiTBlock.forward`): on a full step every block stores
    `attn(modulate(norm1(x)))` and `mlp(modulate(norm2(x)))`, its attention and MLP
    outputs *before* the gates. On a cached step each block still computes its adaLN
    modulation from the current step's conditioning vector (the first line of the block's
    forward, run every step) and does `x += gate_msa * attn_cached; x += gate_mlp *
    mlp_cached`: the attention, the MLP and the LayerNorm/modulate feeding them are
    skipped, the gates are fresh. That is `BranchCache`, the same cached pass as our PAB.

    Schedule (reference): the sampling loop passes `current_step = i`, the diffusion index,
    which counts *down* from num_steps-1 (first step) to 0 (last step); a step is full when
    `i == num_steps - 1 or i % N == 0`. So the first step is full (it fills the cache), the
    last step (i = 0) is always full, and in between the full steps are the multiples of N
    counted from the end -- not every N-th step from the start. No warm-up steps and no
    timestep thresholds beyond that. Here i = len(timesteps) - 1 - step, the same index the
    sampler feeds the diffusion update (the respaced index for DDIM as for DDPM; the
    reference wires the cache only into its DDPM loop).

    Differences from PAB (the Skip-DiT authors' variant, `pab.py`): only the schedule. PAB
    counts steps from the start (counter 0, 1, ...) and is full at counters 0 and 1, at
    every counter that is a multiple of N, and wherever t <= 10; FORA as above. Before
    this was matched to the reference, FORA stored each block's *gated* branch sum and
    added it to the fresh embedding (stale gates) on a schedule counted from the start.
    """

    name = "fora"

    def full_steps(self, timesteps):
        n = len(timesteps)
        index = np.arange(n)[::-1]  # the reference's current_step: n-1 at the first step ... 0 at the last
        return (index % self.interval == 0) | (index == n - 1)
