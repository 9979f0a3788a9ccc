"""PAB for DiT, as the Skip-DiT authors implemented it (their `skip-dit-c2i` models.py):
on cached steps every block reuses *both* its attention and MLP outputs from the last full
step, re-gated with the current step's adaLN gates; the residual stream is recomputed
(`BranchCache`, shared with FORA). Steps 0 and 1 and steps with t <= 10 are always full
(`authors_cadence`); that schedule is the only difference from FORA."""

from __future__ import annotations

import dataclasses

from skipdit_jax.cache.baselines.common import BranchCache, authors_cadence


@dataclasses.dataclass(frozen=True)
class PAB(BranchCache):
    name = "pab"

    def full_steps(self, timesteps):
        return authors_cadence(timesteps, self.interval)
