"""Admission of a TrainingJob, without Ray: the gang it asks for, the pins it gets, the errors it shows,
and the elastic driver's decisions."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time

from waiting import wait_for

from cluster.controller import detached
from cluster.placement.request import Constraint
from cluster.placement.snapshot import NodeSnapshot
from cluster.requests import BundleBinding, RequestState, RequestStatus, SubmitRequest, WorkloadKind
from cluster.scheduler import Scheduler
from cluster.spec import ClusterSpec
from jobs.admission import WorkerPlacement, gang_request, placement_for, rejection_message, sizes_to_try
from jobs.elastic import (
    WATCH_INTERVAL_S,
    ElasticRun,
    Outcome,
    StopWhen,
    TrainingAttemptFailed,
    classify,
    format_progress,
    stop_directive,
    wants_stop,
)
from jobs.spec import TrainingJob
from jobs.train import scaling_config
from jobs.training_loop import StepReport


def job(**overrides) -> TrainingJob:
    data = {
        "name": "lm",
        "team": "research",
        "priority": "high",
        "steps": 100,
        "workers": {"min": 1, "max": 3},
        "resources": {"cpus": 2, "gpus": 1, "memory": "4Gi"},
        "pool": "h100",
    }
    data.update(overrides)
    return TrainingJob.model_validate(data)


def test_gang_is_one_books_only_bundle_per_worker_in_one_pool():
    request = gang_request(job(), 3)
    assert request.team == "research" and request.priority == "high"
    assert request.kind is WorkloadKind.TRAINING
    assert request.bind_placement_group is False
    assert request.gang.constraint is Constraint.SAME_POOL
    assert len(request.gang.bundles) == 3
    bundle = request.gang.bundles[0]
    assert bundle.resources == {"CPU": 2, "GPU": 1, "memory": 4 * 2**30}
    assert bundle.label_selector == {"llmos.io/pool": "h100"}
    by_type = gang_request(job(pool=None, accelerator_type="A100-80G", resources={"cpus": 1}), 1).gang.bundles[0]
    assert by_type.gpu_types == ("A100-80G",) and by_type.label_selector == {}
    assert "GPU" not in by_type.resources


def test_sizes_go_from_max_down_to_min():
    assert sizes_to_try(job()) == [3, 2, 1]
    assert sizes_to_try(job(workers={"min": 2, "max": 2})) == [2]


def test_each_worker_is_pinned_to_the_node_of_its_bundle():
    request = gang_request(job(), 2)
    status = RequestStatus(
        id="research-00001",
        request=request,
        priority_value=1000,
        state=RequestState.PLACED,
        bundles=[
            BundleBinding(bundle_index=0, node="h100-1", node_id="id1", pool="h100", resources={"GPU": 1}),
            BundleBinding(bundle_index=1, node="h100-0", node_id="id0", pool="h100", resources={"GPU": 1}),
        ],
        submitted_seq=1,
        submitted_at=0.0,
    )
    # By Ray's node id, which every node has: a KubeRay pod carries no llmos.io/node label.
    placement = placement_for([status])
    assert placement == WorkerPlacement(2, 2, [{"ray.io/node-id": "id1"}, {"ray.io/node-id": "id0"}])
    config = scaling_config(job(), placement)
    assert config.num_workers == 2
    assert config.label_selector == [{"ray.io/node-id": "id1"}, {"ray.io/node-id": "id0"}]
    # Books journaled before bundles kept the id pin by llmos's node name.
    for bundle in status.bundles:
        bundle.node_id = ""
    assert placement_for([status]).label_selector == [{"llmos.io/node": "h100-1"}, {"llmos.io/node": "h100-0"}]


def test_rejection_names_the_fields_and_the_fix():
    never = rejection_message(job(), 1, "can never fit this cluster: no node has 9 GPUs")
    assert "can never fit" in never and "workers.max" in never and "resources" in never and "'h100'" in never
    quota = rejection_message(job(), 3, "over the team's quota: gpu 3 > 2")
    assert "quota" in quota and "'research'" in quota and "llmos quota" in quota


def test_progress_line_shows_step_loss_rate_workers_and_restarts():
    line = format_progress(
        {"step": 40, "steps": 100, "loss": 2.5, "tokens_per_s": 1234.5, "world_size": 2, "restarts": 1}
    )
    assert line.startswith("step 40/100  loss 2.500  1,234 tok/s  2 workers") and "restarts 1" in line


def test_a_stop_directive_applies_to_its_own_attempt_only():
    now = stop_directive(3, StopWhen.NOW, "node left")
    assert wants_stop(now, 3, checkpoint_step=False)
    assert not wants_stop(now, 4, checkpoint_step=True), "a directive for an earlier attempt is stale"
    at_checkpoint = stop_directive(3, StopWhen.CHECKPOINT, "room to grow")
    assert not wants_stop(at_checkpoint, 3, checkpoint_step=False)
    assert wants_stop(at_checkpoint, 3, checkpoint_step=True)
    assert not wants_stop({"stop": None}, 3, checkpoint_step=True)


def _booking(state: RequestState, reason: str = "") -> RequestStatus:
    return RequestStatus(
        id="r-1",
        request=gang_request(job(), 1),
        priority_value=500,
        state=state,
        reason=reason,
        submitted_seq=1,
        submitted_at=0.0,
    )


def test_an_attempt_is_classified_from_how_it_ended_and_the_books():
    training = job()
    done = StepReport(
        step=training.steps,
        steps=training.steps,
        loss=1.0,
        learning_rate=0.0,
        tokens_per_s=1.0,
        tokens_seen=1,
        world_size=2,
        elapsed_s=1.0,
    )
    early = dataclasses.replace(done, step=10)
    running = _booking(RequestState.RUNNING)
    # The controller requeued it for its lost node, then wrote why it still waits.
    node_left = _booking(RequestState.PREEMPTED, "waiting: no room now").model_copy(update={"failures": 1})
    preempted = _booking(RequestState.PREEMPTED, "preempted by r-9").model_copy(update={"preemptions": 1})
    before = {"r-1": running}
    assert classify(False, done, training, [running], before) is Outcome.FINISHED
    assert classify(True, None, training, [running, node_left], before) is Outcome.NODE_LOST
    assert classify(False, early, training, [preempted], before) is Outcome.PREEMPTED
    lost_before = {"r-1": node_left}
    assert classify(False, early, training, [node_left], lost_before) is Outcome.PREEMPTED, "an old loss is no news"
    assert classify(True, None, training, [running], before) is Outcome.WORKER_FAILED
    # Taken off its nodes and placed again before the driver looked: the counts tell, not the state.
    placed_again = running.model_copy(update={"failures": 1, "nodes": ["cpu-0"]})
    assert classify(True, None, training, [placed_again], before) is Outcome.NODE_LOST
    assert classify(True, None, training, [running.model_copy(update={"preemptions": 1})], before) is Outcome.PREEMPTED
    assert classify(False, early, training, [running], before) is Outcome.STOPPED


DONE = StepReport(
    step=100, steps=100, loss=1.0, learning_rate=0.0, tokens_per_s=1.0, tokens_seen=1, world_size=1, elapsed_s=1.0
)
GROWING = ClusterSpec.model_validate(
    {
        "pools": [
            {
                "name": "h100",
                "accelerator": "gpu",
                "accelerator_type": "H100",
                "node": {"cpus": 32, "memory": "256Gi", "gpus": 8},
                "nodes": {"max": 2},
            }
        ],
        "teams": [
            {"name": "research", "priority": "normal", "quota": {"gpu": 16, "cpu": 64}},
            {"name": "prod", "priority": "high", "quota": {"gpu": 16, "cpu": 64}},
        ],
    }
)


GROWING_NODES = [
    NodeSnapshot(
        name=name,
        pool="h100",
        labels={
            "llmos.io/pool": "h100",
            "llmos.io/node": name,
            "ray.io/accelerator-type": "H100",
            "ray.io/node-id": f"ray-id-{name}",
        },
        cpus=32,
        memory=256 * 2**30,
        gpus=8,
        gpu_type="H100",
    )
    for name in ("h100-0", "h100-1")
]
WHOLE_NODE_GANG = {"name": "prod", "bundles": [{"resources": {"CPU": 1, "GPU": 8}}]}


def whole_node_job(**overrides) -> TrainingJob:
    """A job of one worker per whole H100 node, at the team's priority."""
    return job(**{"priority": None, "workers": {"min": 1, "max": 1}, "resources": {"cpus": 1, "gpus": 8}, **overrides})


