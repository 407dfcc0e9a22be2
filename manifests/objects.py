"""Small pieces every manifest shares: names, labels, metadata and quantities."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from cluster.spec import ClusterSpec, SpecError, format_memory, load_yaml_documents

# Pod label put on every Ray pod llmos renders; the NetworkPolicy selects on it.
CLUSTER_LABEL = "llmos.io/cluster"
TEAM_LABEL = "llmos.io/team"
MANAGED_BY = {"app.kubernetes.io/managed-by": "llmos"}


class ManifestError(ValueError):
    """A ClusterSpec, job or manifest that cannot be rendered or imported; the message names the field."""


def metadata(name: str, namespace: str | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = {**MANAGED_BY, **(labels or {})}
    return meta


def cluster_labels(spec: ClusterSpec) -> dict[str, str]:
    return {CLUSTER_LABEL: spec.name}


def ray_namespaces(spec: ClusterSpec) -> list[str]:
    """Namespaces that hold Ray pods: the RayCluster's, then each team's (its RayJobs and RayServices)."""
    names = [spec.kubernetes.namespace]
    for team in spec.teams:
        if team.kubernetes_namespace not in names:
            names.append(team.kubernetes_namespace)
    return names


def persistent_volume_claim(
    spec: ClusterSpec, name: str, namespace: str, access_mode: str, size: int, storage_class: str | None
) -> dict[str, Any]:
    """A PersistentVolumeClaim; `storage_class` None leaves the Kubernetes cluster's default to provision it."""
    claim: dict[str, Any] = {
        "accessModes": [access_mode],
        "resources": {"requests": {"storage": memory_quantity(size)}},
    }
    if storage_class:
        claim["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(name, namespace, cluster_labels(spec)),
        "spec": claim,
    }


def scoped_name(spec: ClusterSpec, name: str) -> str:
    """A cluster-wide name (ClusterQueue, ResourceFlavor, ...) unique per llmos cluster."""
    return f"{spec.name}-{name}"


def quantity(amount: float) -> str:
    """A Kubernetes quantity: `8`, `0.5` as `500m`."""
    if float(amount).is_integer():
        return str(int(amount))
    return f"{round(amount * 1000)}m"


def memory_quantity(num_bytes: float) -> str:
    return format_memory(int(num_bytes))


_QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))([KMGTPE]i|[mkMGTPE]|[eE][+-]?\d+)?$")
_QUANTITY_FACTORS = {
    "": 1,
    "m": 1e-3,
    **{suffix: 1000 ** (i + 1) for i, suffix in enumerate("kMGTPE")},
    **{f"{suffix}i": 1024 ** (i + 1) for i, suffix in enumerate("KMGTPE")},
}


def parse_quantity(value: Any, field: str) -> float:
    """The number a Kubernetes quantity (`500m`, `8`, `32Gi`, `1e3`) stands for."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        quantity = float(value)
    elif match := _QUANTITY.fullmatch(str(value).strip()):
        number, suffix = match.group(1), match.group(2) or ""
        quantity = float(number + suffix) if suffix[:1] in ("e", "E") else float(number) * _QUANTITY_FACTORS[suffix]
    else:
        raise ManifestError(f"{field}: {value!r} is not a Kubernetes quantity; write e.g. 500m, 8 or 32Gi")
    if not math.isfinite(quantity):
        raise ManifestError(f"{field}: {value!r} is not a finite quantity; write e.g. 500m, 8 or 32Gi")
    return quantity


def read_documents(path: str | Path) -> list[Any]:
    """The YAML documents of a manifest file, empty ones left out; a ManifestError naming the file, and the
    line where YAML says, when it cannot be read or parsed."""
    try:
        return load_yaml_documents(path)
    except SpecError as error:
        raise ManifestError(f"{path}: {'; '.join(error.problems)}") from None
