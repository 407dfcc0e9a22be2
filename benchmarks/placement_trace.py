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
from pydantic import ValidationError

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


NODE_COLUMNS = ("sn", "cpu_milli", "memory_mib", "gpu", "model")


def _read_rows(path: Path, columns: tuple[str, ...], what: str) -> list[tuple[int, dict[str, str]]]:
    """The CSV's rows, each with its line number; refused unless it has a header with `columns` and a row."""
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        rows = [(reader.line_num, row) for row in reader]
        header = reader.fieldnames or []
    missing = [column for column in columns if column not in header]
    if missing or not rows:
        problem = f"no column {', '.join(missing)}" if missing else "a header but no rows"
        raise UserError(
            f"{path}: has {problem}; it needs a header with the columns {', '.join(columns)} and one row per {what}"
        )
    return rows


def _whole_number(path: Path, line: int, row: dict[str, str | None], column: str) -> int:
    text = row[column]
    if text is None:  # DictReader's value for a column a short row lacks
        raise UserError(f"{path} line {line}: {column} is missing; the row has fewer fields than the header")
    if not (text.strip().isascii() and text.strip().isdigit()):
        raise UserError(f"{path} line {line}: {column}={text!r} must be a whole number ≥ 0")
    return int(text)


def load_cluster(trace_dir: Path, nodes: int | None = None) -> ClusterSnapshot:
    """The trace's GPU nodes; with `nodes`, a synthetic cluster of that size cycling through them."""
    path = trace_dir / NODE_LIST
    if not path.is_file():
        raise UserError(f"no {NODE_LIST} in {trace_dir}; point --trace-dir at the alibaba-gpu-2023 folder")
    listed = []
    for line, row in _read_rows(path, NODE_COLUMNS, "node"):
        try:
            listed.append(
                NodeSnapshot(
                    name=row["sn"] or "",
                    pool=row["model"] or "cpu",
                    cpus=_whole_number(path, line, row, "cpu_milli") / 1000,
                    memory=_whole_number(path, line, row, "memory_mib") * MIB,
                    gpus=_whole_number(path, line, row, "gpu"),
                    gpu_type=row["model"] or None,
                )
            )
        except ValidationError as error:
            raise UserError(f"{path} line {line}: {_first_problem(error)}") from None
    if not any(node.gpus for node in listed):
        raise UserError(f"{path}: no node has a GPU (column gpu); the replay places GPU tasks, so give GPU nodes")
    if nodes is not None:
        listed = [
            listed[index % len(listed)].model_copy(update={"name": f"synthetic-node-{index:05d}"})
            for index in range(nodes)
        ]
    try:
        return ClusterSnapshot(nodes=tuple(listed))
    except ValidationError as error:  # a node name listed twice
        raise UserError(f"{path}: {_first_problem(error)}") from None


def _first_problem(error: ValidationError) -> str:
    first = error.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    return f"{'.'.join(str(part) for part in first['loc'])}: {message}".removeprefix(": ")


def _bundle(path: Path, line: int, row: dict[str, str]) -> Bundle:
    cpu_milli, memory_mib, gpus, gpu_milli = (_whole_number(path, line, row, column) for column in POD_COLUMNS)
    share = gpu_milli / 1000
    resources = {"CPU": cpu_milli / 1000, "memory": memory_mib * MIB}
    if gpus:
        resources["GPU"] = share if gpus == 1 and share < 1 else float(gpus)
    spec = row.get("gpu_spec") or ""
    try:
        return Bundle(resources=resources, gpu_types=tuple(spec.split("|")) if spec else None)
    except ValidationError as error:  # a task that asks for nothing at all
        raise UserError(f"{path} line {line}: {_first_problem(error)}; fix or remove the row") from None


def load_trace(trace: str, trace_dir: Path, nodes: int | None = None) -> Trace:
    path = pod_list_path(trace, trace_dir)
    cluster = load_cluster(trace_dir, nodes)
    rows = _read_rows(path, POD_COLUMNS, "task")
    keys = [(*(row[column] for column in POD_COLUMNS), row.get("gpu_spec") or "") for _, row in rows]
    shape_of_key: dict[tuple[str, ...], int] = {}
    requests: list[GangRequest] = []
    for key, (line, row) in zip(keys, rows, strict=True):
        if key not in shape_of_key:
            shape_of_key[key] = len(requests)
            requests.append(GangRequest(name=f"shape-{len(requests)}", bundles=(_bundle(path, line, row),)))
    task_shape = np.array([shape_of_key[key] for key in keys], dtype=np.int64)
    demands = [request.bundles[0].demand for request in requests]
    request_gpus = np.array([demand.gpu_total for demand in demands], dtype=np.float64) / UNITS
    if not request_gpus[task_shape].any():
        # Tasks arrive until their GPU request reaches 130% of the cluster's GPUs: never, without a GPU task.
        raise UserError(
            f"--trace {path}: no task asks for a GPU (num_gpu is 0 on every row); give a pod list with GPU tasks"
        )
    counts = Counter(TaskShape.of(demands[shape]) for shape in task_shape)
    return Trace(
        name=path.stem.removeprefix(POD_LIST_PREFIX),
        cluster=cluster,
        gpus=sum(node.gpus for node in cluster.nodes),
        requests=tuple(requests),
        request_gpus=request_gpus,
        task_shape=task_shape,
        workload=TargetWorkload.from_counts(counts),
    )
