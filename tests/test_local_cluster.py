"""The local cluster is a real multi-node Ray cluster that declares each pool's resources and labels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from waiting import WAIT_S, wait_for

from cluster.console import UserError
from cluster.inventory import read_nodes
from cluster.launcher import WORKER_START_ATTEMPTS, LocalCluster, _group_members, free_port
from cluster.ray_mapping import NODE_LABEL, POOL_LABEL
from cluster.spec import ClusterSpec, load_spec

EXAMPLE_SPEC = Path(__file__).resolve().parents[1] / "examples" / "cluster.yaml"


@ray.remote(num_cpus=1)
class WhereAmI:
    def labels(self) -> dict:
        return dict(ray.get_runtime_context().get_node_labels())


def test_ray_sees_each_nodes_declared_resources_and_labels(local_cluster: LocalCluster):
    by_name = {node.name: node for node in read_nodes() if node.alive}
    assert set(by_name) == {node.name for node in local_cluster.record.nodes}
    for started in local_cluster.record.nodes:
        seen = by_name[started.name]
        declared = started.declaration
        for key, amount in declared["resources"].items():
            assert seen.resources_total.get(key, 0) == pytest.approx(amount), (started.name, key)
        for key, value in declared["labels"].items():
            assert seen.labels.get(key) == value, (started.name, key)
    assert by_name["h100-0"].resources_total["GPU"] == 8
    assert by_name["h100-0"].labels["ray.io/accelerator-type"] == "H100"
    assert by_name["tpu-v5p-s0-h0"].resources_total["TPU-v5p-16-head"] == 1
    assert "TPU-v5p-16-head" not in by_name["tpu-v5p-s0-h1"].resources_total


@pytest.mark.parametrize("pool", ["cpu", "a100", "tpu-v5p"])
def test_actor_with_pool_label_selector_lands_on_that_pool(local_cluster: LocalCluster, pool: str):
    actor = WhereAmI.options(label_selector={POOL_LABEL: pool}).remote()
    try:
        labels = ray.get(actor.labels.remote(), timeout=WAIT_S)
    finally:
        ray.kill(actor)
    assert labels[POOL_LABEL] == pool
    assert labels[NODE_LABEL] in {node.name for node in local_cluster.record.nodes if node.pool == pool}


def test_status_reads_free_resources_from_the_live_cluster(local_cluster: LocalCluster):
    group = placement_group([{"GPU": 3}], bundle_label_selector=[{POOL_LABEL: "h100"}])
    assert group.wait(WAIT_S)
    try:
        env = {**os.environ, "LLMOS_HOME": str(local_cluster.home)}

        def h100_free_gpus():
            out = subprocess.run(
                [sys.executable, "-m", "cluster.cli", "status", "--json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            ).stdout
            pools = {pool["name"]: pool for pool in json.loads(out)["pools"]}
            return pools["h100"]["free"]["GPU"], pools["h100"]["total"]["GPU"], pools

        free, total, pools = h100_free_gpus()
        assert (free, total) == (5, 8)
        assert pools["tpu-v5p"]["nodes_alive"] == 2 and pools["tpu-v5p"]["total"]["TPU"] == 8
    finally:
        remove_placement_group(group)


def test_every_node_keeps_its_files_in_a_temp_dir_of_its_own(local_cluster: LocalCluster):
    # As on machines of their own: Ray unpacks a job's working_dir on every node at once, into its temp dir.
    temp_dirs = {}
    for node in local_cluster.record.nodes:
        args = Path(f"/proc/{node.pid}/cmdline").read_bytes().split(b"\0")
        temp_dirs[node.name] = Path(args[args.index(b"--temp-dir") + 1].decode())
    assert len(temp_dirs) > 1 and len(set(temp_dirs.values())) == len(temp_dirs)
    for name, temp_dir in temp_dirs.items():
        assert temp_dir.is_relative_to(local_cluster.record.temp_dir) and (temp_dir / "session_latest").is_dir(), name


def test_add_and_remove_a_node(local_cluster: LocalCluster):
    (added,) = local_cluster.add_replica("cpu")
    assert added.name == "cpu-1"
    wait_for(lambda: any(n.name == "cpu-1" and n.alive for n in read_nodes()), what="cpu-1 to join")
    local_cluster.remove_node("cpu-1")
    assert _group_members(added.pid) == []
    wait_for(lambda: all(not n.alive for n in read_nodes() if n.name == "cpu-1"), what="cpu-1 to be dead")
    assert all(local_cluster.node_alive(node.name) for node in local_cluster.record.nodes)


class StartKiller(threading.Thread):
    """Kills the `ray start` of the first `times` attempts to start `name`, the moment each is spawned.

    A real fault in the window a node is most fragile: its start dies before Ray says it runs.
    """

    def __init__(self, cluster: LocalCluster, name: str, times: int):
        super().__init__(daemon=True)
        self.cluster, self.name, self.times = cluster, name, times
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self):
        while len(self.killed) < self.times and not self.stop.is_set():
            for node in list(self.cluster.record.nodes):
                if node.name == self.name and node.pid not in self.killed:
                    os.kill(node.pid, signal.SIGKILL)
                    self.killed.append(node.pid)
            time.sleep(0.02)


def test_a_node_whose_start_dies_is_started_again(local_cluster: LocalCluster):
    killer = StartKiller(local_cluster, "cpu-1", times=1)
    killer.start()
    progress: list[str] = []
    try:
        (added,) = local_cluster.add_replica("cpu", on_progress=progress.append)
    finally:
        killer.stop.set()
        killer.join(timeout=WAIT_S)
    try:
        assert len(killer.killed) == 1 and added.pid != killer.killed[0]
        assert _group_members(killer.killed[0]) == []
        assert [node.name for node in local_cluster.record.nodes].count("cpu-1") == 1
        assert progress == [
            f"node cpu-1 exited during start (code -9); starting it again (attempt 2 of {WORKER_START_ATTEMPTS})"
        ]
        wait_for(lambda: any(n.name == "cpu-1" and n.alive for n in read_nodes()), what="cpu-1 to join")
        log = Path(added.log_path).read_text()
        assert "attempt 1 to start cpu-1" in log and "attempt 2 to start cpu-1" in log
    finally:
        local_cluster.remove_node("cpu-1")
    wait_for(lambda: all(not n.alive for n in read_nodes() if n.name == "cpu-1"), what="cpu-1 to be dead")


def test_a_node_that_never_starts_is_refused_and_leaves_nothing_behind(local_cluster: LocalCluster):
    names_before = [node.name for node in local_cluster.record.nodes]
    killer = StartKiller(local_cluster, "cpu-1", times=WORKER_START_ATTEMPTS)
    killer.start()
    try:
        attempts = WORKER_START_ATTEMPTS
        with pytest.raises(
            UserError, match=rf"node cpu-1 exited during start \(code -9\) \(attempt {attempts} of {attempts}\)"
        ):
            local_cluster.add_replica("cpu")
    finally:
        killer.stop.set()
        killer.join(timeout=WAIT_S)
    assert len(killer.killed) == WORKER_START_ATTEMPTS
    assert all(_group_members(pid) == [] for pid in killer.killed)
    assert [node.name for node in local_cluster.record.nodes] == names_before
    assert [node.name for node in LocalCluster.attach(local_cluster.home).record.nodes] == names_before
    assert not any(n.name == "cpu-1" and n.alive for n in read_nodes())


def test_head_node_cannot_be_removed_alone(local_cluster: LocalCluster):
    with pytest.raises(UserError, match="head node cannot be removed"):
        local_cluster.remove_node("head-0")


def test_second_up_in_same_home_or_on_a_used_port_is_refused(local_cluster: LocalCluster, tmp_path):
    spec = local_cluster.spec
    with pytest.raises(UserError, match="already running"):
        LocalCluster.up(spec, home=local_cluster.home)
    with pytest.raises(UserError, match=f"port {local_cluster.record.gcs_port} on 127.0.0.2 is in use"):
        LocalCluster.up(spec, home=tmp_path, gcs_port=local_cluster.record.gcs_port, dashboard_port=free_port())
    with pytest.raises(UserError, match="--nodes-per-pool must be at least 1"):
        LocalCluster.up(spec, home=tmp_path, gcs_port=free_port("127.0.0.2"), replicas_per_pool=0)


def test_down_stops_exactly_what_up_started(local_cluster: LocalCluster, tmp_path):
    small = ClusterSpec.model_validate({"name": "small", "pools": [load_spec(EXAMPLE_SPEC).pool("cpu").model_dump()]})
    other = LocalCluster.up(small, home=tmp_path, gcs_port=free_port("127.0.0.2"), dashboard_port=free_port())
    pids = [node.pid for node in other.record.nodes]
    assert len(pids) == 2 and all(_group_members(pid) for pid in pids)
    other.down()
    assert all(_group_members(pid) == [] for pid in pids)
    assert LocalCluster.find(tmp_path) is None
    # The session's cluster, started the same way, is untouched.
    assert all(local_cluster.node_alive(node.name) for node in local_cluster.record.nodes)
    assert len([n for n in read_nodes() if n.alive]) == len(local_cluster.record.nodes)