class BooksAdmin:
    """The admin calls the elastic driver makes, answered by the controller's own books in process (a copy of
    each request, as the controller hands back): its decisions, without Ray."""

    def __init__(self, books: Scheduler):
        self.books = books
        self.lock = threading.Lock()  # the driver's watcher thread calls too, as on the real controller

    @classmethod
    def on_two_h100_nodes(cls) -> BooksAdmin:
        books = Scheduler(GROWING, "bestfit")
        books.set_nodes(GROWING_NODES)
        return cls(books)

    def _act(self, change, *args, **kwargs) -> RequestStatus:
        with self.lock:
            result = change(*args, **kwargs)
            self.books.schedule()
            return detached(result)

    def submit(self, request: SubmitRequest) -> RequestStatus:
        return self._act(self.books.submit, request)

    def status(self, request_id: str) -> RequestStatus:
        return self._act(self.books.get, request_id)

    def cancel(self, request_id: str) -> RequestStatus:
        return self._act(self.books.cancel, request_id)

    def complete(self, request_id: str, failed: bool = False, reason: str = "") -> RequestStatus:
        return self._act(self.books.complete, request_id, failed=failed, reason=reason)

    def mark_running(self, request_id: str, details: dict | None = None) -> RequestStatus:
        return self._act(self.books.mark_running, request_id, details)

    def report(self, request_id: str, details: dict) -> RequestStatus:
        return self._act(self.books.report, request_id, details)

    def reporter(self, request_id: str) -> None:
        return None


