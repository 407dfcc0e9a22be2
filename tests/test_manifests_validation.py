"""The manifest validator rejects broken manifests, each with the path of the offending field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from cluster.spec import load_spec
from manifests.kueue import cluster_queue, resource_flavor
from manifests.raycluster import ray_cluster
from manifests.security import namespace, network_policy
from manifests.validate import SchemaError, crd_schema, validate_documents, validate_object

EXAMPLE_SPEC = Path(__file__).resolve().parents[1] / "examples" / "cluster.yaml"
SPEC = load_spec(EXAMPLE_SPEC)
RAY_CLUSTER = ray_cluster(SPEC)
CLUSTER_QUEUE = cluster_queue(SPEC, SPEC.teams[1])
FLAVOR = resource_flavor(SPEC, SPEC.pool("h100"))
POLICY = network_policy(SPEC, "llmos")
NAMESPACE = namespace(SPEC, "llmos")
H100 = 1  # index of the h100 worker group


def broken(base: dict, change) -> dict:
    obj = copy.deepcopy(base)
    change(obj)
    return obj


def worker(obj: dict, index: int = H100) -> dict:
    return obj["spec"]["workerGroupSpecs"][index]


def container(obj: dict) -> dict:
    return worker(obj)["template"]["spec"]["containers"][0]


CASES = {
    "typo'd field": (
        broken(RAY_CLUSTER, lambda o: worker(o).update(maxReplica=worker(o).pop("maxReplicas"))),
        "spec.workerGroupSpecs[1].maxReplica",
        "did you mean 'maxReplicas'",
    ),
    "string where an integer goes": (
        broken(RAY_CLUSTER, lambda o: worker(o).update(maxReplicas="4")),
        "spec.workerGroupSpecs[1].maxReplicas",
        "not of type 'integer'",
    ),
    "missing groupName": (
        broken(RAY_CLUSTER, lambda o: worker(o).pop("groupName")),
        "spec.workerGroupSpecs[1].groupName",
        "required field is missing",
    ),
    "bad quantity": (
        broken(RAY_CLUSTER, lambda o: container(o)["resources"]["limits"].update(memory="200GB")),
        "spec.workerGroupSpecs[1].template.spec.containers[0].resources.limits.memory",
        "not a Kubernetes quantity",
    ),
    "typo in the pod template": (
        broken(RAY_CLUSTER, lambda o: worker(o)["template"]["spec"].update(nodeSelectors={})),
        "spec.workerGroupSpecs[1].template.spec.nodeSelectors",
        "did you mean 'nodeSelector'",
    ),
    "typo in embedded metadata": (
        broken(RAY_CLUSTER, lambda o: worker(o)["template"]["metadata"].update(label={})),
        "spec.workerGroupSpecs[1].template.metadata.label",
        "unknown field",
    ),
    "typo in object metadata": (
        broken(RAY_CLUSTER, lambda o: o["metadata"].update(namespce="x")),
        "metadata.namespce",
        "did you mean 'namespace'",
    ),
    "int32 out of range": (
        broken(RAY_CLUSTER, lambda o: worker(o).update(maxReplicas=2**31)),
        "spec.workerGroupSpecs[1].maxReplicas",
        "out of range for int32",
    ),
    "enum value": (
        broken(RAY_CLUSTER, lambda o: o["spec"]["authOptions"].update(mode="tokens")),
        "spec.authOptions.mode",
        "is not one of",
    ),
    "CEL rule (managedBy)": (
        broken(RAY_CLUSTER, lambda o: o["spec"].update(managedBy="me")),
        "spec.managedBy",
        "must be either 'ray.io/kuberay-operator'",
    ),
    "invalid Ray label (KubeRay rule)": (
        broken(RAY_CLUSTER, lambda o: worker(o)["labels"].update({"gpu type": "H100"})),
        "spec.workerGroupSpecs[1].labels.gpu type",
        "is not a Kubernetes label key",
    ),
    "resources set twice (KubeRay rule)": (
        broken(RAY_CLUSTER, lambda o: worker(o)["rayStartParams"].update({"num-gpus": "8"})),
        "spec.workerGroupSpecs[1].resources",
        "conflicts with rayStartParams",
    ),
    "min above max (KubeRay rule)": (
        broken(RAY_CLUSTER, lambda o: worker(o).update(minReplicas=5)),
        "spec.workerGroupSpecs[1].minReplicas",
        "above maxReplicas 4",
    ),
    "token auth on an old Ray (KubeRay rule)": (
        broken(RAY_CLUSTER, lambda o: o["spec"].update(rayVersion="2.46.0")),
        "spec.rayVersion",
        "needs rayVersion 2.52.0",
    ),
    "autoscaler v2 restart policy (KubeRay rule)": (
        broken(RAY_CLUSTER, lambda o: worker(o)["template"]["spec"].update(restartPolicy="Always")),
        "spec.workerGroupSpecs[1].template.spec.restartPolicy",
        "must be Never",
    ),
    "RayCluster name (KubeRay rule)": (
        broken(RAY_CLUSTER, lambda o: o["metadata"].update(name="9lives")),
        "metadata.name",
        "DNS-1035",
    ),
    "RayCluster name ending in a newline (KubeRay rule)": (
        broken(RAY_CLUSTER, lambda o: o["metadata"].update(name="lives\n")),
        "metadata.name",
        "DNS-1035",
    ),
    "Kueue unknown field": (
        broken(CLUSTER_QUEUE, lambda o: o["spec"].update(cohort="llmos-demo")),
        "spec.cohort",
        "did you mean 'cohortName'",
    ),
    "Kueue CEL rule (borrowing without a cohort)": (
        broken(CLUSTER_QUEUE, lambda o: o["spec"].pop("cohortName")),
        "spec",
        "borrowingLimit must be nil when cohort is empty",
    ),
    "Kueue CEL rule (resources per flavor)": (
        broken(CLUSTER_QUEUE, lambda o: o["spec"]["resourceGroups"][0]["flavors"][0]["resources"].pop()),
        "spec.resourceGroups[0]",
        "same number of resources",
    ),
    "Kueue CEL rule (taint effect)": (
        broken(FLAVOR, lambda o: o["spec"]["nodeTaints"][0].update(effect="NoWay")),
        "spec.nodeTaints",
        "supported taint effect values",
    ),
    "Kueue bad quantity": (
        broken(
            CLUSTER_QUEUE,
            lambda o: o["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0].update(borrowingLimit="lots"),
        ),
        "spec.resourceGroups[0].flavors[0].resources[0].borrowingLimit",
        "not a Kubernetes quantity",
    ),
    "NetworkPolicy unknown field (kubernetes-validate --strict)": (
        broken(POLICY, lambda o: o["spec"].update(podSelectr={})),
        "spec.podSelectr",
        "did you mean 'podSelector'",
    ),
    "Namespace bad label value": (
        broken(NAMESPACE, lambda o: o["metadata"]["labels"].update({"team": "R&D"})),
        "metadata.labels.team",
        "is not a Kubernetes label value",
    ),
    "unknown apiVersion": (
        broken(RAY_CLUSTER, lambda o: o.update(apiVersion="ray.io/v2")),
        "apiVersion",
        "served versions: v1, v1alpha1",
    ),
    "missing kind": (broken(POLICY, lambda o: o.pop("kind")), "kind", "required field is missing"),
    # Objects of the wrong shape: each is named, where the operator's rules would have read into it.
    "kind not a string": (broken(RAY_CLUSTER, lambda o: o.update(kind=5)), "kind", "5 is not a string"),
    "core apiVersion not a string": (broken(NAMESPACE, lambda o: o.update(apiVersion=5)), "apiVersion", "not a string"),
    "metadata a list": (broken(RAY_CLUSTER, lambda o: o.update(metadata=["a"])), "metadata", "expected a mapping"),
    "spec a list": (broken(RAY_CLUSTER, lambda o: o.update(spec=[1])), "spec", "not of type 'object'"),
    "worker group a string": (
        broken(RAY_CLUSTER, lambda o: o["spec"].update(workerGroupSpecs=["oops"])),
        "spec.workerGroupSpecs[0]",
        "not of type 'object'",
    ),
    "pod spec a list": (
        broken(RAY_CLUSTER, lambda o: worker(o)["template"].update(spec=[1])),
        "spec.workerGroupSpecs[1].template.spec",
        "not of type 'object'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_manifest_is_rejected_with_the_path_of_the_field(case):
    obj, path, message = CASES[case]
    problems = validate_object(obj)
    assert any(p.path == path and message in p.message for p in problems), [str(p) for p in problems]


def test_each_problem_names_its_object_even_one_whose_metadata_is_no_mapping():
    (problem,) = validate_documents([CASES["metadata a list"][0]])
    assert problem == "RayCluster/?: metadata: expected a mapping, got list"


@pytest.mark.parametrize("obj", [RAY_CLUSTER, CLUSTER_QUEUE, FLAVOR, POLICY, NAMESPACE])
def test_unbroken_objects_pass(obj):
    assert validate_object(obj) == []


def test_kuberay_samples_style_manifest_passes():
    """A hand-written KubeRay manifest in the style of KubeRay's TPU samples (nulls, int quantities)."""
    manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "tpu-cluster", "annotations": None},
        "spec": {
            "headGroupSpec": {
                "rayStartParams": {},
                "template": {"spec": {"containers": [{"name": "ray-head", "image": "rayproject/ray:2.60.0"}]}},
            },
            "workerGroupSpecs": [
                {
                    "groupName": "tpu",
                    "minReplicas": 0,
                    "maxReplicas": 1,
                    "numOfHosts": 2,
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "ray-worker",
                                    "image": "rayproject/ray:2.60.0",
                                    "resources": {"limits": {"cpu": 1, "google.com/tpu": "4", "memory": "40G"}},
                                }
                            ]
                        }
                    },
                }
            ],
        },
    }
    assert validate_object(manifest) == []


def test_missing_schemas_are_reported_with_where_they_were_looked_for(tmp_path):
    with pytest.raises(SchemaError, match=str(tmp_path)):
        crd_schema("ray.io", "v1", "RayCluster", tmp_path)
