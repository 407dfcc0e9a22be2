"""KubeRay and Kueue manifests from the ClusterSpec: rendering, the committed examples, RayJob/RayService."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from cluster.ray_mapping import head_declaration, pool_labels, pool_resources, replicas_for_workers
from cluster.spec import ClusterSpec, SpecError, load_spec, parse_model
from manifests.kueue import QUEUE_NAME_LABEL, kueue_warnings
from manifests.objects import ManifestError, parse_quantity
from manifests.render import render_cluster, to_yaml
from manifests.validate import validate_documents
from manifests.workloads import ray_job, ray_service

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_SPEC = REPO / "examples" / "cluster.yaml"
EXAMPLES_DIR = REPO / "manifests" / "examples"


@pytest.fixture(scope="module")
def spec() -> ClusterSpec:
    return load_spec(EXAMPLE_SPEC)


def spec_with(spec: ClusterSpec, **kubernetes) -> ClusterSpec:
    data = spec.model_dump(mode="json")
    data["kubernetes"].update(kubernetes)
    return parse_model(ClusterSpec, data, "test")


def groups_by_name(ray_cluster: dict) -> dict[str, dict]:
    return {group["groupName"]: group for group in ray_cluster["spec"]["workerGroupSpecs"]}


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


# --- the committed examples --------------------------------------------------------------------


def test_committed_examples_match_the_renderer(spec):
    files = render_cluster(spec)
    assert sorted(p.name for p in EXAMPLES_DIR.glob("*.yaml")) == sorted(files)
    for name, objects in files.items():
        assert (EXAMPLES_DIR / name).read_text() == to_yaml(objects), (
            f"manifests/examples/{name} drifted from the renderer; regenerate with "
            "`llmos manifests render examples/cluster.yaml -o manifests/examples`"
        )


def test_rendered_example_passes_every_schema(spec):
    objects = [obj for objects in render_cluster(spec).values() for obj in objects]
    assert validate_documents(objects) == []
    kinds = {obj["kind"] for obj in objects}
    assert kinds == {
        "Namespace",
        "RayCluster",
        "PersistentVolumeClaim",
        "NetworkPolicy",
        "WorkloadPriorityClass",
        "ResourceFlavor",
        "Cohort",
        "ClusterQueue",
        "LocalQueue",
    }


# --- the RayCluster ----------------------------------------------------------------------------


def test_worker_groups_declare_what_llmos_up_declares(spec):
    cluster = render_cluster(spec)["raycluster.yaml"][0]
    groups = groups_by_name(cluster)
    assert list(groups) == [pool.name for pool in spec.pools]
    for pool in spec.pools:
        group = groups[pool.name]
        declared = {name: parse_quantity(value, name) for name, value in group["resources"].items()}
        assert declared == pool_resources(pool)
        assert group["labels"] == pool_labels(pool)
        assert (group["minReplicas"], group["maxReplicas"]) == (pool.replicas.min, pool.replicas.max)
    head = cluster["spec"]["headGroupSpec"]
    declaration = head_declaration(spec)
    assert {k: parse_quantity(v, k) for k, v in head["resources"].items()} == declaration.resources
    assert head["labels"] == declaration.labels


def test_accelerators_use_gke_selectors_limits_and_tolerations(spec):
    cluster = render_cluster(spec)["raycluster.yaml"][0]
    groups = groups_by_name(cluster)

    def pod(name):
        return groups[name]["template"]["spec"]

    assert pod("h100")["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod("a100")["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}
    assert pod("h100")["containers"][0]["resources"]["limits"] == {
        "cpu": "26",
        "memory": "200Gi",
        "nvidia.com/gpu": "8",
    }
    assert pod("h100")["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod("tpu-v5p")["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
        "cloud.google.com/gke-tpu-topology": "2x2x2",
    }
    assert pod("tpu-v5p")["containers"][0]["resources"]["limits"]["google.com/tpu"] == "4"
    assert groups["tpu-v5p"]["numOfHosts"] == 2
    assert "numOfHosts" not in groups["h100"]
    assert "nodeSelector" not in pod("cpu") and "tolerations" not in pod("cpu")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["autoscalerOptions"]["version"] == "v2"


def test_token_auth_and_network_policy_are_on_by_default_and_can_be_switched_off(spec):
    files = render_cluster(spec)
    assert files["raycluster.yaml"][0]["spec"]["authOptions"] == {"mode": "token"}
    policies = files["network-policies.yaml"]
    assert [p["metadata"]["namespace"] for p in policies] == ["llmos", "research", "prod", "interns"]
    assert policies[0]["spec"]["podSelector"] == {"matchLabels": {"llmos.io/cluster": "llmos-demo"}}
    # The operator only from its own namespace: a pod label alone anyone who may create a pod could set.
    (operator,) = policies[0]["spec"]["ingress"][1]["from"]
    assert operator["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "default"}}
    moved = render_cluster(spec_with(spec, operator_namespace="ray-system"))["network-policies.yaml"]
    assert moved[0]["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ray-system"
    }

    relaxed = render_cluster(spec_with(spec, token_auth=False, network_policy=False))
    assert relaxed["raycluster.yaml"][0]["spec"]["authOptions"] == {"mode": "disabled"}
    assert "network-policies.yaml" not in relaxed
    assert validate_documents(relaxed["raycluster.yaml"]) == []


def pod_templates(ray_cluster_body: dict) -> list[dict]:
    """The pod spec of the head and of every worker group."""
    groups = [ray_cluster_body["headGroupSpec"], *ray_cluster_body["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def test_every_ray_pod_runs_under_the_restricted_pod_security_standard_unless_switched_off(spec):
    job = Job(name="lm", team="prod", pool="h100", workers=Count(min=2, max=2), resources=Resources(gpus=4))
    serve = Serve(name="lm", team="prod", pool="a100", replicas=Count(min=1, max=2), resources=Resources(gpus=1))

    def bodies(spec: ClusterSpec) -> list[dict]:
        return [
            render_cluster(spec)["raycluster.yaml"][0]["spec"],
            ray_job(spec, job, "name: lm\n")[1]["spec"]["rayClusterSpec"],
            ray_service(spec, serve, SERVE_CONFIG)["spec"]["rayClusterConfig"],
        ]

    for body in bodies(spec):
        for pod in pod_templates(body):
            context = pod["securityContext"]
            assert {k: context[k] for k in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")} == {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 100,
                "seccompProfile": {"type": "RuntimeDefault"},
            }
            assert context["fsGroup"] == 100  # every pod mounts the shared storage's claim
            (container,) = pod["containers"]
            assert container["securityContext"] == RESTRICTED_CONTAINER
    assert bodies(spec)[0]["autoscalerOptions"]["securityContext"] == RESTRICTED_CONTAINER

    own_user = spec_with(spec, pod_security={"run_as_user": 2000, "run_as_group": 3000})
    for pod in pod_templates(bodies(own_user)[0]):
        context = pod["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (2000, 3000, 3000)

    as_the_image_runs = spec_with(spec, pod_security=None)
    for body in bodies(as_the_image_runs):
        assert "securityContext" not in body.get("autoscalerOptions", {})
        for pod in pod_templates(body):
            assert pod["securityContext"] == {"fsGroup": 100}  # the Ray image's group may still write its volumes
            assert "securityContext" not in pod["containers"][0]
    assert validate_documents(render_cluster(own_user)["raycluster.yaml"]) == []
    assert validate_documents(render_cluster(as_the_image_runs)["raycluster.yaml"]) == []


@pytest.mark.parametrize(
    ("pod_security", "message"),
    [
        ({"run_as_user": 0}, r"kubernetes\.pod_security\.run_as_user: .*greater than 0"),
        ({"run_as_user": 2**31}, r"kubernetes\.pod_security\.run_as_user: 2147483648 is more than Kubernetes takes"),
        ({"run_as_group": -1}, r"kubernetes\.pod_security\.run_as_group: .*greater than or equal to 0"),
        ({"user": 1000}, r"kubernetes\.pod_security\.user: unknown field; known fields here: run_as_user, run_as_gr"),
    ],
)
def test_pod_security_errors_name_the_field(spec, pod_security, message):
    with pytest.raises(SpecError, match=message):
        spec_with(spec, pod_security=pod_security)


def test_gcs_fault_tolerance_renders_kuberays_redis_options(spec):
    assert "gcsFaultToleranceOptions" not in render_cluster(spec)["raycluster.yaml"][0]["spec"]
    tolerant = spec_with(
        spec, gcs_fault_tolerance={"redis_address": "redis.llmos.svc:6379", "redis_password_secret": "redis-auth"}
    )
    files = render_cluster(tolerant)
    options = files["raycluster.yaml"][0]["spec"]["gcsFaultToleranceOptions"]
    assert options == {
        "backend": "redis",
        "redisAddress": "redis.llmos.svc:6379",
        "externalStorageNamespace": "llmos-llmos-demo",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "password"}}},
    }
    assert validate_documents(files["raycluster.yaml"]) == []
    with pytest.raises(SpecError, match=r"gcs_fault_tolerance\.redis_address"):
        spec_with(spec, gcs_fault_tolerance={"redis_adress": "x:1"})


def test_the_controller_journals_on_a_claim_the_head_pod_keeps_across_restarts(spec):
    files = render_cluster(spec)
    cluster, claim = files["raycluster.yaml"]
    assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"]["namespace"] == "llmos"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    pod = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    assert pod["volumes"] == [
        {"name": "llmos-state", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}},
        {"name": "llmos-shared", "persistentVolumeClaim": {"claimName": "llmos-demo-shared"}},
    ]
    (container,) = pod["containers"]
    assert container["volumeMounts"] == [
        {"name": "llmos-state", "mountPath": "/home/ray/llmos"},
        {"name": "llmos-shared", "mountPath": "/tmp/llmos"},
    ]
    assert {"name": "LLMOS_HOME", "value": "/home/ray/llmos"} in container["env"]
    assert pod["securityContext"]["fsGroup"] == 100

    sized = render_cluster(spec_with(spec, controller_state={"size": "5Gi", "storage_class": "premium-rwo"}))
    assert sized["raycluster.yaml"][1]["spec"]["storageClassName"] == "premium-rwo"
    assert sized["raycluster.yaml"][1]["spec"]["resources"] == {"requests": {"storage": "5Gi"}}
    assert validate_documents(sized["raycluster.yaml"]) == []
    on_pod_disk = render_cluster(spec_with(spec, controller_state=None, shared_storage=None))["raycluster.yaml"]
    assert [obj["kind"] for obj in on_pod_disk] == ["RayCluster"]
    head = on_pod_disk[0]["spec"]["headGroupSpec"]["template"]["spec"]
    assert "volumes" not in head and "env" not in head["containers"][0]
    with pytest.raises(SpecError, match=r"controller_state\.size"):
        spec_with(spec, controller_state={"size": "lots"})


def test_other_clouds_override_node_selectors_and_taints(spec):
    eks = spec_with(
        spec,
        pools={
            "h100": {
                "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "node_taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}],
            }
        },
    )
    files = render_cluster(eks)
    pod = groups_by_name(files["raycluster.yaml"][0])["h100"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]
    flavor = next(f for f in by_kind(files["kueue.yaml"], "ResourceFlavor") if f["metadata"]["name"].endswith("h100"))
    assert flavor["spec"]["nodeLabels"] == pod["nodeSelector"]
    assert flavor["spec"]["nodeTaints"] == [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]
    assert validate_documents([obj for objects in files.values() for obj in objects]) == []


def test_a_gpu_gke_does_not_offer_needs_a_node_selector(spec):
    data = spec.model_dump(mode="json")
    data["pools"][2]["accelerator_type"] = "A10G"
    with pytest.raises(ManifestError, match=r"kubernetes\.pools\.a100\.node_selector"):
        render_cluster(parse_model(ClusterSpec, data, "test"))


def test_placement_overrides_must_name_a_pool(spec):
    with pytest.raises(SpecError, match=r"kubernetes.pools: 'h10' is not a pool \(did you mean 'h100'\?\)"):
        spec_with(spec, pools={"h10": {"node_selector": {}}})


# --- Kueue -------------------------------------------------------------------------------------


def test_flavors_match_worker_groups_and_queues_carry_team_quotas(spec):
    files = render_cluster(spec)
    groups = groups_by_name(files["raycluster.yaml"][0])
    kueue = files["kueue.yaml"]
    for flavor in by_kind(kueue, "ResourceFlavor"):
        pool = flavor["metadata"]["name"].removeprefix("llmos-demo-")
        assert flavor["spec"].get("nodeLabels", {}) == groups[pool]["template"]["spec"].get("nodeSelector", {})

    queues = {q["metadata"]["name"]: q for q in by_kind(kueue, "ClusterQueue")}
    assert set(queues) == {"llmos-demo-research", "llmos-demo-prod", "llmos-demo-interns"}

    def limits(team):
        rows = {}
        for flavor in queues[f"llmos-demo-{team}"]["spec"]["resourceGroups"][0]["flavors"]:
            for resource in flavor["resources"]:
                assert resource["nominalQuota"] == "0"
                rows[(flavor["name"].removeprefix("llmos-demo-"), resource["name"])] = resource.get("borrowingLimit")
        return rows

    prod = limits("prod")
    assert prod[("h100", "nvidia.com/gpu")] == "8"  # gpu:H100: 8 is tighter than gpu: 16
    assert prod[("a100", "nvidia.com/gpu")] == "16"
    assert prod[("tpu-v5p", "google.com/tpu")] == "8"
    assert prod[("cpu", "cpu")] == "64"
    assert prod[("cpu", "nvidia.com/gpu")] is None  # the CPU pool has no GPUs to limit
    interns = limits("interns")
    assert interns[("tpu-v5p", "google.com/tpu")] is None  # no tpu quota: no limit
    assert interns[("h100", "memory")] is None

    cohort = by_kind(kueue, "Cohort")[0]
    capacity = {
        (f["name"].removeprefix("llmos-demo-"), r["name"]): r["nominalQuota"]
        for f in cohort["spec"]["resourceGroups"][0]["flavors"]
        for r in f["resources"]
    }
    assert capacity[("h100", "nvidia.com/gpu")] == "32"  # 4 nodes x 8
    assert capacity[("tpu-v5p", "google.com/tpu")] == "16"  # 2 slices x 2 hosts x 4 chips

    local = {q["metadata"]["namespace"]: q["spec"]["clusterQueue"] for q in by_kind(kueue, "LocalQueue")}
    assert local == {"research": "llmos-demo-research", "prod": "llmos-demo-prod", "interns": "llmos-demo-interns"}
    priorities = {p["metadata"]["name"]: p["value"] for p in by_kind(kueue, "WorkloadPriorityClass")}
    assert priorities == {"llmos-demo-low": 100, "llmos-demo-normal": 500, "llmos-demo-high": 1000}


def spec_data_with(spec: ClusterSpec, change) -> ClusterSpec:
    data = spec.model_dump(mode="json")
    change(data)
    return parse_model(ClusterSpec, data, "test")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d.update(name="c" * 40) or d["teams"][0].update(name="r" * 40),
            r"teams\[0\]\.name: the Kueue queue 'c{40}-r{40}' \(name \+ '-' \+ teams\[0\]\.name\) is 81 characters, "
            r"but RayJobs carry it in the label kueue\.x-k8s\.io/queue-name, which holds at most 63; shorten name or "
            r"teams\[0\]\.name by 18 characters",
        ),
        (
            lambda d: d.update(name="c" * 40, teams=[]) or d["priority_classes"].append({"name": "p" * 40, "value": 1}),
            r"priority_classes\[3\]\.name: the Kueue priority class .* label kueue\.x-k8s\.io/priority-class",
        ),
        (
            lambda d: d.update(pools=[{**d["pools"][0], "name": f"p{i}"} for i in range(65)], teams=[]),
            r"pools: 65 pools, but the Kueue Cohort and ClusterQueues .* at most 64",
        ),
        (
            lambda d: d["kubernetes"]["pools"].update(cpu={"node_selector": {f"k{i}": "v" for i in range(9)}}),
            r"kubernetes\.pools\.cpu\.node_selector: 9 entries, but its Kueue ResourceFlavor holds at most 8",
        ),
    ],
)
def test_values_kubernetes_would_refuse_are_refused_at_render_naming_the_spec_fields(spec, change, message):
    with pytest.raises(ManifestError, match=message):
        render_cluster(spec_data_with(spec, change))


def test_a_typed_quota_over_several_flavors_and_pools_on_the_same_nodes_are_warned_about(spec):
    assert kueue_warnings(spec) == []

    def second_h100_pool(data):
        data["pools"].append({**data["pools"][1], "name": "h100-b"})

    twice = spec_data_with(spec, second_h100_pool)
    quota, same_nodes = kueue_warnings(twice)
    assert quota.startswith("teams[1].quota: gpu:H100: 8 becomes a limit of 8 on each of pools h100, h100-b")
    assert "Kueue limits a ClusterQueue per flavor, never across flavors" in quota
    assert same_nodes.startswith("pools h100, h100-b select the same nodes (cloud.google.com/gke-accelerator: ")
    queues = {q["metadata"]["name"]: q for q in by_kind(render_cluster(twice)["kueue.yaml"], "ClusterQueue")}
    gpu_limits = {
        flavor["name"]: resource.get("borrowingLimit")
        for flavor in queues["llmos-demo-prod"]["spec"]["resourceGroups"][0]["flavors"]
        for resource in flavor["resources"]
        if resource["name"] == "nvidia.com/gpu"
    }
    assert (gpu_limits["llmos-demo-h100"], gpu_limits["llmos-demo-h100-b"]) == (
        "8",
        "8",
    )  # per flavor: all Kueue can say

    told_apart = spec_with(twice, pools={"h100-b": {"node_selector": {"cloud.google.com/gke-nodepool": "h100-b"}}})
    [quota_only] = kueue_warnings(told_apart)
    assert quota_only == quota


def test_a_fractional_gpu_quota_is_warned_about_since_pods_ask_for_whole_devices(spec):
    def a_half_gpu_more(data):
        data["teams"][2]["quota"]["gpu"] = 4.5

    [warning] = kueue_warnings(spec_data_with(spec, a_half_gpu_more))
    assert warning.startswith("teams[2].quota: gpu: 4.5 is not a whole number of devices")
    assert "team 'interns' holds at most 4" in warning and "make it a whole number" in warning


# --- RayJob and RayService ---------------------------------------------------------------------


class Count(BaseModel):
    min: int
    max: int


class Resources(BaseModel):
    cpus: float = 1
    gpus: float = 0
    memory: int = 2 * 2**30


class Checkpoint(BaseModel):
    directory: str | None = None


class Job(BaseModel):
    name: str
    team: str
    priority: str | None = None
    pool: str | None = None
    accelerator_type: str | None = None
    workers: Count
    resources: Resources = Resources()
    storage_path: str = "/tmp/llmos/jobs"  # under the example spec's shared storage
    checkpoint: Checkpoint = Checkpoint()
    metrics_path: str | None = None


class Serve(BaseModel):
    name: str
    team: str
    pool: str | None = None
    accelerator_type: str | None = None
    replicas: Count
    resources: Resources = Resources()
    checkpoint: str = "/tmp/llmos/jobs/lm/checkpoints"


SERVE_CONFIG = {
    "applications": [
        {"name": "llm", "route_prefix": "/", "import_path": "serving.app:app", "deployments": [{"name": "LLM"}]}
    ]
}


def test_ray_job_runs_jobs_train_in_a_fixed_size_queued_cluster(spec):
    job = Job(name="lm", team="prod", pool="a100", workers=Count(min=2, max=3), resources=Resources(gpus=4))
    config_map, rayjob = ray_job(spec, job, "name: lm\n", deadline_seconds=7200, start_deadline_seconds=600)
    assert validate_documents([config_map, rayjob]) == []
    assert rayjob["metadata"]["namespace"] == "prod"
    assert rayjob["metadata"]["labels"][QUEUE_NAME_LABEL] == "llmos-demo-prod"
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "llmos-demo-high"  # prod's default
    body = rayjob["spec"]
    assert body["entrypoint"] == "python -m jobs.train /etc/llmos/job/job.yaml --without-controller"
    assert body["shutdownAfterJobFinishes"] is True
    assert (body["activeDeadlineSeconds"], body["preRunningDeadlineSeconds"]) == (7200, 600)
    cluster = body["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is False  # Kueue admits a RayJob whole
    [group] = cluster["workerGroupSpecs"]
    assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == ("a100", 3, 3, 3)
    head = cluster["headGroupSpec"]["template"]["spec"]
    # Its own config and the shared storage, not the shared cluster's controller state.
    assert head["volumes"] == [
        {"name": "llmos-job", "configMap": {"name": config_map["metadata"]["name"]}},
        {"name": "llmos-shared", "persistentVolumeClaim": {"claimName": "llmos-demo-shared"}},
    ]
    assert config_map["data"] == {"job.yaml": "name: lm\n"}
    # The queue the label names exists in the job's namespace.
    local_queues = by_kind(render_cluster(spec)["kueue.yaml"], "LocalQueue")
    assert {"prod": "llmos-demo-prod"}.items() <= {
        q["metadata"]["namespace"]: q["metadata"]["name"] for q in local_queues
    }.items()


def test_ray_job_finds_its_pool_by_accelerator_type_or_fit(spec):
    by_type = Job(name="a", team="research", accelerator_type="A100-80G", workers=Count(min=1, max=1))
    assert ray_job(spec, by_type, "")[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"] == "a100"
    cpu_only = Job(name="b", team="research", workers=Count(min=1, max=16))
    [group] = ray_job(spec, cpu_only, "")[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["groupName"], group["replicas"]) == ("cpu", 2)  # 8 one-CPU workers per 8-CPU node


@pytest.mark.parametrize(
    ("job", "message"),
    [
        (Job(name="x", team="nobody", workers=Count(min=1, max=1)), r"team: no team named 'nobody'"),
        (Job(name="x", team="prod", pool="h200", workers=Count(min=1, max=1)), r"pool: no pool named 'h200'"),
        (
            Job(name="x", team="prod", pool="h100", workers=Count(min=1, max=1), resources=Resources(gpus=9)),
            r"one worker needs 9 GPU but a node of pool 'h100' has 8",
        ),
        (
            Job(name="x", team="prod", pool="h100", workers=Count(min=1, max=40), resources=Resources(gpus=8)),
            r"40 workers need 40 replicas of pool 'h100', which has at most 4",
        ),
        (
            Job(name="x", team="prod", priority="urgent", workers=Count(min=1, max=1)),
            r"priority: 'urgent' is not a priority class",
        ),
    ],
)
def test_ray_job_errors_name_the_field(spec, job, message):
    with pytest.raises(ManifestError, match=message):
        ray_job(spec, job, "")


def test_a_ray_job_kueue_could_never_admit_is_refused(spec):
    one_gpu = Job(name="x", team="interns", pool="h100", workers=Count(min=1, max=1), resources=Resources(gpus=1))
    with pytest.raises(
        ManifestError,
        match=r"teams\[2\]\.quota: the RayJob needs cpu 26, nvidia.com/gpu 8 for its 1 worker pod in pool 'h100' "
        r"\(a pod takes a whole node\), but team 'interns' may hold at most cpu: 16, gpu: 4 of pool 'h100', so Kueue "
        r"would never admit it; raise the quota's cpu to 26 and gpu to 8, or set the job's pool to one with smaller "
        r"nodes",
    ):
        ray_job(spec, one_gpu, "")
    two_nodes = Job(name="x", team="prod", pool="h100", workers=Count(min=1, max=2), resources=Resources(gpus=8))
    with pytest.raises(ManifestError, match=r"teams\[1\]\.quota: .* at most gpu:H100: 8 of pool 'h100'"):
        ray_job(spec, two_nodes, "")
    in_a100 = Job(name="x", team="interns", pool="a100", workers=Count(min=1, max=1), resources=Resources(gpus=1))
    assert ray_job(spec, in_a100, "")  # a node of 4 GPUs and 12 CPUs fits the quota

    big_head = spec_with(spec, head_pod_cpus=20)
    with pytest.raises(
        ManifestError, match=r"needs cpu 20 for its head pod, .* at most cpu: 16 in any pool, .*head_pod_cpus"
    ):
        ray_job(big_head, Job(name="x", team="interns", pool="cpu", workers=Count(min=1, max=1)), "")

    gpus_only = spec_data_with(spec, lambda d: d.update(pools=d["pools"][1:2], teams=d["teams"][:1]))
    with pytest.raises(
        ManifestError, match=r"pools: the RayJob's head pod requests cpu 4, memory 8Gi, but every pool "
    ):
        ray_job(gpus_only, Job(name="x", team="research", pool="h100", workers=Count(min=1, max=1)), "")


def test_a_ray_job_whose_head_can_only_join_its_workers_flavor_is_refused_when_both_overflow_it(spec):
    # The cpu pool is the only one without node taints, so Kueue counts the head pod (cpu 4, memory 8Gi) in its
    # flavor beside the workers: 8 whole 8-CPU nodes fill the pool and the research team's cpu: 64.
    eight_nodes = Job(name="x", team="research", pool="cpu", workers=Count(min=8, max=64))
    with pytest.raises(
        ManifestError,
        match=r"pools\[0\]\.nodes\.max: the RayJob needs cpu 68, memory 264Gi for its 8 worker pods in pool 'cpu' "
        r"\(a pod takes a whole node\) and its head pod, which no other pool can take, but pool 'cpu' holds cpu 64, "
        r"memory 256Gi at its max size, so Kueue would never admit it; raise the pool's nodes.max, or lower the "
        r"job's workers.max or resources, or add a pool without node taints for the head pod",
    ):
        ray_job(spec, eight_nodes, "")
    bigger_pool = spec_data_with(spec, lambda d: d["pools"][0]["nodes"].update(max=16))
    with pytest.raises(
        ManifestError,
        match=r"teams\[0\]\.quota: the RayJob needs cpu 68 for its 8 worker pods in pool 'cpu' .* and its head pod, "
        r"which no other pool can take, but team 'research' may hold at most cpu: 64 of pool 'cpu', .*raise the "
        r"quota's cpu to 68, or lower the job's workers.max",
    ):
        ray_job(bigger_pool, eight_nodes, "")
    seven_nodes = Job(name="x", team="research", pool="cpu", workers=Count(min=7, max=56))
    assert ray_job(spec, seven_nodes, "")  # cpu 56 + 4 fits both
    # Where another flavor can take the head pod, Kueue may put it there: render cannot tell, so it renders.
    head_elsewhere = spec_with(spec, pools={"a100": {"node_taints": []}})
    assert ray_job(head_elsewhere, eight_nodes, "")


def test_ray_service_autoscales_between_its_replica_bounds(spec):
    serve = Serve(name="llm", team="research", pool="a100", replicas=Count(min=1, max=8), resources=Resources(gpus=1))
    service = ray_service(spec, serve, SERVE_CONFIG)
    assert validate_documents([service]) == []
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == SERVE_CONFIG
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    [group] = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 2)  # 4 one-GPU replicas per a100 node
    assert service["metadata"]["namespace"] == "research"


def test_only_the_shared_ray_cluster_keeps_its_gcs_in_redis(spec):
    tolerant = spec_with(
        spec, gcs_fault_tolerance={"redis_address": "redis.llmos.svc:6379", "redis_password_secret": "redis-auth"}
    )
    assert "gcsFaultToleranceOptions" in render_cluster(tolerant)["raycluster.yaml"][0]["spec"]
    # A RayJob's cluster would load the shared cluster's GCS tables, and wipe them from Redis when it finishes;
    # a RayService's Redis namespace is KubeRay's to pick, and the password Secret is not in the team's namespace.
    job = Job(name="lm", team="prod", pool="a100", workers=Count(min=1, max=2), resources=Resources(gpus=4))
    _, rayjob = ray_job(tolerant, job, "")
    serve = Serve(name="llm", team="research", pool="a100", replicas=Count(min=1, max=8), resources=Resources(gpus=1))
    service = ray_service(tolerant, serve, SERVE_CONFIG)
    assert "gcsFaultToleranceOptions" not in rayjob["spec"]["rayClusterSpec"]
    assert "gcsFaultToleranceOptions" not in service["spec"]["rayClusterConfig"]
    assert validate_documents([rayjob, service]) == []


# --- shared storage ----------------------------------------------------------------------------


def mounts_of(cluster_spec: dict) -> list[dict[str, str]]:
    """Every pod template's shared-storage volume and mount, head first."""
    templates = [cluster_spec["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster_spec["workerGroupSpecs"]]
    found = []
    for template in templates:
        pod = template["spec"]
        (container,) = pod["containers"]
        [volume] = [v for v in pod.get("volumes", []) if v["name"] == "llmos-shared"]
        [mount] = [m for m in container.get("volumeMounts", []) if m["name"] == "llmos-shared"]
        assert pod["securityContext"]["fsGroup"] == 100
        found.append({"claim": volume["persistentVolumeClaim"]["claimName"], "path": mount["mountPath"]})
    return found


def test_every_ray_pod_mounts_the_shared_storage_and_each_namespace_has_a_claim(spec):
    files = render_cluster(spec)
    claims = files["shared-storage.yaml"]
    assert [c["metadata"]["namespace"] for c in claims] == ["llmos", "research", "prod", "interns"]
    for claim in claims:
        assert claim["metadata"]["name"] == "llmos-demo-shared"
        assert claim["spec"] == {
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "1Ti"}},
            "storageClassName": "standard-rwx",
        }
    assert validate_documents(claims) == []
    shared = {"claim": "llmos-demo-shared", "path": "/tmp/llmos"}
    assert mounts_of(files["raycluster.yaml"][0]["spec"]) == [shared] * (1 + len(spec.pools))
    job = Job(name="lm", team="prod", pool="h100", workers=Count(min=2, max=2), resources=Resources(gpus=4))
    rayjob = ray_job(spec, job, "name: lm\n")[1]
    assert mounts_of(rayjob["spec"]["rayClusterSpec"]) == [shared] * 2
    serve = Serve(name="lm", team="prod", pool="a100", replicas=Count(min=1, max=2), resources=Resources(gpus=1))
    assert mounts_of(ray_service(spec, serve, SERVE_CONFIG)["spec"]["rayClusterConfig"]) == [shared] * 2

    existing = spec_with(spec, shared_storage={"mount_path": "/mnt/team-nfs/", "claim": "nfs-share"})
    files = render_cluster(existing)
    assert "shared-storage.yaml" not in files  # the platform made the claims
    mounts = mounts_of(files["raycluster.yaml"][0]["spec"])
    assert set(map(tuple, map(dict.values, mounts))) == {("nfs-share", "/mnt/team-nfs")}
    assert validate_documents(files["raycluster.yaml"]) == []

    own_disks = render_cluster(spec_with(spec, shared_storage=None))
    assert "shared-storage.yaml" not in own_disks
    worker_pod = own_disks["raycluster.yaml"][0]["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "volumes" not in worker_pod and "fsGroup" not in worker_pod["securityContext"]


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ({"mount_path": "mnt/llmos"}, r"shared_storage\.mount_path: .*'mnt/llmos' is not an absolute directory"),
        ({"mount_path": "/"}, r"shared_storage\.mount_path: .*is not an absolute directory below /"),
        ({"claim": "nfs", "storage_class": "standard-rwx"}, r"shared_storage: .*set one or the other"),
        ({"size": "lots"}, r"shared_storage\.size"),
        ({"mount_pth": "/mnt/x"}, r"shared_storage\.mount_pth"),
    ],
)
def test_shared_storage_errors_name_the_field(spec, storage, message):
    with pytest.raises(SpecError, match=message):
        spec_with(spec, shared_storage=storage)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"storage_path": "/data/jobs"},
            r"storage_path: /data/jobs is not under kubernetes\.shared_storage\.mount_path \(/tmp/llmos\), so it "
            r"would be on the pod's own disk, not shared between the job's pods and gone when its cluster shuts "
            r"down; put it under /tmp/llmos",
        ),
        ({"storage_path": "~/llmos/jobs"}, r"storage_path: ~/llmos/jobs is not under"),
        ({"storage_path": "/tmp/llmos/../jobs"}, r"storage_path: /tmp/llmos/\.\./jobs is not under"),
        ({"checkpoint": Checkpoint(directory="/scratch/ckpt")}, r"checkpoint\.directory: /scratch/ckpt is not under"),
        ({"metrics_path": "metrics.jsonl"}, r"metrics_path: metrics\.jsonl is not under"),
    ],
)
def test_a_ray_job_whose_output_would_be_lost_is_refused(spec, change, message):
    job = Job(name="lm", team="prod", workers=Count(min=1, max=1)).model_copy(update=change)
    with pytest.raises(ManifestError, match=message):
        ray_job(spec, job, "")