def answering(node_ids: list[str]):
    """Every node is alive: it answers the driver's probe at once."""
    return lambda: True


def failing_once(nodes: list[list[str]]):
    """An attempt runner whose first attempt fails (a worker process died) and the next one finishes; it
    appends each attempt's nodes to `nodes`."""

    def run_attempt(job_, placement, reporter, details) -> StepReport:
        nodes.append(details["nodes"])
        if len(nodes) == 1:
            raise TrainingAttemptFailed("a worker process died")
        return DONE

    return run_attempt


def test_the_driver_reports_the_last_step_itself_since_rank_0s_reports_may_be_lost():
    admin = BooksAdmin.on_two_h100_nodes()
    training = whole_node_job()

    def run_attempt(job_, placement, reporter, details) -> StepReport:
        return DONE  # none of rank 0's reports reached the controller (it was restarting with the head node)

    request_id, _ = ElasticRun(training, admin, run_attempt, probe_nodes=answering, on_progress=print).run()
    status = admin.status(request_id)
    assert status.state is RequestState.FINISHED
    assert (status.details["step"], status.details["steps"], status.details["attempt"]) == (100, 100, 1)


def test_a_failed_attempt_on_nodes_that_answer_restarts_on_the_same_bookings_as_one_failure():
    admin = BooksAdmin.on_two_h100_nodes()
    training = whole_node_job()
    nodes: list[list[str]] = []
    asked: list[list[str]] = []
    run_attempt = failing_once(nodes)

    def probe(node_ids: list[str]):
        asked.append(node_ids)
        return answering(node_ids)

    lines: list[str] = []
    request_id, final = ElasticRun(training, admin, run_attempt, probe_nodes=probe, on_progress=lines.append).run()
    assert nodes == [nodes[0], nodes[0]] and asked == [[f"ray-id-{nodes[0][0]}"]]
    assert final.step == training.steps
    status = admin.status(request_id)
    assert status.state is RequestState.FINISHED and status.failures == 0
    assert status.details["failures"] == 1 and status.details["restarts"] == 1
    assert any("restarting on the same nodes" in line for line in lines), lines


