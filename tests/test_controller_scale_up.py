"""A controller started with `--scale-up` (pools an autoscaler grows, as on KubeRay) on the shared local
cluster: a gang that fits only on nodes yet to come waits, the controller asks Ray's autoscaler for
them with Ray's own `request_resources`, and the gang lands once they join. No autoscaler runs here:
the test reads the request Ray stores for one and plays its part, adding the node it asked for."""

from __future__ import annotations

import json
from pathlib import Path

import ray
from controllers import llmos_cli, stop_any_controller
from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
from ray.experimental.internal_kv import _internal_kv_get
from waiting import WAIT_S, wait_for

from cluster.admin import Admin
from cluster.launcher import LocalCluster
from cluster.ray_mapping import pool_resources
from cluster.requests import RequestState


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
        assert status.reason.startswith("waiting for pool cpu to scale up: ")
        assert admin.ping()["scale_up_requested"] == {"cpu": 2}
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
        assert asked_of_the_autoscaler() == []  # nothing held up any more: idle nodes may go again
    finally:
        for status in admin.queue():
            admin.cancel(status.id)
        stop_any_controller()
        for node in added:
            local_cluster.remove_node(node.name)