def test_workloads_need_shared_storage_and_a_mount_path_of_their_own(spec):
    own_disks = spec_with(spec, shared_storage=None)
    with pytest.raises(
        ManifestError,
        match=r"storage_path: /tmp/llmos/jobs would be on the pod's own disk, .*; set kubernetes\.shared_storage in "
        r"the ClusterSpec .* and put storage_path under its mount_path",
    ):
        ray_job(own_disks, Job(name="lm", team="prod", workers=Count(min=1, max=1)), "")
    serve = Serve(name="lm", team="prod", replicas=Count(min=1, max=1))
    with pytest.raises(ManifestError, match=r"checkpoint: .* on the pod's own disk, where no training job wrote it"):
        ray_service(own_disks, serve, SERVE_CONFIG)
    elsewhere = serve.model_copy(update={"checkpoint": "/models/lm"})
    with pytest.raises(ManifestError, match=r"checkpoint: /models/lm is not under .*\(/tmp/llmos\)"):
        ray_service(spec, elsewhere, SERVE_CONFIG)

    over_the_job_file = spec_with(spec, shared_storage={"mount_path": "/etc/llmos"})
    job = Job(name="lm", team="prod", workers=Count(min=1, max=1), storage_path="/etc/llmos/jobs")
    with pytest.raises(
        ManifestError,
        match=r"shared_storage\.mount_path: /etc/llmos overlaps /etc/llmos/job, where llmos mounts llmos-job",
    ):
        ray_job(over_the_job_file, job, "")
    with pytest.raises(ManifestError, match=r"mount_path: /home/ray overlaps /home/ray/llmos, where .* llmos-state"):
        render_cluster(spec_with(spec, shared_storage={"mount_path": "/home/ray"}))


