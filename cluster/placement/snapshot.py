"""The cluster as the engine sees it: plain data, built by the controller or a benchmark.

A snapshot holds each node's capacity and what is free on it now, down to each GPU device's free
share, so fractional GPUs are tracked per device. Nothing here talks to Ray; `node_from_ray` only
reads the resource and label dictionaries Ray reports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, model_validator

from cluster.ray_mapping import POOL_LABEL, RAY_ACCELERATOR_TYPE_LABEL, RAY_TPU_SLICE_NAME_LABEL, TPU_SLICE_LABEL

DEFAULT_POOL = "default"


class NodeSnapshot(BaseModel):
    """One node: capacity, labels, and what is free now (None means all of it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., min_length=1)
    pool: str = Field(DEFAULT_POOL, description="Pool the node belongs to (same_pool gangs stay in one).")
    labels: dict[str, str] = Field(default_factory=dict, description="Node labels for label selectors.")
    cpus: NonNegativeFloat
    memory: NonNegativeInt = Field(..., description="Bytes.")
    gpus: NonNegativeInt = 0
    gpu_type: str | None = Field(None, description="GPU model, matched against a bundle's gpu_types.")
    tpu_chips: NonNegativeInt = 0
    tpu_slice: str | None = Field(None, description="The TPU slice this host belongs to.")
    cpus_free: NonNegativeFloat | None = None
    memory_free: NonNegativeInt | None = None
    gpu_free: tuple[NonNegativeFloat, ...] | None = Field(
        None, description="Free share of each GPU device (1.0 = idle); one entry per GPU."
    )
    tpu_chips_free: NonNegativeInt | None = None

    @model_validator(mode="after")
    def _free_within_capacity(self) -> NodeSnapshot:
        checks = (
            ("cpus_free", self.cpus_free, self.cpus),
            ("memory_free", self.memory_free, self.memory),
            ("tpu_chips_free", self.tpu_chips_free, self.tpu_chips),
        )
        for field, free, capacity in checks:
            if free is not None and free > capacity:
                raise ValueError(f"node {self.name}: {field} is {free}, above its capacity {capacity}")
        if self.gpu_free is not None:
            if len(self.gpu_free) != self.gpus:
                raise ValueError(
                    f"node {self.name}: gpu_free has {len(self.gpu_free)} entries for {self.gpus} GPUs; "
                    "give one free share per device"
                )
            if any(share > 1 for share in self.gpu_free):
                raise ValueError(f"node {self.name}: a device's free share is at most 1.0, got {self.gpu_free}")
        if self.tpu_slice is not None and self.tpu_chips == 0:
            raise ValueError(f"node {self.name}: tpu_slice is set but tpu_chips is 0")
        return self


class ClusterSnapshot(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    nodes: tuple[NodeSnapshot, ...] = Field(..., min_length=1)

    def emptied(self) -> ClusterSnapshot:
        """The same nodes with nothing running on them."""
        idle = {"cpus_free": None, "memory_free": None, "gpu_free": None, "tpu_chips_free": None}
        return ClusterSnapshot(nodes=tuple(node.model_copy(update=idle) for node in self.nodes))

    @model_validator(mode="after")
    def _unique_names(self) -> ClusterSnapshot:
        seen: set[str] = set()
        for node in self.nodes:
            if node.name in seen:
                raise ValueError(f"node name {node.name!r} appears twice; node names must be unique")
            seen.add(node.name)
        return self


def node_from_ray(
    name: str,
    total: Mapping[str, float],
    labels: Mapping[str, str],
    available: Mapping[str, float] | None = None,
    gpu_free: tuple[float, ...] | None = None,
) -> NodeSnapshot:
    """A node from Ray's view of it (`ray.nodes()` resources and labels, memory in bytes).

    Ray reports only the node's total free GPU, not each device's share. Pass `gpu_free` from the
    controller's own records when it has them; otherwise the free GPU is assumed packed onto the
    fewest devices (whole devices idle, at most one partly used), the most optimistic reading.
    """
    available = total if available is None else available
    gpus = int(total.get("GPU", 0))
    if gpu_free is None and gpus:
        free = available.get("GPU", 0.0)
        whole = min(math.floor(free + 1e-9), gpus)
        partial = [round(free - whole, 4)] if whole < gpus else []
        gpu_free = tuple([1.0] * whole + partial + [0.0] * (gpus - whole - len(partial)))
    return NodeSnapshot(
        name=name,
        pool=labels.get(POOL_LABEL, DEFAULT_POOL),
        labels=dict(labels),
        cpus=total.get("CPU", 0.0),
        memory=int(total.get("memory", 0)),
        gpus=gpus,
        gpu_type=labels.get(RAY_ACCELERATOR_TYPE_LABEL) if gpus else None,
        tpu_chips=int(total.get("TPU", 0)),
        # llmos up declares its slices; on KubeRay, Ray labels each TPU VM with its slice from GCE metadata.
        tpu_slice=labels.get(TPU_SLICE_LABEL) or labels.get(RAY_TPU_SLICE_NAME_LABEL),
        cpus_free=available.get("CPU", 0.0),
        memory_free=int(available.get("memory", 0)),
        gpu_free=gpu_free,
        tpu_chips_free=int(available.get("TPU", 0)) if total.get("TPU") else None,
    )
