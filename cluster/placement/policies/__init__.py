"""Placement policies, chosen by name from YAML, the CLI and the benchmark (`--policy fgd`)."""

from __future__ import annotations

from cluster.placement.policies.base import NodeScores, Policy
from cluster.placement.policies.bestfit import BestFit
from cluster.placement.policies.clustering import GpuClustering
from cluster.placement.policies.dotprod import DotProduct
from cluster.placement.policies.fgd import Fgd
from cluster.placement.policies.llmos import Llmos
from cluster.placement.policies.packing import GpuPacking
from cluster.placement.policies.random_fit import RandomFit
from cluster.placement.policies.ray_hybrid import RayHybrid
from cluster.placement.workload import TargetWorkload

POLICIES: dict[str, type[Policy]] = {
    policy.name: policy for policy in (RandomFit, DotProduct, GpuPacking, GpuClustering, BestFit, Fgd, RayHybrid, Llmos)
}


def make_policy(name: str, *, workload: TargetWorkload | None = None, seed: int = 0) -> Policy:
    try:
        policy = POLICIES[name]
    except KeyError:
        raise ValueError(f"no placement policy named {name!r}; choose one of {', '.join(POLICIES)}") from None
    return policy(workload=workload, seed=seed)


__all__ = ["POLICIES", "NodeScores", "Policy", "make_policy"]
