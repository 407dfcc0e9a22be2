"""GPU clustering: keep tasks of one GPU kind (shared, 1-GPU, 2-GPU, ...) together on a node."""

from __future__ import annotations

import numpy as np

from cluster.placement.policies.base import REFERENCE_GPUS, NodeScores, Policy, free_gpu_units, truncated
from cluster.placement.request import UNITS, Demand
from cluster.placement.state import ClusterState


class GpuClustering(Policy):
    name = "clustering"

    def score(self, state: ClusterState, demand: Demand, nodes: np.ndarray) -> NodeScores:
        if not demand.gpu_count:
            return NodeScores(np.zeros(len(nodes)))
        kinds = state.gpu_kind_counts[nodes] > 0
        same_kind = kinds[:, 0 if demand.is_fractional_gpu else demand.gpu_count]
        kinds_present = kinds.sum(axis=1)
        # Bands of 25: only this kind > this kind among others > no GPU work yet > only other kinds;
        # within a band, the fuller node first.
        band = np.select([same_kind & (kinds_present == 1), same_kind, kinds_present == 0], [75, 50, 25], 0)
        reference = REFERENCE_GPUS * UNITS
        fullness = truncated(25 * (reference - free_gpu_units(state, nodes)) / reference)
        return NodeScores(fullness + band)
