"""What every placement policy is: a scorer of candidate nodes for one bundle, plus a chooser.

The engine asks a policy to score the nodes that have room for a bundle and then to choose one;
it never asks a policy to change anything. Scores of a `cacheable` policy depend only on the
node's own state and the bundle, so the engine rescores a node only when that node changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cluster.placement.request import Demand
from cluster.placement.state import ClusterState
from cluster.placement.workload import TargetWorkload


@dataclass(frozen=True)
class NodeScores:
    score: np.ndarray  # per node, higher is better
    # For a fractional-GPU bundle, the device the policy would use on each node; None: best fit.
    shared_device: np.ndarray | None = None


class Policy:
    name: ClassVar[str]
    # False when scores depend on more than the node and the bundle (e.g. fresh random draws).
    cacheable: ClassVar[bool] = True
    # True for policies that optimise for a target workload (FGD and llmos).
    needs_workload: ClassVar[bool] = False
    # Ray's PACK: fill the node chosen for the first bundle before opening another.
    packs_gangs: ClassVar[bool] = False

    def __init__(self, *, workload: TargetWorkload | None = None, seed: int = 0):
        # A policy that needs a workload and gets none has it learned by the engine from requests.
        self.workload = workload
        self.rng = np.random.default_rng(seed)

    def score(self, state: ClusterState, demand: Demand, nodes: np.ndarray) -> NodeScores:
        raise NotImplementedError

    def gang_score(self, state: ClusterState, demand: Demand, nodes: np.ndarray) -> np.ndarray:
        """Scores for bundles of a multi-bundle gang; the single-bundle scores unless a policy differs."""
        return self.score(state, demand, nodes).score

    def choose(self, state: ClusterState, candidates: np.ndarray, scores: np.ndarray, tie_rank: np.ndarray) -> int:
        return best_scored(candidates, scores, tie_rank)


def best_scored(candidates: np.ndarray, scores: np.ndarray, tie_rank: np.ndarray) -> int:
    """The best-scored candidate; among equals, the one first in the engine's node order."""
    tied = candidates[scores == scores.max()]
    return int(tied[np.argmin(tie_rank[tied])])


# The FGD simulator normalises by its largest node shape: 128 CPUs and 8 GPUs.
REFERENCE_CPUS = 128
REFERENCE_GPUS = 8


def truncated(values: np.ndarray) -> np.ndarray:
    """Integer node scores, as Kubernetes score plugins (and so the FGD paper's baselines) produce."""
    return np.trunc(values)


def free_gpu_units(state: ClusterState, nodes: np.ndarray) -> np.ndarray:
    return state.gpu_free[nodes].sum(axis=1)
