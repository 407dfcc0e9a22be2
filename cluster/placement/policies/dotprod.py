"""Dot-product (Tetris): the node whose free CPU and GPU align least with the request.

As in the FGD paper's baseline: free and requested (CPU, total GPU) are normalised by the
reference node, and a smaller dot product scores higher, which packs requests onto fuller nodes.
"""

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


class DotProduct(Policy):
    name = "dotprod"

    def score(self, state: ClusterState, demand: Demand, nodes: np.ndarray) -> NodeScores:
        cpu_scale, gpu_scale = REFERENCE_CPUS * UNITS, REFERENCE_GPUS * UNITS
        dot = (state.cpu_free[nodes] / cpu_scale) * (demand.cpu / cpu_scale) + (
            free_gpu_units(state, nodes) / gpu_scale
        ) * (demand.gpu_total / gpu_scale)
        return NodeScores(truncated(100 * (1 - dot / 2)))
