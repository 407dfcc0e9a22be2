"""Namespaces and the NetworkPolicy that fences the Ray pods in each of them.

Ray's ports (GCS, dashboard, object transfer, workers) run code for whoever reaches them, so the
default is: only pods of the same llmos cluster reach a Ray pod, plus the KubeRay operator on the
dashboard port (it submits jobs and reads Serve status there), from its own namespace only: a pod
label alone could be set by anyone who may create a pod in any namespace. Egress stays open (image pulls,
checkpoint storage, the autoscaler's calls to the API server). Turn it off with
`kubernetes.network_policy: false`; to let clients reach Serve, add a policy for port 8000.
"""

from __future__ import annotations

from typing import Any

from cluster.spec import ClusterSpec
from manifests.objects import cluster_labels, metadata
from manifests.raycluster import DASHBOARD_PORT

OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by Kubernetes on every namespace, not by its owner


def namespace(spec: ClusterSpec, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata(name, labels=cluster_labels(spec))}


def network_policy(spec: ClusterSpec, namespace_name: str) -> dict[str, Any]:
    own_pods = {"matchLabels": cluster_labels(spec)}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(f"{spec.name}-ray", namespace_name, cluster_labels(spec)),
        "spec": {
            "podSelector": own_pods,
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": own_pods}]},
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {NAMESPACE_NAME_LABEL: spec.kubernetes.operator_namespace}
                            },
                            "podSelector": {"matchLabels": OPERATOR_POD_LABELS},
                        }
                    ],
                    "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}],
                },
            ],
        },
    }
