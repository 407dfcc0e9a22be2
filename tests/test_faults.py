"""The fault suite (`llmos bench faults`, `make faults`) at CI size, on the shared cluster.

The full run (20 teams, 10,000 requests, the fuzzers) is `make faults`; here every fault runs once
with small counts, and the quota replay is shown to catch a violation.
"""

from __future__ import annotations

import pytest
from controllers import own_controller

from benchmarks import faults
from cluster.admin import Admin
from cluster.launcher import LocalCluster
from cluster.quota import gang_demand
from cluster.requests import DecisionAction, DecisionRecord, SubmitRequest


@pytest.fixture(scope="module")
def admin(local_cluster: LocalCluster, tmp_path_factory) -> Admin:
    with own_controller(tmp_path_factory, "faults-controller", "llmos") as admin:
        yield admin


def test_controller_sigkill_with_requests_placed_and_queued_loses_none(admin: Admin):
    fault = faults.controller_kill(admin, "research", placed=5, queued=20)
    assert fault.survived, fault.detail
    assert fault.requests_lost == 0 and "books agree with Ray" in fault.detail


def test_node_crash_under_a_running_training_gang_and_serving_replica_recovers_both(
    admin: Admin, local_cluster: LocalCluster, tmp_path
):
    # The crash, not the SIGTERM `make faults` also runs: Ray is slow to see it, and the driver must not take
    # it for a worker that died on a live node. test_training_cluster stops a node by SIGTERM under a job.
    fault = faults.node_removal(local_cluster, admin, "research", tmp_path, crash=True)
    print(fault.detail)
    assert fault.survived, fault.detail
    assert not faults.books_disagree(admin)


def test_a_training_worker_killed_mid_step_restarts_from_its_checkpoint_and_finishes(admin: Admin, tmp_path):
    fault = faults.worker_kill(admin, "research", tmp_path)
    assert fault.survived, fault.detail
    assert fault.requests_lost == 0


def test_load_from_several_teams_loses_nothing_and_never_exceeds_a_quota(admin: Admin):
    report = faults.load(admin, ["research", "interns"], 200, on_progress=print)
    assert report["load_requests"] == 200 and report["load_requests_lost"] == 0, report
    assert report["decision_log_complete"] and report["quota_decisions_checked"] > 20, report
    assert report["quota_violations"] == 0
    assert report["admission_p99_ms"] >= report["admission_p50_ms"] > 0


def test_interrupted_checkpoint_writes_leave_the_last_one_loadable(tmp_path):
    fault = faults.checkpoint_interrupted(tmp_path, kills=3)
    assert fault.survived, fault.detail


def test_a_full_checkpoint_disk_is_a_clear_error_and_corrupts_nothing(tmp_path):
    fault = faults.disk_full(tmp_path)
    if fault.detail.startswith("skipped"):
        pytest.skip(fault.detail)
    assert fault.survived, fault.detail


def _record(seq: int, request_id: str, action: DecisionAction) -> DecisionRecord:
    return DecisionRecord(seq=seq, time=0.0, request_id=request_id, action=action)


def test_the_quota_replay_catches_a_team_over_its_quota():
    request = SubmitRequest.model_validate(
        {"team": "interns", "gang": {"name": "g", "bundles": [{"resources": {"CPU": 6}}]}}
    )
    requests = {"a": request, "b": request}
    quotas = {"interns": {"cpu": 10}}
    within = [
        _record(1, "a", DecisionAction.PLACED),
        _record(2, "a", DecisionAction.RELEASED),
        _record(3, "b", DecisionAction.PLACED),
    ]
    assert faults.replay_quotas(within, requests, quotas, gang_demand) == (0, 3)
    over = [_record(1, "a", DecisionAction.PLACED), _record(2, "b", DecisionAction.PLACED)]
    assert faults.replay_quotas(over, requests, quotas, gang_demand) == (1, 2)
