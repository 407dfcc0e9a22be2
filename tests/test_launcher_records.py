"""A local cluster's record signals only processes llmos provably started.

No Ray runs here: a stand-in `ray` prints Ray's start marker and waits on a child, so each node is a
process group of two, as `ray start --block` and its raylet would be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster import launcher
from cluster.console import UserError
from cluster.launcher import (
    DEFAULT_HEAD_IP,
    LocalCluster,
    LocalClusterRecord,
    NodeProcess,
    _boot_id,
    _group_members,
    _start_ticks,
    free_port,
)
from cluster.spec import ClusterSpec, load_spec

EXAMPLE_SPEC = Path(__file__).resolve().parents[1] / "examples" / "cluster.yaml"
SMALL = ClusterSpec.model_validate({"name": "small", "pools": [load_spec(EXAMPLE_SPEC).pool("cpu").model_dump()]})
FAKE_RAY = """#!/bin/bash
sleep 300 &
echo "Ray runtime started."
wait
"""
STOP_S = 0.5  # bash leaves its child running on SIGTERM: SIGKILL of the group has to finish the job


@pytest.fixture
def fake_ray(tmp_path, monkeypatch):
    """`_spawn_node` runs the `ray` beside `sys.executable`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(FAKE_RAY)
    (bin_dir / "ray").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))


@pytest.fixture
def unrelated():
    """A process of the user's that got a pid a dead cluster's record still names."""
    process = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def _up(home: Path, progress: list[str] | None = None, replicas_per_pool: int = 1) -> LocalCluster:
    return LocalCluster.up(
        SMALL,
        home=home,
        replicas_per_pool=replicas_per_pool,
        gcs_port=free_port(DEFAULT_HEAD_IP),
        dashboard_port=free_port(),
        on_progress=(progress if progress is not None else []).append,
    )


def _write_record(home: Path, pid: int, **proof) -> str:
    """A record of a cluster whose head had `pid`; its Ray temp dir."""
    home.mkdir(parents=True, exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix="llmos-")
    record = LocalClusterRecord(
        cluster_name=SMALL.name,
        spec=SMALL.model_dump(mode="json"),
        head_ip=DEFAULT_HEAD_IP,
        gcs_port=6380,
        dashboard_port=8265,
        temp_dir=temp_dir,
        token_path=str(home / "auth_token"),
        object_store_bytes=1,
        started_at=time.time() - 86400,
        nodes=[NodeProcess(name="head-0", pool="head", pid=pid, log_path="x", declaration={}, **proof)],
    )
    # As an older llmos wrote it when there is no proof: without the fields at all.
    LocalCluster.record_path(home).write_text(record.model_dump_json(exclude_defaults=True))
    return temp_dir


STALE_PROOFS = {
    "older llmos": lambda pid: {},
    "other start time": lambda pid: {"start_ticks": _start_ticks(pid) - 1, "boot_id": _boot_id()},
    "other boot": lambda pid: {"start_ticks": _start_ticks(pid), "boot_id": "0-before-the-reboot"},
}


@pytest.mark.parametrize("proof", STALE_PROOFS.values(), ids=STALE_PROOFS.keys())
def test_down_leaves_a_process_that_reused_a_recorded_pid_alone(tmp_path, unrelated, proof):
    temp_dir = _write_record(tmp_path, unrelated.pid, **proof(unrelated.pid))
    progress: list[str] = []
    assert LocalCluster.attach(tmp_path).down(timeout_s=STOP_S, on_progress=progress.append) == 0
    time.sleep(0.2)  # a signal, had one been sent, lands
    assert unrelated.poll() is None
    assert LocalCluster.find(tmp_path) is None and not Path(temp_dir).exists()
    assert progress[0].startswith(f"not signalling head-0 (pid {unrelated.pid}): the record is stale")


