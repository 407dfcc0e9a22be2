"""The RayCluster: a head group and one worker group per pool, declared as `llmos up` declares them.

Ray `resources` and `labels` of every group come from `cluster.ray_mapping` (the one mapping from a
pool to what Ray sees); KubeRay turns them into `ray start --resources/--labels` and also copies the
labels onto the pods. Per-host TPU identity (slice name, worker id) is left to Ray's autodetection
on real TPU VMs. The same cluster spec, sized for one workload, goes inside RayJobs and RayServices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from cluster.ray_mapping import head_declaration, pool_labels, pool_resources
from cluster.spec import ClusterSpec, Pool
from manifests.nodes import container_resources, devices_per_pool_pod, node_selector, node_taints, tolerations
from manifests.objects import (
    ManifestError,
    cluster_labels,
    memory_quantity,
    metadata,
    persistent_volume_claim,
    quantity,
)
from manifests.storage import shared_storage_mount

RAY_API_VERSION = "ray.io/v1"
HEAD_PORTS = (("gcs", 6379), ("dashboard", 8265), ("client", 10001), ("serve", 8000))
DASHBOARD_PORT = 8265
CONTROLLER_STATE_VOLUME = "llmos-state"
CONTROLLER_STATE_PATH = "/home/ray/llmos"  # LLMOS_HOME of the head: the controller journals under it
RAY_IMAGE_GROUP = 100  # the Ray image's user `ray` (uid 1000) is in group `users` (100)


@dataclass(frozen=True)
class GroupSize:
    """How many replicas (nodes, or TPU slices) of one pool a Ray cluster may have."""

    pool: Pool
    min: int
    max: int


def cluster_groups(spec: ClusterSpec) -> list[GroupSize]:
    """Every pool with its own replica bounds: the shared cluster."""
    return [GroupSize(pool, pool.replicas.min, pool.replicas.max) for pool in spec.pools]


def ray_resources(resources: dict[str, float]) -> dict[str, str]:
    """Ray resources as KubeRay's group `resources` map of Kubernetes quantities (memory as 32Gi)."""
    return {name: memory_quantity(v) if name == "memory" else quantity(v) for name, v in resources.items()}


def _pod_template(
    spec: ClusterSpec, container: dict[str, Any], pod_spec: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"labels": cluster_labels(spec)},
        "spec": {"restartPolicy": "Never", **(pod_spec or {}), "containers": [container]},
    }


def controller_state_claim(spec: ClusterSpec) -> dict[str, Any] | None:
    """The PersistentVolumeClaim the shared cluster's head pod keeps the controller's journal on, if any."""
    state = spec.kubernetes.controller_state
    if state is None:
        return None
    name, namespace = controller_state_claim_name(spec), spec.kubernetes.namespace
    # ReadWriteOnce: one head pod at a time.
    return persistent_volume_claim(spec, name, namespace, "ReadWriteOnce", state.size, state.storage_class)


def controller_state_claim_name(spec: ClusterSpec) -> str:
    return f"{spec.name}-llmos-state"


def head_pod_request(spec: ClusterSpec) -> dict[str, float]:
    """What the head pod requests of Kubernetes: CPUs for Ray's own processes plus those offered to user work."""
    return {"cpu": spec.kubernetes.head_pod_cpus + spec.head.cpus, "memory": spec.head.memory}


def head_group(
    spec: ClusterSpec, volumes: list[dict[str, Any]] | None = None, *, controller_state: bool = False
) -> dict[str, Any]:
    """The head: no user work unless head.cpus > 0; mounts `volumes` (name, mountPath, configMap), the shared
    storage, and with `controller_state` the claim of `controller_state_claim` as `LLMOS_HOME`, where the
    controller journals."""
    head = head_declaration(spec)
    request = head_pod_request(spec)
    container: dict[str, Any] = {
        "name": "ray-head",
        "image": spec.kubernetes.image,
        "ports": [{"containerPort": port, "name": name} for name, port in HEAD_PORTS],
        "resources": container_resources(request["cpu"], int(request["memory"]), {}),
    }
    pod_spec: dict[str, Any] = {}
    mounts = [{"name": v["name"], "mountPath": v["mountPath"]} for v in volumes or []]
    pod_volumes = [{"name": v["name"], "configMap": v["configMap"]} for v in volumes or []]
    if controller_state and spec.kubernetes.controller_state is not None:
        mounts.append({"name": CONTROLLER_STATE_VOLUME, "mountPath": CONTROLLER_STATE_PATH})
        pod_volumes.append(
            {"name": CONTROLLER_STATE_VOLUME, "persistentVolumeClaim": {"claimName": controller_state_claim_name(spec)}}
        )
        container["env"] = [{"name": "LLMOS_HOME", "value": CONTROLLER_STATE_PATH}]
    _restrict(spec, container, pod_spec)
    _mount_volumes(spec, container, pod_spec, pod_volumes, mounts)
    return {
        "rayStartParams": {},
        "resources": ray_resources(head.resources),
        "labels": dict(head.labels),
        "template": _pod_template(spec, container, pod_spec),
    }


