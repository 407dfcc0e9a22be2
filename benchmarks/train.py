"""`llmos bench train`: Ray Train's overhead over bare processes, and recovery from a killed worker and a lost node.

One local cluster (started here on free ports, stopped at the end) runs three measurements:

- overhead: tokens/s of the same training loop in 2 bare processes (gloo) and in 2 Ray Train workers
  admitted through the controller, same job, in interleaved rounds (and the same with 1 worker). Two
  rates each: step throughput (the loop's own timer, training steps only) and wall throughput (tokens
  between the first and last report over the time between them, so Ray's report barrier and checkpoint
  registration count). `overhead_ratio` is the wall one, the stricter, averaged over rounds.
- worker kill: the example-style job submitted with the Ray Jobs API (`python -m jobs.train`), one
  worker process SIGKILLed mid-run; seconds to the first step after the resume, at full size.
- node removal: an elastic job (`workers: {min: 1, max: 2}`) on two cpu nodes, admitted through the
  controller; the raylet of the node hosting the second worker is stopped (SIGTERM, as Kubernetes
  stops a pod); seconds to the first step with fewer workers, steps lost, and after a node is added
  back, seconds to the first step at full size again; three such cycles in the same job, every
  cycle's figures reported, with the median of each time and the most steps any cycle lost (the
  bound a checkpoint interval promises holds only if it holds in every cycle). llmos restarts both
  (`jobs.elastic`).

Each report is one line of the job's metrics JSONL (rank 0), timestamped; every figure is read from them.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from cluster.console import UserError, progress
from cluster.launcher import LocalCluster, temporary_cluster
from cluster.spec import ClusterSpec, format_memory, load_spec, parse_memory
from jobs.spec import TrainingJob

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180.0
OVERHEAD_ROUNDS = 4
NODE_REMOVAL_CYCLES = 3
BENCH_TEAM = "research"
GPU_POOL = "h100"  # the overhead and worker-kill jobs' workers: 1 CPU, 1 GPU and WORKER_MEMORY each
CPU_POOL = "cpu"  # the node-removal job's workers: NODE_REMOVAL_WORKER_CPUS and WORKER_MEMORY each
WORKER_MEMORY = "1Gi"
JOB_WORKERS = 2  # bench_job's, and so the worker-kill job's
# A cpu node has 8 in examples/cluster.yaml: room for one worker per node, so a removal takes one.
NODE_REMOVAL_WORKER_CPUS = 6
NOTE_ELASTIC = (
    "worker kill and node removal run through the controller (jobs.elastic): Ray Train ends an attempt at its "
    "first failure and llmos restarts it; the removed node's raylet gets SIGTERM, Ray marks it draining, the "
    "controller requeues the gang at once, the workers checkpoint and stop, and the job is admitted again on "
    "the nodes left; a node added back is taken by the job's queued growth request and the workers regrow at "
    "the next checkpoint step"
)


def bench_job(storage: Path, name: str, **overrides) -> TrainingJob:
    data = {
        "name": name,
        "team": BENCH_TEAM,
        "model": {"layers": 2, "d_model": 128, "heads": 4, "context_length": 128},
        "batch_size_per_worker": 8,
        "steps": 60,
        "schedule": {"warmup_steps": 5},
        "workers": {"min": JOB_WORKERS, "max": JOB_WORKERS},
        "resources": {"cpus": 1, "gpus": 1, "memory": WORKER_MEMORY},
        "pool": GPU_POOL,
        "checkpoint": {"every_steps": 60, "keep_last": 2},
        "evaluation": {"every_steps": 60, "batches": 1},
        "log_every_steps": 10,
        "storage_path": str(storage),
    }
    data.update(overrides)
    return TrainingJob.model_validate(data)


def records(job: TrainingJob) -> list[dict]:
    if not job.metrics_file.exists():
        return []
    return [json.loads(line) for line in job.metrics_file.read_text().splitlines() if line.strip()]


def throughput(job: TrainingJob) -> dict[str, float]:
    """Step and wall tokens/s of a finished run, leaving out the first report (warm-up)."""
    rows = records(job)
    steady = rows[1:]
    step_rate = statistics.median(row["tokens_per_s"] for row in steady)
    wall = (rows[-1]["tokens_seen"] - rows[0]["tokens_seen"]) / (rows[-1]["time"] - rows[0]["time"])
    return {"step_tokens_per_s": round(step_rate, 1), "wall_tokens_per_s": round(wall, 1)}


def wait_record(
    job: TrainingJob,
    predicate: Callable[[dict], bool],
    what: str,
    on_progress: Callable[[str], None],
    timeout_s: float = TIMEOUT_S,
) -> dict | None:
    """The first report of `job` that `predicate` accepts; None, and said so, after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = next((row for row in records(job) if predicate(row)), None)
        if found is not None:
            return found
        time.sleep(0.2)
    on_progress(f"{job.name}: no report of {what} within {timeout_s:.0f} s")
    return None


