"""`llmos pools import`: KubeRay RayClusters -> ClusterSpec, and the manifests CLI end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from cluster.cli import main
from cluster.spec import ClusterSpec, load_spec
from manifests.importer import import_ray_cluster, spec_to_yaml
from manifests.objects import ManifestError, parse_quantity
from manifests.raycluster import ray_cluster
from serving.config import build_serve_config
from serving.spec import load_serve_job

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_SPEC = REPO / "examples" / "cluster.yaml"
EXAMPLES_DIR = REPO / "manifests" / "examples"

# KubeRay-style manifests, written the way people write them: shapes in container limits or
# rayStartParams, GKE selectors, a multi-host TPU group, one group on a non-GKE cloud.
KUBERAY_MANIFEST = """
apiVersion: ray.io/v1
kind: RayCluster
metadata:
  name: research
  namespace: ml
spec:
  rayVersion: "2.60.0"
  enableInTreeAutoscaling: true
  headGroupSpec:
    rayStartParams:
      num-cpus: "0"
    template:
      spec:
        containers:
        - name: ray-head
          image: example.com/ray-llmos:2.60.0
          resources:
            limits: {cpu: "4", memory: 16Gi}
  workerGroupSpecs:
  - groupName: cpu-workers
    replicas: 2
    minReplicas: 1
    maxReplicas: 10
    rayStartParams: {}
    labels: {tier: batch}
    template:
      spec:
        containers:
        - name: ray-worker
          image: example.com/ray-llmos:2.60.0
          resources:
            limits: {cpu: "16", memory: 64Gi}
            requests: {cpu: "16", memory: 64Gi}
  - groupName: a100
    minReplicas: 0
    maxReplicas: 4
    rayStartParams:
      num-gpus: "8"
    template:
      spec:
        nodeSelector:
          cloud.google.com/gke-accelerator: nvidia-tesla-a100
        tolerations:
        - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
        containers:
        - name: ray-worker
          image: example.com/ray-llmos:2.60.0
          resources:
            limits: {cpu: "12", memory: 85Gi, nvidia.com/gpu: "8"}
  - groupName: l4
    minReplicas: 0
    maxReplicas: 6
    resources: {CPU: "8", GPU: "1", memory: 32Gi}
    labels: {ray.io/accelerator-type: L4}
    template:
      spec:
        nodeSelector:
          node.kubernetes.io/instance-type: g6.2xlarge
        tolerations:
        - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
        containers:
        - name: ray-worker
          image: example.com/ray-llmos:2.60.0
          resources:
            limits: {cpu: "8", memory: 32Gi, nvidia.com/gpu: "1"}
  - groupName: tpu-v4
    replicas: 1
    minReplicas: 1
    maxReplicas: 3
    numOfHosts: 2
    rayStartParams: {}
    template:
      spec:
        nodeSelector:
          cloud.google.com/gke-tpu-accelerator: tpu-v4-podslice
          cloud.google.com/gke-tpu-topology: 2x2x2
        containers:
        - name: ray-worker
          image: example.com/ray-llmos:2.60.0
          resources:
            limits: {cpu: "200", memory: 400G, google.com/tpu: "4"}
