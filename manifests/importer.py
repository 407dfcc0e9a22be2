"""Import a KubeRay RayCluster manifest as a ClusterSpec (`llmos pools import`).

Each worker group becomes a pool: its shape from the group's Ray `resources`, else its
`rayStartParams`, else the Ray container's limits; its accelerator from GPU/TPU counts; the GPU model
or TPU generation from the `ray.io/accelerator-type` label, an `accelerator_type:` resource or GKE's
node selector; TPU slices from `numOfHosts` and the topology selector; bounds from min/maxReplicas.
Node selectors and tolerations that differ from what llmos would write become
`kubernetes.pools` overrides, so rendering the imported spec gives back the same groups. The shared
storage of a cluster llmos rendered comes back as the existing claim it now is.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from cluster.ray_mapping import RAY_ACCELERATOR_TYPE_LABEL, RAY_TPU_TOPOLOGY_LABEL, tpu_generation
from cluster.spec import ClusterSpec, format_memory, parse_memory, parse_model
from manifests.nodes import (
    GKE_GPU_LABEL,
    GKE_GPU_NAMES,
    GKE_TPU_LABEL,
    GKE_TPU_NAMES,
    GKE_TPU_TOPOLOGY_LABEL,
    GPU_RESOURCE,
    TPU_RESOURCE,
    node_selector,
    node_taints,
    tolerations,
)
from manifests.objects import ManifestError, parse_quantity
from manifests.storage import SHARED_STORAGE_VOLUME

_RESERVED_LABEL_PREFIXES = ("ray.io/", "llmos.io/")
# First Ray name wins where GKE uses one name for two (nvidia-tesla-a100: A100 and A100-40G).
_GPU_BY_GKE_NAME = {gke: ray for ray, gke in reversed(GKE_GPU_NAMES.items())}
_TPU_BY_GKE_NAME = {gke: generation for generation, gke in GKE_TPU_NAMES.items()}


def _amount(group: dict[str, Any], at: str, ray_name: str, start_param: str | None, limit: str) -> float:
    """One resource of a group: Ray `resources`, else `rayStartParams`, else the container's limit."""
    ray_resources = group.get("resources") or {}
    params = group.get("rayStartParams") or {}
    if ray_name in ray_resources:
        return parse_quantity(ray_resources[ray_name], f"{at}.resources.{ray_name}")
    if start_param and start_param in params:
        return parse_quantity(params[start_param], f"{at}.rayStartParams.{start_param}")
    container = _ray_container(group, at)
    resources = container.get("resources") or {}
    for section in ("limits", "requests"):
        if limit in (resources.get(section) or {}):
            return parse_quantity(resources[section][limit], f"{at}.template.spec.containers[0].resources.{section}")
    return 0.0


def _ray_container(group: dict[str, Any], at: str) -> dict[str, Any]:
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
    if not containers:
        raise ManifestError(f"{at}.template.spec.containers: missing; KubeRay runs Ray in the first container")
    return containers[0]


def _whole(value: float, field: str) -> int:
    if not float(value).is_integer():
        raise ManifestError(f"{field}: {value:g} is not a whole number; llmos pools have whole CPUs and devices")
    return int(value)


def _accelerator_type(group: dict[str, Any], at: str, kind: str) -> str:
    labels = group.get("labels") or {}
    selector = ((group.get("template") or {}).get("spec") or {}).get("nodeSelector") or {}
    typed = [name.split(":", 1)[1] for name in group.get("resources") or {} if name.startswith("accelerator_type:")]
    ray_type = labels.get(RAY_ACCELERATOR_TYPE_LABEL) or (typed[0] if typed else None)
    if kind == "gpu":
        found = ray_type or _GPU_BY_GKE_NAME.get(selector.get(GKE_GPU_LABEL, ""))
        hint = f"labels: {{{RAY_ACCELERATOR_TYPE_LABEL}: H100}}"
    else:
        found = (tpu_generation(ray_type) if ray_type else None) or _TPU_BY_GKE_NAME.get(
            selector.get(GKE_TPU_LABEL, "")
        )
        hint = f"nodeSelector: {{{GKE_TPU_LABEL}: tpu-v5p-slice}}"
    if not found:
        raise ManifestError(f"{at}: cannot tell which {kind.upper()} this group has; add {hint}")
    return found


def _pool(group: dict[str, Any], at: str) -> dict[str, Any]:
    name = group.get("groupName")
    if not name:
        raise ManifestError(f"{at}.groupName: missing; each worker group needs a name")
    cpus = _whole(_amount(group, at, "CPU", "num-cpus", "cpu"), f"{at} CPUs")
    memory = int(_amount(group, at, "memory", "memory", "memory"))
    gpus = _whole(_amount(group, at, "GPU", "num-gpus", GPU_RESOURCE), f"{at} GPUs")
    chips = _whole(_amount(group, at, "TPU", None, TPU_RESOURCE), f"{at} TPU chips")
    labels = {k: v for k, v in (group.get("labels") or {}).items() if not k.startswith(_RESERVED_LABEL_PREFIXES)}
    low, high = group.get("minReplicas", 0), group.get("maxReplicas", group.get("replicas", 0))
    pool: dict[str, Any] = {"name": name, "node": {"cpus": cpus, "memory": memory}, "labels": labels}
    if chips:
        selector = ((group.get("template") or {}).get("spec") or {}).get("nodeSelector") or {}
        topology = selector.get(GKE_TPU_TOPOLOGY_LABEL) or (group.get("labels") or {}).get(RAY_TPU_TOPOLOGY_LABEL)
        if not topology:
            raise ManifestError(f"{at}: no TPU topology; add nodeSelector {{{GKE_TPU_TOPOLOGY_LABEL}: 2x2x2}}")
        pool["accelerator"] = "tpu"
        pool["accelerator_type"] = _accelerator_type(group, at, "tpu")
        pool["tpu"] = {"topology": topology, "chips_per_host": chips, "hosts_per_slice": group.get("numOfHosts", 1)}
        pool["slices"] = {"min": low, "max": high}
    elif gpus:
        pool["accelerator"] = "gpu"
        pool["accelerator_type"] = _accelerator_type(group, at, "gpu")
        pool["node"]["gpus"] = gpus
        pool["nodes"] = {"min": low, "max": high}
    else:
        pool["accelerator"] = "cpu"
        pool["nodes"] = {"min": low, "max": high}
    return pool