@pytest.mark.parametrize(
    "image", ["rayproject/ray:2.60.0-py311", "docker.io/rayproject/ray-ml:2.60.0", "rayproject/ray@sha256:0123abcd"]
)
def test_workloads_refuse_rays_own_image_which_has_no_llmos(spec, image):
    stock = spec_with(spec, image=image)
    job = Job(name="lm", team="prod", workers=Count(min=1, max=1))
    with pytest.raises(
        ManifestError,
        match=r"kubernetes\.image: .* is Ray's own image, without llmos, so the "
        r"RayJob's `python -m jobs\.train` would fail at start; build llmos's image .*\(`make image`\)",
    ):
        ray_job(stock, job, "")
    with pytest.raises(ManifestError, match=r"so the RayService's Serve application \(serving\.app\) would fail"):
        ray_service(stock, Serve(name="lm", team="prod", replicas=Count(min=1, max=1)), SERVE_CONFIG)
    own = spec_with(spec, image="registry.example.com:5000/rayproject/ray-llmos:2.60.0")
    [head] = ray_job(own, job, "")[1]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert head["image"] == "registry.example.com:5000/rayproject/ray-llmos:2.60.0"
    assert spec.kubernetes.image == "llmos:0.1.0"  # what `make image` builds


def test_replicas_for_workers_counts_nodes_and_whole_tpu_slices(spec):
    h100, tpu = spec.pool("h100"), spec.pool("tpu-v5p")
    assert replicas_for_workers(h100, 3, {"GPU": 4, "CPU": 1}) == 2
    assert replicas_for_workers(h100, 0, {"GPU": 4}) == 0
    assert replicas_for_workers(tpu, 2, {"TPU": 4}) == 1  # one slice holds two 4-chip hosts
    assert replicas_for_workers(tpu, 3, {"TPU": 4}) == 2
    with pytest.raises(ValueError, match="memory"):
        replicas_for_workers(h100, 1, {"memory": 2**50})


def test_rendering_does_not_mutate_shared_state(spec):
    before = copy.deepcopy(render_cluster(spec))
    render_cluster(spec_with(spec, token_auth=False))
    assert render_cluster(spec) == before
