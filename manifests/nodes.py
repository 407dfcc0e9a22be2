"""Where a pool's pods run on Kubernetes: node selectors, taints, and the device resources they ask for.

The defaults are GKE's: GPU nodes carry `cloud.google.com/gke-accelerator` (nvidia-h100-80gb, ...),
TPU nodes `cloud.google.com/gke-tpu-accelerator` and `cloud.google.com/gke-tpu-topology`, and GKE
taints them `nvidia.com/gpu` / `google.com/tpu` so only pods that ask for the device land there. On
another cloud, set `kubernetes.pools.<pool>.node_selector` and `node_taints` in the ClusterSpec.
"""

from __future__ import annotations

from typing import Any

from cluster.spec import AcceleratorKind, ClusterSpec, Pool, Taint
from manifests.objects import ManifestError, memory_quantity, quantity

GKE_GPU_LABEL = "cloud.google.com/gke-accelerator"
GKE_TPU_LABEL = "cloud.google.com/gke-tpu-accelerator"
GKE_TPU_TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"
GPU_RESOURCE = "nvidia.com/gpu"
TPU_RESOURCE = "google.com/tpu"

# Ray's GPU names -> GKE's accelerator names (cloud.google.com/gke-accelerator values).
GKE_GPU_NAMES = {
    "H100": "nvidia-h100-80gb",
    "H200": "nvidia-h200-141gb",
    "B200": "nvidia-b200",
    "A100": "nvidia-tesla-a100",
    "A100-40G": "nvidia-tesla-a100",
    "A100-80G": "nvidia-a100-80gb",
    "L4": "nvidia-l4",
    "T4": "nvidia-tesla-t4",
    "V100": "nvidia-tesla-v100",
    "P100": "nvidia-tesla-p100",
    "P4": "nvidia-tesla-p4",
    "K80": "nvidia-tesla-k80",
}
# llmos TPU generations -> GKE's TPU names (cloud.google.com/gke-tpu-accelerator values).
GKE_TPU_NAMES = {
    "v4": "tpu-v4-podslice",
    "v5e": "tpu-v5-lite-podslice",
    "v5p": "tpu-v5p-slice",
    "v6e": "tpu-v6e-slice",
}
DEVICE_RESOURCES = {AcceleratorKind.GPU: GPU_RESOURCE, AcceleratorKind.TPU: TPU_RESOURCE}


def node_selector(spec: ClusterSpec, pool: Pool) -> dict[str, str]:
    override = spec.kubernetes.pools.get(pool.name)
    if override is not None and override.node_selector is not None:
        return dict(override.node_selector)
    if pool.accelerator is AcceleratorKind.GPU:
        gke_name = GKE_GPU_NAMES.get(pool.accelerator_type)  # type: ignore[arg-type]
        if gke_name is None:
            raise ManifestError(
                f"pools: {pool.name!r} has accelerator_type {pool.accelerator_type!r}, which GKE does not "
                f"offer; set kubernetes.pools.{pool.name}.node_selector to the label of its nodes"
            )
        return {GKE_GPU_LABEL: gke_name}
    if pool.tpu is not None:
        generation = GKE_TPU_NAMES[pool.accelerator_type]  # type: ignore[index]
        return {GKE_TPU_LABEL: generation, GKE_TPU_TOPOLOGY_LABEL: pool.tpu.topology}
    return {}


def node_taints(spec: ClusterSpec, pool: Pool) -> list[Taint]:
    override = spec.kubernetes.pools.get(pool.name)
    if override is not None and override.node_taints is not None:
        return list(override.node_taints)
    device = DEVICE_RESOURCES.get(pool.accelerator)
    return [Taint(key=device, value="present")] if device else []


def tolerations(taints: list[Taint]) -> list[dict[str, Any]]:
    """Tolerate each taint whatever its value."""
    return [{"key": taint.key, "operator": "Exists", "effect": taint.effect} for taint in taints]


def taint_objects(taints: list[Taint]) -> list[dict[str, Any]]:
    return [taint.model_dump(exclude_none=True) for taint in taints]


def devices_per_pool_pod(pool: Pool) -> dict[str, int]:
    """Device resources one pod (one node or one TPU host) of the pool asks Kubernetes for."""
    if pool.accelerator is AcceleratorKind.GPU:
        return {GPU_RESOURCE: pool.node.gpus}
    if pool.accelerator is AcceleratorKind.TPU:
        return {TPU_RESOURCE: pool.tpu_chips_per_host}
    return {}


def container_resources(cpus: float, memory: int, devices: dict[str, int]) -> dict[str, dict[str, str]]:
    """Requests equal to limits, so every Ray pod gets the Guaranteed QoS class."""
    amounts = {"cpu": quantity(cpus), "memory": memory_quantity(memory)}
    amounts.update({name: quantity(count) for name, count in devices.items()})
    return {"limits": dict(amounts), "requests": dict(amounts)}
