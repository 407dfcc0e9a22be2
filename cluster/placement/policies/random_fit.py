"""Random-fit: any node with room, and any device on it that fits, uniformly at random."""

from __future__ import annotations

import numpy as np

from cluster.placement.policies.base import NodeScores, Policy
from cluster.placement.request import Demand
from cluster.placement.state import ClusterState


class RandomFit(Policy):
    name = "random"
    cacheable = False

    def score(self, state: ClusterState, demand: Demand, nodes: np.ndarray) -> NodeScores:
        shared_device = None
        if demand.is_fractional_gpu:
            draws = self.rng.random(state.gpu_free[nodes].shape)
            shared_device = np.where(state.gpu_free[nodes] >= demand.gpu_share, draws, -1.0).argmax(axis=1)
        return NodeScores(np.zeros(len(nodes)), shared_device)

    def choose(self, state: ClusterState, candidates: np.ndarray, scores: np.ndarray, tie_rank: np.ndarray) -> int:
        return int(self.rng.choice(candidates))
