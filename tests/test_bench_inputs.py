"""The benchmarks' checks and cleanup that run without a cluster: specs, intervals, percentiles, and what
a failed round or fault leaves behind (the controller faked; Ray is never started here)."""

from __future__ import annotations

import socket
import sys
import tempfile
import threading
import types
from pathlib import Path

import pytest

from benchmarks import binding, faults, serve, train
from benchmarks.serve_load import percentile
from cluster.console import UserError
from cluster.spec import ClusterSpec, load_spec

EXAMPLE_SPEC = Path(__file__).resolve().parents[1] / "examples" / "cluster.yaml"


def _example_spec(change=lambda data: None) -> ClusterSpec:
    data = load_spec(EXAMPLE_SPEC).model_dump(mode="json")
    change(data)
    return ClusterSpec.model_validate(data)


def _pool(data: dict, name: str) -> dict:
    return next(pool for pool in data["pools"] if pool["name"] == name)


def _without(key: str, name: str):
    def change(data: dict) -> None:
        data[key] = [entry for entry in data[key] if entry["name"] != name]
        if key == "pools":  # and the teams whose quotas name its accelerator type
            data["teams"] = [team for team in data["teams"] if team["name"] == "research"]

    return change


def _only_cpu_pool(data: dict) -> None:
    _without("pools", "h100")(data)
    data["pools"] = [_pool(data, "cpu")]


# --- binding: the spec and --count ---


def test_binding_runs_on_the_example_spec():
    binding.check_spec(_example_spec(), EXAMPLE_SPEC, sizes=(1, 8), count=50)


@pytest.mark.parametrize(
    "change",
    [_without("pools", "cpu"), _without("teams", "research"), _only_cpu_pool],
)
def test_binding_refuses_a_spec_without_what_it_needs(change):
    with pytest.raises(UserError) as refused:
        binding.check_spec(_example_spec(change), EXAMPLE_SPEC, sizes=(8,), count=50)
    message = str(refused.value)
    assert "needs a pool named 'cpu', another pool for its two-node path, and a team named 'research'" in message
    assert "the spec has pools " in message and "teams " in message


def test_binding_refuses_more_groups_than_the_cpu_node_holds():
    # 200 groups of 8 bundles of 0.01 CPU: 16 CPUs, on a node of 8.
    with pytest.raises(UserError, match=r"--count 200: .* 16 CPUs, more than the cpu node's 8 CPUs .*give --count 100"):
        binding.check_spec(_example_spec(), EXAMPLE_SPEC, sizes=(1, 8), count=200)
    binding.check_spec(_example_spec(), EXAMPLE_SPEC, sizes=(1, 8), count=100)


def test_binding_refuses_more_groups_than_the_team_quota_holds():
    def small_quota(data: dict) -> None:
        next(team for team in data["teams"] if team["name"] == "research")["quota"]["cpu"] = 2

    with pytest.raises(UserError, match=r"--count 50: .*team research's cpu quota of 2 .*give --count 25 or less"):
        binding.check_spec(_example_spec(small_quota), EXAMPLE_SPEC, sizes=(8,), count=50)


# --- binding: what a failed round leaves ---


class _FakeAdmin:
    """The controller's request calls, remembering what was cancelled."""

    def __init__(self):
        self.cancelled: list[str] = []

    def acquire_many(self, requests: list[dict]) -> list:
        placed = types.SimpleNamespace(id="placed", bundles=[])
        waiting = types.SimpleNamespace(id="waiting", state=types.SimpleNamespace(value="queued"), reason="no room")
        return [(placed, object()), (waiting, None)]

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)


def test_an_llmos_round_that_fails_cancels_every_request_it_made():
    admin = _FakeAdmin()
    with pytest.raises(RuntimeError, match="was not placed at once"):
        binding._llmos_round(admin, size=1, count=2, batched=True, group_bundles="per_bundle")
    assert admin.cancelled == ["placed", "waiting"]


# --- train: the spec ---


def test_train_runs_on_the_example_spec():
    train.check_spec(_example_spec(), EXAMPLE_SPEC, workers=2)


