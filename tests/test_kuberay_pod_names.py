"""A node that joins the way a KubeRay worker pod of the rendered RayCluster joins (emulated: no
Kubernetes here) is named by its pod's name, in the controller's books and in `llmos status` alike,
so `llmos drain <pod>` takes the name `kubectl get pods` shows.

KubeRay starts a worker pod's raylet with the group's Ray resources and labels, and sets
`RAY_CLOUD_INSTANCE_ID` to the pod's name and `RAY_NODE_TYPE_NAME` to the group's (from which Ray
gives the node its `ray.io/node-group` label). The pod carries no `llmos.io/node` label: its name is
not known when the manifest is rendered. The emulated pod here is one `ray start` process doing that
on the shared local cluster, stopped by its process group at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from controllers import stop_any_controller
from ray.core.generated.gcs_pb2 import GcsNodeInfo
from ray.util.placement_group import placement_group_table
from waiting import WAIT_S, wait_for

from cluster.admin import Admin
from cluster.inventory import ray_nodes, read_nodes
from cluster.launcher import LocalCluster, free_port
from cluster.ray_mapping import NODE_LABEL, RAY_NODE_GROUP_LABEL, pool_resources
from cluster.requests import RequestState
from manifests.raycluster import ray_cluster

POD_NAME = "llmos-demo-cpu-worker-x7k2p"


POD_START_ATTEMPTS = 3  # a raylet on a loaded machine can miss Ray's 30 s window to register, as in `llmos up`


@pytest.fixture
def kuberay_pod(local_cluster: LocalCluster, tmp_path: Path):
    """The rendered RayCluster's CPU worker group, started as KubeRay starts one of its pods."""
    group = next(g for g in ray_cluster(local_cluster.spec)["spec"]["workerGroupSpecs"] if g["groupName"] == "cpu")
    resources = pool_resources(local_cluster.spec.pool("cpu"))
    user_labels = {key: value for key, value in group["labels"].items() if not key.startswith("ray.io/")}
    kuberay_env = {"RAY_CLOUD_INSTANCE_ID": POD_NAME, "RAY_NODE_TYPE_NAME": group["groupName"]}
    log_path = tmp_path / "pod.log"

    def start() -> subprocess.Popen:
        args = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--block",
            "--disable-usage-stats",
            "--address",
            local_cluster.gcs_address,
            "--node-ip-address",
            local_cluster.record.head_ip,
            "--num-cpus",
            str(int(resources["CPU"])),
            "--memory",
            str(int(resources["memory"])),
            "--object-store-memory",
            str(local_cluster.record.object_store_bytes),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            "--labels",
            ",".join(f"{key}={value}" for key, value in user_labels.items()),
        ]
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                args,
                env={**os.environ, **local_cluster.client_env(), **kuberay_env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def joined() -> bool:
        return any(node.alive and node.name == POD_NAME for node in read_nodes())

    for _ in range(POD_START_ATTEMPTS):
        pod = start()
        wait_for(lambda pod=pod: pod.poll() is not None or joined(), WAIT_S, "the pod's raylet to join or exit")
        if pod.poll() is None:
            break
    else:
        pytest.fail(f"the emulated pod never joined; its log: {log_path.read_text()[-2000:]}")
    try:
        yield group
    finally:
        os.killpg(pod.pid, signal.SIGTERM)
        pod.wait(timeout=WAIT_S)
        wait_for(lambda: not joined(), WAIT_S, "the pod's node to go")


def test_a_kuberay_pod_is_named_by_its_pod_name_and_drained_by_it(
    local_cluster: LocalCluster, kuberay_pod: dict, tmp_path: Path
):
    stop_any_controller()
    admin = Admin(state_dir=tmp_path / "books", policy="bestfit")
    try:
        wait_for(lambda: POD_NAME in {node.name for node in admin.nodes()}, WAIT_S, "the pod to join the books")
        pod = next(node for node in read_nodes() if node.name == POD_NAME)  # `llmos status` names it alike
        assert pod.alive and pod.pool == "cpu" and NODE_LABEL not in pod.labels
        assert pod.labels | {"ray.io/node-id": pod.node_id} == {**kuberay_pod["labels"], "ray.io/node-id": pod.node_id}
        assert pod.labels[RAY_NODE_GROUP_LABEL] == "cpu"  # from RAY_NODE_TYPE_NAME, as on KubeRay

        admin.cordon("cpu-0")  # the CPU pool's other node: the gang can only go to the pod
        bundle = {"resources": {"CPU": 2}, "label_selector": {"llmos.io/pool": "cpu"}}
        status = admin.submit({"team": "research", "gang": {"name": "on-the-pod", "bundles": [bundle]}})
        assert status.state is RequestState.PLACED and status.nodes == [POD_NAME]
        group = ray.util.get_placement_group(status.placement_group)
        assert group.wait(WAIT_S)
        assert set(placement_group_table(group)["bundles_to_node_id"].values()) == {pod.node_id}

        assert admin.drain(POD_NAME) == [status.id]
        assert admin.status(status.id).state is not RequestState.PLACED  # nowhere to go: cpu-0 is cordoned
        admin.uncordon("cpu-0")
        wait_for(lambda: admin.status(status.id).nodes == ["cpu-0"], WAIT_S, "the gang to move to cpu-0")
    finally:
        for status in admin.queue():
            admin.cancel(status.id)
        admin.uncordon("cpu-0")
        stop_any_controller()


def test_an_instance_id_that_several_live_nodes_share_names_none_of_them():
    def info(node_id: int, instance_id: str, alive: bool = True, labels: dict | None = None) -> GcsNodeInfo:
        state = GcsNodeInfo.GcsNodeState.ALIVE if alive else GcsNodeInfo.GcsNodeState.DEAD
        return GcsNodeInfo(node_id=bytes([node_id]) * 28, instance_id=instance_id, state=state, labels=labels or {})

    nodes = ray_nodes(
        [
            info(1, "same-env"),
            info(2, "same-env"),
            info(3, POD_NAME),
            info(4, POD_NAME, alive=False),  # the pod's earlier raylet: only live nodes can share a name
            info(5, "ignored", labels={NODE_LABEL: "cpu-0"}),
        ]
    )
    assert [node.name for node in nodes] == ["010101010101", "020202020202", POD_NAME, POD_NAME, "cpu-0"]
    assert [node.alive for node in nodes] == [True, True, True, False, True]


def test_of_a_node_restarted_under_its_name_the_newest_raylet_comes_last_so_the_controller_keeps_it():
    def info(node_id: int, start_time_ms: int) -> GcsNodeInfo:
        return GcsNodeInfo(
            node_id=bytes([node_id]) * 28,
            state=GcsNodeInfo.GcsNodeState.ALIVE,  # the old raylet too, until the GCS misses its heartbeats
            start_time_ms=start_time_ms,
            labels={NODE_LABEL: "h100-0"},
        )

    for listed in ([info(1, 1000), info(2, 2000)], [info(2, 2000), info(1, 1000)]):
        nodes = ray_nodes(listed)
        assert [node.name for node in nodes] == ["h100-0", "h100-0"]
        assert {node.name: node.node_id for node in nodes}["h100-0"] == (bytes([2]) * 28).hex()
