"""Kueue objects that make the ClusterSpec's quotas and priorities hold on Kubernetes.

- A `ResourceFlavor` per pool, with the node labels and taints of the pool's worker group.
- A `Cohort` per cluster holding the hardware: each pool's capacity at its maximum size.
- A `ClusterQueue` per team in that cohort, with no quota of its own and a borrowing limit per
  flavor equal to the team's quota, so a team may hold up to its quota of whatever is free, as
  `llmos up`'s controller allows. Kueue counts quota per flavor: an untyped `gpu: N` caps each GPU
  pool at N, it cannot cap their sum (the controller inside a Ray cluster still can).
- A `LocalQueue` in each team's namespace, named by `queue_name`, which RayJobs point at with the
  `kueue.x-k8s.io/queue-name` label; and a `WorkloadPriorityClass` per priority class.
"""

from __future__ import annotations

from typing import Any

from cluster.spec import AcceleratorKind, ClusterSpec, Pool, Team
from manifests.nodes import GPU_RESOURCE, TPU_RESOURCE, node_selector, node_taints, taint_objects
from manifests.objects import cluster_labels, memory_quantity, metadata, quantity, scoped_name

KUEUE_API_VERSION = "kueue.x-k8s.io/v1beta2"
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
# ClusterSpec quota key of each Kubernetes resource, and the pool kind that offers it.
_QUOTA_KEYS = {
    "cpu": ("cpu", None),
    "memory": ("memory", None),
    GPU_RESOURCE: ("gpu", "gpu"),
    TPU_RESOURCE: ("tpu", "tpu"),
}


def flavor_name(spec: ClusterSpec, pool: Pool) -> str:
    return scoped_name(spec, pool.name)


def queue_name(spec: ClusterSpec, team: Team) -> str:
    """Name of the team's ClusterQueue and of the LocalQueue in its namespace."""
    return scoped_name(spec, team.name)


def priority_class_name(spec: ClusterSpec, priority: str) -> str:
    return scoped_name(spec, priority)


def covered_resources(spec: ClusterSpec) -> list[str]:
    kinds = {pool.accelerator for pool in spec.pools}
    resources = ["cpu", "memory"]
    if AcceleratorKind.GPU in kinds:
        resources.append(GPU_RESOURCE)
    if AcceleratorKind.TPU in kinds:
        resources.append(TPU_RESOURCE)
    return resources


def pool_capacity(pool: Pool) -> dict[str, float]:
    """What the pool offers Kubernetes at its maximum size, per resource."""
    pods = pool.replicas.max * pool.hosts_per_replica
    return {
        "cpu": pods * pool.node.cpus,
        "memory": pods * pool.node.memory,
        GPU_RESOURCE: pods * pool.node.gpus,
        TPU_RESOURCE: pods * pool.tpu_chips_per_host,
    }


def team_limit(team: Team, pool: Pool, resource: str) -> float | None:
    """The most of `resource` the team may take from `pool` (None: no limit), from its quota keys."""
    key, kind = _QUOTA_KEYS[resource]
    keys = [key] if kind is None else [key, f"{kind}:{pool.accelerator_type}"]
    limits = [team.quota[k] for k in keys if k in team.quota]
    return min(limits) if limits else None


def _amount(resource: str, value: float) -> str:
    return memory_quantity(value) if resource == "memory" else quantity(value)


def resource_flavor(spec: ClusterSpec, pool: Pool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    labels = node_selector(spec, pool)
    if labels:
        body["nodeLabels"] = labels
    taints = node_taints(spec, pool)
    if taints:
        body["nodeTaints"] = taint_objects(taints)
    return {
        "apiVersion": KUEUE_API_VERSION,
        "kind": "ResourceFlavor",
        "metadata": metadata(flavor_name(spec, pool), labels=cluster_labels(spec)),
        "spec": body,
    }


def cohort(spec: ClusterSpec) -> dict[str, Any]:
    resources = covered_resources(spec)
    flavors = [
        {
            "name": flavor_name(spec, pool),
            "resources": [{"name": r, "nominalQuota": _amount(r, pool_capacity(pool)[r])} for r in resources],
        }
        for pool in spec.pools
    ]
    return {
        "apiVersion": KUEUE_API_VERSION,
        "kind": "Cohort",
        "metadata": metadata(spec.name, labels=cluster_labels(spec)),
        "spec": {"resourceGroups": [{"coveredResources": resources, "flavors": flavors}]},
    }


def cluster_queue(spec: ClusterSpec, team: Team) -> dict[str, Any]:
    resources = covered_resources(spec)
    flavors = []
    for pool in spec.pools:
        quotas = []
        for resource in resources:
            quota: dict[str, Any] = {"name": resource, "nominalQuota": "0"}
            limit = team_limit(team, pool, resource)
            if limit is not None and pool_capacity(pool)[resource] > 0:
                quota["borrowingLimit"] = _amount(resource, limit)
            quotas.append(quota)
        flavors.append({"name": flavor_name(spec, pool), "resources": quotas})
    return {
        "apiVersion": KUEUE_API_VERSION,
        "kind": "ClusterQueue",
        "metadata": metadata(queue_name(spec, team), labels=cluster_labels(spec)),
        "spec": {
            "cohortName": spec.name,
            "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: team.kubernetes_namespace}},
            "queueingStrategy": "BestEffortFIFO",
            # Higher priority may preempt lower priority, inside the team and across teams.
            "preemption": {
                "withinClusterQueue": "LowerPriority",
                "reclaimWithinCohort": "Any",
                "borrowWithinCohort": {"policy": "LowerPriority"},
            },
            "resourceGroups": [{"coveredResources": resources, "flavors": flavors}],
        },
    }


def local_queue(spec: ClusterSpec, team: Team) -> dict[str, Any]:
    return {
        "apiVersion": KUEUE_API_VERSION,
        "kind": "LocalQueue",
        "metadata": metadata(queue_name(spec, team), team.kubernetes_namespace, cluster_labels(spec)),
        "spec": {"clusterQueue": queue_name(spec, team)},
    }


def workload_priority_classes(spec: ClusterSpec) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": KUEUE_API_VERSION,
            "kind": "WorkloadPriorityClass",
            "metadata": metadata(priority_class_name(spec, c.name), labels=cluster_labels(spec)),
            "value": c.value,
            "description": f"llmos priority class {c.name!r} of cluster {spec.name!r}",
        }
        for c in spec.priority_classes
    ]


def kueue_objects(spec: ClusterSpec) -> list[dict[str, Any]]:
    return [
        *workload_priority_classes(spec),
        *(resource_flavor(spec, pool) for pool in spec.pools),
        cohort(spec),
        *(cluster_queue(spec, team) for team in spec.teams),
        *(local_queue(spec, team) for team in spec.teams),
    ]