def test_up_over_a_stale_record_removes_it_and_starts(tmp_path, fake_ray, unrelated):
    temp_dir = _write_record(tmp_path, unrelated.pid)
    progress: list[str] = []
    cluster = _up(tmp_path, progress)
    try:
        assert unrelated.poll() is None and not Path(temp_dir).exists()
        assert progress[0] == f"the cluster small recorded in {tmp_path} no longer runs; removing it"
        assert unrelated.pid not in [node.pid for node in cluster.record.nodes]
        assert all(cluster.node_alive(node.name) for node in cluster.record.nodes)
    finally:
        cluster.down(timeout_s=STOP_S)


def test_up_over_a_running_cluster_is_refused(tmp_path, fake_ray):
    cluster = _up(tmp_path)
    try:
        with pytest.raises(UserError, match="already running"):
            _up(tmp_path)
    finally:
        cluster.down(timeout_s=STOP_S)


def test_down_stops_the_process_groups_it_started(tmp_path, fake_ray):
    cluster = _up(tmp_path)
    pids = [node.pid for node in cluster.record.nodes]
    assert len(pids) == 2 and all(len(_group_members(pid)) == 2 for pid in pids)
    assert cluster.down(timeout_s=STOP_S) == 2
    assert all(_group_members(pid) == [] for pid in pids)
    assert LocalCluster.find(tmp_path) is None


def test_down_stops_what_is_left_of_a_group_whose_leader_died(tmp_path, fake_ray):
    cluster = _up(tmp_path)
    worker = next(node for node in cluster.record.nodes if node.pool != "head")
    # As an OOM kill would leave it: the `ray start` process gone (reaped), its raylet running on.
    os.kill(worker.pid, signal.SIGKILL)
    os.waitpid(worker.pid, 0)
    assert not cluster.node_alive(worker.name) and len(_group_members(worker.pid)) == 1
    cluster.down(timeout_s=STOP_S)
    assert _group_members(worker.pid) == []