"""


def kuberay_manifest() -> dict:
    return yaml.safe_load(KUBERAY_MANIFEST)


def _shape(group: dict) -> dict:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return {
        "replicas": (group["minReplicas"], group["maxReplicas"]),
        "hosts": group.get("numOfHosts", 1),
        "limits": {name: parse_quantity(value, name) for name, value in limits.items()},
        "selector": group["template"]["spec"].get("nodeSelector", {}),
    }


def test_import_reads_cpu_gpu_and_multi_host_tpu_groups():
    spec = import_ray_cluster(kuberay_manifest(), "test")
    pools = {pool.name: pool for pool in spec.pools}
    assert list(pools) == ["cpu-workers", "a100", "l4", "tpu-v4"]
    cpu, a100, l4, tpu = pools.values()
    assert (cpu.accelerator.value, cpu.node.cpus, cpu.node.memory) == ("cpu", 16, 64 * 2**30)
    assert (cpu.nodes.min, cpu.nodes.max, cpu.labels) == (1, 10, {"tier": "batch"})
    assert (a100.accelerator_type, a100.node.gpus, a100.nodes.max) == ("A100", 8, 4)
    assert (l4.accelerator_type, l4.node.gpus, l4.node.cpus) == ("L4", 1, 8)
    assert (tpu.accelerator_type, tpu.tpu.topology, tpu.tpu.hosts_per_slice, tpu.tpu.chips_per_host) == (
        "v4",
        "2x2x2",
        2,
        4,
    )
    assert (tpu.slices.min, tpu.slices.max) == (1, 3)
    assert (spec.name, spec.kubernetes.namespace, spec.kubernetes.image) == (
        "research",
        "ml",
        "example.com/ray-llmos:2.60.0",
    )
    assert spec.head.cpus == 0 and spec.head.memory == 16 * 2**30
    # The non-GKE group keeps its own node selector; GKE groups need no override.
    assert set(spec.kubernetes.pools) == {"l4"}


def test_render_of_import_keeps_pools_shapes_accelerators_and_bounds():
    original = kuberay_manifest()
    rendered = ray_cluster(import_ray_cluster(original, "test"))
    before = {g["groupName"]: _shape(g) for g in original["spec"]["workerGroupSpecs"]}
    after = {g["groupName"]: _shape(g) for g in rendered["spec"]["workerGroupSpecs"]}
    assert after == before


def test_import_of_render_gives_back_the_spec():
    spec = load_spec(EXAMPLE_SPEC)
    again = import_ray_cluster(ray_cluster(spec), "test")
    assert again.pools == spec.pools
    # The claims exist once the cluster runs: the shared storage comes back as one to mount, not to make.
    shared = again.kubernetes.shared_storage
    assert (shared.mount_path, shared.claim) == ("/tmp/llmos", "llmos-demo-shared")
    assert ray_cluster(again) == ray_cluster(spec)
    assert again.kubernetes.pod_security == spec.kubernetes.pod_security
    assert yaml.safe_load(spec_to_yaml(again))["pools"][1]["node"]["memory"] == "200Gi"


def test_import_of_render_keeps_the_cluster_settings_the_raycluster_carries():
    data = yaml.safe_load(EXAMPLE_SPEC.read_text())
    data["kubernetes"].update(
        head_pod_cpus=6,
        idle_timeout_seconds=300,
        controller_state=None,
        gcs_fault_tolerance={"redis_address": "redis:6379", "redis_password_secret": "redis-pw"},
        pools={"h100": {"node_taints": []}},  # untainted nodes: llmos writes no tolerations for them
    )
    spec = ClusterSpec.model_validate(data)
    again = import_ray_cluster(ray_cluster(spec), "test")
    assert ray_cluster(again) == ray_cluster(spec)
    for setting in ("head_pod_cpus", "idle_timeout_seconds", "controller_state", "gcs_fault_tolerance"):
        assert getattr(again.kubernetes, setting) == getattr(spec.kubernetes, setting), setting
    assert again.kubernetes.pools["h100"].node_taints == []
    # Written by hand, a GPU group without tolerations is the GKE way: GKE adds them, the nodes keep their taints.
    assert import_ray_cluster(kuberay_manifest(), "test").kubernetes.pools.get("a100") is None


@pytest.mark.parametrize("ray_version", ["2.46.0", "2.9", "2.60.0rc1"])
def test_import_keeps_a_cluster_without_auth_options_unauthenticated_whatever_its_ray(ray_version):
    manifest = kuberay_manifest()
    manifest["spec"]["rayVersion"] = ray_version
    assert "authOptions" not in manifest["spec"]  # KubeRay runs it without token auth
    imported = import_ray_cluster(manifest, "test")
    assert (imported.kubernetes.ray_version, imported.kubernetes.token_auth) == (ray_version, False)
    assert ray_cluster(imported)["spec"]["authOptions"] == {"mode": "disabled"}
    manifest["spec"]["authOptions"] = {"mode": "token"}
    if ray_version == "2.60.0rc1":
        assert import_ray_cluster(manifest, "test").kubernetes.token_auth
        return
    with pytest.raises(ManifestError, match=r"^spec\.rayVersion: .* the first Ray KubeRay runs with token auth"):
        import_ray_cluster(manifest, "test")  # KubeRay refuses token auth before Ray 2.52 too


def test_import_refuses_a_redis_password_it_cannot_render_back():
    manifest = ray_cluster(
        ClusterSpec.model_validate(
            {
                **yaml.safe_load(EXAMPLE_SPEC.read_text()),
                "kubernetes": {"gcs_fault_tolerance": {"redis_address": "r:6379"}},
            }
        )
    )
    manifest["spec"]["gcsFaultToleranceOptions"]["redisPassword"] = {"value": "hunter2"}
    with pytest.raises(
        ManifestError, match=r"^spec\.gcsFaultToleranceOptions\.redisPassword\.valueFrom\.secretKeyRef: llmos"
    ):
        import_ray_cluster(manifest, "test")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(kind="RayJob"), r"kind is 'RayJob'; llmos pools import reads a KubeRay RayCluster"),
        (
            lambda m: m["spec"]["workerGroupSpecs"][1]["template"]["spec"].pop("nodeSelector"),
            r"workerGroupSpecs\[1\]: cannot tell which GPU this group has; add labels",
        ),
        (
            lambda m: m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"].update(
                limits={"cpu": "500m", "memory": "1Gi"}
            ),
            r"workerGroupSpecs\[0\]\.template\.spec\.containers\[0\]\.resources\.limits\.cpu: 0.5 is not a whole",
        ),
        (
            lambda m: m["spec"]["workerGroupSpecs"][3]["template"]["spec"]["nodeSelector"].pop(
                "cloud.google.com/gke-tpu-topology"
            ),
            r"workerGroupSpecs\[3\]: no TPU topology",
        ),
        (
            lambda m: m["spec"]["workerGroupSpecs"][2]["resources"].update(memory="lots"),
            r"workerGroupSpecs\[2\]\.resources\.memory: 'lots' is not a Kubernetes quantity",
        ),
        (
            lambda m: m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"].update(
                limits={"cpu": 4, "memory": float("inf")}
            ),
            r"workerGroupSpecs\[0\]\.template\.spec\.containers\[0\]\.resources\.limits\.memory: inf is not a finite",
        ),
        (
            lambda m: m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
                memory=float("nan")
            ),
            r"headGroupSpec\.template\.spec\.containers\[0\]\.resources\.limits\.memory: nan is not a finite",
        ),
        (
            lambda m: m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
                "limits"
            ].update({"amd.com/gpu": 8}),
            r"workerGroupSpecs\[0\]\.template\.spec\.containers\[0\]\.resources\.limits\.amd\.com/gpu: llmos pools",
        ),
        (
            lambda m: m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
                "limits"
            ].update({"gpu.intel.com/i915": 1}),
            r"resources\.limits\.gpu\.intel\.com/i915: llmos pools have NVIDIA GPUs",
        ),
        # Of the wrong shape: said of the field, not a traceback from reading into it.
        (lambda m: m.update(metadata=["x"]), r"^metadata: expected a mapping, got list"),
        (lambda m: m.update(spec=[1]), r"^spec: expected a mapping, got list"),
        (lambda m: m.pop("apiVersion") and m.update(spec=[1]), r"^spec: expected a mapping, got list"),
        (
            lambda m: m["spec"]["workerGroupSpecs"].append("oops"),
            r"^spec\.workerGroupSpecs\[4\]: 'oops' is not of type 'object'",
        ),
        (
            lambda m: m["spec"]["workerGroupSpecs"][0].update(labels=["a"]),
            r"^spec\.workerGroupSpecs\[0\]\.labels: \['a'\] is not of type 'object'",
        ),
        (
            lambda m: m["spec"]["workerGroupSpecs"][1]["template"]["spec"].update(tolerations=["oops"]),
            r"^spec\.workerGroupSpecs\[1\]\.template\.spec\.tolerations\[0\]: 'oops' is not of type",
        ),
    ],
)
def test_import_errors_name_the_group_and_the_fix(change, message):
    manifest = kuberay_manifest()
    change(manifest)
    with pytest.raises(ManifestError, match=message):
        import_ray_cluster(manifest, "test")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda groups: groups[1].update(groupName="GPU_group"),
            r"^spec\.workerGroupSpecs\[1\]\.groupName: 'GPU_group' is not a valid name; use lowercase letters",
        ),
        (
            lambda groups: groups[2].update(minReplicas=7),
            r"^spec\.workerGroupSpecs\[2\]\.minReplicas: min \(7\) is above max \(6\)",
        ),
        (
            lambda groups: groups[0].update(labels={"tier": "x" * 64}),
            r"^spec\.workerGroupSpecs\[0\]\.labels",
        ),
        (  # pools[2] of the spec, as the group before it is left out
            lambda groups: groups[1].update(maxReplicas=0) or groups[3].update(groupName="TPU"),
            r"^spec\.workerGroupSpecs\[3\]\.groupName: 'TPU' is not a valid name",
        ),
    ],
)
def test_import_errors_name_the_manifest_field_not_the_cluster_spec_field(change, message):
    manifest = kuberay_manifest()
    change(manifest["spec"]["workerGroupSpecs"])
    with pytest.raises(ManifestError, match=message):
        import_ray_cluster(manifest, "test")


def test_import_keeps_the_user_the_pods_run_as():
    assert import_ray_cluster(kuberay_manifest(), "test").kubernetes.pod_security is None  # the image's user
    manifest = kuberay_manifest()
    head_pod = manifest["spec"]["headGroupSpec"]["template"]["spec"]
    head_pod["securityContext"] = {"runAsUser": 1500, "runAsGroup": 1500}
    security = import_ray_cluster(manifest, "test").kubernetes.pod_security
    assert (security.run_as_user, security.run_as_group) == (1500, 1500)
    head_pod["securityContext"] = {"runAsUser": "ray"}
    with pytest.raises(
        ManifestError, match=r"^spec\.headGroupSpec\.template\.spec\.securityContext\.runAsUser: 'ray' is not of type"
    ):
        import_ray_cluster(manifest, "test")


def test_import_leaves_out_groups_that_never_have_a_pod_and_says_so(tmp_path, capsys):
    manifest = kuberay_manifest()
    manifest["spec"]["workerGroupSpecs"][1].update(maxReplicas=0, groupName="GPU_group")
    assert [pool.name for pool in import_ray_cluster(manifest, "test").pools] == ["cpu-workers", "l4", "tpu-v4"]
    source = tmp_path / "raycluster.yaml"
    source.write_text(yaml.safe_dump(manifest))
    assert main(["pools", "import", str(source), "-o", str(tmp_path / "cluster.yaml")]) == 0
    assert (
        "note: spec.workerGroupSpecs[1] (GPU_group) left out: its maxReplicas is 0, so it never has a pod; give it "
        "its largest size and import again to keep it" in capsys.readouterr().err
    )
    for group in manifest["spec"]["workerGroupSpecs"]:
        group["maxReplicas"] = 0
    with pytest.raises(ManifestError, match=r"spec\.workerGroupSpecs: every group has maxReplicas 0"):
        import_ray_cluster(manifest, "test")


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_render_writes_the_committed_examples_and_they_validate(tmp_path, capsys):
    assert main(["manifests", "render", str(EXAMPLE_SPEC), "-o", str(tmp_path)]) == 0
    for path in EXAMPLES_DIR.glob("*.yaml"):
        assert (tmp_path / path.name).read_text() == path.read_text()
    assert main(["manifests", "validate", str(tmp_path)]) == 0
    assert "ok: 28 objects in 5 files" in capsys.readouterr().out


def test_cli_validate_reports_file_object_and_path(tmp_path, capsys):
    manifest = kuberay_manifest()
    manifest["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert main(["manifests", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: RayCluster/research: spec.workerGroupSpecs[0].maxReplica: unknown field" in out


def test_cli_pools_import_writes_a_valid_cluster_spec(tmp_path):
    source = tmp_path / "raycluster.yaml"
    source.write_text(KUBERAY_MANIFEST)
    target = tmp_path / "cluster.yaml"
    assert main(["pools", "import", str(source), "-o", str(target)]) == 0
    spec = load_spec(target)
    assert [pool.name for pool in spec.pools] == ["cpu-workers", "a100", "l4", "tpu-v4"]
    assert main(["manifests", "render", str(target), "-o", str(tmp_path / "out")]) == 0
    assert main(["manifests", "validate", str(tmp_path / "out")]) == 0


def test_cli_errors_are_clean(tmp_path, capsys):
    assert main(["pools", "import", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "x.yaml")]) == 2
    not_a_cluster = tmp_path / "job.yaml"
    not_a_cluster.write_text("apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: x}\n")
    assert main(["pools", "import", str(not_a_cluster), "-o", str(tmp_path / "x.yaml")]) == 2
    no_groups = tmp_path / "empty.yaml"
    no_groups.write_text("kind: RayCluster\nmetadata: {name: x}\nspec: {workerGroupSpecs: []}\n")
    assert main(["pools", "import", str(no_groups), "-o", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert "file not found" in err and "no RayCluster in it (kinds found: RayJob)" in err
    assert f"error: {no_groups}: spec.workerGroupSpecs is empty" in err  # the file named once


def test_cli_validate_reports_unreadable_files_and_goes_on(tmp_path, capsys):
    (tmp_path / "a-broken.yaml").write_text("apiVersion: v1\nkind: [Namespace\n")
    (tmp_path / "b-binary.yaml").write_bytes(b"\xff\xfe\x00kind")
    shutil.copy(EXAMPLES_DIR / "namespaces.yaml", tmp_path / "c-namespaces.yaml")
    # kubectl's strict decoding refuses a key written twice; YAML would keep the last silently.
    (tmp_path / "d-twice.yaml").write_text("kind: Namespace\n---\napiVersion: v1\nkind: Namespace\nkind: Pod\n")
    assert main(["manifests", "validate", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"{tmp_path / 'a-broken.yaml'}: line 3, column 1: not valid YAML (expected ',' or ']', but got '<stream end>')",
        f"{tmp_path / 'b-binary.yaml'}: is not a text file (not UTF-8); give the path of a YAML file",
        f"{tmp_path / 'd-twice.yaml'}: key 'kind' appears twice (lines 4 and 5); keep one",
    ]
    assert "Traceback" not in captured.err


def test_cli_prints_brackets_in_user_text_as_they_are(tmp_path, capsys):
    namespace = tmp_path / "namespace.yaml"
    namespace.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {'[bold]key!': v}}\n")
    assert main(["manifests", "validate", str(namespace)]) == 1
    printed = capsys.readouterr().out
    assert "metadata.labels.[bold]key!: '[bold]key!' is not a Kubernetes label key; write [prefix/]name," in printed
    out = tmp_path / "home [x]" / "[/]"
    assert main(["manifests", "render", str(EXAMPLE_SPEC), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"Wrote 5 files to {out}" in printed and f"llmos manifests validate {out}" in printed


def test_cli_render_refuses_an_output_that_is_a_file(tmp_path, capsys):
    existing = tmp_path / "k8s"
    existing.write_text("not a directory\n")
    assert main(["manifests", "render", str(EXAMPLE_SPEC), "-o", str(existing)]) == 2
    err = capsys.readouterr().err
    assert f"error: --output: {existing} is a file; give a directory, new or holding an earlier render" in err
    assert existing.read_text() == "not a directory\n"


def test_cli_render_replaces_its_earlier_output_and_nothing_else(tmp_path, capsys):
    out = tmp_path / "k8s"
    job = EXAMPLE_SPEC.parent / "train.yaml"
    assert main(["manifests", "render", str(EXAMPLE_SPEC), "-o", str(out), "--job", str(job)]) == 0
    (out / "mine.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: mine}\n")
    (out / "notes.txt").write_text("kept\n")
    capsys.readouterr()

    bare = tmp_path / "cluster.yaml"
    bare.write_text(EXAMPLE_SPEC.read_text().replace("  shared_storage:", "  network_policy: false\n  shared_storage:"))
    assert main(["manifests", "render", str(bare), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "removed what an earlier render wrote there and this one does not: network-policies.yaml, rayjob-stdlib-lm.yaml"
        in printed
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "kueue.yaml",
        "mine.yaml",
        "namespaces.yaml",
        "notes.txt",
        "raycluster.yaml",
        "shared-storage.yaml",
    ]

    (out / "kueue.yaml").write_text("# my own queues\n")
    before = {p.name: p.read_text() for p in out.iterdir()}
    assert main(["manifests", "render", str(EXAMPLE_SPEC), "-o", str(out)]) == 2
    assert f"{out / 'kueue.yaml'} was not written by llmos" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in out.iterdir()} == before  # refused before writing anything


def test_cli_render_with_the_example_job_and_serve_specs(tmp_path):
    examples = EXAMPLE_SPEC.parent
    out = tmp_path / "out"
    args = ["manifests", "render", str(EXAMPLE_SPEC), "-o", str(out), "--job", str(examples / "train.yaml")]
    assert main([*args, "--serve", str(examples / "serve.yaml"), "--deadline", "3600"]) == 0
    config_map, rayjob = yaml.safe_load_all((out / "rayjob-stdlib-lm.yaml").read_text())
    assert config_map["data"]["job.yaml"] == (examples / "train.yaml").read_text()
    assert rayjob["spec"]["activeDeadlineSeconds"] == 3600
    [service] = yaml.safe_load_all((out / "rayservice-stdlib-lm.yaml").read_text())

    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == build_serve_config(
        load_serve_job(examples / "serve.yaml")
    )
    assert main(["manifests", "validate", str(out)]) == 0


def test_cli_render_warns_of_a_typed_quota_kueue_enforces_per_pool(tmp_path, capsys):
    spec = yaml.safe_load(EXAMPLE_SPEC.read_text())
    spec["pools"].append({**spec["pools"][1], "name": "h100-b"})
    spec["kubernetes"]["pools"] = {"h100-b": {"node_selector": {"cloud.google.com/gke-nodepool": "h100-b"}}}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["manifests", "render", str(path), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: teams[1].quota: gpu:H100: 8 becomes a limit of 8 on each of pools h100, h100-b")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"team": "nobody"}, "team: no team named 'nobody'"),
        ({"team": "reserch"}, "team: no team named 'reserch' (did you mean 'research'?)"),
        ({"storage_path": "~/llmos/jobs"}, "storage_path: ~/llmos/jobs is not under kubernetes.shared_storage"),
    ],
)
def test_cli_render_reports_job_errors_without_traceback(tmp_path, capsys, change, message):
    job = yaml.safe_load((EXAMPLE_SPEC.parent / "train.yaml").read_text()) | change
    job_file = tmp_path / "train.yaml"
    job_file.write_text(yaml.safe_dump(job))
    args = ["manifests", "render", str(EXAMPLE_SPEC), "-o", str(tmp_path / "out"), "--job", str(job_file)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--job", "train.yaml", "--deadline", "-5"], "--deadline -5: give the seconds, 1 to 2147483647"),
        (["--job", "train.yaml", "--start-deadline", "0"], "--start-deadline 0: give the seconds, 1 to 2147483647"),
        (
            ["--job", "train.yaml", "--deadline", "2147483648"],
            "--deadline 2147483648: give the seconds, 1 to 2147483647",
        ),
        (["--start-deadline", "60"], "--start-deadline bounds a RayJob: give the TrainingJob with --job"),
    ],
)
def test_cli_render_refuses_deadlines_that_bound_nothing(tmp_path, capsys, flags, message):
    flags = [str(EXAMPLE_SPEC.parent / flag) if flag == "train.yaml" else flag for flag in flags]
    assert main(["manifests", "render", str(EXAMPLE_SPEC), "-o", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pools_import_needs_only_the_runtime_dependencies(tmp_path):
    """`pip install .` and the image have no dev extras: cel-python and kubernetes-validate are for validation."""
    import subprocess
    import sys

    source, out = tmp_path / "raycluster.yaml", tmp_path / "cluster.yaml"
    source.write_text(KUBERAY_MANIFEST)
    without_dev_extras = f"""
import importlib.abc, sys
class NoDevExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("kubernetes_validate", "celpy"):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoDevExtras())
from cluster.cli import main
sys.exit(main(["pools", "import", {str(source)!r}, "-o", {str(out)!r}]))
"""
    done = subprocess.run([sys.executable, "-c", without_dev_extras], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [pool.name for pool in load_spec(out).pools] == ["cpu-workers", "a100", "l4", "tpu-v4"]
