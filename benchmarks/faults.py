"""`llmos bench faults` (`make faults`): faults survived, requests lost, quotas under load, inputs fuzzed.

Everything runs on one real local cluster (started here on free ports, stopped at the end; the
ClusterSpec is examples/cluster.yaml with `--teams` teams instead of its three), and after every
fault the controller's books are compared with Ray's (`books_disagree`): every placed request has
its placement group on exactly the booked nodes, and no llmos group exists that the books do not
hold.

- controller SIGKILL: `placed` requests placed and `queued` waiting; the actor process is killed;
  the restarted controller must hold the same requests in the same states, with the same groups.
- node removal and node crash: a 2-worker training job (Ray Train, elastic) and a Serve replica
  running on a node whose raylet is then stopped (SIGTERM), or whose processes are all SIGKILLed at
  once: the job must resume on the nodes left and finish after one restart, the replica must be
  placed again and answer, and nothing may stay booked on the removed node.
- worker killed: a 2-worker training job (Ray Train) has one worker process SIGKILLed at step 10 or
  later: llmos restarts it on the same bookings from the newest checkpoint and it finishes.
- checkpoint write interrupted: a process writing checkpoints is SIGKILLed mid-write, again and
  again: the newest complete checkpoint must always load, and no partial one may be listed.
- disk full: checkpoints written to a 2 MiB tmpfs: a clear error naming the directory, the earlier
  checkpoint intact (skipped, and said so, where tmpfs cannot be mounted).
- load: `load_requests` requests from every team at once, in batches through the admin API, while
  a releaser finishes placed ones: none lost, and every decision in the controller's log replayed
  in order to check that no team's use ever went above its quota; admission latency and the
  controller's memory.
- fuzz: the hypothesis fuzzers of tests/test_fuzz_inputs.py (ClusterSpec, TrainingJob, ServeJob
  YAML, admin requests and call sequences), counted from hypothesis' own statistics; and
  schemathesis against a completions app deployed through the controller, from the app's own
  OpenAPI schema: no 5xx, and a valid request still answered afterwards.
- head restart: a second cluster whose GCS keeps its tables in a Redis server (Debian's
  redis-server on 127.0.0.2, started here and stopped by pid); its head node is killed and started
  again while a training job runs (2 workers, driven from a worker node): the controller's queue
  and groups, an actor on a worker node with its state, and every node must come back, the books
  agreeing with Ray, and the job must train on to its last step and end finished. Only `make
  faults` runs it: it needs a cluster of its own, and the test session's cluster is up the whole time.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.serve_load import percentile
from cluster.binding import live_groups
from cluster.requests import RequestState
from cluster.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 90.0
TRAINING_WAIT_S = 300.0
BATCH = 50


@dataclass
class Fault:
    name: str
    survived: bool
    detail: str
    requests_lost: int = 0
    seconds: float = 0.0


def books_disagree(admin) -> list[str]:
    """Where the controller's books and Ray's placement groups differ (empty when they agree)."""
    node_ids = {node.name: node.node_id for node in admin.nodes()}
    groups = live_groups()
    problems = []
    held = set()
    for status in admin.queue():
        if not status.state.holding or not status.placement_group:
            continue
        held.add(status.placement_group)
        group = groups.get(status.placement_group)
        if group is None:
            problems.append(f"{status.id} holds {status.nodes} but Ray has no group {status.placement_group}")
            continue
        placed = group.get("bundles_to_node_id") or {}
        for index, node in enumerate(status.nodes):
            if index in placed and placed[index] != node_ids.get(node):
                problems.append(f"{status.id} bundle {index}: booked on {node}, Ray put it elsewhere")
    problems += [f"Ray holds {name}, which no request in the books holds" for name in groups.keys() - held]
    return problems


def _gang(name: str, resources: dict, selector: dict | None = None, count: int = 1) -> dict:
    bundle = {"resources": resources, **({"label_selector": selector} if selector else {})}
    return {"name": name, "bundles": [bundle] * count}


def controller_kill(admin, team: str, *, placed: int = 10, queued: int = 100) -> Fault:
    """SIGKILL the controller with `placed` requests placed and `queued` waiting."""
    started = time.monotonic()
    blocker = admin.submit({"team": team, "gang": _gang("blocker", {"CPU": 1, "GPU": 8}, {"llmos.io/pool": "h100"})})
    small = admin.submit_many(
        [{"team": team, "gang": _gang(f"small-{i}", {"CPU": 0.1}, {"llmos.io/pool": "cpu"})} for i in range(placed - 1)]
    )
    waiting = admin.submit_many(
        [
            {"team": team, "gang": _gang(f"wait-{i}", {"CPU": 1, "GPU": 8}, {"llmos.io/pool": "h100"})}
            for i in range(queued)
        ]
    )
    ids = [blocker.id, *(s.id for s in small), *(s.id for s in waiting)]
    try:
        before = {s.id: (s.state, s.nodes, s.placement_group) for s in map(admin.status, ids)}
        held = sum(state.holding for state, _, _ in before.values())
        if held != placed or sum(state.waiting for state, _, _ in before.values()) != queued:
            return Fault("controller SIGKILL", False, f"setup: {held} placed, expected {placed}")
        wait_for(lambda: all(g["state"] == "CREATED" for g in live_groups().values()), WAIT_S, "groups to be created")
        groups_before = {name: g["placement_group_id"] for name, g in live_groups().items()}
        old_pid = admin.ping()["pid"]
        killed = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: _pid_or_none(admin) not in (None, old_pid), WAIT_S, "the controller to restart")
        restarted = time.monotonic() - killed
        after = {s.id: (s.state, s.nodes, s.placement_group) for s in admin.queue() if s.id in before}
        lost = len(before.keys() - after.keys())
        changed = sum(1 for request_id, kept in after.items() if kept != before[request_id])
        groups_after = {name: g["placement_group_id"] for name, g in live_groups().items()}
        problems = books_disagree(admin)
        if groups_after != groups_before:
            problems.append("placement groups changed across the restart (bound twice or lost)")
        detail = (
            f"{placed} placed + {queued} queued; back {restarted:.1f}s after the kill; {lost} lost, {changed} changed; "
            + ("; ".join(problems) or "books agree with Ray")
        )
        survived = lost == 0 and changed == 0 and not problems
        return Fault("controller SIGKILL", survived, detail, lost, time.monotonic() - started)
    finally:
        for request_id in ids:
            with contextlib.suppress(Exception):
                admin.cancel(request_id)


def _none_holding(statuses: list) -> list | None:
    return None if any(status.state.holding for status in statuses) else statuses


def _pid_or_none(admin) -> int | None:
    try:
        return admin.ping()["pid"]
    except Exception:
        return None


def _small_job(workdir: Path, name: str, team: str, **overrides):
    """The training benchmark's job made small enough for a 2-core machine: a 1-layer model, checkpoints
    every 10 steps, held-out loss once, at the last step."""
    from benchmarks.train import bench_job

    steps = overrides.get("steps", 300)
    small = {
        "model": {"layers": 1, "d_model": 32, "heads": 2, "context_length": 32},
        "batch_size_per_worker": 4,
        "steps": steps,
        "checkpoint": {"every_steps": 10, "keep_last": 2},
        "evaluation": {"every_steps": steps, "batches": 1},
        "log_every_steps": 5,
    }
    return bench_job(workdir / "jobs", name, team=team, **{**small, **overrides})


class _Trainer(threading.Thread):
    """`jobs.train.run_admitted` in a thread of this driver: the request id, last report or error."""

    def __init__(self, job, admin):
        super().__init__(daemon=True, name=f"llmos-fault-{job.name}")
        self.job, self.admin = job, admin
        self.request_id: str | None = None
        self.final = None
        self.error: str | None = None
        self.progress: list[str] = []

    def run(self) -> None:
        from jobs.train import run_admitted

        try:
            self.request_id, self.final = run_admitted(self.job, self.admin, on_progress=self.progress.append)
        except Exception as error:  # reported as the fault's detail
            self.error = f"{type(error).__name__}: {error}"

    def problems(self, restarts: int) -> list[str]:
        """What is wrong with how the job ended, expecting `restarts` restarts of its workers."""
        if self.error or self.is_alive():
            return [f"the training job did not finish: {self.error or 'still running'}"]
        details = self.admin.status(self.request_id).details
        if self.final.step != self.job.steps or details.get("restarts") != restarts:
            return [f"training ended at step {self.final.step} of {self.job.steps}, details {details}"]
        return []

    def stop(self) -> None:
        """Cancel the job's requests until this thread ends, or for WAIT_S at most: its driver answers a
        cancelled booking as a preemption, by asking again, so cancelling once is not enough."""
        deadline = time.monotonic() + WAIT_S
        while self.is_alive() and time.monotonic() < deadline:
            for status in self.admin.queue():
                if status.request.gang.name == self.job.name:
                    with contextlib.suppress(Exception):
                        self.admin.cancel(status.id)
            self.join(1.0)

    def restarted_off(self, node: str) -> list[str]:
        """What is wrong unless the job said its node left and its last attempt ran on other nodes."""
        if self.request_id is None:
            return []  # `problems` says it did not finish
        nodes = self.admin.status(self.request_id).details.get("nodes", [])
        if node in nodes or not any("left the cluster" in line for line in self.progress):
            events = [line for line in self.progress if not line.startswith("step ")]
            return [f"after {node} left, the last attempt ran on {nodes}; the job said: {events}"]
        return []


def worker_kill(admin, team: str, workdir: Path) -> Fault:
    """A Ray Train worker process SIGKILLed mid-step: the job restarts from its checkpoint and finishes."""
    from benchmarks.train import alive_worker_pids

    started = time.monotonic()
    job = _small_job(workdir, "worker-killed", team, resources={"cpus": 1, "gpus": 1, "memory": "256Mi"}, pool="h100")
    trainer = _Trainer(job, admin)
    trainer.start()
    try:
        wait_for(lambda: _training_on(admin, job.name, None, at_step=10), WAIT_S, f"{job.name} to reach step 10")
        workers = alive_worker_pids()
        victim = max(pid for pid, _ in workers)
        os.kill(victim, signal.SIGKILL)
        trainer.join(TRAINING_WAIT_S)
        problems = trainer.problems(restarts=1) + books_disagree(admin)
        lost = int(bool(trainer.error or trainer.is_alive()))
        detail = f"1 of {len(workers)} workers (pid {victim}) killed at step 10 or later: " + (
            "; ".join(problems) or f"restarted from its checkpoint and finished all {job.steps} steps; books agree"
        )
        return Fault("worker killed mid-step", not problems, detail, lost, time.monotonic() - started)
    finally:  # a job still training, or still waiting, would hold its bookings into the next fault
        trainer.stop()


def node_removal(cluster, admin, team: str, workdir: Path, *, crash: bool = False) -> Fault:
    """A training gang and a serving replica running on one node; its raylet stopped (SIGTERM), or with
    `crash` the node's processes SIGKILLed at once.

    The other cpu node is cordoned while both are placed, so the controller puts them on the added
    node; then the node goes. The training job must resume on the nodes left and finish, counting one
    restart (a crash must not first be taken for a worker that died on a live node), the replica must
    be placed again and answer, and the books must agree with Ray.
    """
    import requests as http
    from ray import serve

    from cluster.launcher import free_port
    from serving.deploy import delete, deploy

    fault = "node crash" if crash else "node removal"
    # Names of its own: the other fault's job, trained to its last step in the same workdir, would not train again.
    name = "on-crashed-node" if crash else "on-removed-node"
    started = time.monotonic()
    (node,) = cluster.add_replica("cpu")
    others = [n.name for n in admin.nodes() if n.pool == "cpu" and n.name != node.name]
    # Long enough to be mid-run when the node goes, or it never needs to resume: the node's raylet is
    # gone within NODE_STOP_TIMEOUT_S (SIGKILL after 20 s; a SIGTERMed raylet under a running job can take
    # all of it) and its workers with it, and this job trains up to ~38 steps a second here on a fast day
    # (256 tokens a step), so at most ~800 steps: 600 were all done before the node went on such a day.
    job = _small_job(
        workdir,
        name,
        team,
        steps=1500,
        workers={"min": 1, "max": 2},
        resources={"cpus": 2, "memory": "256Mi"},
        pool="cpu",
    )
    replica = _small_serve_job(workdir, f"{name}-lm", team, route_prefix=f"/{name}")
    trainer = _Trainer(job, admin)
    deployment = None
    try:
        wait_for(lambda: node.name in {n.name for n in admin.nodes()}, WAIT_S, f"{node.name} in the controller")
        for other in others:
            admin.cordon(other)
        deployment = deploy(replica, admin, port=free_port(), wait_s=WAIT_S)
        if deployment.nodes != [node.name]:
            return Fault(fault, False, f"setup: the replica went to {deployment.nodes}, not {node.name}")
        trainer.start()
        wait_for(lambda: _training_on(admin, job.name, node.name), WAIT_S, f"{job.name} to train on {node.name}")
        for other in others:
            admin.uncordon(other)
        removed = time.monotonic()
        cluster.remove_node(node.name, crash=crash)
        gone_at = _last_step(trainer.progress)
        # Asked only once the replica is booked elsewhere: the dying one may still answer for a moment.
        wait_for(
            lambda: all(_booked_off(admin.status(request_id), node.name) for request_id in deployment.requests),
            WAIT_S,
            f"the replica to be placed again off {node.name}",
        )
        answered = wait_for(lambda: _answers(http, deployment.url, replica.name), WAIT_S, "the new replica to answer")
        replica_back = time.monotonic() - removed
        trainer.join(TRAINING_WAIT_S)
        problems = books_disagree(admin)
        problems += trainer.problems(restarts=1) + trainer.restarted_off(node.name)
        lost = int(bool(trainer.error or trainer.is_alive()))
        detail = (
            f"a {job.workers.max}-worker training gang and a serving replica running on {node.name}, "
            f"{'crashed' if crash else 'stopped'} after the job reported step {gone_at} of {job.steps}: it resumed on "
            f"{', '.join(others)} and finished; the replica "
            f"was placed on {', '.join(others)} and answered {answered} {replica_back:.1f}s after the removal; "
            + ("; ".join(problems) or "books agree with Ray")
        )
        return Fault(fault, not problems, detail, lost, time.monotonic() - started)
    finally:
        trainer.stop()
        for other in others:
            with contextlib.suppress(Exception):
                admin.uncordon(other)
        if deployment is not None:
            delete(replica.name, admin)
            serve.shutdown()
        if node.name in {n.name for n in cluster.record.nodes}:
            cluster.remove_node(node.name)


def _training_on(admin, name: str, node: str | None, at_step: int = 1) -> bool:
    """Whether training job `name` runs (on `node`, if given) and its workers reported `at_step`."""
    return any(
        s.request.gang.name == name
        and s.state.holding
        and (node is None or node in s.nodes)
        and s.details.get("step", 0) >= at_step
        for s in admin.queue()
    )


def _last_step(progress: list[str]) -> int:
    """The last step a training job's progress lines reported ("step 40/600  loss ..."), 0 before any."""
    steps = [int(line.split()[1].split("/")[0]) for line in progress if line.startswith("step ")]
    return steps[-1] if steps else 0