def test_a_failed_attempt_whose_node_does_not_answer_waits_for_the_books_and_counts_one_node_loss():
    admin = BooksAdmin.on_two_h100_nodes()
    books = admin.books
    training = whole_node_job()
    nodes: list[list[str]] = []
    run_attempt = failing_once(nodes)  # with its node, which Ray still lists

    def crashed_node(node_ids: list[str]):
        checks = itertools.count()

        def answered() -> bool:
            # Ray declares the node dead only after its health checks fail for a while: here ~2 s in.
            if next(checks) == 8:
                with admin.lock:
                    books.set_nodes([node for node in GROWING_NODES if node.name not in nodes[0]])
                    books.schedule()
            return False

        return answered

    lines: list[str] = []
    request_id, final = ElasticRun(
        training, admin, run_attempt, probe_nodes=crashed_node, on_progress=lines.append
    ).run()
    assert len(nodes) == 2 and nodes[1] != nodes[0], nodes
    assert final.step == training.steps
    status = admin.status(request_id)
    assert status.state is RequestState.FINISHED and status.failures == 1
    assert status.details["failures"] == 1 and status.details["restarts"] == 1, status.details
    assert not any("restarting on the same nodes" in line for line in lines), lines
    assert any("left the cluster" in line for line in lines), lines


def growing_once_the_node_frees(admin: BooksAdmin, before_the_checkpoint=lambda: None):
    """An attempt runner for a job of up to two whole H100 nodes while prod holds the other node: in the first
    attempt prod gives it up, the growth request gets it and the driver asks for a checkpoint, and
    `before_the_checkpoint` runs; that attempt stops at step 50 with 1 worker, the next finishes at its size.
    Returns the runner and the worker count of each attempt."""
    holder = admin.submit(SubmitRequest(team="prod", gang=WHOLE_NODE_GANG))
    sizes: list[int] = []

    def run_attempt(job_, placement, reporter, details) -> StepReport:
        sizes.append(placement.max_workers)
        if len(sizes) == 1:
            admin.complete(holder.id)
            wait_for(lambda: admin.status(details["requests"][0]).details.get("stop"), 10, "the stop directive")
            before_the_checkpoint()
            return dataclasses.replace(DONE, step=50, world_size=1)
        return dataclasses.replace(DONE, world_size=placement.max_workers)

    return run_attempt, sizes


def test_a_growth_request_taken_back_before_the_checkpoint_leaves_the_job_running_at_its_size():
    admin = BooksAdmin.on_two_h100_nodes()
    books = admin.books
    training = whole_node_job(workers={"min": 1, "max": 2})

    def take_the_node_back() -> None:
        (growth,) = [s for s in books.requests.values() if s.request.gang.name == "lm-grow"]
        with admin.lock:
            books.preempt(growth.id)
            books.submit(SubmitRequest(team="prod", gang=WHOLE_NODE_GANG))
            books.schedule()

    run_attempt, sizes = growing_once_the_node_frees(admin, before_the_checkpoint=take_the_node_back)
    request_id, final = ElasticRun(training, admin, run_attempt, probe_nodes=answering, on_progress=print).run()
    assert sizes == [1, 1] and final.step == training.steps
    assert admin.status(request_id).state is RequestState.FINISHED
    (growth,) = [s for s in books.requests.values() if s.request.gang.name == "lm-grow"]
    assert growth.state is RequestState.CANCELLED  # given back with the job, never run


