"""The Alibaba 2023 GPU trace ("openb") as the FGD paper uses it: nodes, tasks, and arrivals.

Reading the CSVs lives here, not in the placement engine: the engine gets a `ClusterSnapshot` and
`GangRequest`s like any other caller. See ../shared/data/alibaba-gpu-2023/README.md for the data
and for the simulator details matched here.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.console import UserError
from cluster.placement import UNITS, Bundle, ClusterSnapshot, GangRequest, NodeSnapshot, TargetWorkload, TaskShape

NODE_LIST = "openb_node_list_gpu_node.csv"
POD_LIST_PREFIX = "openb_pod_list_"
MIB = 1024**2
# The FGD procedure: submit tasks until their GPU request reaches 130% of the cluster's GPUs.
ARRIVAL_LIMIT = 1.3

POD_COLUMNS = ("cpu_milli", "memory_mib", "num_gpu", "gpu_milli")


@dataclass(frozen=True)
class Trace:
    name: str
    cluster: ClusterSnapshot
    gpus: int
    # One request per distinct task shape; `task_shape[i]` indexes the shape of task i of the pod list.
    requests: tuple[GangRequest, ...]
    request_gpus: np.ndarray  # GPUs each request asks for
    task_shape: np.ndarray
    workload: TargetWorkload  # every task shape and its frequency; FGD targets the top 95% (35 shapes)

    def arrivals(self, seed: int) -> np.ndarray:
        """Shape index of each submitted task: the pod list shuffled, then random draws from it,
        until the GPU request reaches 130% of capacity (the simulator's `tune=1.3`)."""
        rng = np.random.default_rng([seed, 1])
        order = list(self.task_shape[rng.permutation(len(self.task_shape))])
        requested = float(self.request_gpus[order].sum())
        limit = ARRIVAL_LIMIT * self.gpus
        while requested < limit:
            shape = int(self.task_shape[rng.integers(len(self.task_shape))])
            order.append(shape)
            requested += float(self.request_gpus[shape])
        # The shuffled list alone may already pass the limit on a heavy trace.
        cumulative = np.cumsum(self.request_gpus[order])
        return np.asarray(order[: int(np.searchsorted(cumulative, limit)) + 1], dtype=np.int64)


def pod_list_path(trace: str, trace_dir: Path) -> Path:
    """A trace name (`default`, `gpushare40`, ...) in the trace dir, or a path to a CSV."""
    candidate = Path(trace)
    if candidate.suffix == ".csv":
        if not candidate.is_file():
            raise UserError(f"--trace {trace}: no such file")
        return candidate
    path = trace_dir / f"{POD_LIST_PREFIX}{trace}.csv"
    if not path.is_file():
        known = sorted(p.stem.removeprefix(POD_LIST_PREFIX) for p in trace_dir.glob(f"{POD_LIST_PREFIX}*.csv"))
        raise UserError(
            f"--trace {trace}: no {path.name} in {trace_dir}; known traces: {', '.join(known) or 'none'} "
            "(or give a path to a CSV with the same columns, or --trace-dir)"
        )
    return path


def load_cluster(trace_dir: Path, nodes: int | None = None) -> ClusterSnapshot:
    """The trace's GPU nodes; with `nodes`, a synthetic cluster of that size cycling through them."""
    path = trace_dir / NODE_LIST
    if not path.is_file():
        raise UserError(f"no {NODE_LIST} in {trace_dir}; point --trace-dir at the alibaba-gpu-2023 folder")
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    if nodes is not None:
        rows = [{**rows[index % len(rows)], "sn": f"synthetic-node-{index:05d}"} for index in range(nodes)]
    return ClusterSnapshot(
        nodes=tuple(
            NodeSnapshot(
                name=row["sn"],
                pool=row["model"] or "cpu",
                cpus=int(row["cpu_milli"]) / 1000,
                memory=int(row["memory_mib"]) * MIB,
                gpus=int(row["gpu"]),
                gpu_type=row["model"] or None,
            )
            for row in rows
        )
    )


def _bundle(row: dict[str, str]) -> Bundle:
    gpus = int(row["num_gpu"])
    share = int(row["gpu_milli"]) / 1000
    resources = {"CPU": int(row["cpu_milli"]) / 1000, "memory": int(row["memory_mib"]) * MIB}
    if gpus:
        resources["GPU"] = share if gpus == 1 and share < 1 else float(gpus)
    spec = row.get("gpu_spec") or ""
    return Bundle(resources=resources, gpu_types=tuple(spec.split("|")) if spec else None)


def load_trace(trace: str, trace_dir: Path, nodes: int | None = None) -> Trace:
    path = pod_list_path(trace, trace_dir)
    cluster = load_cluster(trace_dir, nodes)
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    missing = [column for column in POD_COLUMNS if rows and column not in rows[0]]
    if not rows or missing:
        raise UserError(f"{path}: needs a header and rows with columns {', '.join(POD_COLUMNS)}; missing {missing}")
    keys = [(*(row[column] for column in POD_COLUMNS), row.get("gpu_spec") or "") for row in rows]
    shape_of_key: dict[tuple[str, ...], int] = {}
    requests: list[GangRequest] = []
    for key, row in zip(keys, rows, strict=True):
        if key not in shape_of_key:
            shape_of_key[key] = len(requests)
            requests.append(GangRequest(name=f"shape-{len(requests)}", bundles=(_bundle(row),)))
    task_shape = np.array([shape_of_key[key] for key in keys], dtype=np.int64)
    demands = [request.bundles[0].demand for request in requests]
    counts = Counter(TaskShape.of(demands[shape]) for shape in task_shape)
    return Trace(
        name=path.stem.removeprefix(POD_LIST_PREFIX),
        cluster=cluster,
        gpus=sum(node.gpus for node in cluster.nodes),
        requests=tuple(requests),
        request_gpus=np.array([demand.gpu_total for demand in demands], dtype=np.float64) / UNITS,
        task_shape=task_shape,
        workload=TargetWorkload.from_counts(counts),
    )