def _booked_off(status, node: str) -> bool:
    return status.state.holding and node not in status.nodes


def _answers(http, url: str, model: str) -> int | None:
    try:
        response = http.post(url, json={"model": model, "prompt": "def f():", "max_tokens": 2}, timeout=30)
    except http.RequestException:
        return None
    return response.status_code if response.status_code == 200 else None


def _small_serve_job(workdir: Path, name: str, team: str, **overrides):
    """A ServeJob of a tiny random-weight model on one CPU of the cpu pool."""
    from serving.spec import ServeJob

    fields = {"checkpoint": str(random_weight_checkpoint(workdir / "serve")), "resources": {"cpus": 1}, "pool": "cpu"}
    return ServeJob(name=name, team=team, **{**fields, **overrides})


def random_weight_checkpoint(directory: Path, layers: int = 1, context_length: int = 64) -> Path:
    """A checkpoint of a tiny random-weight model, as jobs/ writes it, for serving that needs a model,
    not a good one (the fault suite, the serving tests); the same weights every time."""
    import torch

    from jobs.checkpoint import save_checkpoint
    from jobs.data import VOCAB_SIZE
    from jobs.model import TransformerLM
    from jobs.spec import ModelSize

    size = ModelSize(layers=layers, d_model=32, heads=2, context_length=context_length)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TransformerLM(size, VOCAB_SIZE)
    return save_checkpoint(directory, 1, {"model": model.state_dict(), "job": {"model": size.model_dump()}}, {})


