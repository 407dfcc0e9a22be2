"""The pool-to-Ray mapping uses Ray 2.60's own names, checked against Ray itself rather than copied."""

from __future__ import annotations

from pathlib import Path

import ray._raylet
import ray.util.accelerators.accelerators as ray_accelerators
from ray._private.accelerators.tpu import infer_tpu_pod_type_from_topology

from cluster import ray_mapping
from cluster.spec import KNOWN_GPU_TYPES, KNOWN_TPU_GENERATIONS, ClusterSpec, load_spec

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cluster.yaml"


def tpu_spec(generation: str, topology: str, hosts: int) -> ClusterSpec:
    return ClusterSpec.model_validate(
        {
            "pools": [
                {
                    "name": "tpu",
                    "accelerator": "tpu",
                    "accelerator_type": generation,
                    "node": {"cpus": 8, "memory": "16Gi"},
                    "tpu": {"topology": topology, "chips_per_host": 4, "hosts_per_slice": hosts},
                    "slices": {"max": 2},
                }
            ]
        }
    )


def test_label_keys_are_rays_own():
    assert ray_mapping.RAY_ACCELERATOR_TYPE_LABEL == ray._raylet.RAY_NODE_ACCELERATOR_TYPE_KEY
    assert ray_mapping.RAY_NODE_GROUP_LABEL == ray._raylet.RAY_NODE_GROUP_KEY
    assert ray_mapping.RAY_TPU_SLICE_NAME_LABEL == ray._raylet.RAY_NODE_TPU_SLICE_NAME_KEY
    assert ray_mapping.RAY_TPU_WORKER_ID_LABEL == ray._raylet.RAY_NODE_TPU_WORKER_ID_KEY
    assert ray_mapping.RAY_TPU_TOPOLOGY_LABEL == ray._raylet.RAY_NODE_TPU_TOPOLOGY_KEY
    assert ray_mapping.RAY_TPU_POD_TYPE_LABEL == ray._raylet.RAY_NODE_TPU_POD_TYPE_KEY


def test_known_gpu_types_are_named_as_ray_names_them():
    ray_names = {value for name, value in vars(ray_accelerators).items() if name.isupper()}
    assert set(KNOWN_GPU_TYPES) <= ray_names


def test_tpu_names_match_ray_for_every_generation():
    ray_tpu_types = {value for name, value in vars(ray_accelerators).items() if name.startswith("GOOGLE_TPU")}
    for generation, topology, hosts in [("v4", "2x2x2", 2), ("v5e", "4x4", 4), ("v5p", "2x2x4", 4), ("v6e", "4x4", 4)]:
        pool = tpu_spec(generation, topology, hosts).pools[0]
        accelerator_type = ray_mapping.ray_accelerator_type(pool)
        assert accelerator_type in ray_tpu_types
        assert ray_mapping.tpu_pod_type(pool) == infer_tpu_pod_type_from_topology(topology, accelerator_type)
    assert set(KNOWN_TPU_GENERATIONS) == {"v4", "v5e", "v5p", "v6e"}


def test_gpu_pool_resources_and_labels():
    spec = load_spec(EXAMPLE)
    h100 = spec.pool("h100")
    assert ray_mapping.pool_resources(h100) == {
        "CPU": 26,
        "memory": 200 * 2**30,
        "GPU": 8,
        "accelerator_type:H100": 1,
    }
    labels = ray_mapping.pool_labels(h100)
    assert labels[ray_mapping.POOL_LABEL] == "h100"
    assert labels["ray.io/accelerator-type"] == "H100"


def test_multi_host_tpu_slice_hosts_share_a_slice_and_only_worker_zero_is_head():
    pool = tpu_spec("v5p", "2x2x4", 4).pools[0]
    hosts = ray_mapping.replica_nodes(pool, replica=1)
    assert [host.name for host in hosts] == [f"tpu-s1-h{i}" for i in range(4)]
    assert {host.labels[ray_mapping.TPU_SLICE_LABEL] for host in hosts} == {"tpu-s1"}
    assert [host.labels[ray_mapping.RAY_TPU_WORKER_ID_LABEL] for host in hosts] == ["0", "1", "2", "3"]
    head_resource = "TPU-v5p-32-head"
    assert [head_resource in host.resources for host in hosts] == [True, False, False, False]
    assert all(host.resources["tpu-s1"] == 1 and host.resources["TPU"] == 4 for host in hosts)
    # `ray start --labels` refuses ray.io/ keys, so they travel separately.
    assert all(not key.startswith("ray.io/") for key in hosts[0].user_labels)
    assert hosts[0].reserved_labels[ray_mapping.RAY_TPU_SLICE_NAME_LABEL] == "tpu-s1"


def test_local_cluster_caps_nodes_per_pool_at_pool_max():
    spec = load_spec(EXAMPLE)
    names = [node.name for node in ray_mapping.local_cluster_nodes(spec, replicas_per_pool=1)]
    assert names == ["cpu-0", "h100-0", "a100-0", "tpu-v5p-s0-h0", "tpu-v5p-s0-h1"]
    many = ray_mapping.local_cluster_nodes(spec, replicas_per_pool=5)
    per_pool = {pool.name: sum(node.pool == pool.name for node in many) for pool in spec.pools}
    assert per_pool == {"cpu": 5, "h100": 4, "a100": 5, "tpu-v5p": 4}  # TPU: 2 slices x 2 hosts


def test_a_node_is_named_by_its_llmos_label_else_its_instance_id_else_the_start_of_its_ray_id():
    ray_id = "5f93246dd41830d2eaac4c5ed473e4b5cc40802be176f8a570cd700a"
    labelled = {"llmos.io/node": "cpu-0", "ray.io/node-id": ray_id}
    assert ray_mapping.node_name(labelled, ray_id, "llmos-demo-cpu-worker-x7k2p") == "cpu-0"
    pod = {"ray.io/node-id": ray_id}  # a KubeRay pod: no llmos label, its name in RAY_CLOUD_INSTANCE_ID
    assert ray_mapping.node_name(pod, ray_id, "llmos-demo-cpu-worker-x7k2p") == "llmos-demo-cpu-worker-x7k2p"
    assert ray_mapping.node_name(pod, ray_id) == "5f93246dd418"  # a plain `ray start`
