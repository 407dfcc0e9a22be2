"""Kueue objects that make the ClusterSpec's quotas and priorities hold on Kubernetes.

- A `ResourceFlavor` per pool, with the node labels and taints of the pool's worker group.
- A `Cohort` per cluster holding the hardware: each pool's capacity at its maximum size.
- A `ClusterQueue` per team in that cohort, with no quota of its own and a borrowing limit per
  flavor equal to the team's quota, so a team may hold up to its quota of whatever is free, as
  `llmos up`'s controller allows. Kueue counts quota per flavor: an untyped `gpu: N` caps each GPU
  pool at N, it cannot cap their sum (the controller inside a Ray cluster still can).
  A typed quota (`gpu:H100: 8`) is per flavor too: with two H100 pools the team may hold 8 in
  each, and Kueue has no limit across the flavors of one ClusterQueue, so `kueue_warnings` says so.
- A `LocalQueue` in each team's namespace, named by `queue_name`, which RayJobs point at with the
  `kueue.x-k8s.io/queue-name` label; and a `WorkloadPriorityClass` per priority class.

Names that RayJobs carry as label values, and lists Kueue caps, are checked here: a spec that validates
can still derive a value Kubernetes refuses, and the error names the spec fields to change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cluster.spec import AcceleratorKind, ClusterSpec, Pool, Taint, Team
from manifests.nodes import GPU_RESOURCE, TPU_RESOURCE, node_selector, node_taints, taint_objects
from manifests.objects import ManifestError, cluster_labels, memory_quantity, metadata, quantity, scoped_name

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
LABEL_VALUE_MAX_LENGTH = 63  # Kubernetes label values
# Kueue's CRDs: resourceGroups[].flavors (Cohort, ClusterQueue); ResourceFlavor nodeLabels and nodeTaints.
MAX_FLAVORS = 64
MAX_FLAVOR_NODE_LABELS = 8
MAX_FLAVOR_NODE_TAINTS = 8


def flavor_name(spec: ClusterSpec, pool: Pool) -> str:
    return scoped_name(spec, pool.name)


def queue_name(spec: ClusterSpec, team: Team) -> str:
    """Name of the team's ClusterQueue and of the LocalQueue in its namespace, which RayJobs carry as a label."""
    field = f"teams[{spec.teams.index(team)}].name"
    return _label_value_name(spec, team.name, field, "queue", QUEUE_NAME_LABEL)


def priority_class_name(spec: ClusterSpec, priority: str) -> str:
    """Name of the WorkloadPriorityClass of a priority class, which RayJobs carry as a label."""
    index = [c.name for c in spec.priority_classes].index(priority)
    return _label_value_name(spec, priority, f"priority_classes[{index}].name", "priority class", PRIORITY_CLASS_LABEL)


def _label_value_name(spec: ClusterSpec, name: str, field: str, what: str, label: str) -> str:
    value = scoped_name(spec, name)
    excess = len(value) - LABEL_VALUE_MAX_LENGTH
    if excess > 0:
        raise ManifestError(
            f"{field}: the Kueue {what} {value!r} (name + '-' + {field}) is {len(value)} characters, but RayJobs "
            f"carry it in the label {label}, which holds at most {LABEL_VALUE_MAX_LENGTH}; shorten name or "
            f"{field} by {excess} characters between them"
        )
    return value


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
    return pool_request(pool, pool.replicas.max)


def pool_request(pool: Pool, replicas: int) -> dict[str, float]:
    """What `replicas` replicas (nodes, or TPU slices) of the pool's pods request, per resource: each pod
    asks for a whole node (or TPU host)."""
    pods = replicas * pool.hosts_per_replica
    return {
        "cpu": pods * pool.node.cpus,
        "memory": pods * pool.node.memory,
        GPU_RESOURCE: pods * pool.node.gpus,
        TPU_RESOURCE: pods * pool.tpu_chips_per_host,
    }


def team_limit(team: Team, pool: Pool, resource: str) -> float | None:
    """The most of `resource` the team may take from `pool` (None: no limit), from its quota keys."""
    limiting = limiting_quota(team, pool, resource)
    return limiting[1] if limiting else None


def limiting_quota(team: Team, pool: Pool | None, resource: str) -> tuple[str, float] | None:
    """The quota key, and its amount, that caps what the team may take of `resource` from `pool` (None: from
    any pool, where only untyped keys hold); None when no key does."""
    key, kind = _QUOTA_KEYS[resource]
    keys = [key] if kind is None or pool is None else [key, f"{kind}:{pool.accelerator_type}"]
    limits = [(k, team.quota[k]) for k in keys if k in team.quota]
    return min(limits, key=lambda limit: limit[1]) if limits else None


