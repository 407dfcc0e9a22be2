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
from cluster.spec import ClusterSpec, SpecError, format_memory, parse_memory, parse_model
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
from manifests.objects import CLUSTER_LABEL, ManifestError, parse_quantity
from manifests.raycluster import CONTROLLER_STATE_VOLUME
from manifests.storage import SHARED_STORAGE_VOLUME
from manifests.validate import wrong_types

_REDIS_SECRET_FIELD = "spec.gcsFaultToleranceOptions.redisPassword.valueFrom.secretKeyRef"
_RESERVED_LABEL_PREFIXES = ("ray.io/", "llmos.io/")
# First Ray name wins where GKE uses one name for two (nvidia-tesla-a100: A100 and A100-40G).
_GPU_BY_GKE_NAME = {gke: ray for ray, gke in reversed(GKE_GPU_NAMES.items())}
_TPU_BY_GKE_NAME = {gke: generation for generation, gke in GKE_TPU_NAMES.items()}


def _amount(group: dict[str, Any], at: str, ray_name: str, start_param: str | None, limit: str) -> tuple[float, str]:
    """One resource of a group, and the field it was read from: Ray `resources`, else `rayStartParams`, else
    the container's limit (or request); 0 read from nowhere counts as Ray `resources`."""
    ray_resources = group.get("resources") or {}
    params = group.get("rayStartParams") or {}
    if ray_name in ray_resources:
        field = f"{at}.resources.{ray_name}"
        return parse_quantity(ray_resources[ray_name], field), field
    if start_param and start_param in params:
        field = f"{at}.rayStartParams.{start_param}"
        return parse_quantity(params[start_param], field), field
    container = _ray_container(group, at)
    resources = container.get("resources") or {}
    for section in ("limits", "requests"):
        if limit in (resources.get(section) or {}):
            field = f"{at}.template.spec.containers[0].resources.{section}.{limit}"
            return parse_quantity(resources[section][limit], field), field
    return 0.0, f"{at}.resources.{ray_name}"


def _ray_container(group: dict[str, Any], at: str) -> dict[str, Any]:
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
    if not containers:
        raise ManifestError(f"{at}.template.spec.containers: missing; KubeRay runs Ray in the first container")
    return containers[0]


def _refuse_other_devices(group: dict[str, Any], at: str) -> None:
    """A device llmos cannot render (an AMD or Intel GPU) would otherwise import as a pool without it."""
    resources = _ray_container(group, at).get("resources") or {}
    for section in ("limits", "requests"):
        for name in resources.get(section) or {}:
            domain, _, device = name.partition("/")
            # amd.com/gpu, gpu.intel.com/i915, gpu.intel.com/xe, ...
            if name not in (GPU_RESOURCE, TPU_RESOURCE) and device and ("gpu" in domain or device in ("gpu", "tpu")):
                raise ManifestError(
                    f"{at}.template.spec.containers[0].resources.{section}.{name}: llmos pools have NVIDIA GPUs "
                    f"({GPU_RESOURCE}) or Google TPUs ({TPU_RESOURCE}); leave this group out of the manifest to import"
                )


def _whole(value: float, field: str) -> int:
    if not float(value).is_integer():
        raise ManifestError(f"{field}: {value:g} is not a whole number; llmos pools have whole CPUs and devices")
    return int(value)


def _accelerator_type(group: dict[str, Any], at: str, kind: str) -> tuple[str, str]:
    """The GPU model or TPU generation of a group, and the field it was read from."""
    labels = group.get("labels") or {}
    selector = ((group.get("template") or {}).get("spec") or {}).get("nodeSelector") or {}
    typed = [name for name in group.get("resources") or {} if name.startswith("accelerator_type:")]
    found: list[tuple[str | None, str]] = [
        (labels.get(RAY_ACCELERATOR_TYPE_LABEL), f"{at}.labels.{RAY_ACCELERATOR_TYPE_LABEL}"),
        *((name.split(":", 1)[1], f"{at}.resources.{name}") for name in typed[:1]),
    ]
    if kind == "gpu":
        found.append((_GPU_BY_GKE_NAME.get(selector.get(GKE_GPU_LABEL, "")), f"{at}.template.spec.nodeSelector"))
        hint = f"labels: {{{RAY_ACCELERATOR_TYPE_LABEL}: H100}}"
    else:
        found = [(tpu_generation(value) if value else None, field) for value, field in found]
        found.append((_TPU_BY_GKE_NAME.get(selector.get(GKE_TPU_LABEL, "")), f"{at}.template.spec.nodeSelector"))
        hint = f"nodeSelector: {{{GKE_TPU_LABEL}: tpu-v5p-slice}}"
    for value, field in found:
        if value:
            return value, field
    raise ManifestError(f"{at}: cannot tell which {kind.upper()} this group has; add {hint}")