@contextlib.contextmanager
def redis_server(workdir: Path):
    """Debian's redis-server on 127.0.0.2 and a free port, in memory only, stopped by its pid."""
    from cluster.launcher import free_port

    port = free_port("127.0.0.2")
    log = open(workdir / "redis.log", "wb")  # noqa: SIM115 - open while the server runs
    server = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.2", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: _accepts("127.0.0.2", port) or server.poll() is not None, 30, "redis-server to listen")
        if server.poll() is not None:
            raise RuntimeError(f"redis-server exited: {(workdir / 'redis.log').read_text()[-500:]}")
        yield f"127.0.0.2:{port}"
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _accepts(host: str, port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def head_restart(spec, workdir: Path, team: str, training_team: str, on_progress: Callable[[str], None]) -> Fault:
    """The head node killed and started again, with the GCS kept in Redis (GCS fault tolerance), while
    `training_team` trains through `ray job submit`."""
    import shutil

    import ray

    from cluster.admin import Admin
    from cluster.inventory import connect
    from cluster.launcher import temporary_cluster

    if shutil.which("redis-server") is None:
        return Fault("head restart (GCS in Redis)", False, "skipped: no redis-server (apt-get install redis-server)")
    started = time.monotonic()
    with (
        redis_server(workdir) as redis,
        temporary_cluster(spec, redis_address=redis, on_progress=on_progress) as cluster,
    ):
        connect()
        admin = Admin(state_dir=workdir / "head-restart-controller", policy="llmos")
        placed = admin.submit({"team": team, "gang": _gang("kept", {"CPU": 1}, {"llmos.io/pool": "cpu"})})
        queued = admin.submit({"team": team, "gang": _gang("waits", {"CPU": 1, "GPU": 8}, {"llmos.io/pool": "h100"})})
        blocker = admin.submit(
            {"team": team, "gang": _gang("blocker", {"CPU": 1, "GPU": 8}, {"llmos.io/pool": "h100"})}
        )
        ids = [placed.id, queued.id, blocker.id]
        wait_for(lambda: not books_disagree(admin), WAIT_S, "the groups to be bound")
        before = {s.id: (s.state, s.nodes, s.placement_group) for s in map(admin.status, ids)}
        on_worker_node = ray.remote(num_cpus=0, label_selector={"llmos.io/pool": "cpu"})(_Counter)
        workload = on_worker_node.options(name="llmos-fault-counter", namespace="llmos", lifetime="detached").remote()
        ray.get([workload.add.remote() for _ in range(3)], timeout=WAIT_S)
        job, training_id = _start_training(workdir, training_team, admin, kill_at_step=20)
        ray.shutdown()  # this driver is attached to the head node, which is about to go
        killed = time.monotonic()
        cluster.restart_head(on_progress)
        connect()
        recovered = time.monotonic()
        admin = Admin(state_dir=workdir / "head-restart-controller", policy="llmos")
        after = {s.id: (s.state, s.nodes, s.placement_group) for s in map(admin.status, ids)}
        counted = ray.get(ray.get_actor("llmos-fault-counter", namespace="llmos").add.remote(), timeout=WAIT_S)
        alive = {entry["Labels"].get("llmos.io/node") for entry in ray.nodes() if entry["Alive"]}
        problems = books_disagree(admin)
        if after != before:
            problems.append(f"the books changed: {before} -> {after}")
        if counted != 4:
            problems.append(f"the actor on a worker node lost its state (count {counted}, expected 4)")
        missing = {node.name for node in cluster.record.nodes} - alive
        if missing:
            problems.append(f"nodes not back: {sorted(missing)}")
        trained, training_problems = _training_outcome(job, admin, training_id)
        problems += training_problems
        detail = (
            f"head killed and restarted, back in {recovered - killed:.1f}s; controller queue and groups, an actor "
            f"on a worker node with its state, every node, a training job ({trained}): "
            + ("; ".join(problems) or "all back, books agree with Ray")
        )
        for request_id in ids:
            with contextlib.suppress(Exception):
                admin.cancel(request_id)
        admin.stop_controller()
        return Fault("head restart (GCS in Redis)", not problems, detail, seconds=time.monotonic() - started)


class _TrainingDriver:
    """The elastic training driver (`jobs.train.run_admitted`) in a detached actor on a worker node.

    A driver attached to the head node dies with it, and Ray Train puts its controller and its
    synchronization actor on the driver's node. On one host every raylet shares one address, and
    Ray attaches a `ray job submit` driver to the head node whatever the entrypoint's label
    selector; on a real cluster the selector moves it to a worker node, as this actor is.
    """

    def __init__(self):
        self.outcome: dict | None = None

    def run(self, job: dict) -> None:
        from cluster.admin import Admin
        from jobs.spec import TrainingJob
        from jobs.train import run_admitted

        try:
            request_id, final = run_admitted(TrainingJob.model_validate(job), Admin(), on_progress=lambda line: None)
            self.outcome = {"request_id": request_id, "step": final.step}
        except Exception as error:
            self.outcome = {"error": f"{type(error).__name__}: {error}"}

    def result(self) -> dict | None:
        return self.outcome


TRAINING_DRIVER = "llmos-fault-training-driver"


def _start_training(workdir: Path, team: str, admin, kill_at_step: int) -> tuple[Any, str]:
    """A small training job on the a100 pool, driven from a worker node; returns the job and its
    request id once its workers reported `kill_at_step`."""
    import ray

    from cluster.ray_mapping import POOL_LABEL

    job = _small_job(
        workdir,
        "through-head-restart",
        team,
        model={"layers": 2, "d_model": 64, "heads": 2, "context_length": 64},
        batch_size_per_worker=8,
        steps=150,
        resources={"cpus": 1, "gpus": 1, "memory": "256Mi"},
        pool="a100",
    )
    driver_class = ray.remote(num_cpus=0, max_concurrency=2, label_selector={POOL_LABEL: "cpu"})(_TrainingDriver)
    driver = driver_class.options(name=TRAINING_DRIVER, namespace="llmos", lifetime="detached").remote()
    driver.run.remote(job.model_dump(mode="json"))

    def running():
        outcome = ray.get(driver.result.remote(), timeout=WAIT_S)
        if outcome is not None:
            raise RuntimeError(f"the training job ended before step {kill_at_step}: {outcome}")
        for status in admin.queue():
            if status.request.gang.name == job.name and status.details.get("step", 0) >= kill_at_step:
                return status.id
        return None

    return job, wait_for(running, TRAINING_WAIT_S, f"{job.name} to reach step {kill_at_step}")


def _training_outcome(job, admin, request_id: str) -> tuple[str, list[str]]:
    """How the job ended after the restart, and what went wrong (empty when nothing did)."""
    import ray

    driver = ray.get_actor(TRAINING_DRIVER, namespace="llmos")
    try:
        outcome = wait_for(lambda: ray.get(driver.result.remote(), timeout=WAIT_S), TRAINING_WAIT_S, "training to end")
    finally:
        ray.kill(driver)
    status = admin.status(request_id)
    seen = status.details.get("step")
    # Rank 0's reports sent while the controller was down are lost; the driver reports the last step itself.
    ended = f"ran through to step {outcome.get('step')}/{job.steps}; the last step the controller saw: {seen}"
    problems = []
    if "error" in outcome:
        problems.append(f"the training job failed: {outcome['error']}")
    elif outcome["step"] != job.steps or status.state is not RequestState.FINISHED:
        problems.append(f"the training request ended {status.state.value} at step {outcome['step']}")
    elif seen != job.steps:
        problems.append(f"the controller's books show step {seen}, not the last, {job.steps}")
    return ended, problems


class _Counter:
    """A workload that keeps state in a worker-node process: it must outlive the head."""

    def __init__(self):
        self.count = 0

    def add(self) -> int:
        self.count += 1
        return self.count


_WRITER = """
import sys, torch
from pathlib import Path
from jobs.checkpoint import save_checkpoint
directory = Path(sys.argv[1])
state = {"weights": torch.randn(4_000_000)}
step = int(sys.argv[2])
print("ready", flush=True)
while True:
    step += 1
    save_checkpoint(directory, step, state, {"writer": "faults"}, keep_last=3)
"""


def checkpoint_interrupted(workdir: Path, kills: int = 5) -> Fault:
    """SIGKILL a process writing checkpoints, `kills` times; the newest complete one must always load."""
    from jobs.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

    started = time.monotonic()
    directory = workdir / "interrupted"
    problems = []
    step = 0
    for attempt in range(kills):
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(directory), str(step)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        writer.stdout.readline()
        time.sleep(0.3 + 0.37 * attempt)  # a different moment of the write each time
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        latest = latest_checkpoint(directory)
        if latest is None:
            problems.append(f"kill {attempt + 1}: no complete checkpoint")
            continue
        try:
            load_checkpoint(latest)
        except Exception as error:
            problems.append(f"kill {attempt + 1}: {latest.name} does not load: {error}")
        if any(not (path / "state.pt").exists() for path in list_checkpoints(directory)):
            problems.append(f"kill {attempt + 1}: a partial checkpoint is listed")
        step = int(latest.name.rsplit("-", 1)[-1])
    detail = f"{kills} writers killed mid-write; " + ("; ".join(problems) or "the newest checkpoint always loaded")
    return Fault("checkpoint write interrupted", not problems, detail, seconds=time.monotonic() - started)


def disk_full(workdir: Path) -> Fault:
    """Checkpoints on a 2 MiB tmpfs: the write that does not fit fails clearly; the earlier one is intact."""
    import torch

    from jobs.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

    started = time.monotonic()
    mount = workdir / "tmpfs"
    mount.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        return Fault("disk full", False, f"skipped: cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        directory = mount / "checkpoints"
        save_checkpoint(directory, 1, {"weights": torch.zeros(1000)}, {})
        try:
            save_checkpoint(directory, 2, {"weights": torch.zeros(2_000_000)}, {})
            return Fault("disk full", False, "an 8 MB checkpoint was written to a 2 MiB disk")
        except CheckpointError as error:
            message = str(error)
        intact = latest_checkpoint(directory)
        clear = "no space left" in message and str(directory) in message
        loads = intact is not None and intact.name.endswith("1") and load_checkpoint(intact) is not None
        leftovers = [p.name for p in directory.iterdir() if p != intact]
        survived = clear and loads and not leftovers
        detail = f"error: {message!r}; previous checkpoint {'loads' if loads else 'BROKEN'}; leftovers {leftovers}"
        return Fault("disk full", survived, detail, seconds=time.monotonic() - started)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def load(admin, teams: list[str], total: int, on_progress: Callable[[str], None]) -> dict:
    """`total` requests from all teams at once, in batches, while placed ones are finished; quotas replayed.

    The requests still waiting are left to the caller (`run` stops the controller with them queued).
    """
    from cluster.quota import gang_demand
    from cluster.requests import DecisionAction

    per_team = total // len(teams)
    latencies: list[float] = []
    submitted: dict[str, object] = {}
    errors: list[str] = []
    lock = threading.Lock()
    log = DecisionFollower(admin)
    log.start()

    def submit_team(team: str) -> None:
        for first in range(0, per_team, BATCH):
            batch = [
                {"team": team, "gang": _gang(f"{team}-{first + i}", {"CPU": 1 if (first + i) % 3 else 2})}
                for i in range(min(BATCH, per_team - first))
            ]
            began = time.perf_counter()
            try:
                statuses = admin.submit_many(batch)
            except Exception as error:
                errors.append(f"{team}: {error}")
                return
            elapsed = (time.perf_counter() - began) * 1000
            with lock:
                latencies.extend([elapsed] * len(statuses))
                submitted.update({status.id: status.request for status in statuses})

    stop = threading.Event()

    def release_placed() -> None:
        """Finish what gets placed, so the queue keeps turning over and quotas keep being tested."""
        seen, placed = 0, []
        while not stop.is_set():
            fresh, seen = log.records[seen:], len(log.records)
            placed += [record.request_id for record in fresh if record.action is DecisionAction.PLACED]
            # A placement can be logged before its batch call returned the ids: keep it for the next round.
            ready, placed = [i for i in placed if i in submitted], [i for i in placed if i not in submitted]
            for request_id in ready:
                with contextlib.suppress(Exception):
                    admin.complete(request_id)
            time.sleep(0.1)

    releaser = threading.Thread(target=release_placed, daemon=True)
    releaser.start()
    began = time.monotonic()
    threads = [threading.Thread(target=submit_team, args=(team,)) for team in teams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    on_progress(f"load: {len(submitted)} requests accepted in {time.monotonic() - began:.1f}s")
    time.sleep(3)  # let the releaser and the scheduler turn over a few more
    stop.set()
    releaser.join()
    log.stop()
    known = {status.id for status in admin.queue(include_finished=True)}
    lost = sum(1 for request_id in submitted if request_id not in known)
    quotas = {usage.team: usage.quota for usage in admin.usage()}
    violations, checked = replay_quotas(log.records, submitted, quotas, gang_demand)
    return {
        "load_requests": len(submitted),
        "load_teams": len(teams),
        "load_requests_lost": lost,
        "load_errors": errors,
        "quota_violations": violations,
        "quota_decisions_checked": checked,
        "decision_log_complete": log.complete,
        "admission_p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "admission_p99_ms": round(percentile(latencies, 0.99), 1) if latencies else None,
        "controller_rss_mib": _rss_mib(admin.ping()["pid"]),
    }


class DecisionFollower(threading.Thread):
    """Reads the controller's decision log as it grows, so no decision is missed (the log keeps the last 10,000)."""

    def __init__(self, admin, interval_s: float = 0.1):
        super().__init__(daemon=True)
        self.admin, self.interval_s = admin, interval_s
        self.records: list = []
        self.last_seq = max((d.seq for d in admin.decisions(limit=1)), default=0)
        self.complete = True
        self.stopping = threading.Event()

    def poll(self) -> None:
        fresh = self.admin.decisions(limit=0, after_seq=self.last_seq)
        if fresh and fresh[0].seq != self.last_seq + 1:
            self.complete = False  # decisions fell off the log between two reads
        self.records.extend(fresh)
        if fresh:
            self.last_seq = fresh[-1].seq

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            with contextlib.suppress(Exception):
                self.poll()

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.poll()


def replay_quotas(records, requests: dict, quotas: dict, gang_demand) -> tuple[int, int]:
    """Replay placements and releases in decision order; count decisions after which a team was over quota."""
    from cluster.requests import DecisionAction

    holding: set[str] = set()
    used: dict[str, dict[str, float]] = {}
    violations = checked = 0
    for record in records:
        request = requests.get(record.request_id)
        if request is None:
            continue
        demand = gang_demand(request.gang)
        team = used.setdefault(request.team, {})
        if record.action is DecisionAction.PLACED and record.request_id not in holding:
            holding.add(record.request_id)
            sign = 1.0
        elif record.request_id in holding and record.action in (
            DecisionAction.RELEASED,
            DecisionAction.CANCELLED,
            DecisionAction.PREEMPTED,
            DecisionAction.REQUEUED,
        ):
            holding.discard(record.request_id)
            sign = -1.0
        else:
            continue
        for key, amount in demand.items():
            team[key] = team.get(key, 0.0) + sign * amount
        checked += 1
        quota = quotas.get(request.team, {})
        if any(team.get(key, 0.0) > limit + 1e-9 for key, limit in quota.items()):
            violations += 1
    return violations, checked


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def fuzz() -> tuple[int, int]:
    """Run the input fuzzers; (cases tried, cases that failed), from hypothesis' statistics."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/test_fuzz_inputs.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "--hypothesis-show-statistics",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    # "- 600 passing, 0 failing, and 70 invalid test cases" per phase of each test.
    counts = re.findall(r"(\d+) passing, (\d+) failing", result.stdout)
    passing = sum(int(ok) for ok, _ in counts)
    failing = sum(int(bad) for _, bad in counts)
    if result.returncode != 0 and failing == 0:
        failing = 1  # pytest failed outside hypothesis' examples: count it rather than hide it
    return passing + failing, failing


def http_fuzz(base_url: str, max_examples: int = 50, seed: int = 1) -> tuple[int, int]:
    """Schemathesis against a running completions app, from its own OpenAPI schema; (cases, failures).

    The one check is the one that matters to the replica: no 5xx, whatever the body.
    """
    # Schemathesis keeps its example database in its working dir: a scratch one, removed after.
    with tempfile.TemporaryDirectory(prefix="llmos-schemathesis-", ignore_cleanup_errors=True) as scratch:
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "st"),
                "run",
                f"{base_url}/openapi.json",
                "--url",
                base_url,
                "--checks",
                "not_a_server_error",
                "--max-examples",
                str(max_examples),
                "--seed",
                str(seed),
                "--wait-for-schema",
                "30",
            ],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=scratch,
        )
    generated = re.search(r"(\d+) generated", result.stdout)
    if generated is None:
        raise RuntimeError(f"schemathesis did not run: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    if result.returncode == 0:
        return int(generated.group(1)), 0
    failures = re.search(r"(\d+) (?:unique )?failures?", result.stdout)
    return int(generated.group(1)), int(failures.group(1)) if failures else 1


def serving_fuzz(admin, workdir: Path, team: str, max_examples: int) -> dict:
    """Deploy a small random-weight model through the controller, fuzz its API, then ask it something valid."""
    import requests
    from ray import serve

    from cluster.launcher import free_port
    from serving.deploy import delete, deploy

    job = _small_serve_job(
        workdir, "fuzzed-lm", team, limits={"max_tokens": 8, "max_prompt_bytes": 256, "max_body_bytes": 4096}
    )
    deployment = deploy(job, admin, port=free_port(), wait_s=WAIT_S)
    try:
        base = deployment.url.removesuffix("/v1/completions")
        cases, failures = http_fuzz(base, max_examples)
        valid = requests.post(
            deployment.url, json={"model": job.name, "prompt": "def f():", "max_tokens": 4}, timeout=60
        )
        return {"http_fuzz_cases": cases, "http_fuzz_failures": failures, "valid_request_after": valid.status_code}
    finally:
        delete(job.name, admin)
        serve.shutdown()


def spec_with_teams(count: int):
    """examples/cluster.yaml with `count` teams (team-00 ...), each with room for a few placements."""
    from cluster.spec import load_spec

    spec = load_spec(REPO / "examples" / "cluster.yaml")
    teams = [
        {"name": f"team-{index:02d}", "priority": "normal", "quota": {"cpu": 8, "gpu": 8}} for index in range(count)
    ]
    data = spec.model_dump(mode="json")
    data["teams"] = teams
    return type(spec).model_validate(data)


def run(
    *,
    teams: int = 20,
    load_requests: int = 10_000,
    queued: int = 100,
    placed: int = 10,
    checkpoint_kills: int = 5,
    run_fuzz: bool = True,
    http_examples: int = 100,
    on_progress: Callable[[str], None] = print,
) -> dict:
    from cluster.admin import Admin
    from cluster.launcher import temporary_cluster

    spec = spec_with_teams(teams)
    team_names = [team.name for team in spec.teams]
    faults: list[Fault] = []
    with tempfile.TemporaryDirectory(prefix="llmos-faults-", ignore_cleanup_errors=True) as scratch:
        workdir = Path(scratch)
        report_http = {"http_fuzz_cases": 0, "http_fuzz_failures": 0, "valid_request_after": None}
        for name, check in (
            ("checkpoint write interrupted", lambda: checkpoint_interrupted(workdir, checkpoint_kills)),
            ("disk full", lambda: disk_full(workdir)),
        ):
            on_progress(f"fault: {name}")
            faults.append(_guarded(name, check))
        with temporary_cluster(spec, on_progress=on_progress) as cluster:
            admin = Admin(state_dir=workdir / "controller", policy="llmos")
            on_progress(f"fault: controller SIGKILL with {placed} placed and {queued} queued")
            faults.append(
                _guarded(
                    "controller SIGKILL", lambda: controller_kill(admin, team_names[0], placed=placed, queued=queued)
                )
            )
            on_progress("fault: a training worker killed mid-step")
            faults.append(_guarded("worker killed mid-step", lambda: worker_kill(admin, team_names[0], workdir)))
            on_progress("fault: node removal under a training gang and a serving replica")
            faults.append(_guarded("node removal", lambda: node_removal(cluster, admin, team_names[0], workdir)))
            on_progress("fault: node crash under a training gang and a serving replica")
            faults.append(
                _guarded("node crash", lambda: node_removal(cluster, admin, team_names[0], workdir, crash=True))
            )
            if http_examples:
                on_progress(f"fuzz: the serving API from its OpenAPI schema ({http_examples} examples per operation)")
                try:
                    report_http = serving_fuzz(admin, workdir, team_names[0], http_examples)
                except Exception as error:  # reported, counted as a failure, and the rest still runs
                    report_http = {**report_http, "http_fuzz_failures": 1, "http_fuzz_error": f"{error}"}
            on_progress(f"load: {load_requests} requests from {teams} teams")
            report_load = load(admin, team_names, load_requests, on_progress)
            admin.stop_controller()
        on_progress("fault: head node restart with the GCS in Redis (a cluster of its own, with its own Redis)")
        faults.append(
            _guarded(
                "head restart (GCS in Redis)",
                lambda: head_restart(spec, workdir, team_names[0], team_names[1], on_progress),
            )
        )
    for fault in faults:
        on_progress(f"{'survived' if fault.survived else 'FAILED  '} {fault.name}: {fault.detail}")
    fuzz_cases, fuzz_failures = fuzz() if run_fuzz else (0, 0)
    ran = [fault for fault in faults if not fault.detail.startswith("skipped")]
    return {
        "faults_run": len(ran),
        "faults_survived": sum(fault.survived for fault in ran),
        "requests_lost": sum(fault.requests_lost for fault in faults) + report_load["load_requests_lost"],
        "fuzz_cases": fuzz_cases + report_http["http_fuzz_cases"],
        "fuzz_failures": fuzz_failures + report_http["http_fuzz_failures"],
        "input_fuzz_cases": fuzz_cases,
        **report_http,
        **report_load,
        "faults": [asdict(fault) for fault in faults],
        "not_covered": [
            "a training job whose driver runs on the head node does not survive a head restart; on one host "
            "`ray job submit` always attaches its driver there (the head restart fault drives training from a "
            "worker node)",
        ],
    }


def _guarded(name: str, check: Callable[[], Fault]) -> Fault:
    """A fault whose check itself breaks counts as not survived, with the reason."""
    started = time.monotonic()
    try:
        return check()
    except Exception as error:
        return Fault(name, False, f"{type(error).__name__}: {error}", seconds=time.monotonic() - started)