def write_job(job: TrainingJob, directory: Path) -> Path:
    path = directory / f"{job.name}.yaml"
    path.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    return path


def alive_worker_pids() -> list[tuple[int, str]]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True)
    return [(actor.pid, actor.node_id) for actor in actors]


def _bare_rates(storage: Path, workers: int) -> dict[str, float]:
    import torch

    from jobs.training_loop import run_bare

    bare = bench_job(storage, "overhead-bare", workers={"min": workers, "max": workers})
    # One worker trains in this process: give it the threads a Ray worker of the job gets, as the
    # spawned processes of several workers do themselves.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(bare.resources.cpus)))
    try:
        run_bare(bare, workers, resume=False, echo=False)
    finally:
        torch.set_num_threads(threads)
    return throughput(bare)


def _ray_rates(admin, storage: Path, workers: int) -> dict[str, float]:
    from jobs import train as ray_train

    on_ray = bench_job(storage, "overhead-ray", workers={"min": workers, "max": workers})
    ray_train.run_admitted(on_ray, admin, on_progress=lambda line: None)
    return throughput(on_ray)


def measure_overhead(admin, storage: Path, workers: int, on_progress, rounds: int = OVERHEAD_ROUNDS) -> dict:
    """Bare and Ray runs of the same job, interleaved (bare first, then Ray first) to cancel drift in load."""
    bare_runs, ray_runs = [], []
    for index in range(rounds):
        order = ("bare", "ray") if index % 2 == 0 else ("ray", "bare")
        for kind in order:
            directory = storage / f"overhead-{workers}w-{index}"
            if kind == "bare":
                bare_runs.append(_bare_rates(directory, workers))
            else:
                ray_runs.append(_ray_rates(admin, directory, workers))
        on_progress(
            f"overhead round {index + 1}/{rounds}, {workers} workers: bare {bare_runs[-1]['wall_tokens_per_s']:,.0f} "
            f"tok/s, Ray Train {ray_runs[-1]['wall_tokens_per_s']:,.0f} tok/s"
        )

    def mean(runs: list[dict[str, float]], key: str) -> float:
        return round(statistics.mean(run[key] for run in runs), 1)

    wall = [r["wall_tokens_per_s"] / b["wall_tokens_per_s"] for b, r in zip(bare_runs, ray_runs, strict=True)]
    step = [r["step_tokens_per_s"] / b["step_tokens_per_s"] for b, r in zip(bare_runs, ray_runs, strict=True)]
    return {
        "bare_tokens_per_s": mean(bare_runs, "wall_tokens_per_s"),
        "ray_tokens_per_s": mean(ray_runs, "wall_tokens_per_s"),
        "overhead_ratio": round(statistics.mean(wall), 3),
        "overhead_ratio_per_round": [round(ratio, 3) for ratio in wall],
        "bare_step_tokens_per_s": mean(bare_runs, "step_tokens_per_s"),
        "ray_step_tokens_per_s": mean(ray_runs, "step_tokens_per_s"),
        "step_overhead_ratio": round(statistics.mean(step), 3),
    }


def measure_worker_kill(client, storage: Path, on_progress) -> tuple[dict, TrainingJob]:
    job = bench_job(
        storage,
        "worker-kill",
        model={"layers": 1, "d_model": 64, "heads": 2, "context_length": 64},
        steps=120,
        checkpoint={"every_steps": 10, "keep_last": 2},
        evaluation={"every_steps": 60, "batches": 1},
        log_every_steps=1,
    )
    submission = client.submit_job(
        entrypoint=f"python -m jobs.train {write_job(job, storage)}", runtime_env={"working_dir": str(REPO)}
    )
    result: dict = {"worker_kill_recovery_s": None, "worker_kill_steps_lost": None, "worker_kill_workers_after": None}
    try:
        if wait_record(job, lambda row: row["step"] >= 25, "step 25", on_progress) is None:
            return result, job
        pid, _ = alive_worker_pids()[-1]
        killed_at, step_at_kill = time.time(), records(job)[-1]["step"]
        os.kill(pid, signal.SIGKILL)
        on_progress(f"worker kill: SIGKILL worker pid {pid} at step {step_at_kill}")
        resumed = wait_record(
            job, lambda row: row["resumed_from_step"] is not None, "a step after the resume", on_progress
        )
        if resumed is not None:
            result = {
                "worker_kill_recovery_s": round(resumed["time"] - killed_at, 2),
                "worker_kill_steps_lost": step_at_kill - resumed["resumed_from_step"],
                "worker_kill_workers_after": resumed["world_size"],
            }
        end = _wait_job(client, submission)
        result["worker_kill_job_status"] = end
    finally:
        _stop_job(client, submission)
    return result, job