def _max_replicas(group: dict[str, Any]) -> tuple[int, str]:
    """A group's most replicas, and the field they were read from."""
    field = "maxReplicas" if "maxReplicas" in group else "replicas"
    return group.get(field, 0), field


def skipped_groups(manifest: dict[str, Any]) -> list[str]:
    """One line per worker group the import leaves out: a group that may have no replica never has a pod, and
    an llmos pool has at least one node or slice."""
    groups = (manifest.get("spec") or {}).get("workerGroupSpecs") or []
    return [
        f"spec.workerGroupSpecs[{index}] ({group.get('groupName')}) left out: its {_max_replicas(group)[1]} is 0, "
        "so it never has a pod; give it its largest size and import again to keep it"
        for index, group in enumerate(groups)
        if _max_replicas(group)[0] == 0
    ]


def _pool(group: dict[str, Any], at: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The pool of a worker group, and for each pool field the group field it was read from."""
    name = group.get("groupName")
    if not name:
        raise ManifestError(f"{at}.groupName: missing; each worker group needs a name")
    _refuse_other_devices(group, at)
    cpus, cpus_field = _amount(group, at, "CPU", "num-cpus", "cpu")
    memory, memory_field = _amount(group, at, "memory", "memory", "memory")
    gpus, gpus_field = _amount(group, at, "GPU", "num-gpus", GPU_RESOURCE)
    chips, chips_field = _amount(group, at, "TPU", None, TPU_RESOURCE)
    labels = {k: v for k, v in (group.get("labels") or {}).items() if not k.startswith(_RESERVED_LABEL_PREFIXES)}
    high, high_field = _max_replicas(group)
    bounds = {"min": group.get("minReplicas", 0), "max": high}
    pool: dict[str, Any] = {
        "name": name,
        "node": {"cpus": _whole(cpus, cpus_field), "memory": int(memory)},
        "labels": labels,
    }
    sources = {
        "": at,
        "name": f"{at}.groupName",
        "node.cpus": cpus_field,
        "node.memory": memory_field,
        "node.gpus": gpus_field,
        "labels": f"{at}.labels",
    }
    if _whole(chips, chips_field):
        selector = ((group.get("template") or {}).get("spec") or {}).get("nodeSelector") or {}
        topology = selector.get(GKE_TPU_TOPOLOGY_LABEL) or (group.get("labels") or {}).get(RAY_TPU_TOPOLOGY_LABEL)
        if not topology:
            raise ManifestError(f"{at}: no TPU topology; add nodeSelector {{{GKE_TPU_TOPOLOGY_LABEL}: 2x2x2}}")
        pool["accelerator"] = "tpu"
        pool["accelerator_type"], sources["accelerator_type"] = _accelerator_type(group, at, "tpu")
        pool["tpu"] = {
            "topology": topology,
            "chips_per_host": int(chips),
            "hosts_per_slice": group.get("numOfHosts", 1),
        }
        sources["tpu"] = f"{at}.template.spec.nodeSelector"
        sources["tpu.chips_per_host"] = chips_field
        sources["tpu.hosts_per_slice"] = f"{at}.numOfHosts"
        counts = "slices"
    elif _whole(gpus, gpus_field):
        pool["accelerator"] = "gpu"
        pool["accelerator_type"], sources["accelerator_type"] = _accelerator_type(group, at, "gpu")
        pool["node"]["gpus"] = int(gpus)
        counts = "nodes"
    else:
        pool["accelerator"] = "cpu"
        counts = "nodes"
    pool[counts] = bounds
    sources[counts] = sources[f"{counts}.min"] = f"{at}.minReplicas"
    sources[f"{counts}.max"] = f"{at}.{high_field}"
    return pool, sources


def _placement_overrides(spec: ClusterSpec, groups: list[dict[str, Any]], rendered_by_llmos: bool) -> dict[str, Any]:
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
        given = [t for t in pod_spec.get("tolerations") or [] if t.get("key")]
        default_taints = tolerations(node_taints(spec, pool))
        if given and [(t["key"], t.get("effect", "NoSchedule")) for t in given] != [
            (t["key"], t["effect"]) for t in default_taints
        ]:
            placement["node_taints"] = [
                {"key": t["key"], "value": t.get("value"), "effect": t.get("effect", "NoSchedule")} for t in given
            ]
        elif not given and default_taints and rendered_by_llmos:
            # llmos writes the tolerations of every taint it knows of: none written means untainted nodes. In a
            # manifest written by hand, none is no news: GKE adds them to pods that ask for GPUs or TPUs.
            placement["node_taints"] = []
        if placement:
            overrides[pool.name] = placement
    return overrides


def import_ray_cluster(manifest: Any, source: str) -> ClusterSpec:
    """The ClusterSpec of a RayCluster manifest, without the groups `skipped_groups` names; raises ManifestError
    naming the manifest's field."""
    if not isinstance(manifest, dict) or manifest.get("kind") != "RayCluster":
        kind = manifest.get("kind") if isinstance(manifest, dict) else type(manifest).__name__
        raise ManifestError(f"kind is {kind!r}; llmos pools import reads a KubeRay RayCluster")
    # The CRD's types say more, where its schema is at hand; these two the import reads first in any case.
    for field in ("metadata", "spec"):
        if not isinstance(manifest.get(field, {}), dict):
            raise ManifestError(f"{field}: expected a mapping, got {type(manifest[field]).__name__}")
    if shape := wrong_types(manifest):
        raise ManifestError("; ".join(str(problem) for problem in shape))
    body = manifest.get("spec") or {}
    meta = manifest.get("metadata") or {}
    groups = body.get("workerGroupSpecs") or []
    if not groups:
        raise ManifestError("spec.workerGroupSpecs is empty; a pool comes from each worker group")
    kept = [(index, group) for index, group in enumerate(groups) if _max_replicas(group)[0] != 0]
    if not kept:
        raise ManifestError("spec.workerGroupSpecs: every group has maxReplicas 0, so none ever has a pod to import")
    head = body.get("headGroupSpec") or {}
    head_container = _ray_container(head, "spec.headGroupSpec")
    kubernetes: dict[str, Any] = {"image": head_container.get("image")}
    if meta.get("namespace"):
        kubernetes["namespace"] = meta["namespace"]
    if body.get("rayVersion"):
        kubernetes["ray_version"] = str(body["rayVersion"])
    # KubeRay runs a cluster without authOptions unauthenticated: imported as it runs, not turned on.
    kubernetes["token_auth"] = (body.get("authOptions") or {}).get("mode") == "token"
    kubernetes["shared_storage"] = _shared_storage(head, head_container)
    kubernetes["pod_security"] = _pod_security(head)
    idle_timeout = (body.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    if idle_timeout is not None:
        kubernetes["idle_timeout_seconds"] = idle_timeout
    if body.get("gcsFaultToleranceOptions"):
        kubernetes["gcs_fault_tolerance"] = _gcs_fault_tolerance(body["gcsFaultToleranceOptions"])
    rendered_by_llmos = CLUSTER_LABEL in (meta.get("labels") or {})
    if rendered_by_llmos and not _has_volume(head, CONTROLLER_STATE_VOLUME):
        kubernetes["controller_state"] = None  # rendered with controller_state: null
    head_cpus, head_cpus_field = _amount(head, "spec.headGroupSpec", "CPU", "num-cpus", "cpu")
    head_memory, head_memory_field = _amount(head, "spec.headGroupSpec", "memory", "memory", "memory")
    head_pod_cpus = _head_pod_cpus(head_container, math.floor(head_cpus))
    if head_pod_cpus is not None:
        kubernetes["head_pod_cpus"] = head_pod_cpus
    sources = {
        "name": "metadata.name",
        "head.cpus": head_cpus_field,
        "head.memory": head_memory_field,
        "kubernetes.image": "spec.headGroupSpec.template.spec.containers[0].image",
        "kubernetes.namespace": "metadata.namespace",
        "kubernetes.ray_version": "spec.rayVersion",
        "kubernetes.shared_storage": "spec.headGroupSpec.template.spec.volumes",
        "kubernetes.pod_security.run_as_user": "spec.headGroupSpec.template.spec.securityContext.runAsUser",
        "kubernetes.pod_security.run_as_group": "spec.headGroupSpec.template.spec.securityContext.runAsGroup",
        "kubernetes.idle_timeout_seconds": "spec.autoscalerOptions.idleTimeoutSeconds",
        "kubernetes.gcs_fault_tolerance.redis_address": "spec.gcsFaultToleranceOptions.redisAddress",
        "kubernetes.gcs_fault_tolerance.redis_password_secret": _REDIS_SECRET_FIELD,
        "kubernetes.head_pod_cpus": "spec.headGroupSpec.template.spec.containers[0].resources",
    }
    pools = []
    for index, group in kept:
        at = f"spec.workerGroupSpecs[{index}]"
        pool, pool_sources = _pool(group, at)
        where = f"pools[{len(pools)}]"
        sources.update({f"{where}.{field}" if field else where: origin for field, origin in pool_sources.items()})
        sources[f"kubernetes.pools.{pool['name']}.node_selector"] = f"{at}.template.spec.nodeSelector"
        sources[f"kubernetes.pools.{pool['name']}.node_taints"] = f"{at}.template.spec.tolerations"
        pools.append(pool)
    data: dict[str, Any] = {
        "name": meta.get("name", "llmos"),
        "head": {"cpus": math.floor(head_cpus), "memory": int(head_memory) or "8Gi"},
        "pools": pools,
        "kubernetes": {
            k: v for k, v in kubernetes.items() if v is not None or k in ("pod_security", "controller_state")
        },
    }
    spec = _parse_imported(data, source, sources)
    overrides = _placement_overrides(spec, [group for _, group in kept], rendered_by_llmos)
    if overrides:
        data["kubernetes"]["pools"] = overrides
        spec = _parse_imported(data, source, sources)
    return spec


def _parse_imported(data: dict[str, Any], source: str, sources: dict[str, str]) -> ClusterSpec:
    """The ClusterSpec of imported data; its problems said of the manifest fields they came from, as the user
    wrote none of the ClusterSpec's."""
    try:
        return parse_model(ClusterSpec, data, source)
    except SpecError as error:
        problems = [_in_manifest_terms(problem, sources) for problem in error.problems]
    if len(problems) == 1:
        raise ManifestError(problems[0])
    raise ManifestError("\n".join(["cannot become a ClusterSpec:", *(f"  - {problem}" for problem in problems)]))


def _in_manifest_terms(problem: str, sources: dict[str, str]) -> str:
    """`pools[1].name: ...` as `spec.workerGroupSpecs[1].groupName: ...`: the longest ClusterSpec field the
    problem starts with, replaced by the manifest field it was read from."""
    for field in sorted(sources, key=len, reverse=True):
        if problem.startswith(field) and problem[len(field) : len(field) + 1] in (":", ".", "["):
            return sources[field] + problem[len(field) :]
    return problem


def _shared_storage(head: dict[str, Any], container: dict[str, Any]) -> dict[str, Any] | None:
    """The shared storage of a RayCluster llmos rendered, as the existing claim it now is."""
    volumes = ((head.get("template") or {}).get("spec") or {}).get("volumes") or []
    claims = [v.get("persistentVolumeClaim") for v in volumes if v.get("name") == SHARED_STORAGE_VOLUME]
    mounts = [m.get("mountPath") for m in container.get("volumeMounts") or [] if m.get("name") == SHARED_STORAGE_VOLUME]
    if not claims or not claims[0] or not mounts:
        return None
    return {"mount_path": mounts[0], "claim": claims[0].get("claimName")}


def _has_volume(group: dict[str, Any], name: str) -> bool:
    volumes = ((group.get("template") or {}).get("spec") or {}).get("volumes") or []
    return any(volume.get("name") == name for volume in volumes)


def _head_pod_cpus(container: dict[str, Any], ray_cpus: int) -> int | None:
    """The head pod's CPUs beyond those Ray offers to user work (kubernetes.head_pod_cpus), where the head
    container asks for a whole number of CPUs more than Ray's; None to keep the default."""
    resources = container.get("resources") or {}
    cpu = (resources.get("limits") or {}).get("cpu", (resources.get("requests") or {}).get("cpu"))
    if cpu is None:
        return None
    extra = parse_quantity(cpu, "spec.headGroupSpec.template.spec.containers[0].resources.limits.cpu") - ray_cpus
    return int(extra) if extra >= 1 and float(extra).is_integer() else None


def _gcs_fault_tolerance(options: dict[str, Any]) -> dict[str, Any]:
    """KubeRay's gcsFaultToleranceOptions as kubernetes.gcs_fault_tolerance."""
    tolerance: dict[str, Any] = {"redis_address": options.get("redisAddress")}
    password = options.get("redisPassword")
    if password:
        secret = (password.get("valueFrom") or {}).get("secretKeyRef") or {}
        if not secret.get("name") or secret.get("key") != "password":
            raise ManifestError(
                f"{_REDIS_SECRET_FIELD}: llmos reads Redis's password from the key `password` of a Secret; store it "
                "there and name the Secret in spec.gcsFaultToleranceOptions.redisPassword.valueFrom.secretKeyRef"
            )
        tolerance["redis_password_secret"] = secret["name"]
    return tolerance


def _pod_security(head: dict[str, Any]) -> dict[str, Any] | None:
    """The head pod's user and group as kubernetes.pod_security; None where its containers run as the image's user,
    which may be root: rendering the spec must not make them another user."""
    context = ((head.get("template") or {}).get("spec") or {}).get("securityContext") or {}
    if not context.get("runAsUser"):
        return None
    security = {"run_as_user": context["runAsUser"]}
    if context.get("runAsGroup") is not None:
        security["run_as_group"] = context["runAsGroup"]
    return security


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
