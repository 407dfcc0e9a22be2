"""Numpy accounting of one snapshot: what every node and every GPU device has free.

Everything is a fixed-point integer (see `request.UNITS`; memory in bytes), so no sequence of
placements and releases can drift into oversubscription. Each node carries a version that changes
whenever its free resources do; the engine uses it to rescore only the nodes that changed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cluster.placement.request import UNITS, Demand, to_units
from cluster.placement.snapshot import ClusterSnapshot, NodeSnapshot


class OversubscriptionError(RuntimeError):
    """An allocation or release that would break the books; always a bug in the caller."""


def _intern(values: Sequence[str | None]) -> tuple[list[str], np.ndarray]:
    """Distinct values and, per item, the index of its value (-1 for None)."""
    names: list[str] = []
    lookup: dict[str, int] = {}
    codes = np.full(len(values), -1, dtype=np.int64)
    for position, value in enumerate(values):
        if value is None:
            continue
        if value not in lookup:
            lookup[value] = len(names)
            names.append(value)
        codes[position] = lookup[value]
    return names, codes


def selector_matches(labels: dict[str, str], key: str, expression: str) -> bool:
    """Ray's label-selector syntax: `v`, `!v`, `in(a,b)`, `!in(a,b)`; a missing label matches only `!`."""
    negated = expression.startswith("!")
    body = expression[1:] if negated else expression
    if body.startswith("in(") and body.endswith(")"):
        allowed = {value.strip() for value in body[3:-1].split(",")}
    else:
        allowed = {body}
    return (labels.get(key) in allowed) != negated