def measure_node_removal(
    client, cluster: LocalCluster, storage: Path, on_progress, cycles: int = NODE_REMOVAL_CYCLES
) -> dict:
    """`cycles` times in one elastic job: remove the node of the second worker, time the resume on
    the node left, add a node back, time the regrowth. Each cycle's figures are kept; the headline
    times are medians, since one recovery on this shared 2-core machine varies by several seconds, and
    the headline steps lost is the most any cycle lost."""
    job = bench_job(
        storage,
        "node-removal",
        model={"layers": 1, "d_model": 32, "heads": 2, "context_length": 32},
        batch_size_per_worker=4,
        steps=5000,
        workers={"min": 1, "max": 2},
        resources={"cpus": NODE_REMOVAL_WORKER_CPUS, "memory": WORKER_MEMORY},
        pool=CPU_POOL,
        checkpoint={"every_steps": 10, "keep_last": 2},
        evaluation={"every_steps": 5000, "batches": 1},
        log_every_steps=1,
        restart_budget={"failures": cycles + 1, "preemptions": 1},
    )
    runs: list[dict] = []
    submission = client.submit_job(
        entrypoint=f"python -m jobs.train {write_job(job, storage)}", runtime_env={"working_dir": str(REPO)}
    )
    try:
        steady_from = 25
        for cycle in range(1, cycles + 1):
            full = wait_record(
                job,
                lambda row, at=steady_from: row["world_size"] == 2 and row["step"] >= at,
                f"step {steady_from} with 2 workers (cycle {cycle}/{cycles})",
                on_progress,
            )
            if full is None:
                break
            run = _remove_and_regrow(job, cluster, cycle, cycles, on_progress)
            runs.append(run)
            if run["regrow_s"] is None:
                break
            steady_from = run["grown_at_step"] + 5
    finally:
        _stop_job(client, submission)
    return _node_removal_summary(runs, job.checkpoint.every_steps)


def _remove_and_regrow(job: TrainingJob, cluster: LocalCluster, cycle: int, cycles: int, on_progress) -> dict:
    # The node added for the second worker; the cpu node the cluster started with stays.
    victim = [node.name for node in cluster.record.nodes if node.pool == CPU_POOL][-1]
    run: dict = dict.fromkeys(
        ("recovery_s", "steps_lost", "workers_before", "workers_after", "regrow_s", "grown_at_step")
    )
    removed_at = time.time()
    last_before = records(job)[-1]
    cluster.remove_node(victim)
    on_progress(f"node removal {cycle}/{cycles}: stopped {victim} at step {last_before['step']}")
    shrunk = wait_record(
        job, lambda row: row["time"] > removed_at and row["world_size"] == 1, "a step with 1 worker", on_progress
    )
    if shrunk is None:
        return run
    # The last step the 2-worker attempt reported (it may go on for a moment after the removal).
    last_step = max(
        row["step"]
        for row in records(job)
        if row["world_size"] == 2 and last_before["time"] <= row["time"] < shrunk["time"]
    )
    run.update(
        recovery_s=round(shrunk["time"] - removed_at, 2),
        steps_lost=max(0, last_step - (shrunk["resumed_from_step"] or 0)),
        workers_before=last_before["world_size"],
        workers_after=shrunk["world_size"],
    )
    on_progress(f"node removal {cycle}/{cycles}: resumed with 1 worker after {run['recovery_s']} s; adding a node back")
    added_at = time.time()
    cluster.add_replica(CPU_POOL, on_progress)
    grown = wait_record(
        job, lambda row: row["time"] > added_at and row["world_size"] == 2, "2 workers again", on_progress
    )
    if grown is not None:
        run.update(regrow_s=round(grown["time"] - added_at, 2), grown_at_step=grown["step"])
        on_progress(f"node removal {cycle}/{cycles}: 2 workers again after {run['regrow_s']} s")
    return run


