"""FGD: fragmentation gradient descent (Weng et al., ATC'23).

Place the bundle where the node's fragmentation, measured against the target workload (the most
popular shapes covering 95% of tasks), grows the least (or shrinks the most), on the device that
achieves it. The score is the paper simulator's:
sigmoid of the fragmentation decrease in GPUs, times 100, truncated to an integer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cluster.placement.policies.base import NodeScores, Policy, truncated
from cluster.placement.request import UNITS, Demand
from cluster.placement.state import ClusterState
from cluster.placement.workload import TargetWorkload

# A fragmentation measure: (gpu_free[rows, devices], cpu_free[rows], accessible[rows, shapes]) -> [rows]
# (or [rows, columns] for several measures at once).
Measure = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PlacementOptions:
    """Each candidate node as it is, and as it would be after each way of placing the demand there.

    A fractional-GPU demand has one option per device; any other demand has one option (whole GPUs
    take the lowest idle devices).
    """

    gpu_free: np.ndarray
    cpu_free: np.ndarray
    accessible: np.ndarray
    gpu_free_after: np.ndarray  # rows: node-major, `options` rows per node
    cpu_free_after: np.ndarray
    accessible_after: np.ndarray
    valid: np.ndarray  # [node, option]

    @classmethod
    def of(cls, workload: TargetWorkload, state: ClusterState, demand: Demand, nodes: np.ndarray) -> PlacementOptions:
        free = state.gpu_free[nodes]
        cpu = state.cpu_free[nodes]
        accessible = workload.accessible(state.gpu_types)[state.gpu_type_of[nodes] + 1]
        cpu_after = cpu - demand.cpu
        if demand.is_fractional_gpu:
            count, devices = free.shape
            free_after = np.repeat(free, devices, axis=0)
            free_after[np.arange(count * devices), np.tile(np.arange(devices), count)] -= demand.gpu_share
            # An invalid option (device too small) goes negative; clamp it so measures stay defined.
            return cls(
                free,
                cpu,
                accessible,
                np.maximum(free_after, 0),
                np.repeat(cpu_after, devices),
                np.repeat(accessible, devices, axis=0),
                free >= demand.gpu_share,
            )
        free_after = free.copy()
        if demand.gpu_count:
            idle = free == UNITS
            free_after[idle & (np.cumsum(idle, axis=1) <= demand.gpu_count)] = 0
        return cls(free, cpu, accessible, free_after, cpu_after, accessible, np.ones((len(nodes), 1), dtype=bool))

    def decrease(self, measure: Measure) -> np.ndarray:
        """[node, option, ...]: how much the measure falls (in GPUs) if the demand is placed that way;
        a measure with several columns gives one decrease per column."""
        before = measure(self.gpu_free, self.cpu_free, self.accessible)
        after = measure(self.gpu_free_after, self.cpu_free_after, self.accessible_after)
        return (before[:, None] - after.reshape(self.valid.shape + before.shape[1:])) / UNITS


def gpu_free_unchanged(
    state: ClusterState,
    demand: Demand,
    nodes: np.ndarray,
    score: Callable[[np.ndarray], NodeScores],
    unchanged: float,
) -> NodeScores:
    """Scores `nodes` with `score`, except nodes a GPU-less demand leaves without any free GPU share.

    On such a node every measure of free GPU capacity is zero before and after placing the demand,
    so its decrease is zero and its score is the constant `unchanged` (the policy's score of a zero
    decrease); only the other nodes are scored in full. Exact, and it spares a CPU-only bundle on a
    CPU node the per-device arithmetic.
    """
    if demand.gpu_count:
        return score(nodes)
    has_gpu_free = state.gpu_free[nodes].any(axis=1)
    if has_gpu_free.all():
        return score(nodes)
    scores = np.full(len(nodes), unchanged)
    if has_gpu_free.any():
        scores[has_gpu_free] = score(nodes[has_gpu_free]).score
    return NodeScores(scores, None)


def sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


def fgd_score(fragmentation_decrease: np.ndarray) -> np.ndarray:
    """The simulator's integer FGD score of a fragmentation decrease in GPUs."""
    return truncated(sigmoid(fragmentation_decrease) * 100)


# The score of a zero fragmentation decrease: a node where the bundle changes no free GPU capacity.
UNCHANGED = float(fgd_score(np.zeros(1))[0])


class Fgd(Policy):
    name = "fgd"
    needs_workload = True

    def score(self, state: ClusterState, demand: Demand, nodes: np.ndarray) -> NodeScores:
        return gpu_free_unchanged(state, demand, nodes, lambda some: self._score(state, demand, some), UNCHANGED)

    def _score(self, state: ClusterState, demand: Demand, nodes: np.ndarray) -> NodeScores:
        target = self.workload.covering()
        options = PlacementOptions.of(target, state, demand, nodes)
        option_score = np.where(options.valid, fgd_score(options.decrease(target.fragmentation)), -1.0)
        device = option_score.argmax(axis=1)
        return NodeScores(option_score.max(axis=1), device if demand.is_fractional_gpu else None)
