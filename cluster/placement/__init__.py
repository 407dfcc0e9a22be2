"""The placement engine: fragmentation-aware gang bin-packing, a pure core.

Plain data in (a `ClusterSnapshot` and a `GangRequest`), a decision out (`Placement` or
`Rejection`). Nothing here imports Ray, Kubernetes or anything that does I/O; an import-linter
contract in pyproject.toml keeps it that way.
"""

from cluster.placement.decision import BundlePlacement, Decision, Placement, Rejection, RejectionReason
from cluster.placement.engine import PlacementEngine, place
from cluster.placement.policies import POLICIES, Policy, make_policy
from cluster.placement.request import UNITS, Bundle, Constraint, Demand, GangRequest
from cluster.placement.snapshot import ClusterSnapshot, NodeSnapshot, node_from_ray
from cluster.placement.state import ClusterState, OversubscriptionError
from cluster.placement.workload import TargetWorkload, TaskShape

__all__ = [
    "POLICIES",
    "UNITS",
    "Bundle",
    "BundlePlacement",
    "ClusterSnapshot",
    "ClusterState",
    "Constraint",
    "Decision",
    "Demand",
    "GangRequest",
    "NodeSnapshot",
    "OversubscriptionError",
    "Placement",
    "PlacementEngine",
    "Policy",
    "Rejection",
    "RejectionReason",
    "TargetWorkload",
    "TaskShape",
    "make_policy",
    "node_from_ray",
    "place",
]