def _node_removal_summary(runs: list[dict], checkpoint_interval: int) -> dict:
    """The median of each time over the cycles, and the most steps one cycle lost."""

    def median(key: str) -> float | None:
        values = [run[key] for run in runs if run[key] is not None]
        return round(statistics.median(values), 2) if values else None

    first = runs[0] if runs else {}
    lost = [run["steps_lost"] for run in runs if run["steps_lost"] is not None]
    return {
        "recovery_s": median("recovery_s"),
        "steps_lost": max(lost) if lost else None,
        "checkpoint_interval": checkpoint_interval,
        "workers_before": first.get("workers_before"),
        "workers_after": first.get("workers_after"),
        "regrow_s": median("regrow_s"),
        "node_removal_runs": [
            {key: run[key] for key in ("recovery_s", "steps_lost", "workers_after", "regrow_s")} for run in runs
        ],
    }


def _wait_job(client, submission: str, timeout_s: float = TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(submission)
        if status.is_terminal():
            return status.value
        time.sleep(0.5)
    return "TIMED_OUT"


def _stop_job(client, submission: str) -> None:
    if not client.get_job_status(submission).is_terminal():
        client.stop_job(submission)
        _wait_job(client, submission, 60)


def run(
    spec_path: Path = REPO / "examples" / "cluster.yaml",
    *,
    workers: int = 2,
    plot_path: Path | None = None,
    on_progress: Callable[[str], None] = progress,
) -> dict:
    from ray.job_submission import JobSubmissionClient

    from cluster.admin import Admin
    from cluster.inventory import connect
    from jobs.metrics import plot_loss_curve

    spec = load_spec(spec_path)
    check_spec(spec, spec_path, workers)
    on_progress("starting a local cluster for the benchmark")
    with temporary_cluster(spec, on_progress=on_progress) as cluster:
        storage = cluster.home / "jobs"
        storage.mkdir()
        connect()
        admin = Admin()
        client = JobSubmissionClient(cluster.dashboard_url)
        result = measure_overhead(admin, storage, workers, on_progress)
        on_progress(f"overhead: {json.dumps(result)}")
        if workers > 1:  # one worker each: Ray's cost without two workers and Ray's processes sharing 2 cores
            single = measure_overhead(admin, storage / "one-worker", 1, on_progress)
            result["overhead_ratio_1_worker"] = single["overhead_ratio"]
            result["step_overhead_ratio_1_worker"] = single["step_overhead_ratio"]
        kill, kill_job = measure_worker_kill(client, storage, on_progress)
        result.update(kill)
        on_progress(f"worker kill: {json.dumps(kill)}")
        cluster.add_replica(CPU_POOL, on_progress)
        removal = measure_node_removal(client, cluster, storage, on_progress)
        result.update(removal)
        on_progress(f"node removal: {json.dumps(removal)}")
        if plot_path is not None and kill_job.metrics_file.exists():
            plot_path.parent.mkdir(parents=True, exist_ok=True)
            plot_loss_curve(kill_job.metrics_file, plot_path, title="worker killed mid-run: loss continues")
    result.update(workers=workers, note=NOTE_ELASTIC)
    return result


def check_spec(spec: ClusterSpec, spec_path: Path, workers: int) -> None:
    """Refuse, before a cluster starts, a spec the benchmark cannot run on, saying what it needs and what it has."""
    gpu_workers = max(workers, JOB_WORKERS)
    memory = parse_memory(WORKER_MEMORY)
    pools = {pool.name: pool.node for pool in spec.pools}
    teams = [team.name for team in spec.teams]
    needs = []
    gpu_node = pools.get(GPU_POOL)
    if gpu_node is None or min(gpu_node.cpus, gpu_node.gpus, gpu_node.memory // memory) < gpu_workers:
        more = f", or fewer --workers than {workers}" if workers > JOB_WORKERS else ""
        needs.append(
            f"a pool {GPU_POOL!r} whose node holds {gpu_workers} workers of 1 CPU, 1 GPU and {WORKER_MEMORY}{more}"
        )
    cpu_node = pools.get(CPU_POOL)
    if cpu_node is None or not NODE_REMOVAL_WORKER_CPUS <= cpu_node.cpus < 2 * NODE_REMOVAL_WORKER_CPUS:
        needs.append(
            f"a pool {CPU_POOL!r} whose nodes have {NODE_REMOVAL_WORKER_CPUS} to {2 * NODE_REMOVAL_WORKER_CPUS - 1} "
            f"CPUs (room for one node-removal worker of {NODE_REMOVAL_WORKER_CPUS} CPUs a node)"
        )
    if BENCH_TEAM not in teams:
        needs.append(f"a team {BENCH_TEAM!r}")
    if needs:
        has = ", ".join(
            f"{name} ({node.cpus} CPUs, {node.gpus} GPUs, {format_memory(node.memory)} a node)"
            for name, node in pools.items()
        )
        raise UserError(
            f"--spec {spec_path}: the training benchmark needs {'; '.join(needs)}; "
            f"the spec has pools {has} and teams {', '.join(teams)}"
        )
