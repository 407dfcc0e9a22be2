"""FGD: fragmentation gradient descent (Weng et al., ATC'23).

Place the bundle where the node's fragmentation, measured against the target workload, grows the
least (or shrinks the most), on the device that achieves it. The score is the paper simulator's:
sigmoid of the fragmentation decrease in GPUs, times 100, truncated to an integer.
"""

from __future__ import annotations

import numpy as np

from cluster.placement.policies.base import NodeScores, Policy, truncated
from cluster.placement.request import UNITS, Demand
from cluster.placement.state import ClusterState
from cluster.placement.workload import TargetWorkload


def fragmentation_change(
    workload: TargetWorkload, state: ClusterState, demand: Demand, nodes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fragmentation of each node now, and after placing the demand there, per placement option.

    Returns (before[node], after[node, option], valid[node, option]). A fractional-GPU demand has one
    option per device; any other demand has one option (whole GPUs take the lowest idle devices).
    """
    free = state.gpu_free[nodes]
    cpu = state.cpu_free[nodes]
    accessible = workload.accessible(state.gpu_types)[state.gpu_type_of[nodes] + 1]
    before = workload.fragmentation(free, cpu, accessible)
    cpu_after = cpu - demand.cpu
    if demand.is_fractional_gpu:
        count, devices = free.shape
        free_after = np.repeat(free, devices, axis=0)
        free_after[np.arange(count * devices), np.tile(np.arange(devices), count)] -= demand.gpu_share
        after = workload.fragmentation(
            free_after, np.repeat(cpu_after, devices), np.repeat(accessible, devices, axis=0)
        ).reshape(count, devices)
        return before, after, free >= demand.gpu_share
    free_after = free.copy()
    if demand.gpu_count:
        idle = free == UNITS
        free_after[idle & (np.cumsum(idle, axis=1) <= demand.gpu_count)] = 0
    after = workload.fragmentation(free_after, cpu_after, accessible)[:, None]
    return before, after, np.ones(after.shape, dtype=bool)


def sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


class Fgd(Policy):
    name = "fgd"
    needs_workload = True

    def score(self, state: ClusterState, demand: Demand, nodes: np.ndarray) -> NodeScores:
        before, after, valid = fragmentation_change(self.workload, state, demand, nodes)
        option_score = np.where(valid, truncated(sigmoid((before[:, None] - after) / UNITS) * 100), -1.0)
        device = option_score.argmax(axis=1)
        return NodeScores(option_score.max(axis=1), device if demand.is_fractional_gpu else None)
