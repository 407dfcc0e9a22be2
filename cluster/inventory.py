"""What the live cluster has: nodes, pools, capacity and free resources, read from Ray's node table.

`connect()` is the one place a driver joins a cluster: it finds the address (argument, local
cluster, or RAY_ADDRESS) and points Ray's token authentication at the cluster's token.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cluster.console import UserError
from cluster.launcher import LocalCluster
from cluster.ray_mapping import (
    ACCELERATOR_KIND_LABEL,
    POOL_LABEL,
    RAY_ACCELERATOR_TYPE_LABEL,
    node_name,
    ray_accelerator_type,
)
from cluster.spec import ClusterSpec

# Resources people read in tables; the rest (accelerator_type:*, slice names) stay in --json.
SUMMARY_RESOURCES = ("CPU", "GPU", "TPU", "memory")
GCS_TIMEOUT_S = 30.0


class NodeInfo(BaseModel):
    """One Ray node as the cluster reports it now."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="llmos node name: its llmos.io/node label, else its instance id (a KubeRay pod's name), "
        "else the first 12 characters of its Ray node id."
    )
    pool: str
    node_id: str
    address: str
    alive: bool
    is_head: bool
    resources_total: dict[str, float]
    resources_free: dict[str, float]
    labels: dict[str, str]


class PoolInfo(BaseModel):
    """Capacity and free resources of one pool, summed over its live nodes."""

    model_config = ConfigDict(extra="forbid")

    name: str
    accelerator: str
    accelerator_type: str | None
    nodes_alive: int
    nodes_dead: int
    total: dict[str, float]
    free: dict[str, float]
    nodes_max: int | None = Field(
        None, description="Most nodes the pool may grow to (TPU: hosts of its slices), where the spec is known."
    )


def declared_pools(spec: ClusterSpec) -> list[PoolInfo]:
    """Every pool of the spec with no node counted yet: what `summarize_pools` shows for a pool none of
    whose nodes is up (an autoscaled pool at zero), and how far each may grow."""
    return [
        PoolInfo(
            name=pool.name,
            accelerator=pool.accelerator.value,
            accelerator_type=ray_accelerator_type(pool),
            nodes_alive=0,
            nodes_dead=0,
            total={},
            free={},
            nodes_max=pool.replicas.max * (pool.tpu.hosts_per_slice if pool.tpu else 1),
        )
        for pool in spec.pools
    ]


def connect(address: str | None = None) -> str:
    """Connect this process to the cluster as a driver (idempotent); returns the GCS address."""
    local = LocalCluster.find()
    if address is None and local is not None:
        env = local.client_env()
    elif address is not None or os.environ.get("RAY_ADDRESS"):
        env = {"RAY_ADDRESS": address or os.environ["RAY_ADDRESS"]}
        if local is not None and env["RAY_ADDRESS"] == local.gcs_address:
            env = local.client_env()
        env.setdefault("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "token"))
    else:
        raise UserError(
            "no cluster to connect to: start one with `llmos up examples/cluster.yaml`, "
            "or pass --address / set RAY_ADDRESS"
        )
    os.environ.update(env)
    import ray
    from ray._private.authentication.authentication_token_setup import AuthenticationTokenLoader
    from ray._raylet import Config

    if ray.is_initialized():
        return env["RAY_ADDRESS"]
    # Ray reads its auth settings when first imported; refresh them in case that was before `env`.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        ray.init(address=env["RAY_ADDRESS"], namespace="llmos", logging_level=logging.ERROR, log_to_driver=False)
    except ConnectionError as error:
        raise UserError(f"cannot reach the Ray cluster at {env['RAY_ADDRESS']}: {error}") from None
    return env["RAY_ADDRESS"]


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def ray_cluster_id() -> str:
    """The GCS's id of this Ray cluster (needs `connect()`, or to run in a Ray worker). A head restarted with
    GCS fault tolerance keeps it; a cluster started anew has another."""
    import ray

    return ray._private.worker.global_worker.gcs_client.cluster_id.hex()  # no public call reads it


def ray_node_table(alive_only: bool = False) -> list[NodeInfo]:
    """Ray's node table, read from the GCS (needs `connect()`, or to run in a Ray worker), free resources
    left empty. Not `ray.nodes()`: it leaves out each node's instance id, which names a KubeRay pod."""
    import ray
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    infos = ray._private.worker.global_worker.gcs_client.get_all_node_info(  # no public call reads the instance id
        timeout=GCS_TIMEOUT_S, state_filter=GcsNodeInfo.GcsNodeState.ALIVE if alive_only else None
    )
    return ray_nodes(list(infos.values()))


def ray_nodes(infos: Sequence[Any]) -> list[NodeInfo]:
    """Ray's `GcsNodeInfo` messages as llmos nodes, named by `node_name`, oldest start first. An instance id
    that several live nodes share (raylets started by hand with one environment) names none of them: a
    name picks out one node."""
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    alive = GcsNodeInfo.GcsNodeState.ALIVE
    live_ids = Counter(info.instance_id for info in infos if info.state == alive)
    infos = sorted(infos, key=lambda info: info.start_time_ms)
    return [
        NodeInfo(
            name=node_name(info.labels, info.node_id.hex(), info.instance_id if live_ids[info.instance_id] < 2 else ""),
            pool=info.labels.get(POOL_LABEL, "head" if info.is_head_node else "unknown"),
            node_id=info.node_id.hex(),
            address=info.node_manager_address,
            alive=info.state == alive,
            is_head=info.is_head_node,
            resources_total=dict(info.resources_total),
            resources_free={},
            labels=dict(info.labels),
        )
        for info in infos
    ]


def read_nodes() -> list[NodeInfo]:
    """Every node Ray knows, alive or dead, with its free resources (needs `connect()` first)."""
    from ray._private.state import available_resources_per_node  # no public per-node view in 2.60

    free_by_node = available_resources_per_node()
    nodes = ray_node_table()
    for node in nodes:
        if node.alive:
            node.resources_free = dict(free_by_node.get(node.node_id, {}))
    return sorted(nodes, key=lambda node: (not node.is_head, node.pool, node.name, not node.alive))


def summarize_pools(nodes: list[NodeInfo], declared: Sequence[PoolInfo] = ()) -> list[PoolInfo]:
    """The pools of the live nodes, summed; with `declared` (`declared_pools`), every declared pool too,
    each with its `nodes_max`."""
    by_pool: dict[str, list[NodeInfo]] = defaultdict(list)
    for node in nodes:
        by_pool[node.pool].append(node)
    pools = []
    for name, members in by_pool.items():
        alive = [node for node in members if node.alive]
        total: dict[str, float] = defaultdict(float)
        free: dict[str, float] = defaultdict(float)
        for node in alive:
            for key in SUMMARY_RESOURCES:
                total[key] += node.resources_total.get(key, 0.0)
                free[key] += node.resources_free.get(key, 0.0)
        labels = members[0].labels
        pools.append(
            PoolInfo(
                name=name,
                accelerator=labels.get(ACCELERATOR_KIND_LABEL, "cpu"),
                accelerator_type=labels.get(RAY_ACCELERATOR_TYPE_LABEL),
                nodes_alive=len(alive),
                nodes_dead=len(members) - len(alive),
                total=dict(total),
                free=dict(free),
                nodes_max=next((pool.nodes_max for pool in declared if pool.name == name), None),
            )
        )
    return pools + [pool for pool in declared if pool.name not in by_pool]