def test_an_attempt_runs_where_the_books_have_its_booking_when_it_starts():
    admin = BooksAdmin.on_two_h100_nodes()
    books = admin.books
    training = whole_node_job()
    taken: list[str] = []

    def take_the_node_back(line: str) -> None:
        if line.startswith("training lm:") and not taken:  # placed; its first attempt is next
            (booking,) = [s for s in books.requests.values() if s.state.holding]
            taken.extend(booking.nodes)
            on_that_node = {**WHOLE_NODE_GANG["bundles"][0], "label_selector": {"llmos.io/node": taken[0]}}
            with admin.lock:  # prod takes that node; the job's booking is placed again on the other
                books.submit(SubmitRequest(team="prod", gang={"name": "prod", "bundles": [on_that_node]}))
                books.schedule()

    nodes: list[list[str]] = []

    def run_attempt(job_, placement, reporter, details) -> StepReport:
        nodes.append(details["nodes"])
        return dataclasses.replace(DONE, world_size=placement.max_workers)

    request_id, final = ElasticRun(
        training, admin, run_attempt, probe_nodes=answering, on_progress=take_the_node_back
    ).run()
    assert final.step == training.steps and len(nodes) == 1
    assert nodes[0] != taken, f"the attempt ran on {nodes[0]}, the node prod took"
    status = admin.status(request_id)
    assert status.state is RequestState.FINISHED and status.preemptions == 1


def test_a_stop_directive_the_controller_did_not_take_is_sent_again():
    class RestartingOnce(BooksAdmin):
        refused = False

        def report(self, request_id: str, details: dict) -> RequestStatus:
            if "stop" in details and not self.refused:
                self.refused = True
                raise ConnectionError("the controller is restarting")
            return super().report(request_id, details)

    admin = RestartingOnce.on_two_h100_nodes()
    training = whole_node_job(workers={"min": 1, "max": 2})
    run_attempt, sizes = growing_once_the_node_frees(admin)
    ElasticRun(training, admin, run_attempt, probe_nodes=answering, on_progress=print).run()
    assert admin.refused and sizes == [1, 2]


def test_a_job_grows_only_within_the_pool_it_runs_in():
    two_pools = GROWING.model_copy(
        update={
            "pools": [
                GROWING.pools[0].model_copy(
                    update={"name": name, "nodes": GROWING.pools[0].nodes.model_copy(update={"max": 1})}
                )
                for name in ("h100", "h100-b")
            ]
        }
    )
    nodes = [
        node.model_copy(update={"pool": pool, "labels": {**node.labels, "llmos.io/pool": pool}})
        for node, pool in zip(GROWING_NODES, ("h100", "h100-b"), strict=True)
    ]
    books = Scheduler(two_pools, "bestfit")
    books.set_nodes(nodes)
    admin = BooksAdmin(books)
    training = whole_node_job(pool=None, accelerator_type="H100", workers={"min": 1, "max": 2})
    pools: list[set[str]] = []

    def run_attempt(job_, placement, reporter, details) -> StepReport:
        wait_for(
            lambda: any(s.request.gang.name == "lm-grow" for s in books.requests.values()), 10, "the growth request"
        )
        time.sleep(4 * WATCH_INTERVAL_S)  # a few more polls, in which a growth placed elsewhere would stop the attempt
        pools.append({books.requests[request_id].bundles[0].pool for request_id in details["requests"]})
        return dataclasses.replace(DONE, world_size=placement.max_workers)

    ElasticRun(training, admin, run_attempt, probe_nodes=answering, on_progress=print).run()
    (growth,) = [s for s in books.requests.values() if s.request.gang.name == "lm-grow"]
    assert pools == [pools[0]] and len(pools[0]) == 1
    assert growth.request.gang.bundles[0].label_selector == {"llmos.io/pool": next(iter(pools[0]))}
    assert growth.state is RequestState.CANCELLED and not growth.bundles, "the other pool's node is not the job's"
