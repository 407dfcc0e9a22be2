"""Training on the real local cluster: admitted through the controller, pinned to the booked nodes,
submitted with `ray job submit`, and restarted from its last checkpoint after a worker is killed."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import types
from pathlib import Path

import pytest
import yaml
from controllers import own_controller
from ray.util.state import list_actors
from tiny_jobs import tiny_job
from waiting import WAIT_S, wait_for

from cluster.admin import Admin
from cluster.launcher import LocalCluster
from cluster.requests import RequestState
from jobs import train as ray_train
from jobs.spec import TrainingJob

REPO = Path(__file__).resolve().parents[1]
TRAIN_WORKER_CLASS = "RayTrainWorker"


@pytest.fixture(scope="module")
def admin(local_cluster: LocalCluster, tmp_path_factory) -> Admin:
    with own_controller(tmp_path_factory, "training-controller", "bestfit") as admin:
        yield admin


def metrics(job: TrainingJob) -> list[dict]:
    return [json.loads(line) for line in job.metrics_file.read_text().splitlines()]


def alive_train_workers() -> list:
    return list_actors(filters=[("class_name", "=", TRAIN_WORKER_CLASS), ("state", "=", "ALIVE")], detail=True)


class Watcher(threading.Thread):
    """Polls the controller (and Ray's actor table) while fit() runs in the main thread."""

    def __init__(self, admin: Admin, job_name: str, action=None):
        super().__init__(daemon=True)
        self.admin, self.job_name, self.action = admin, job_name, action
        self.progress: list[dict] = []
        self.worker_nodes: set[str] = set()
        self.booked: list[str] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def request(self):
        return next((s for s in self.admin.queue() if s.request.gang.name == self.job_name), None)

    def run(self) -> None:
        try:
            node_names = {node.node_id: node.name for node in self.admin.nodes()}
            while not self.stop.wait(0.25):
                status = self.request()
                if status is None or status.state is not RequestState.RUNNING:
                    continue
                self.booked = status.nodes
                if "step" in status.details:
                    self.progress.append(dict(status.details))
                self.worker_nodes |= {node_names.get(a.node_id, a.node_id) for a in alive_train_workers()}
                if self.action is not None and self.action(status):
                    self.action = None
        except BaseException as error:  # reported by the test, not lost in the thread
            self.error = error

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(WAIT_S)


def test_job_runs_on_exactly_the_booked_nodes_and_reports_progress(
    admin: Admin, local_cluster: LocalCluster, tmp_path: Path
):
    (extra,) = local_cluster.add_replica("cpu")
    try:
        wait_for(lambda: extra.name in {n.name for n in admin.nodes()}, what=f"{extra.name} in the controller")
        # 6 of a cpu node's 8 CPUs per worker: the two workers can only sit on two different nodes.
        lines: list[str] = []
        job = tiny_job(tmp_path, "pinned", pool="cpu", resources={"cpus": 6, "memory": "256Mi"}, steps=30)
        with Watcher(admin, job.name) as watcher:
            request_id, final = ray_train.run_admitted(job, admin, on_progress=lines.append)
        assert watcher.error is None
        assert any(line.startswith("step 30/30  loss") for line in lines), lines
        status = admin.status(request_id)
        assert status.state is RequestState.FINISHED
        booked = sorted(watcher.booked)
        assert booked == sorted({"cpu-0", extra.name})
        assert watcher.worker_nodes == set(booked)
        assert final.step == job.steps and final.world_size == 2
        # Progress reached the controller while it ran, step by step, from the rank-0 worker.
        steps_seen = [p["step"] for p in watcher.progress]
        assert steps_seen and steps_seen == sorted(steps_seen)
        assert {"loss", "tokens_per_s", "world_size", "restarts"} <= set(watcher.progress[-1])
        assert status.details["step"] == job.steps and status.details["restarts"] == 0
        # Released: nothing of it left in the books.
        assert all(request_id not in node.requests for node in admin.nodes())
        assert all(usage.used.get("cpu", 0) == 0 for usage in admin.usage() if usage.team == "research")
    finally:
        local_cluster.remove_node(extra.name)


def test_job_that_can_never_fit_is_refused_naming_the_fields(admin: Admin, tmp_path: Path, capsys):
    # Two workers of 3 GPUs each in the a100 pool: a node has 4 GPUs and the pool one node.
    job = tiny_job(tmp_path, "too-big", pool="a100", resources={"cpus": 1, "gpus": 3, "memory": "256Mi"})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    assert ray_train.main([str(path)]) == 2
    error = capsys.readouterr().err
    assert "can never fit" in error and "workers.max" in error and "resources" in error
    assert "Traceback" not in error
    over = tiny_job(tmp_path, "over-quota", team="interns", workers={"min": 1, "max": 1})
    over = over.model_copy(update={"resources": over.resources.model_copy(update={"gpus": 8})})
    path.write_text(yaml.safe_dump(over.model_dump(mode="json")))
    assert ray_train.main([str(path)]) == 2
    error = capsys.readouterr().err
    assert "quota" in error and "interns" in error and "Traceback" not in error
    assert not [s for s in admin.queue() if s.request.gang.name in ("too-big", "over-quota")]


def test_a_job_its_workers_refuse_fails_at_its_first_attempt_naming_the_field(admin: Admin, tmp_path: Path, capsys):
    # The spec takes fp16 with GPUs asked for; the local cluster's GPU pools have no CUDA, so each worker refuses.
    job = tiny_job(tmp_path, "fp16-on-cpu", precision="fp16", workers={"min": 1, "max": 1})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    assert ray_train.main([str(path)]) == 2
    out, error = capsys.readouterr()
    assert "precision: fp16 needs a CUDA GPU" in error and "Traceback" not in error, error
    (request_id,) = re.findall(r"request (\S+) placed", out)
    status = admin.status(request_id)
    assert status.state is RequestState.FAILED and "precision: fp16" in status.reason
    assert status.details["attempt"] == 1, "refused by its workers: not tried again"


def submit_training(local_cluster: LocalCluster, job: TrainingJob, tmp_path: Path):
    """`ray job submit` of `python -m jobs.train` on the job's YAML: the job client and the submission id."""
    from ray.job_submission import JobSubmissionClient

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    submission = local_cluster.submit_job(f"python -m jobs.train {path}", REPO)
    return JobSubmissionClient(local_cluster.dashboard_url), submission


def test_ray_job_submit_runs_the_entrypoint_through_the_controller(
    admin: Admin, local_cluster: LocalCluster, tmp_path: Path
):
    from ray.job_submission import JobStatus

    job = tiny_job(tmp_path, "submitted", steps=10, workers={"min": 1, "max": 1})
    client, submission = submit_training(local_cluster, job, tmp_path)
    try:
        final = wait_for(
            lambda: (s := client.get_job_status(submission)).is_terminal() and s,
            timeout_s=180,
            what="the submitted job to end",
        )
        logs = client.get_job_logs(submission)
        assert final is JobStatus.SUCCEEDED, logs[-3000:]
    finally:
        if not client.get_job_status(submission).is_terminal():
            client.stop_job(submission)
    assert "placed 1 worker on h100-0" in logs
    assert f"done: step {job.steps}/{job.steps}" in logs
    (status,) = [s for s in admin.queue(include_finished=True) if s.request.gang.name == job.name]
    assert status.state is RequestState.FINISHED and status.details["step"] == job.steps
    # Every node unpacks the job's working_dir at once; sharing one temp dir, they replaced it under a running
    # Ray Train controller, which died at start in most runs and cost the job a restart.
    assert status.details["restarts"] == 0, logs[-3000:]


def test_a_submitted_job_stopped_while_it_waits_gives_its_request_back(
    admin: Admin, local_cluster: LocalCluster, tmp_path: Path
):
    whole_h100 = [{"resources": {"CPU": 1, "GPU": 8}, "label_selector": {"llmos.io/pool": "h100"}}]
    blocker = admin.submit({"team": "prod", "gang": {"name": "holds-h100", "bundles": whole_h100}})
    assert blocker.state is RequestState.PLACED, blocker.reason
    job = tiny_job(tmp_path, "stopped-waiting", workers={"min": 1, "max": 1})
    client, submission = submit_training(local_cluster, job, tmp_path)
    try:
        waiting = wait_for(
            lambda: next((s for s in admin.queue() if s.request.gang.name == job.name), None),
            timeout_s=180,
            what="the submitted job's request",
        )
        assert waiting.state is RequestState.QUEUED, waiting
        client.stop_job(submission)
        # Ray sends the driver SIGTERM, then SIGKILL 3 s later: the driver cancels its request in between.
        ended = wait_for(lambda: (s := admin.status(waiting.id)).state.final and s, what="the request to end")
        assert ended.state is RequestState.CANCELLED, ended
    finally:
        if not client.get_job_status(submission).is_terminal():
            client.stop_job(submission)
        admin.complete(blocker.id)


def test_killed_worker_resumes_from_the_last_checkpoint_and_the_loss_curve_continues(admin: Admin, tmp_path: Path):
    job = tiny_job(
        tmp_path,
        "killed",
        model={"layers": 2, "d_model": 64, "heads": 2, "context_length": 64},
        batch_size_per_worker=8,
        steps=60,
        checkpoint={"every_steps": 10, "keep_last": 2},
        evaluation={"every_steps": 30, "batches": 1},
    )
    killed: dict = {}

    def kill_a_worker(status) -> bool:
        if status.details.get("step", 0) < 15:
            return False
        workers = alive_train_workers()
        if len(workers) < 2:
            return False
        killed["pid"], killed["step"], killed["at"] = workers[-1].pid, status.details["step"], time.time()
        os.kill(workers[-1].pid, signal.SIGKILL)
        return True

    with Watcher(admin, job.name, kill_a_worker) as watcher:
        request_id, final = ray_train.run_admitted(job, admin, on_progress=print)
    assert watcher.error is None
    assert killed, "the run ended before a worker could be killed"
    assert final.step == job.steps and final.world_size == 2
    records = metrics(job)
    resumed = [r for r in records if r["resumed_from_step"] is not None]
    assert resumed, "no report came from a resumed attempt"
    restart_step = resumed[0]["resumed_from_step"]
    before = [r for r in records if r["resumed_from_step"] is None]
    # It resumed from the last checkpoint before the kill, not from step 0 or an older one. The step
    # the watcher saw lags the workers, so the first attempt may have saved one more checkpoint before
    # the kill landed; it cannot have resumed past the last step that attempt reported.
    every = job.checkpoint.every_steps
    assert restart_step % every == 0
    assert killed["step"] // every * every <= restart_step <= before[-1]["step"]
    assert [r["step"] for r in resumed] == list(range(restart_step + 5, job.steps + 1, 5))
    # The loss curve continues: the first loss after resuming is near the one before, far below the start.
    at_restart = next(r["loss"] for r in before if r["step"] == restart_step)
    assert resumed[0]["loss"] < before[0]["loss"] - 0.5
    assert abs(resumed[0]["loss"] - at_restart) < 0.75
    status = admin.status(request_id)
    assert status.state is RequestState.FINISHED
    assert status.details["restarts"] == 1 and status.details["step"] == job.steps


def test_lost_node_shrinks_the_job_to_the_nodes_left_and_it_grows_back_at_a_checkpoint(
    admin: Admin, local_cluster: LocalCluster, tmp_path: Path
):
    (extra,) = local_cluster.add_replica("cpu")
    wait_for(lambda: extra.name in {n.name for n in admin.nodes()}, what=f"{extra.name} in the controller")
    # One worker per cpu node (6 of 8 CPUs each), at most two: cpu-0 and the added node.
    job = tiny_job(
        tmp_path,
        "elastic",
        pool="cpu",
        resources={"cpus": 6, "memory": "256Mi"},
        workers={"min": 1, "max": 2},
        model={"layers": 2, "d_model": 128, "heads": 4, "context_length": 128},
        batch_size_per_worker=8,
        steps=320,
        checkpoint={"every_steps": 20, "keep_last": 2},
        evaluation={"every_steps": 320, "batches": 1},
    )
    events: dict = {}
    lines: list[str] = []

    def remove_then_add_back(status) -> bool:
        step, workers = status.details.get("step", 0), status.details.get("world_size")
        if "removed_at" not in events and step >= 30 and workers == 2:
            events["removed_step"], events["removed_at"] = step, time.time()
            local_cluster.remove_node(extra.name)
        elif "removed_at" in events and "added" not in events and workers == 1:
            events["shrunk_step"] = step
            (events["added"],) = local_cluster.add_replica("cpu")
            events["added_at"] = time.time()
            return True
        return False

    try:
        with Watcher(admin, job.name, remove_then_add_back) as watcher:
            request_id, final = ray_train.run_admitted(
                job, admin, on_progress=lambda line: lines.append(f"{time.time():.1f} {line}")
            )
    finally:
        for node in ("added",):
            if node in events:
                local_cluster.remove_node(events[node].name)
    assert watcher.error is None
    assert "added" in events, f"the run ended before it shrank: {events}\n" + "\n".join(lines[-20:])
    records = metrics(job)
    sizes = [(r["step"], r["world_size"], r["resumed_from_step"]) for r in records]
    shrunk = [r for r in records if r["world_size"] == 1]
    regrown = [r for r in records if r["world_size"] == 2 and r["step"] > shrunk[0]["step"]]
    assert shrunk and regrown, sizes
    # Resumed with fewer workers from a checkpoint at or after the removal: the node was draining, so the
    # workers checkpointed where they stopped and no step was lost.
    resumed_at = shrunk[0]["resumed_from_step"]
    last_before = max(r["step"] for r in records if r["step"] < shrunk[0]["step"] and r["world_size"] == 2)
    assert resumed_at >= events["removed_step"] and resumed_at == last_before, sizes
    # Grew back at a checkpoint boundary: the 2-worker attempt resumed from a checkpoint of the 1-worker one.
    assert regrown[0]["resumed_from_step"] % 20 == 0 and regrown[0]["resumed_from_step"] > resumed_at, sizes
    assert final.step == job.steps and final.world_size == 2
    status = admin.status(request_id)
    assert status.state is RequestState.FINISHED
    assert status.details["failures"] == 1 and status.details["preemptions"] == 0
    assert status.details["replaced"], "the request that lost its node was replaced"
    (old,) = [admin.status(r) for r in status.details["replaced"]]
    assert "left the cluster" in old.reason and old.state.final
    assert any("growth request" in line for line in lines), lines
    assert all(usage.used.get("cpu", 0) == 0 for usage in admin.usage() if usage.team == "research")
    print("elastic timeline:", events, "\n".join(lines))


def test_directive_reads_never_wait_on_an_unanswering_controller(admin: Admin, monkeypatch):
    import ray

    monkeypatch.setattr(ray_train.LatestDetails, "UNANSWERED_S", 0.5)
    never_answers = ray.remote(num_cpus=0)(lambda: time.sleep(120)).remote()

    class Reporter:
        def __init__(self, answers):
            self.answers, self.asked = answers, 0

        def status_later(self):
            self.asked += 1
            return self.answers.pop(0)

    def answer(details: dict):
        return ray.put(types.SimpleNamespace(details=details))

    reporter = Reporter([answer({"stop": 1}), never_answers, answer({"stop": 2}), answer({"stop": 3})])
    latest = ray_train.LatestDetails(reporter)
    try:
        ray.get(reporter.answers[0])
        assert latest() == {} and reporter.asked == 1  # nothing answered yet: no directive
        assert latest() == {"stop": 1} and reporter.asked == 2
        started = time.monotonic()
        assert latest() == {"stop": 1} and reporter.asked == 2  # the question is out: no new one, no wait
        assert time.monotonic() - started < 0.25
        time.sleep(0.6)
        assert latest() == {"stop": 1} and reporter.asked == 3  # unanswered too long: asked again
        assert latest() == {"stop": 2} and reporter.asked == 4
    finally:
        ray.cancel(never_answers, force=True)
