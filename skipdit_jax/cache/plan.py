"""A cache's per-step schedule and its predicted (unit-count) speedup."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """The per-step schedule of a cache and its predicted (block-count) speedup."""

    full: np.ndarray  # bool, one per sampling step, in sampling order
    predicted_speedup: float

    @property
    def num_full(self) -> int:
        return int(self.full.sum())

    @property
    def num_cached(self) -> int:
        return int((~self.full).sum())


def plan_from_schedule(full, depth: int, cached_units: int) -> CachePlan:
    """The plan of a realised schedule: `depth` units per full step, `cached_units` per
    cached step."""
    full = np.asarray(full, bool)
    cost = full.sum() * depth + (~full).sum() * cached_units
    return CachePlan(full=full, predicted_speedup=float(len(full) * depth / max(cost, 1e-9)))
