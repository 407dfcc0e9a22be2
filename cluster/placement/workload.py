"""The workload: which task shapes arrive and how often, and the fragmentation it defines.

Fragmentation follows the FGD paper (Weng et al., ATC'23). For a task shape m, the fragment of a
node is the free GPU capacity m cannot use: all of it when m does not fit the node at all (too
little CPU, too few usable devices, the wrong GPU type, or m asks for no GPU), otherwise the free
share of the devices too small for m's per-device request. A node's fragmentation is the
popularity-weighted sum over shapes: the GPUs a random arriving task would find unusable there.
FGD measures it against its target workload, the most popular shapes covering 95% of tasks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from cluster.placement.request import UNITS, Demand

# FGD's target workload: the most popular shapes that together make up this share of all tasks.
FGD_COVERAGE = 0.95


@dataclass(frozen=True, slots=True)
class TaskShape:
    """What fragmentation looks at: CPU, GPU count, per-device share and allowed GPU types."""

    cpu: int
    gpu_count: int
    gpu_share: int
    gpu_types: frozenset[str] | None = None

    @classmethod
    def of(cls, demand: Demand) -> TaskShape:
        return cls(demand.cpu, demand.gpu_count, demand.gpu_share, demand.gpu_types)


class TargetWorkload:
    """Task shapes and their popularity, most popular first."""

    def __init__(self, shapes: Sequence[TaskShape], popularity: Sequence[float]):
        if not shapes or len(shapes) != len(popularity):
            raise ValueError("a target workload needs at least one shape and one popularity per shape")
        weights = np.asarray(popularity, dtype=np.float64)
        # Most popular first, keeping the given order among equals.
        order = np.argsort(-weights, kind="stable")
        self.shapes = tuple(shapes[index] for index in order)
        self.popularity = weights[order] / weights.sum()
        self.cpu = np.array([shape.cpu for shape in self.shapes], dtype=np.int64)
        self.gpu_count = np.array([shape.gpu_count for shape in self.shapes], dtype=np.int64)
        # A CPU-only shape can use no device: its per-device need is set above any device's capacity.
        self.gpu_share = np.array(
            [shape.gpu_share if shape.gpu_count else UNITS + 1 for shape in self.shapes], dtype=np.int64
        )
        self._accessible: dict[tuple[str, ...], np.ndarray] = {}
        self._covering: dict[float, TargetWorkload] = {}

    @classmethod
    def most_common(cls, demands: Iterable[Demand]) -> TargetWorkload:
        return cls.from_counts(Counter(TaskShape.of(demand) for demand in demands))

    @classmethod
    def from_counts(cls, counts: Counter[TaskShape]) -> TargetWorkload:
        # Equal counts are ordered as the FGD simulator orders them (larger CPU, share, GPU count first).
        ranked = sorted(
            counts.items(),
            key=lambda item: (item[1], item[0].cpu, item[0].gpu_share, item[0].gpu_count),
            reverse=True,
        )
        return cls([shape for shape, _ in ranked], [count for _, count in ranked])

    def covered_popularity(self, coverage: float = FGD_COVERAGE) -> np.ndarray:
        """Popularity of the fewest most popular shapes covering `coverage` of tasks (the rest 0),
        renormalized: FGD's target workload, as the simulator picks it, over all shapes."""
        covered_before = np.concatenate([[0.0], np.cumsum(self.popularity)[:-1]])
        kept = np.where(covered_before < coverage - 1e-12, self.popularity, 0.0)
        return kept / kept.sum()

    def covering(self, coverage: float = FGD_COVERAGE) -> TargetWorkload:
        """FGD's target workload: just the shapes that `covered_popularity` keeps."""
        if coverage not in self._covering:
            popularity = self.covered_popularity(coverage)
            kept = np.flatnonzero(popularity)
            self._covering[coverage] = TargetWorkload([self.shapes[index] for index in kept], popularity[kept])
        return self._covering[coverage]

    def accessible(self, gpu_types: Sequence[str]) -> np.ndarray:
        """(types + 1, shapes): may shape m use a node of GPU type t (row 0: nodes without a GPU type)?

        A CPU-only shape "uses" no node's GPUs, so its column is all False: every free GPU is a
        fragment for it, exactly as the paper counts it.
        """
        key = tuple(gpu_types)
        matrix = self._accessible.get(key)
        if matrix is None:
            rows = [None, *key]
            matrix = np.array(
                [
                    [
                        shape.gpu_count > 0 and (shape.gpu_types is None or gpu_type in shape.gpu_types)
                        for shape in self.shapes
                    ]
                    for gpu_type in rows
                ],
                dtype=bool,
            )
            self._accessible[key] = matrix
        return matrix

    def fragmentation(self, gpu_free: np.ndarray, cpu_free: np.ndarray, accessible: np.ndarray) -> np.ndarray:
        """Expected unusable GPU units of each node state (rows of `gpu_free`, `cpu_free`, `accessible`)."""
        usable_devices, usable_capacity = self._usable_devices(gpu_free)
        return self._fragmentation(gpu_free, cpu_free, accessible, usable_devices, usable_capacity, self.popularity)

    def stranded(self, gpu_free: np.ndarray, cpu_free: np.ndarray, accessible: np.ndarray) -> np.ndarray:
        """Like `fragmentation`, but a shape can use only as many devices as its copies that fit.

        FGD counts every device big enough for a shape as usable by it, even when the node's CPU
        leaves room for a single copy: 8 idle GPUs next to 12 free CPUs are "usable" by a 1-GPU,
        11-CPU task. Here copies of shape m are limited by devices (count // m's GPUs) and by CPU
        (free CPU // m's CPU), and m can use only the largest devices those copies would take.
        """
        usable_devices, _ = self._usable_devices(gpu_free)
        return self._stranded(gpu_free, cpu_free, accessible, usable_devices, self.popularity)

    def fragmentation_and_stranded(
        self,
        gpu_free: np.ndarray,
        cpu_free: np.ndarray,
        accessible: np.ndarray,
        fragmentation_popularity: np.ndarray,
        stranded_popularity: np.ndarray,
    ) -> np.ndarray:
        """Both measures as two columns, each with its own weights over this workload's shapes;
        they share the costly per-device comparison."""
        usable_devices, usable_capacity = self._usable_devices(gpu_free)
        fragmentation = self._fragmentation(
            gpu_free, cpu_free, accessible, usable_devices, usable_capacity, fragmentation_popularity
        )
        stranded = self._stranded(gpu_free, cpu_free, accessible, usable_devices, stranded_popularity)
        return np.stack([fragmentation, stranded], axis=1)

    def _usable_devices(self, gpu_free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[row, shape]: how many devices are big enough for the shape, and their free capacity."""
        usable = gpu_free[:, :, None] >= self.gpu_share[None, None, :]
        return usable.sum(axis=1), np.einsum("rd,rdm->rm", gpu_free, usable)

    def _fragmentation(self, gpu_free, cpu_free, accessible, usable_devices, usable_capacity, popularity) -> np.ndarray:
        fits = accessible & (cpu_free[:, None] >= self.cpu) & (usable_devices >= self.gpu_count)
        return gpu_free.sum(axis=1) - (usable_capacity * fits) @ popularity

    def _stranded(self, gpu_free, cpu_free, accessible, usable_devices, popularity) -> np.ndarray:
        largest_first = -np.sort(-gpu_free, axis=1)
        capacity_of_largest = np.concatenate(
            [np.zeros((len(gpu_free), 1), dtype=gpu_free.dtype), np.cumsum(largest_first, axis=1)], axis=1
        )
        devices_per_copy = np.maximum(self.gpu_count, 1)
        copies_by_cpu = np.where(self.cpu > 0, cpu_free[:, None] // np.maximum(self.cpu, 1), usable_devices)
        copies = np.minimum(usable_devices // devices_per_copy, copies_by_cpu)
        devices_used = np.minimum(copies * devices_per_copy, gpu_free.shape[1])
        usable = np.take_along_axis(capacity_of_largest, devices_used, axis=1)
        return gpu_free.sum(axis=1) - np.where(accessible, usable, 0) @ popularity


class WorkloadEstimator:
    """Learns the workload online from the bundles submitted, for a live cluster.

    The estimate is rebuilt after 1, 2, 4, ... 1024 bundles and then every 1024, so that scores
    cached against the previous estimate stay valid between rebuilds.
    """

    REBUILD_EVERY = 1024

    def __init__(self) -> None:
        self._counts: Counter[TaskShape] = Counter()
        self._observed = 0

    def observe(self, demands: Iterable[Demand]) -> TargetWorkload | None:
        """Records the demands; returns a new estimate when it is time to rebuild, else None."""
        rebuild = False
        for demand in demands:
            self._counts[TaskShape.of(demand)] += 1
            self._observed += 1
            count = self._observed
            power_of_two = count & (count - 1) == 0
            rebuild |= (power_of_two and count <= self.REBUILD_EVERY) or count % self.REBUILD_EVERY == 0
        return TargetWorkload.from_counts(self._counts) if rebuild else None