class ClusterState:
    def __init__(self, snapshot: ClusterSnapshot):
        nodes = snapshot.nodes
        self.snapshot = snapshot
        self.names = [node.name for node in nodes]
        self.index = {name: position for position, name in enumerate(self.names)}
        self.pools, self.pool_of = _intern([node.pool for node in nodes])
        self.gpu_types, self.gpu_type_of = _intern([node.gpu_type for node in nodes])
        self.slices, self.slice_of = _intern([node.tpu_slice for node in nodes])
        self.labels = [node.labels for node in nodes]
        # At least one device column, so a cluster without GPUs still has (never usable) device arrays.
        self.max_devices = max(1, *(node.gpus for node in nodes))

        def units(values: list[float]) -> np.ndarray:
            return np.array([to_units(value) for value in values], dtype=np.int64)

        self.cpu_cap = units([node.cpus for node in nodes])
        self.cpu_free = units([node.cpus if node.cpus_free is None else node.cpus_free for node in nodes])
        self.mem_cap = np.array([node.memory for node in nodes], dtype=np.int64)
        self.mem_free = np.array(
            [node.memory if node.memory_free is None else node.memory_free for node in nodes], dtype=np.int64
        )
        self.gpu_count = np.array([node.gpus for node in nodes], dtype=np.int64)
        # Devices a node lacks stay at 0 free, which no GPU demand can use.
        self.gpu_free = np.zeros((len(nodes), self.max_devices), dtype=np.int64)
        for position, node in enumerate(nodes):
            shares = node.gpu_free if node.gpu_free is not None else (1.0,) * node.gpus
            self.gpu_free[position, : node.gpus] = units(list(shares))
        self.tpu_cap = units([node.tpu_chips for node in nodes])
        self.tpu_free = units(
            [node.tpu_chips if node.tpu_chips_free is None else node.tpu_chips_free for node in nodes]
        )
        self.has_accelerator = (self.gpu_count > 0) | (self.tpu_cap > 0)
        _, self.capacity_class = _intern(
            [
                f"{node.gpu_type}/{node.gpus}/{cpus}/{node.memory}/{tpus}"
                for node, cpus, tpus in zip(nodes, self.cpu_cap, self.tpu_cap, strict=True)
            ]
        )
        # Kinds of GPU work each node runs (index 0: shared GPUs, k: k whole GPUs); GPU clustering
        # reads it. Work already running in the snapshot is of unknown kind and not counted.
        self.gpu_kind_counts = np.zeros((len(nodes), self.max_devices + 1), dtype=np.int64)
        self.version = np.zeros(len(nodes), dtype=np.int64)
        self._static_masks: dict[tuple, np.ndarray] = {}

    @property
    def size(self) -> int:
        return len(self.names)

    def empty_copy(self) -> ClusterState:
        """The same cluster with nothing running: to tell "never fits" from "no room now"."""
        return ClusterState(self.snapshot.emptied())

    def static_mask(self, demand: Demand) -> np.ndarray:
        """Nodes whose labels and GPU type suit the demand, whatever is free (cached: they never change)."""
        key = (demand.gpu_types if demand.gpu_count else None, demand.label_selector)
        mask = self._static_masks.get(key)
        if mask is None:
            mask = np.ones(self.size, dtype=bool)
            if demand.gpu_count and demand.gpu_types is not None:
                allowed = [code for code, name in enumerate(self.gpu_types) if name in demand.gpu_types]
                mask &= np.isin(self.gpu_type_of, allowed)
            for key_name, expression in demand.label_selector:
                mask &= np.array([selector_matches(labels, key_name, expression) for labels in self.labels])
            self._static_masks[key] = mask
        return mask

    def scoring_keys(self, nodes: np.ndarray) -> np.ndarray:
        """One row per node of everything a policy may read about it: equal rows score the same."""
        return np.column_stack(
            [
                self.capacity_class[nodes],
                self.cpu_free[nodes],
                self.mem_free[nodes],
                self.tpu_free[nodes],
                self.gpu_free[nodes],
                self.gpu_kind_counts[nodes],
            ]
        )

    def fits(self, demand: Demand, nodes: np.ndarray) -> np.ndarray:
        """Which of `nodes` have room for the demand now (labels and GPU type not checked)."""
        ok = (
            (self.cpu_free[nodes] >= demand.cpu)
            & (self.mem_free[nodes] >= demand.memory)
            & (self.tpu_free[nodes] >= demand.tpu)
        )
        if demand.gpu_count:
            usable = (self.gpu_free[nodes] >= demand.gpu_share).sum(axis=1)
            ok &= usable >= demand.gpu_count
        return ok

    def fits_capacity(self, demand: Demand, nodes: np.ndarray) -> np.ndarray:
        """Which of `nodes` could hold the demand if they were empty."""
        return (
            (self.cpu_cap[nodes] >= demand.cpu)
            & (self.mem_cap[nodes] >= demand.memory)
            & (self.tpu_cap[nodes] >= demand.tpu)
            & (self.gpu_count[nodes] >= demand.gpu_count)
        )

    def whole_devices(self, node: int, count: int) -> tuple[int, ...]:
        """The lowest-numbered idle devices, as Ray and the FGD simulator both pick them."""
        idle = np.flatnonzero(self.gpu_free[node] == UNITS)
        return tuple(int(device) for device in idle[:count])

    def best_fit_devices(self, nodes: np.ndarray, share: int) -> np.ndarray:
        """Per node, the device with the least free share that still holds `share` (lowest index on ties)."""
        free = self.gpu_free[nodes]
        return np.where(free >= share, free, UNITS + 1).argmin(axis=1)

    def devices_for(self, node: int, demand: Demand, shared_device: int) -> tuple[int, ...]:
        if demand.is_fractional_gpu:
            return (shared_device,)
        if demand.gpu_count:
            return self.whole_devices(node, demand.gpu_count)
        return ()

    def allocate(self, node: int, demand: Demand, devices: tuple[int, ...]) -> None:
        share = demand.gpu_share
        if (
            self.cpu_free[node] < demand.cpu
            or self.mem_free[node] < demand.memory
            or self.tpu_free[node] < demand.tpu
            or len(devices) != demand.gpu_count
            or len(set(devices)) != len(devices)
            or any(self.gpu_free[node, device] < share for device in devices)
        ):
            raise OversubscriptionError(f"{demand} does not fit node {self.names[node]} on devices {devices}")
        self.cpu_free[node] -= demand.cpu
        self.mem_free[node] -= demand.memory
        self.tpu_free[node] -= demand.tpu
        for device in devices:
            self.gpu_free[node, device] -= share
        if demand.gpu_count:
            self.gpu_kind_counts[node, self._gpu_kind(demand)] += 1
        self.version[node] += 1

    def release(self, node: int, demand: Demand, devices: tuple[int, ...]) -> None:
        share = demand.gpu_share
        if (
            self.cpu_free[node] + demand.cpu > self.cpu_cap[node]
            or self.mem_free[node] + demand.memory > self.mem_cap[node]
            or self.tpu_free[node] + demand.tpu > self.tpu_cap[node]
            or len(devices) != demand.gpu_count
            or any(self.gpu_free[node, device] + share > UNITS for device in devices)
        ):
            raise OversubscriptionError(f"releasing {demand} would overfill node {self.names[node]}")
        self.cpu_free[node] += demand.cpu
        self.mem_free[node] += demand.memory
        self.tpu_free[node] += demand.tpu
        for device in devices:
            self.gpu_free[node, device] += share
        if demand.gpu_count:
            kind = self._gpu_kind(demand)
            self.gpu_kind_counts[node, kind] = max(0, self.gpu_kind_counts[node, kind] - 1)
        self.version[node] += 1

    @staticmethod
    def _gpu_kind(demand: Demand) -> int:
        return 0 if demand.is_fractional_gpu else demand.gpu_count

    def gpus_allocated(self) -> float:
        """GPUs in use, fractional shares summed."""
        return float(self.gpu_count.sum() * UNITS - self.gpu_free.sum()) / UNITS

    def to_snapshot(self) -> ClusterSnapshot:
        def node_now(position: int, node: NodeSnapshot) -> NodeSnapshot:
            return node.model_copy(
                update={
                    "cpus_free": float(self.cpu_free[position] / UNITS),
                    "memory_free": int(self.mem_free[position]),
                    "gpu_free": tuple((self.gpu_free[position, : node.gpus] / UNITS).tolist()),
                    "tpu_chips_free": int(self.tpu_free[position] // UNITS),
                }
            )

        return ClusterSnapshot(
            nodes=tuple(node_now(position, node) for position, node in enumerate(self.snapshot.nodes))
        )