@pytest.mark.parametrize("provable", [False, True], ids=["older llmos", "provably ours"])
def test_down_survives_a_pid_it_may_not_signal(tmp_path, monkeypatch, unrelated, provable):
    proof = {"start_ticks": _start_ticks(unrelated.pid), "boot_id": _boot_id()} if provable else {}
    _write_record(tmp_path, unrelated.pid, **proof)

    def refuse(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    with monkeypatch.context() as patch:
        patch.setattr(launcher.os, "kill", refuse)
        patch.setattr(launcher.os, "killpg", refuse)
        LocalCluster.attach(tmp_path).down(timeout_s=STOP_S)
    assert LocalCluster.find(tmp_path) is None


def test_a_start_that_fails_names_a_log_that_is_still_there(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text('#!/bin/bash\necho "the reason Ray gave, long before the tail"\nexit 1\n')
    (bin_dir / "ray").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    with pytest.raises(UserError, match="exited during start") as refused:
        _up(tmp_path / "home")
    log = Path(str(refused.value).rsplit("the whole log: ", 1)[1].strip())
    assert "the reason Ray gave" in log.read_text()
    assert LocalCluster.find(tmp_path / "home") is None  # the failed start left no record behind


def _ray_script(tmp_path: Path, monkeypatch, body: str) -> None:
    """A stand-in `ray` beside `sys.executable` running `body`; `$TIMES` is a file for it to write to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(f"#!/bin/bash\nTIMES={tmp_path / 'times'}\n{body}")
    (bin_dir / "ray").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))


def test_worker_nodes_start_several_at_once(tmp_path, monkeypatch):
    # Each worker says when its start began and when it was done (a second later); the head starts first, alone.
    _ray_script(
        tmp_path,
        monkeypatch,
        'name=$(echo "$@" | grep -o "llmos.io/node=[a-z0-9-]*" | cut -d= -f2)\n'
        'echo "$name begin $(date +%s.%N)" >> "$TIMES"\nsleep 1\necho "$name end $(date +%s.%N)" >> "$TIMES"\n'
        'sleep 300 &\necho "Ray runtime started."\nwait\n',
    )
    progress: list[str] = []
    cluster = _up(tmp_path / "home", progress, replicas_per_pool=4)
    try:
        times: dict[str, dict[str, float]] = {}
        for line in (tmp_path / "times").read_text().splitlines():
            name, event, at = line.split()
            times.setdefault(name, {})[event] = float(at)
        workers = [f"cpu-{index}" for index in range(4)]
        assert sorted(times) == sorted(["head-0", *workers])
        assert all(times["head-0"]["end"] <= times[name]["begin"] for name in workers)
        overlapping = [
            (a, b)
            for a in workers
            for b in workers
            if a < b and times[a]["begin"] < times[b]["end"] and times[b]["begin"] < times[a]["end"]
        ]
        assert overlapping  # a one-by-one start overlaps none
        assert sorted(node.name for node in cluster.record.nodes) == sorted(["head-0", *workers])
        assert sum("joined" in message for message in progress) == 4 and any("4/4" in m for m in progress)
    finally:
        cluster.down(timeout_s=STOP_S)


def test_a_worker_that_never_starts_takes_down_the_nodes_started_beside_it(tmp_path, monkeypatch):
    _ray_script(
        tmp_path,
        monkeypatch,
        'if echo "$@" | grep -q "llmos.io/node=cpu-2"; then echo "cpu-2 cannot start"; exit 1; fi\n'
        # `ray start --block` ends its raylet on SIGTERM; bash alone would leave the child for the SIGKILL.
        'sleep 300 &\nchild=$!\necho $child >> "$TIMES"\ntrap "kill $child; exit 0" TERM\n'
        'echo "Ray runtime started."\nwait\n',
    )
    with pytest.raises(UserError, match=r"node cpu-2 exited during start \(code 1\) \(attempt 3 of 3\)"):
        _up(tmp_path / "home", replicas_per_pool=4)
    assert LocalCluster.find(tmp_path / "home") is None
    children = [int(pid) for pid in (tmp_path / "times").read_text().split()]
    assert len(children) == 4  # the head and the three workers that started
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]


def test_after_a_failed_start_no_further_start_begins_and_those_under_way_stop(tmp_path, monkeypatch):
    # cpu-1 fails at once, three times; the others would take 5 s to start. Four start at a time: once cpu-1 has
    # failed for good, cpu-4 to cpu-7 must never begin, and cpu-0, cpu-2 and cpu-3 are stopped mid-start.
    _ray_script(
        tmp_path,
        monkeypatch,
        'name=$(echo "$@" | grep -o "llmos.io/node=[a-z0-9-]*" | cut -d= -f2)\necho "$name" >> "$TIMES"\n'
        'if [ "$name" = cpu-1 ]; then exit 1; fi\n'
        # As `ray start --block` ends its children on SIGTERM.
        "sleep 300 &\ntrap 'kill $(jobs -p); exit 0' TERM\n"
        'if [ "$name" != head-0 ]; then sleep 5 & wait $!; fi\necho "Ray runtime started."\nwait\n',
    )
    progress: list[str] = []
    with pytest.raises(UserError, match=r"node cpu-1 exited during start \(code 1\) \(attempt 3 of 3\)"):
        _up(tmp_path / "home", progress, replicas_per_pool=8)
    begun = (tmp_path / "times").read_text().split()
    assert sorted(set(begun)) == ["cpu-0", "cpu-1", "cpu-2", "cpu-3", "head-0"] and begun.count("cpu-1") == 3
    assert "stopping the node starts under way" in progress
    assert not any("joined" in message for message in progress)
    assert LocalCluster.find(tmp_path / "home") is None


def test_the_callers_llmos_credential_is_not_handed_to_the_nodes(tmp_path, fake_ray, monkeypatch):
    monkeypatch.setenv("LLMOS_CREDENTIAL", "team-secret")
    monkeypatch.setenv("LLMOS_CREDENTIAL_FILE", str(tmp_path / "team.cred"))
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    cluster = _up(tmp_path / "home")
    try:
        env = cluster._node_env()
        assert not [key for key in env if key.startswith("LLMOS_CREDENTIAL")]
        assert env["LLMOS_HOME"] == str(tmp_path)  # the rest of the caller's environment goes along
    finally:
        cluster.down(timeout_s=STOP_S)


def test_free_port_never_hands_out_a_port_twice_while_nodes_start_at_once():
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