def _mount_volumes(
    spec: ClusterSpec,
    container: dict[str, Any],
    pod_spec: dict[str, Any],
    pod_volumes: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
) -> None:
    """Mount `pod_volumes` at `mounts` in the pod, and the shared storage wherever the spec has one."""
    shared = shared_storage_mount(spec)
    if shared is not None:
        volume, mount = shared
        for other in mounts:
            paths = PurePosixPath(mount["mountPath"]), PurePosixPath(other["mountPath"])
            if paths[0].is_relative_to(paths[1]) or paths[1].is_relative_to(paths[0]):
                raise ManifestError(
                    f"kubernetes.shared_storage.mount_path: {mount['mountPath']} overlaps {other['mountPath']}, "
                    f"where llmos mounts {other['name']}; choose another path, e.g. /mnt/llmos"
                )
        pod_volumes.append(volume)
        mounts.append(mount)
    if not mounts:
        return
    if any("persistentVolumeClaim" in volume for volume in pod_volumes):
        # A fresh volume is root's otherwise.
        security = spec.kubernetes.pod_security
        pod_spec.setdefault("securityContext", {})["fsGroup"] = security.run_as_group if security else RAY_IMAGE_GROUP
    container["volumeMounts"] = mounts
    pod_spec["volumes"] = pod_volumes


def _container_security() -> dict[str, Any]:
    """A container's part of the restricted Pod Security Standard (a fresh dict: YAML would alias a shared one)."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _restrict(spec: ClusterSpec, container: dict[str, Any], pod_spec: dict[str, Any]) -> None:
    """The securityContext of kubernetes.pod_security on the pod and its Ray container, if the spec has one."""
    security = spec.kubernetes.pod_security
    if security is None:
        return
    pod_spec["securityContext"] = {
        # runAsUser too: the kubelet cannot tell that an image's named user (`ray`) is not root.
        "runAsNonRoot": True,
        "runAsUser": security.run_as_user,
        "runAsGroup": security.run_as_group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container["securityContext"] = _container_security()


def worker_group(spec: ClusterSpec, size: GroupSize) -> dict[str, Any]:
    pool = size.pool
    container = {
        "name": "ray-worker",
        "image": spec.kubernetes.image,
        "resources": container_resources(pool.node.cpus, pool.node.memory, devices_per_pool_pod(pool)),
    }
    pod_spec: dict[str, Any] = {}
    _restrict(spec, container, pod_spec)
    _mount_volumes(spec, container, pod_spec, [], [])
    selector = node_selector(spec, pool)
    if selector:
        pod_spec["nodeSelector"] = selector
    taints = node_taints(spec, pool)
    if taints:
        pod_spec["tolerations"] = tolerations(taints)
    group: dict[str, Any] = {
        "groupName": pool.name,
        "replicas": size.min,
        "minReplicas": size.min,
        "maxReplicas": size.max,
    }
    if pool.tpu is not None:
        group["numOfHosts"] = pool.tpu.hosts_per_slice
    group.update(
        {
            "rayStartParams": {},
            "resources": ray_resources(pool_resources(pool)),
            "labels": pool_labels(pool),
            "template": _pod_template(spec, container, pod_spec),
        }
    )
    return group


def ray_cluster_spec(
    spec: ClusterSpec,
    groups: list[GroupSize],
    *,
    autoscaling: bool,
    head_volumes: list[dict[str, Any]] | None = None,
    shared_cluster: bool = False,
) -> dict[str, Any]:
    """A RayClusterSpec (the body of a RayCluster, a RayJob's rayClusterSpec or a RayService's).

    Only the `shared_cluster` keeps state that must outlive its head pod: the controller's journal on a claim
    and, with kubernetes.gcs_fault_tolerance, the GCS tables in Redis. A RayJob's cluster must not share them:
    it would load the shared cluster's tables, and when it finishes KubeRay deletes every Redis key of its
    namespace. A RayService's neither: KubeRay picks its Redis namespace per cluster across upgrades, and the
    password Secret is in the shared cluster's namespace, not the team's."""
    body: dict[str, Any] = {"rayVersion": spec.kubernetes.ray_version}
    body["authOptions"] = {"mode": "token" if spec.kubernetes.token_auth else "disabled"}
    tolerance = spec.kubernetes.gcs_fault_tolerance
    if shared_cluster and tolerance is not None:
        options: dict[str, Any] = {
            "backend": "redis",
            "redisAddress": tolerance.redis_address,
            # One cluster's tables per namespace in a shared Redis.
            "externalStorageNamespace": f"{spec.kubernetes.namespace}-{spec.name}",
        }
        if tolerance.redis_password_secret:
            options["redisPassword"] = {
                "valueFrom": {"secretKeyRef": {"name": tolerance.redis_password_secret, "key": "password"}}
            }
        body["gcsFaultToleranceOptions"] = options
    body["enableInTreeAutoscaling"] = autoscaling
    if autoscaling:
        body["autoscalerOptions"] = {
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": spec.kubernetes.idle_timeout_seconds,
        }
        if spec.kubernetes.pod_security is not None:
            body["autoscalerOptions"]["securityContext"] = _container_security()
    body["headGroupSpec"] = head_group(spec, head_volumes, controller_state=shared_cluster)
    body["workerGroupSpecs"] = [worker_group(spec, size) for size in groups]
    return body


def ray_cluster(spec: ClusterSpec) -> dict[str, Any]:
    """The shared, autoscaled RayCluster: the Kubernetes twin of `llmos up`."""
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayCluster",
        "metadata": metadata(spec.name, spec.kubernetes.namespace, cluster_labels(spec)),
        "spec": ray_cluster_spec(spec, cluster_groups(spec), autoscaling=True, shared_cluster=True),
    }
