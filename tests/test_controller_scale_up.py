"""A controller started with `--scale-up` (pools an autoscaler grows, as on KubeRay) on the shared local
cluster: a gang that fits only on nodes yet to come waits, the controller asks Ray's autoscaler for
them with Ray's own `request_resources`, and the gang lands once they join. No autoscaler runs here:
the first test reads the request Ray stores for one and plays its part, adding the node it asked for;
the second hands the same request through the GCS to the decision code of Ray's autoscaler v2 (what
KubeRay runs), given the node types a rendered RayCluster declares, and checks what it would launch;
the third lists pools none of whose nodes is up."""

from __future__ import annotations

import json
from pathlib import Path

import ray
from controllers import llmos_cli, stop_any_controller
from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
from ray._raylet import GcsClient
from ray.autoscaler.v2.instance_manager.config import NodeTypeConfig
from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
from ray.autoscaler.v2.schema import AutoscalerInstance
from ray.autoscaler.v2.sdk import get_cluster_resource_state, request_cluster_resources
from ray.core.generated.autoscaler_pb2 import NodeState
from ray.core.generated.instance_manager_pb2 import Instance, NodeKind
from ray.experimental.internal_kv import _internal_kv_get
from waiting import WAIT_S, wait_for

from cluster.admin import Admin
from cluster.inventory import declared_pools, summarize_pools
from cluster.launcher import LocalCluster
from cluster.ray_mapping import pool_labels, pool_resources, whole_node_requests
from cluster.requests import RequestState
from cluster.spec import ClusterSpec


def asked_of_the_autoscaler() -> list[dict]:
    """The standing request a (v1) autoscaler reads; v2 gets the same bundles, with their pool selectors."""
    stored = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(stored) if stored else []


def test_a_gang_waits_for_the_nodes_it_asked_the_autoscaler_for_and_lands_on_them(
    local_cluster: LocalCluster, tmp_path: Path
):
    stop_any_controller()
    admin = Admin(state_dir=tmp_path / "books", policy="bestfit", scale_up=True)
    added = []
    try:
        # Two 6-CPU bundles in the CPU pool: one node (8 CPUs) holds one, the pool may grow to 8 nodes.
        bundle = {"resources": {"CPU": 6}, "label_selector": {"llmos.io/pool": "cpu"}}
        status = admin.submit({"team": "research", "gang": {"name": "wide", "bundles": [bundle, bundle]}})
        assert status.state is RequestState.QUEUED
        assert status.reason == "waiting for the cluster to scale up: 1 more node of pool cpu"
        assert admin.ping()["scale_up_requested"] == {"cpu": 2}
        pools = {pool.name: pool for pool in admin.pools()}
        assert (pools["cpu"].nodes_alive, pools["cpu"].nodes_max) == (1, 8)
        assert (pools["tpu-v5p"].nodes_alive, pools["tpu-v5p"].nodes_max) == (2, 4)  # 2 slices of 2 hosts
        cpu_node = pool_resources(local_cluster.spec.pool("cpu"))
        assert asked_of_the_autoscaler() == [cpu_node, cpu_node]  # whole nodes, the live one included
        shown = llmos_cli(local_cluster, "controller", "status")
        assert "nodes asked of Ray's autoscaler: cpu x2" in shown.stdout, shown.stderr

        added = local_cluster.add_replica("cpu")  # the autoscaler's part
        wait_for(lambda: admin.status(status.id).state is RequestState.PLACED, WAIT_S, "the gang to be placed")
        placed = admin.status(status.id)
        assert sorted(placed.nodes) == sorted(["cpu-0", added[0].name])
        group = ray.util.get_placement_group(placed.placement_group)
        assert group.wait(WAIT_S)
        assert admin.ping()["scale_up_requested"] == {}
        assert {pool.name: pool for pool in admin.pools()}["cpu"].nodes_alive == 2
        assert asked_of_the_autoscaler() == []  # nothing held up any more: idle nodes may go again
    finally:
        for status in admin.queue():
            admin.cancel(status.id)
        stop_any_controller()
        for node in added:
            local_cluster.remove_node(node.name)


def busy_node(spec: ClusterSpec, pool_name: str, index: int) -> AutoscalerInstance:
    """A running node of the pool with nothing free, as the autoscaler sees it."""
    pool, name = spec.pool(pool_name), f"{pool_name}-{index}"
    return AutoscalerInstance(
        cloud_instance_id=name,
        im_instance=Instance(
            instance_id=name, instance_type=pool_name, status=Instance.RAY_RUNNING, node_kind=NodeKind.WORKER
        ),
        ray_node=NodeState(
            node_id=name.encode(),
            total_resources=pool_resources(pool),
            available_resources={},
            labels=pool_labels(pool),
        ),
    )


def test_rays_autoscaler_v2_launches_exactly_the_nodes_the_controller_asks_for(local_cluster: LocalCluster):
    spec = local_cluster.spec
    # KubeRay's node types: one per worker group, with the group's Ray resources and labels.
    node_types = {
        pool.name: NodeTypeConfig(
            name=pool.name,
            min_worker_nodes=0,
            max_worker_nodes=pool.replicas.max,
            resources=pool_resources(pool),
            labels=pool_labels(pool),
        )
        for pool in spec.pools
        if pool.tpu is None
    }
    live = [busy_node(spec, "h100", 0), busy_node(spec, "cpu", 0)]

    def launched(nodes_by_pool: dict[str, int]) -> dict[str, int]:
        request_cluster_resources(local_cluster.gcs_address, whole_node_requests(spec, nodes_by_pool))
        stored = get_cluster_resource_state(GcsClient(address=local_cluster.gcs_address))
        reply = ResourceDemandScheduler().schedule(
            SchedulingRequest(
                disable_launch_config_check=True,
                node_type_configs=node_types,
                cluster_resource_constraints=list(stored.cluster_resource_constraints),
                current_instances=live,
            )
        )
        assert not reply.infeasible_cluster_resource_constraints
        return {launch.instance_type: launch.count for launch in reply.to_launch}

    try:
        assert launched({"h100": 2}) == {"h100": 1}  # the live, busy node and one more
        assert launched({"h100": 2, "a100": 3}) == {"h100": 1, "a100": 3}  # each pool by its label
        # Why the live nodes are in the request: the autoscaler fits it against nodes' totals, so the busy
        # node alone seems to hold one more node's worth.
        assert launched({"h100": 1}) == {}
        assert launched({}) == {}
    finally:
        request_cluster_resources(local_cluster.gcs_address, [])


def test_pools_none_of_whose_nodes_is_up_are_listed_with_how_far_they_may_grow(
    local_cluster: LocalCluster, tmp_path: Path
):
    pools = summarize_pools([], declared_pools(local_cluster.spec))
    assert [(pool.name, pool.nodes_alive, pool.nodes_max) for pool in pools] == [
        ("cpu", 0, 8),
        ("h100", 0, 4),
        ("a100", 0, 8),
        ("tpu-v5p", 0, 4),
    ]
    stop_any_controller()
    Admin(state_dir=tmp_path / "books", policy="bestfit")  # the CLI below would start one of its own
    try:
        shown = llmos_cli(local_cluster, "pools", "list")
        assert shown.returncode == 0, shown.stderr
        assert "1 of 8" in shown.stdout and "2 of 4" in shown.stdout  # cpu, tpu-v5p: live of most
    finally:
        stop_any_controller()
