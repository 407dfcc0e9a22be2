"""GPU packing: share a used GPU first, then take idle GPUs on a used node, then open an idle node."""

from __future__ import annotations

import numpy as np

from cluster.placement.policies.base import NodeScores, Policy
from cluster.placement.request import UNITS, Demand
from cluster.placement.state import ClusterState


class GpuPacking(Policy):
    name = "packing"

    def score(self, state: ClusterState, demand: Demand, nodes: np.ndarray) -> NodeScores:
        if not demand.gpu_count:
            return NodeScores(np.zeros(len(nodes)))
        free = state.gpu_free[nodes]
        idle = (free == UNITS).sum(axis=1)
        # Bands, highest first: 50-100 share a used GPU (the fuller the better), 33-50 use idle GPUs
        # of a used node, 0-33 open an idle node (the fewer its GPUs the better).
        score = np.maximum(50 - demand.gpu_count, 33).astype(np.float64).repeat(len(nodes))
        if demand.is_fractional_gpu:
            device = state.best_fit_devices(nodes, demand.gpu_share)
            device_free = free[np.arange(len(nodes)), device]
            shares_used_gpu = device_free < UNITS
            percent_free = device_free * 100 // UNITS
            score = np.where(shares_used_gpu, np.maximum(100 - percent_free // 10, 50), score)
        node_idle = idle == state.gpu_count[nodes]
        score = np.where(node_idle, np.maximum(33 - idle, idle), score)
        return NodeScores(score)
