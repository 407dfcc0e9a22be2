"""`llmos bench placement`: the FGD paper's trace experiment, run on the llmos placement engine.

For each trace, policy and seed: the 1,213 GPU nodes start empty; tasks arrive one at a time (the
pod list shuffled, then random draws, until the GPU request reaches 130% of capacity); each task
is placed once or fails; nothing departs. Reported per policy, as the mean over seeds:

- gpu_alloc_ratio: GPUs allocated (fractions summed) / cluster GPUs, at 130% arrived;
- unallocated_gpus: (1 - gpu_alloc_ratio) x cluster GPUs;
- frag_rate_at_90: fragmentation (against FGD's target workload) / free GPUs, at 90% arrived;
- first_failure_arrived: arrived load when the first task failed;
- decisions_per_s: placement decisions per second of wall time, single process.

A seed where no task failed, or where 90% never arrived, has no figure for it (None): such seeds are
left out of that mean, and `first_failure_seeds` and `frag_rate_seeds` say how many seeds it covers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.placement_trace import ARRIVAL_LIMIT, Trace
from cluster.placement import ClusterState, Placement, PlacementEngine, TargetWorkload

FRAGMENTATION_POINT = 0.9
# The allocation curve is kept at these arrived loads (0% to 130% in 1% steps) for the plot.
CURVE_POINTS = np.round(np.arange(0, ARRIVAL_LIMIT + 1e-9, 0.01), 2)


@dataclass(frozen=True)
class SeedRun:
    gpu_alloc_ratio: float
    frag_rate_at_90: float | None  # None: 90% never arrived
    first_failure_arrived: float | None  # None: no task failed
    decisions: int
    seconds: float
    curve: np.ndarray  # allocation ratio at each of CURVE_POINTS


def fragmentation_rate(state: ClusterState, workload: TargetWorkload) -> float:
    """Cluster fragmentation over free GPU capacity (the paper's "fragmentation ratio")."""
    accessible = workload.accessible(state.gpu_types)[state.gpu_type_of + 1]
    fragment = workload.fragmentation(state.gpu_free, state.cpu_free, accessible).sum()
    free = state.gpu_free.sum()
    return float(fragment / free) if free else 0.0


def run_seed(trace: Trace, policy: str, seed: int) -> SeedRun:
    engine = PlacementEngine(trace.cluster, policy, workload=trace.workload, seed=seed)
    arrivals = trace.arrivals(seed)
    requests, request_gpus = trace.requests, trace.request_gpus
    arrived = allocated = 0.0
    first_failure = frag_rate = None
    arrived_at = np.empty(len(arrivals))
    allocated_at = np.empty(len(arrivals))
    placing = 0.0
    for position, shape in enumerate(arrivals):
        gpus = request_gpus[shape]
        arrived += gpus
        started = time.perf_counter()
        decision = engine.place(requests[shape])
        placing += time.perf_counter() - started
        if isinstance(decision, Placement):
            allocated += gpus
        elif first_failure is None:
            first_failure = arrived / trace.gpus
        if frag_rate is None and arrived >= FRAGMENTATION_POINT * trace.gpus:
            frag_rate = fragmentation_rate(engine.state, trace.workload.covering())
        arrived_at[position] = arrived / trace.gpus
        allocated_at[position] = allocated / trace.gpus
    # Allocation at each curve point: as it stood after the last task that arrived by then.
    curve_index = np.searchsorted(arrived_at, CURVE_POINTS, side="right") - 1
    curve = np.where(curve_index >= 0, allocated_at[np.maximum(curve_index, 0)], 0.0)
    return SeedRun(
        gpu_alloc_ratio=engine.state.gpus_allocated() / trace.gpus,
        frag_rate_at_90=frag_rate,
        first_failure_arrived=first_failure,
        decisions=len(arrivals),
        seconds=placing,
        curve=curve,
    )


@dataclass(frozen=True)
class PolicyResult:
    gpu_alloc_ratio: float
    unallocated_gpus: float
    frag_rate_at_90: float | None  # mean over the seeds that have one; None when none has
    frag_rate_seeds: int
    first_failure_arrived: float | None
    first_failure_seeds: int
    decisions_per_s: float
    curve: np.ndarray

    @classmethod
    def of(cls, runs: Sequence[SeedRun], gpus: int) -> PolicyResult:
        """The mean over seeds; a figure a seed lacks is left out of its mean rather than counted as 0."""
        alloc = float(np.mean([run.gpu_alloc_ratio for run in runs]))
        frag_rates = [run.frag_rate_at_90 for run in runs if run.frag_rate_at_90 is not None]
        first_failures = [run.first_failure_arrived for run in runs if run.first_failure_arrived is not None]
        return cls(
            gpu_alloc_ratio=alloc,
            unallocated_gpus=(1 - alloc) * gpus,
            frag_rate_at_90=float(np.mean(frag_rates)) if frag_rates else None,
            frag_rate_seeds=len(frag_rates),
            first_failure_arrived=float(np.mean(first_failures)) if first_failures else None,
            first_failure_seeds=len(first_failures),
            decisions_per_s=sum(run.decisions for run in runs) / sum(run.seconds for run in runs),
            curve=np.mean([run.curve for run in runs], axis=0),
        )

    def as_json(self) -> dict[str, float | int | None]:
        return {
            "gpu_alloc_ratio": round(self.gpu_alloc_ratio, 4),
            "unallocated_gpus": round(self.unallocated_gpus, 1),
            "frag_rate_at_90": _rounded(self.frag_rate_at_90, 4),
            "frag_rate_seeds": self.frag_rate_seeds,
            "first_failure_arrived": _rounded(self.first_failure_arrived, 4),
            "first_failure_seeds": self.first_failure_seeds,
            "decisions_per_s": round(self.decisions_per_s, 1),
        }


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def run_policy(
    trace: Trace, policy: str, seeds: Sequence[int], on_seed: Callable[[int, SeedRun], None] | None = None
) -> PolicyResult:
    runs = []
    for seed in seeds:
        run = run_seed(trace, policy, seed)
        runs.append(run)
        if on_seed is not None:
            on_seed(seed, run)
    return PolicyResult.of(runs, trace.gpus)


def report(trace: Trace, seeds: Sequence[int], results: dict[str, PolicyResult]) -> dict:
    return {
        "trace": trace.name,
        "seeds": list(seeds),
        "nodes": len(trace.cluster.nodes),
        "gpus": trace.gpus,
        "results": {policy: result.as_json() for policy, result in results.items()},
    }


def describe_seeds(seeds: Sequence[int]) -> str:
    """`42-44, 50` for [42, 43, 44, 50]: runs of consecutive seeds as ranges."""
    ranges: list[list[int]] = []
    for seed in seeds:
        if ranges and seed == ranges[-1][1] + 1:
            ranges[-1][1] = seed
        else:
            ranges.append([seed, seed])
    return ", ".join(str(first) if first == last else f"{first}-{last}" for first, last in ranges)


def plot(path: Path, trace: Trace, seeds: Sequence[int], results: dict[str, PolicyResult]) -> None:
    """Allocation ratio against arrived workload, one line per policy (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    percent = CURVE_POINTS * 100
    axes.plot(percent, np.minimum(percent, 100), color="0.75", linestyle=":", label="arrived (upper bound)")
    for policy, result in results.items():
        axes.plot(percent, result.curve * 100, label=f"{policy} ({result.gpu_alloc_ratio:.1%})")
    axes.set_xlabel("arrived workload (% of cluster GPUs)")
    axes.set_ylabel("GPUs allocated (%)")
    axes.set_xlim(60, ARRIVAL_LIMIT * 100)
    axes.set_ylim(60, 100)
    axes.set_title(f"{trace.name}: {len(trace.cluster.nodes)} nodes, {trace.gpus} GPUs, seeds {describe_seeds(seeds)}")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
