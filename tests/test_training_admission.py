"""Admission of a TrainingJob, without Ray: the gang it asks for, the pins it gets, the errors it shows,
and the elastic driver's decisions."""

from __future__ import annotations

import dataclasses

from cluster.placement.request import Constraint
from cluster.requests import BundleBinding, RequestState, RequestStatus, WorkloadKind
from jobs.admission import WorkerPlacement, gang_request, placement_for, rejection_message, sizes_to_try
from jobs.elastic import Outcome, StopWhen, classify, format_progress, stop_directive, wants_stop
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