def _placement_overrides(spec: ClusterSpec, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Node selectors and taints of groups that differ from what llmos renders by default."""
    overrides: dict[str, Any] = {}
    for pool, group in zip(spec.pools, groups, strict=True):
        pod_spec = (group.get("template") or {}).get("spec") or {}
        selector = pod_spec.get("nodeSelector") or {}
        try:
            default_selector = node_selector(spec, pool)
        except ManifestError:
            default_selector = None
        placement: dict[str, Any] = {}
        if selector != default_selector:
            placement["node_selector"] = selector
        # No tolerations is no news: GKE adds them to pods that ask for GPUs or TPUs.
        given = [t for t in pod_spec.get("tolerations") or [] if t.get("key")]
        if given and [(t["key"], t.get("effect", "NoSchedule")) for t in given] != [
            (t["key"], t["effect"]) for t in tolerations(node_taints(spec, pool))
        ]:
            placement["node_taints"] = [
                {"key": t["key"], "value": t.get("value"), "effect": t.get("effect", "NoSchedule")} for t in given
            ]
        if placement:
            overrides[pool.name] = placement
    return overrides


def import_ray_cluster(manifest: Any, source: str) -> ClusterSpec:
    """The ClusterSpec of a RayCluster manifest; raises ManifestError or SpecError naming the field."""
    if not isinstance(manifest, dict) or manifest.get("kind") != "RayCluster":
        kind = manifest.get("kind") if isinstance(manifest, dict) else type(manifest).__name__
        raise ManifestError(f"{source}: kind is {kind!r}; llmos pools import reads a KubeRay RayCluster")
    body = manifest.get("spec") or {}
    meta = manifest.get("metadata") or {}
    groups = body.get("workerGroupSpecs") or []
    if not groups:
        raise ManifestError(f"{source}: spec.workerGroupSpecs is empty; a pool comes from each worker group")
    head = body.get("headGroupSpec") or {}
    head_container = _ray_container(head, "spec.headGroupSpec")
    kubernetes: dict[str, Any] = {"image": head_container.get("image")}
    if meta.get("namespace"):
        kubernetes["namespace"] = meta["namespace"]
    if body.get("rayVersion"):
        kubernetes["ray_version"] = str(body["rayVersion"])
    if (body.get("authOptions") or {}).get("mode") == "disabled":
        kubernetes["token_auth"] = False
    kubernetes["shared_storage"] = _shared_storage(head, head_container)
    data: dict[str, Any] = {
        "name": meta.get("name", "llmos"),
        "head": {
            "cpus": math.floor(_amount(head, "spec.headGroupSpec", "CPU", "num-cpus", "cpu")),
            "memory": int(_amount(head, "spec.headGroupSpec", "memory", "memory", "memory")) or "8Gi",
        },
        "pools": [_pool(group, f"spec.workerGroupSpecs[{i}]") for i, group in enumerate(groups)],
        "kubernetes": {k: v for k, v in kubernetes.items() if v is not None},
    }
    spec = parse_model(ClusterSpec, data, source)
    overrides = _placement_overrides(spec, groups)
    if overrides:
        data["kubernetes"]["pools"] = overrides
        spec = parse_model(ClusterSpec, data, source)
    return spec


def _shared_storage(head: dict[str, Any], container: dict[str, Any]) -> dict[str, Any] | None:
    """The shared storage of a RayCluster llmos rendered, as the existing claim it now is."""
    volumes = ((head.get("template") or {}).get("spec") or {}).get("volumes") or []
    claims = [v.get("persistentVolumeClaim") for v in volumes if v.get("name") == SHARED_STORAGE_VOLUME]
    mounts = [m.get("mountPath") for m in container.get("volumeMounts") or [] if m.get("name") == SHARED_STORAGE_VOLUME]
    if not claims or not claims[0] or not mounts:
        return None
    return {"mount_path": mounts[0], "claim": claims[0].get("claimName")}


def spec_to_yaml(spec: ClusterSpec) -> str:
    """The spec as ClusterSpec YAML, defaults left out and memory written as quantities."""
    data = spec.model_dump(mode="json", exclude_defaults=True)
    for part in [data.get("head") or {}, *(pool["node"] for pool in data["pools"])]:
        if "memory" in part:
            part["memory"] = _memory(part["memory"])
    return yaml.safe_dump(data, sort_keys=False)


def _memory(num_bytes: int) -> str | int:
    """A quantity such as 64Gi where the ClusterSpec reads it back exactly, else plain bytes."""
    text = format_memory(num_bytes)
    try:
        return text if parse_memory(text) == num_bytes else num_bytes
    except ValueError:
        return num_bytes