def require_within_quota(
    spec: ClusterSpec, team: Team, pods: str, pool: Pool | None, request: Mapping[str, float], alternative: str
) -> None:
    """Refuse a RayJob whose `pods` (`its head pod`, say) need more of `pool`'s flavor (None: of any flavor)
    than the team's ClusterQueue may borrow there: Kueue admits a RayJob whole or not at all, so it would
    wait for ever."""
    over = []
    for resource, amount in request.items():
        limiting = limiting_quota(team, pool, resource)
        if limiting is not None and amount > limiting[1]:
            over.append((resource, amount, *limiting))
    if not over:
        return
    requested = ", ".join(f"{resource} {_amount(resource, amount)}" for resource, amount, _, _ in over)
    allowed = ", ".join(f"{key}: {_quota(key, limit)}" for _, _, key, limit in over)
    raises = " and ".join(f"{key} to {_quota(key, amount)}" for _, amount, key, _ in over)
    where = f"of pool {pool.name!r}" if pool else "in any pool"
    raise ManifestError(
        f"teams[{spec.teams.index(team)}].quota: the RayJob needs {requested} for {pods}, but team {team.name!r} "
        f"may hold at most {allowed} {where}, so Kueue would never admit it; raise the quota's {raises}, or "
        f"{alternative}"
    )


def require_head_flavor(spec: ClusterSpec, request: Mapping[str, float]) -> None:
    """Refuse a RayJob whose head pod no flavor can take: it tolerates no taint, so Kueue admits it only to an
    untainted pool's flavor with room for it, and would otherwise never admit the RayJob."""
    untainted = [pool for pool in spec.pools if _flavor_takes(spec, pool, {}, [])]
    if any(all(pool_capacity(pool)[r] >= amount for r, amount in request.items()) for pool in untainted):
        return
    requested = ", ".join(f"{resource} {_amount(resource, amount)}" for resource, amount in request.items())
    if untainted:
        problem = "no pool without node taints has room for it at its max size"
    else:
        problem = "every pool has node taints, and it tolerates none"
    raise ManifestError(
        f"pools: the RayJob's head pod requests {requested}, but {problem}, so Kueue would never admit the RayJob; "
        "add a CPU pool that holds it, or set kubernetes.pools.<pool>.node_taints: [] where nodes have no taints"
    )


def _flavor_takes(spec: ClusterSpec, pool: Pool, selector: Mapping[str, str], tolerated: list[Taint]) -> bool:
    """Whether Kueue may give the pool's flavor to pods with node selector `selector` that tolerate the taints
    `tolerated`: it skips a flavor whose node labels contradict the selector, or with a NoSchedule or NoExecute
    taint the pods do not tolerate (it ignores PreferNoSchedule)."""
    labels = node_selector(spec, pool)
    if any(labels.get(key) != value for key, value in selector.items()):
        return False
    tolerated_taints = {(taint.key, taint.effect) for taint in tolerated}
    return all(
        taint.effect == "PreferNoSchedule" or (taint.key, taint.effect) in tolerated_taints
        for taint in node_taints(spec, pool)
    )


def _pools_holding(
    spec: ClusterSpec,
    team: Team,
    request: Mapping[str, float],
    selector: Mapping[str, str],
    tolerated: list[Taint],
) -> list[Pool]:
    """The pools whose flavor Kueue may give a pod set requesting `request` (see `_flavor_takes`) and that hold it
    within the pool's capacity and the team's quota."""
    return [
        pool
        for pool in spec.pools
        if _flavor_takes(spec, pool, selector, tolerated)
        and all(amount <= pool_capacity(pool)[resource] for resource, amount in request.items())
        and all(
            (limit := team_limit(team, pool, resource)) is None or amount <= limit
            for resource, amount in request.items()
        )
    ]


def require_room_beside_head(
    spec: ClusterSpec,
    team: Team,
    pool: Pool,
    workers: str,
    workers_request: Mapping[str, float],
    head_request: Mapping[str, float],
    alternative: str,
) -> None:
    """Refuse a RayJob whose head pod and `workers` (the worker pods' description) can only share `pool`'s flavor,
    where Kueue counts both pod sets together, when their sum exceeds the pool's capacity or the team's quota."""
    head_pools = _pools_holding(spec, team, head_request, {}, [])
    worker_pools = _pools_holding(spec, team, workers_request, node_selector(spec, pool), node_taints(spec, pool))
    # Kueue gives each pod set the first flavor in the ClusterQueue's list that takes it and has room now, and
    # on a retry goes on from the next flavor; so while another flavor could take the head or the workers, it
    # may split them and admit the RayJob. Only when both pod sets can get the pool's flavor alone is their sum
    # certain to be counted there.
    if head_pools != [pool] or worker_pools != [pool]:
        return
    total = {
        resource: workers_request.get(resource, 0) + head_request.get(resource, 0)
        for resource in {**workers_request, **head_request}
    }
    pods = f"{workers} and its head pod, which no other pool can take"
    capacity = pool_capacity(pool)
    over = {resource: amount for resource, amount in total.items() if amount > capacity[resource]}
    if over:
        requested = ", ".join(f"{resource} {_amount(resource, amount)}" for resource, amount in over.items())
        holds = ", ".join(f"{resource} {_amount(resource, capacity[resource])}" for resource in over)
        bounds = "nodes" if pool.nodes is not None else "slices"
        raise ManifestError(
            f"pools[{spec.pools.index(pool)}].{bounds}.max: the RayJob needs {requested} for {pods}, but pool "
            f"{pool.name!r} holds {holds} at its max size, so Kueue would never admit it; raise the pool's "
            f"{bounds}.max, or {alternative}"
        )
    require_within_quota(spec, team, pods, pool, total, alternative)


