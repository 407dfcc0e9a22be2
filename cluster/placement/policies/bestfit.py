"""Best-fit: the node left with the least free CPU and GPU, each weighed by half."""

from __future__ import annotations

import numpy as np

from cluster.placement.policies.base import (
    REFERENCE_CPUS,
    REFERENCE_GPUS,
    NodeScores,
    Policy,
    free_gpu_units,
    truncated,
)
from cluster.placement.request import UNITS, Demand
from cluster.placement.state import ClusterState


class BestFit(Policy):
    name = "bestfit"

    def score(self, state: ClusterState, demand: Demand, nodes: np.ndarray) -> NodeScores:
        cpu_left = (state.cpu_free[nodes] - demand.cpu) / (REFERENCE_CPUS * UNITS)
        gpu_left = (free_gpu_units(state, nodes) - demand.gpu_total) / (REFERENCE_GPUS * UNITS)
        return NodeScores(truncated((1.0 - (cpu_left * 0.5 + gpu_left * 0.5)) * 100))
