"""llmos: FGD's fragmentation descent, with ties settled by the GPUs a node's CPU would strand.

FGD's integer score puts many nodes in one bin (a fragmentation change within about 0.04 GPU
scores the same), and FGD settles the bin by node order. That coarseness is not a weakness to
remove: scoring the exact fragmentation change spreads work over more nodes and loses allocation.
llmos keeps FGD's score as its first key and uses the bin to fix two blind spots of FGD's measure:

- FGD counts every device big enough for a task shape as usable by it, even when the node's CPU
  leaves room for one copy of the shape. The second key is the decrease of *stranded* capacity
  (`TargetWorkload.stranded`): expected unusable GPUs with each shape's copies limited by the
  node's free CPU as well as its devices. CPU-heavy tasks go where CPU is plentiful, light ones
  where it is scarce, so CPU and GPU stay usable together.
- FGD ignores the 5% least popular shapes, among them the largest gangs, which fit only a few
  nodes (on the Alibaba trace, 8-GPU tasks with 120 CPUs fit only the 39 G3 nodes). The stranded
  measure covers every shape, each weighted by the pressure on its possible hosts: the cluster's
  GPUs over the GPUs of the nodes that could hold it when empty. Breaking the only nodes a shape
  fits costs in proportion.

The second key is FGD's own transform (sigmoid of GPUs) cut into 10 bins, coarse on purpose:
equal bins fall to the node order, which keeps work consolidated and whole nodes free for gangs.
A continuous key spreads work over every node it marginally prefers.

Online and honest: it knows only the workload's shape distribution, as FGD does, and scores one
task at a time.
"""

from __future__ import annotations

import numpy as np

from cluster.placement.policies.base import NodeScores, Policy
from cluster.placement.policies.fgd import PlacementOptions, fgd_score, gpu_free_unchanged, sigmoid
from cluster.placement.request import Demand
from cluster.placement.state import ClusterState
from cluster.placement.workload import TargetWorkload

TIE_BREAK_BINS = 10
# Each bin is worth this much; all of them together stay below one FGD score point.
TIE_BREAK_STEP = 0.9 / TIE_BREAK_BINS
# The score of a zero decrease on both keys: a node where the bundle changes no free GPU capacity.
UNCHANGED = float(fgd_score(np.zeros(1))[0] + np.floor(sigmoid(np.zeros(1))[0] * TIE_BREAK_BINS) * TIE_BREAK_STEP)


def host_pressure_popularity(workload: TargetWorkload, state: ClusterState) -> np.ndarray:
    """Each shape's popularity times the cluster's GPUs over the GPUs of nodes that could host it."""
    accessible = workload.accessible(state.gpu_types)[state.gpu_type_of + 1]
    could_host = (
        accessible
        & (state.cpu_cap[:, None] >= workload.cpu[None, :])
        & (state.gpu_count[:, None] >= workload.gpu_count[None, :])
    )
    host_gpus = (could_host * state.gpu_count[:, None]).sum(axis=0)
    pressure = np.where(host_gpus > 0, state.gpu_count.sum() / np.maximum(host_gpus, 1), 1.0)
    weights = workload.popularity * pressure
    return weights / weights.sum()


class Llmos(Policy):
    name = "llmos"
    needs_workload = True

    def __init__(self, *, workload: TargetWorkload | None = None, seed: int = 0):
        super().__init__(workload=workload, seed=seed)
        self._pressure: tuple[TargetWorkload, ClusterState, np.ndarray] | None = None

    def score(self, state: ClusterState, demand: Demand, nodes: np.ndarray) -> NodeScores:
        return gpu_free_unchanged(state, demand, nodes, lambda some: self._score(state, demand, some), UNCHANGED)

    def _score(self, state: ClusterState, demand: Demand, nodes: np.ndarray) -> NodeScores:
        workload = self.workload
        fgd_popularity = workload.covered_popularity()
        stranded_popularity = self._pressure_popularity(workload, state)
        options = PlacementOptions.of(workload, state, demand, nodes)
        decrease = options.decrease(
            lambda gpu_free, cpu_free, accessible: workload.fragmentation_and_stranded(
                gpu_free, cpu_free, accessible, fgd_popularity, stranded_popularity
            )
        )
        stranded_bin = np.floor(sigmoid(decrease[..., 1]) * TIE_BREAK_BINS)
        option_score = np.where(options.valid, fgd_score(decrease[..., 0]) + stranded_bin * TIE_BREAK_STEP, -1.0)
        device = option_score.argmax(axis=1)
        return NodeScores(option_score.max(axis=1), device if demand.is_fractional_gpu else None)

    def _pressure_popularity(self, workload: TargetWorkload, state: ClusterState) -> np.ndarray:
        # Capacities never change, so the weights hold for as long as the workload and the state do.
        if self._pressure is None or self._pressure[0] is not workload or self._pressure[1] is not state:
            self._pressure = (workload, state, host_pressure_popularity(workload, state))
        return self._pressure[2]
