"""The one mapping from a pool to what Ray sees: resources and node labels.

`llmos up` declares exactly these on each simulated node, the manifests renderer writes them into
each KubeRay worker group, and the controller reads them back from Ray's node table. Names follow
Ray 2.60's own conventions (`ray.util.accelerators`, `ray._private.accelerators.tpu`), so Ray's TPU
utilities and `accelerator_type=` work unchanged on llmos nodes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from cluster.spec import HEAD_POOL, AcceleratorKind, ClusterSpec, Pool

POOL_LABEL = "llmos.io/pool"
NODE_LABEL = "llmos.io/node"
RAY_NODE_ID_LABEL = "ray.io/node-id"  # Ray gives every node this label, on KubeRay as locally
ACCELERATOR_KIND_LABEL = "llmos.io/accelerator"
TPU_SLICE_LABEL = "llmos.io/tpu-slice"

# Ray's own label keys (ray._raylet.RAY_NODE_*_KEY); a test checks them against Ray.
RAY_ACCELERATOR_TYPE_LABEL = "ray.io/accelerator-type"
RAY_NODE_GROUP_LABEL = "ray.io/node-group"
RAY_TPU_SLICE_NAME_LABEL = "ray.io/tpu-slice-name"
RAY_TPU_WORKER_ID_LABEL = "ray.io/tpu-worker-id"
RAY_TPU_TOPOLOGY_LABEL = "ray.io/tpu-topology"
RAY_TPU_POD_TYPE_LABEL = "ray.io/tpu-pod-type"

# llmos TPU generation -> the name Ray and GCP use for it in pod types ("v5litepod-8").
_TPU_RAY_GENERATION = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}
# Generations with one TensorCore per chip; pod type sizes count cores, so chips x cores.
_SINGLE_CORE_GENERATIONS = ("v5litepod", "v6e")


def ray_accelerator_type(pool: Pool) -> str | None:
    """The value of Ray's `ray.io/accelerator-type` label and `accelerator_type:` resource."""
    if pool.accelerator is AcceleratorKind.GPU:
        return pool.accelerator_type
    if pool.accelerator is AcceleratorKind.TPU:
        return _tpu_ray_type(pool.accelerator_type)  # type: ignore[arg-type]
    return None


def _tpu_ray_type(generation: str) -> str:
    return f"TPU-{_TPU_RAY_GENERATION[generation].upper()}"


def tpu_generation(ray_type: str) -> str | None:
    """The llmos TPU generation Ray calls `ray_type` (`TPU-V5P` -> `v5p`), or None."""
    return next((g for g in _TPU_RAY_GENERATION if _tpu_ray_type(g) == ray_type), None)


def tpu_pod_type(pool: Pool) -> str:
    """GCP/Ray pod type of one slice, e.g. `v5litepod-8` or `v4-16` (sized in TensorCores)."""
    assert pool.tpu is not None, "tpu_pod_type needs a TPU pool"
    generation = _TPU_RAY_GENERATION[pool.accelerator_type]  # type: ignore[index]
    cores_per_chip = 1 if generation in _SINGLE_CORE_GENERATIONS else 2
    return f"{generation}-{pool.tpu.chips * cores_per_chip}"


def tpu_head_resource(pool: Pool) -> str:
    """The resource Ray puts on worker 0 of a multi-host slice, used to reserve a whole slice."""
    return f"TPU-{tpu_pod_type(pool)}-head"


def pool_resources(pool: Pool) -> dict[str, float]:
    """Ray resources every node of the pool declares (memory in bytes)."""
    resources: dict[str, float] = {"CPU": pool.node.cpus, "memory": pool.node.memory}
    if pool.accelerator is AcceleratorKind.GPU:
        resources["GPU"] = pool.node.gpus
    if pool.accelerator is AcceleratorKind.TPU:
        resources["TPU"] = pool.tpu_chips_per_host
    accelerator_type = ray_accelerator_type(pool)
    if accelerator_type:
        resources[f"accelerator_type:{accelerator_type}"] = 1
    return resources


def pool_labels(pool: Pool) -> dict[str, str]:
    """Node labels every node of the pool carries (user labels first, llmos's and Ray's win)."""
    labels = dict(pool.labels)
    labels[POOL_LABEL] = pool.name
    labels[ACCELERATOR_KIND_LABEL] = pool.accelerator.value
    labels[RAY_NODE_GROUP_LABEL] = pool.name
    accelerator_type = ray_accelerator_type(pool)
    if accelerator_type:
        labels[RAY_ACCELERATOR_TYPE_LABEL] = accelerator_type
    if pool.tpu is not None:
        labels[RAY_TPU_TOPOLOGY_LABEL] = pool.tpu.topology
        labels[RAY_TPU_POD_TYPE_LABEL] = tpu_pod_type(pool)
    return labels