def _amount(resource: str, value: float) -> str:
    return memory_quantity(value) if resource == "memory" else quantity(value)


def _quota(key: str, value: float) -> str:
    return memory_quantity(value) if key == "memory" else f"{value:g}"


def resource_flavor(spec: ClusterSpec, pool: Pool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    labels = node_selector(spec, pool)
    taints = node_taints(spec, pool)
    for field, count, most in (
        ("node_selector", len(labels), MAX_FLAVOR_NODE_LABELS),
        ("node_taints", len(taints), MAX_FLAVOR_NODE_TAINTS),
    ):
        if count > most:
            raise ManifestError(
                f"kubernetes.pools.{pool.name}.{field}: {count} entries, but its Kueue ResourceFlavor holds at most "
                f"{most}; keep the {most} that tell the pool's nodes apart"
            )
    if labels:
        body["nodeLabels"] = labels
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


def kueue_warnings(spec: ClusterSpec) -> list[str]:
    """What Kueue cannot enforce as written: a fractional GPU or TPU quota (pods ask for whole devices); a typed
    quota on a GPU type or TPU generation that several pools have caps each of their flavors, not their sum; and
    pools with the same node selector and taints are one set of nodes to Kubernetes, so a pod of one may run on
    another's nodes."""
    warnings = []
    for index, team in enumerate(spec.teams):
        for key, amount in team.quota.items():
            kind, _, type_name = key.partition(":")
            if kind in ("gpu", "tpu") and amount != int(amount):
                warnings.append(
                    f"teams[{index}].quota: {key}: {amount:g} is not a whole number of devices, and a pod asks for "
                    f"whole ones, so on Kubernetes team {team.name!r} holds at most {int(amount)} (llmos up's "
                    "controller shares devices and holds the fraction); make it a whole number"
                )
            pools = [p.name for p in spec.pools if (p.accelerator.value, p.accelerator_type) == (kind, type_name)]
            if len(pools) > 1:
                warnings.append(
                    f"teams[{index}].quota: {key}: {amount:g} becomes a limit of {amount:g} on each of pools "
                    f"{', '.join(pools)}, so on Kubernetes team {team.name!r} may hold up to {len(pools)} x "
                    f"{amount:g}: Kueue limits a ClusterQueue per flavor, never across flavors (llmos up's "
                    "controller does cap the sum)"
                )
    placements: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for pool in spec.pools:
        selector, taints = node_selector(spec, pool), node_taints(spec, pool)
        placement = (*sorted(selector.items()), *(("taint", taint.key) for taint in taints))
        placements.setdefault(placement, []).append(pool.name)
    for placement, pools in placements.items():
        if len(pools) > 1:
            nodes = ", ".join(f"{key}: {value}" for key, value in placement) or "any untainted node"
            warnings.append(
                f"pools {', '.join(pools)} select the same nodes ({nodes}), so Kubernetes and Kueue cannot tell "
                "them apart: a pod of one may run on another's nodes, under the wrong pool's labels; set "
                "kubernetes.pools.<pool>.node_selector to a label only that pool's nodes carry (on GKE, "
                "cloud.google.com/gke-nodepool: <node pool>)"
            )
    return warnings


def kueue_objects(spec: ClusterSpec) -> list[dict[str, Any]]:
    if len(spec.pools) > MAX_FLAVORS:
        raise ManifestError(
            f"pools: {len(spec.pools)} pools, but the Kueue Cohort and ClusterQueues list one flavor per pool and hold "
            f"at most {MAX_FLAVORS}; merge pools of the same node shape (raise their nodes.max) or split the pools "
            "between two ClusterSpecs"
        )
    return [
        *workload_priority_classes(spec),
        *(resource_flavor(spec, pool) for pool in spec.pools),
        cohort(spec),
        *(cluster_queue(spec, team) for team in spec.teams),
        *(local_queue(spec, team) for team in spec.teams),
    ]
