"""The shared storage every Ray pod llmos renders mounts (`kubernetes.shared_storage`): where training
writes checkpoints and metrics and serving reads them.

A pod's own disk is not shared with the other pods of its Ray cluster, and it goes with the pod; a
RayJob's whole cluster goes when the job ends. So a workload's paths are checked against the mount
when it is rendered, and one whose output would be lost is refused with the field to change.
"""

from __future__ import annotations

import posixpath
from pathlib import PurePosixPath
from typing import Any

from cluster.spec import ClusterSpec, SharedStorage, parse_memory
from manifests.objects import ManifestError, persistent_volume_claim, ray_namespaces

SHARED_STORAGE_VOLUME = "llmos-shared"
DEFAULT_SHARED_STORAGE_SIZE = parse_memory("1Ti")  # GKE Filestore's smallest basic instance


def shared_storage_claim_name(spec: ClusterSpec, storage: SharedStorage) -> str:
    return storage.claim or f"{spec.name}-shared"


def shared_storage_claims(spec: ClusterSpec) -> list[dict[str, Any]]:
    """The ReadWriteMany claims llmos renders, one in each namespace with Ray pods; none for an existing claim."""
    storage = spec.kubernetes.shared_storage
    if storage is None or storage.claim is not None:
        return []
    name = shared_storage_claim_name(spec, storage)
    size = storage.size or DEFAULT_SHARED_STORAGE_SIZE
    return [
        persistent_volume_claim(spec, name, namespace, "ReadWriteMany", size, storage.storage_class)
        for namespace in ray_namespaces(spec)
    ]


def shared_storage_mount(spec: ClusterSpec) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The pod volume and the container's mount of the shared storage, if the spec has one."""
    storage = spec.kubernetes.shared_storage
    if storage is None:
        return None
    claim = {"claimName": shared_storage_claim_name(spec, storage)}
    return (
        {"name": SHARED_STORAGE_VOLUME, "persistentVolumeClaim": claim},
        {"name": SHARED_STORAGE_VOLUME, "mountPath": storage.mount_path},
    )


def require_on_shared_storage(spec: ClusterSpec, field: str, path: str, why: str) -> None:
    """Refuse `path` (the workload's `field`) unless it lies on the shared storage; `why` says what is lost."""
    storage = spec.kubernetes.shared_storage
    if storage is None:
        raise ManifestError(
            f"{field}: {path} would be on the pod's own disk, {why}; set kubernetes.shared_storage in the "
            f"ClusterSpec (a ReadWriteMany volume every Ray pod mounts) and put {field} under its mount_path"
        )
    mount = storage.mount_path
    if not PurePosixPath(posixpath.normpath(path)).is_relative_to(mount):
        raise ManifestError(
            f"{field}: {path} is not under kubernetes.shared_storage.mount_path ({mount}), so it would be on the "
            f"pod's own disk, {why}; put it under {mount}"
        )