def node_name(labels: Mapping[str, str], node_id: str, instance_id: str = "") -> str:
    """A node's llmos name: its llmos.io/node label (nodes `llmos up` starts), else the instance id its
    raylet was started with (`RAY_CLOUD_INSTANCE_ID`, which KubeRay sets to the pod's name, so a pod is
    named as `kubectl get pods` names it), else the first 12 characters of its Ray id, short enough to
    type in `llmos drain`."""
    return labels.get(NODE_LABEL) or instance_id or node_id[:12]


def whole_node_requests(spec: ClusterSpec, nodes_by_pool: Mapping[str, int]) -> list[dict]:
    """Whole nodes of each pool, as Ray's autoscaler is asked for them (`request_resources`): one bundle of
    the node's resources per node, selecting its pool by label."""
    return [
        {"resources": pool_resources(spec.pool(name)), "label_selector": {POOL_LABEL: name}}
        for name, nodes in sorted(nodes_by_pool.items())
        for _ in range(nodes)
    ]


def replicas_for_workers(pool: Pool, workers: int, per_worker: Mapping[str, float]) -> int:
    """Replicas (nodes, or TPU slices) of `pool` that hold `workers` workers of `per_worker` resources.

    `per_worker` uses Ray's resource names (CPU, GPU, TPU, memory in bytes). Raises ValueError naming
    the resource when a single worker fits on no node of the pool.
    """
    if workers <= 0:
        return 0
    offered = pool_resources(pool)
    per_host = workers
    for name, amount in per_worker.items():
        if amount <= 0:
            continue
        fitting = math.floor(offered.get(name, 0) / amount)
        if fitting == 0:
            raise ValueError(
                f"one worker needs {amount:g} {name} but a node of pool {pool.name!r} has "
                f"{offered.get(name, 0):g}; lower the worker's {name} or pick a larger pool"
            )
        per_host = min(per_host, fitting)
    return math.ceil(workers / (per_host * pool.hosts_per_replica))


@dataclass(frozen=True)
class NodeDeclaration:
    """Everything one simulated node declares to Ray: its pool's shape plus per-host identity."""

    name: str
    pool: str
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def custom_resources(self) -> dict[str, float]:
        """Resources other than the ones `ray start` takes as flags (CPU, GPU, memory)."""
        return {k: v for k, v in self.resources.items() if k not in ("CPU", "GPU", "memory")}

    @property
    def reserved_labels(self) -> dict[str, str]:
        """Labels under `ray.io/`, which `--labels` refuses and RAY_OVERRIDE_LABELS accepts."""
        return {k: v for k, v in self.labels.items() if k.startswith("ray.io/")}

    @property
    def user_labels(self) -> dict[str, str]:
        return {k: v for k, v in self.labels.items() if not k.startswith("ray.io/")}


def replica_nodes(pool: Pool, replica: int) -> list[NodeDeclaration]:
    """The node(s) of one replica: one node, or every host of one TPU slice.

    The per-host TPU identity (slice name resource, worker id, head resource on worker 0) is what
    Ray autodetects on a real TPU VM from GCE metadata; a simulated host has to declare it.
    """
    resources = pool_resources(pool)
    labels = pool_labels(pool)
    if pool.tpu is None:
        name = f"{pool.name}-{replica}"
        return [NodeDeclaration(name, pool.name, resources, {**labels, NODE_LABEL: name})]
    slice_name = f"{pool.name}-s{replica}"
    hosts = []
    for worker_id in range(pool.tpu.hosts_per_slice):
        name = f"{slice_name}-h{worker_id}"
        host_resources = {**resources, slice_name: 1}
        if worker_id == 0:
            host_resources[tpu_head_resource(pool)] = 1
        host_labels = {
            **labels,
            NODE_LABEL: name,
            TPU_SLICE_LABEL: slice_name,
            RAY_TPU_SLICE_NAME_LABEL: slice_name,
            RAY_TPU_WORKER_ID_LABEL: str(worker_id),
        }
        hosts.append(NodeDeclaration(name, pool.name, host_resources, host_labels))
    return hosts


def head_declaration(spec: ClusterSpec) -> NodeDeclaration:
    name = f"{HEAD_POOL}-0"
    return NodeDeclaration(
        name,
        HEAD_POOL,
        {"CPU": spec.head.cpus, "memory": spec.head.memory},
        {POOL_LABEL: HEAD_POOL, NODE_LABEL: name, RAY_NODE_GROUP_LABEL: HEAD_POOL},
    )


def local_replicas(pool: Pool, cap: int) -> int:
    """How many replicas `llmos up` starts for a pool: `cap` (nodes, or TPU slices), at most its max."""
    return min(cap, pool.replicas.max)


def local_cluster_nodes(spec: ClusterSpec, replicas_per_pool: int) -> list[NodeDeclaration]:
    """Worker nodes of a local cluster, pool by pool (the head is separate)."""
    nodes: list[NodeDeclaration] = []
    for pool in spec.pools:
        for replica in range(local_replicas(pool, replicas_per_pool)):
            nodes.extend(replica_nodes(pool, replica))
    return nodes