@pytest.mark.parametrize(
    ("change", "workers", "need"),
    [
        (_without("pools", "h100"), 2, "a pool 'h100' whose node holds 2 workers of 1 CPU, 1 GPU and 1Gi"),
        (lambda data: None, 9, "a pool 'h100' whose node holds 9 workers of 1 CPU, 1 GPU and 1Gi, or fewer --workers"),
        (lambda data: _pool(data, "cpu")["node"].update(cpus=16), 2, "a pool 'cpu' whose nodes have 6 to 11 CPUs"),
        (_without("teams", "research"), 2, "a team 'research'"),
    ],
)
def test_train_refuses_a_spec_without_what_it_needs(change, workers: int, need: str):
    with pytest.raises(UserError) as refused:
        train.check_spec(_example_spec(change), EXAMPLE_SPEC, workers=workers)
    message = str(refused.value)
    assert f"the training benchmark needs {need}" in message
    assert "the spec has pools cpu (" in message and "teams " in message


def test_waiting_for_a_report_says_what_never_came(tmp_path: Path):
    said: list[str] = []
    job = train.bench_job(tmp_path, "never-reports")
    assert train.wait_record(job, lambda row: True, "step 25", said.append, timeout_s=0) is None
    assert said == ["never-reports: no report of step 25 within 0 s"]


# --- serve ---


def test_serve_refuses_a_missing_checkpoint_before_making_a_folder(tmp_path: Path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(UserError, match=r"--checkpoint .*nowhere: no checkpoint there"):
        serve.run(checkpoint=tmp_path / "nowhere", on_progress=lambda line: None)
    assert list(scratch.iterdir()) == []


def test_a_failed_load_generator_is_an_error_with_its_stderr():
    with socket.socket() as probe:  # a port nothing listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UserError) as refused:
        serve._load(f"http://127.0.0.1:{port}/v1/completions", "bench", concurrency=1, count=1)
    message = str(refused.value)
    assert "the load generator (benchmarks.serve_load)" in message and "failed (exit 1)" in message
    assert "ConnectionError" in message


# --- one p99 ---


def test_percentile_is_the_nearest_rank():
    assert percentile(list(range(1, 101)), 0.99) == 99
    assert percentile(list(range(64, 0, -1)), 0.99) == 64
    assert percentile(list(range(1, 10_001)), 0.99) == 9900
    assert percentile([5.0], 0.99) == 5.0
    assert percentile(list(range(1, 101)), 0.55) == 55  # not 56: 0.55 * 100 is 55.00000000000001


# --- faults: a fault that fails leaves no job training ---


def test_worker_kill_stops_its_job_when_it_never_reaches_step_10(tmp_path: Path, monkeypatch):
    cancelled = threading.Event()

    class Admin:
        def queue(self) -> list:
            if cancelled.is_set():
                return []
            status = types.SimpleNamespace(
                id="r1",
                request=types.SimpleNamespace(gang=types.SimpleNamespace(name="worker-killed")),
                state=types.SimpleNamespace(holding=True),
                nodes=["h100-0"],
                details={"step": 0},
            )
            return [status]

        def cancel(self, request_id: str) -> None:
            cancelled.set()

    def run_admitted(job, admin, on_progress):
        """Trains until its request is cancelled, as the elastic driver does."""
        if not cancelled.wait(30):
            raise AssertionError("never cancelled")
        raise RuntimeError("the request was cancelled")

    monkeypatch.setitem(sys.modules, "jobs.train", types.SimpleNamespace(run_admitted=run_admitted))
    monkeypatch.setattr(faults, "WAIT_S", 0.5)
    with pytest.raises(TimeoutError, match="worker-killed to reach step 10"):
        faults.worker_kill(Admin(), "research", tmp_path)
    assert cancelled.is_set()
    assert not [thread for thread in threading.enumerate() if thread.name == "llmos-fault-worker-killed"]


def test_the_fault_jobs_are_the_training_benchmarks_job_made_small(tmp_path: Path):
    job = faults._small_job(tmp_path, "small", "prod", steps=40, pool="cpu", resources={"cpus": 1})
    assert (job.team, job.pool, job.steps, job.evaluation.every_steps) == ("prod", "cpu", 40, 40)
    assert job.model.layers == 1 and job.storage_path == str(tmp_path / "jobs")
    assert job.workers == train.bench_job(tmp_path, "x").workers
