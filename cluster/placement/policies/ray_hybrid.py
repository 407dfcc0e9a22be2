"""An emulation of Ray's own scheduling, the baseline llmos replaces.

Tasks and actors (single bundles) follow Ray's default hybrid policy
(src/ray/raylet/scheduling/policy/hybrid_scheduling_policy.cc): a node's score is its critical
utilization, the highest of CPU and memory use (Ray also counts object store memory, which llmos
does not model; it ignores GPUs), clamped to 0 below `scheduler_spread_threshold` (0.5). Nodes are
ordered by score (ties in node-id order) and one of the best k is picked uniformly at random,
k = max(`scheduler_top_k_absolute` (1), int(nodes x `scheduler_top_k_fraction` (0.2))). CPU-only
work avoids GPU nodes while others have room (`scheduler_avoid_gpu_nodes`, done by the engine), and
a fractional GPU goes to the device with the least free share that fits, as Ray's
`AllocateResourceInstances` does. Ray's preference for the caller's local node is not modelled.

Gangs follow Ray's placement-group policies (bundle_scheduling_policy.cc), with nodes scored by
`LeastResourceScorer`: the sum over requested resources of (available - requested) / available,
highest first. same_pool gangs use PACK, bundles sorted largest first: the best node takes as
many bundles as fit before the next node is opened. same_node is STRICT_PACK, spread STRICT_SPREAD.
"""

from __future__ import annotations

import numpy as np

from cluster.placement.policies.base import NodeScores, Policy, free_gpu_units
from cluster.placement.request import Demand
from cluster.placement.state import ClusterState

SPREAD_THRESHOLD = 0.5
TOP_K_FRACTION = 0.2
TOP_K_ABSOLUTE = 1


def critical_utilization(state: ClusterState, nodes: np.ndarray) -> np.ndarray:
    utilization = np.zeros(len(nodes), dtype=np.float32)
    for capacity, free in ((state.cpu_cap, state.cpu_free), (state.mem_cap, state.mem_free)):
        total = capacity[nodes]
        used = np.where(total > 0, 1 - free[nodes] / np.maximum(total, 1), 0).astype(np.float32)
        utilization = np.maximum(utilization, used)
    return np.where(utilization < SPREAD_THRESHOLD, np.float32(0), utilization)


class RayHybrid(Policy):
    name = "ray-hybrid"
    packs_gangs = True

    def score(self, state: ClusterState, demand: Demand, nodes: np.ndarray) -> NodeScores:
        # Lower utilization is better in Ray; llmos scores are higher-is-better.
        return NodeScores(-critical_utilization(state, nodes).astype(np.float64))

    def choose(self, state: ClusterState, candidates: np.ndarray, scores: np.ndarray, tie_rank: np.ndarray) -> int:
        top_k = max(TOP_K_ABSOLUTE, int(state.size * TOP_K_FRACTION))
        best_first = np.lexsort((tie_rank[candidates], -scores))
        return int(self.rng.choice(candidates[best_first[:top_k]]))

    def gang_score(self, state: ClusterState, demand: Demand, nodes: np.ndarray) -> np.ndarray:
        requested = (
            (demand.cpu, state.cpu_free[nodes]),
            (demand.memory, state.mem_free[nodes]),
            (demand.gpu_total, free_gpu_units(state, nodes)),
            (demand.tpu, state.tpu_free[nodes]),
        )
        score = np.zeros(len(nodes))
        for amount, available in requested:
            if amount:
                score += np.where(available > 0, (available - amount) / np.maximum(available, 1), 0.0)
        return score
