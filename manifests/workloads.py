"""RayJobs for training jobs and RayServices for serving jobs, each with its own Ray cluster.

A workload's cluster has the head of the shared cluster and one worker group: the pool the
workload runs in, sized for it (`cluster.ray_mapping.replicas_for_workers`). RayJobs are fixed in
size, as Kueue admits a RayJob whole and refuses autoscaled ones; RayServices autoscale between the
sizes of their fewest and most replicas. Job and serve specs are read through the small protocols
below, so this layer depends on no field it does not use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import yaml

from cluster.ray_mapping import replicas_for_workers
from cluster.spec import ClusterSpec, Pool, ResourcesLike, Team, WorkloadLike
from manifests.kueue import (
    PRIORITY_CLASS_LABEL,
    QUEUE_NAME_LABEL,
    pool_request,
    priority_class_name,
    queue_name,
    require_head_flavor,
    require_room_beside_head,
    require_within_quota,
)
from manifests.objects import TEAM_LABEL, ManifestError, cluster_labels, metadata
from manifests.raycluster import RAY_API_VERSION, GroupSize, head_pod_request, ray_cluster_spec
from manifests.storage import require_on_shared_storage

RAY_OWN_IMAGES = ("rayproject/ray", "rayproject/ray-ml")
JOB_DIRECTORY = "/etc/llmos/job"
JOB_FILE = "job.yaml"
MAX_DEADLINE_SECONDS = 2**31 - 1  # RayJob's activeDeadlineSeconds and preRunningDeadlineSeconds are int32


class CountLike(Protocol):
    @property
    def min(self) -> int: ...
    @property
    def max(self) -> int: ...


class CheckpointPolicyLike(Protocol):
    @property
    def directory(self) -> str | None: ...


class TrainingJobLike(WorkloadLike, Protocol):
    """jobs.spec.TrainingJob as the RayJob renderer reads it."""

    @property
    def workers(self) -> CountLike: ...
    @property
    def storage_path(self) -> str: ...
    @property
    def checkpoint(self) -> CheckpointPolicyLike: ...
    @property
    def metrics_path(self) -> str | None: ...


class ServeJobLike(WorkloadLike, Protocol):
    """serving's ServeJob as the RayService renderer reads it."""

    @property
    def replicas(self) -> CountLike: ...
    @property
    def checkpoint(self) -> str: ...


def ray_resources_of(resources: ResourcesLike) -> dict[str, float]:
    return {"CPU": resources.cpus, "GPU": resources.gpus, "memory": resources.memory}


def workload_team(spec: ClusterSpec, workload: WorkloadLike) -> Team:
    try:
        return spec.team(workload.team)
    except KeyError as error:
        raise ManifestError(f"team: {error.args[0]}") from None


def workload_pool(spec: ClusterSpec, workload: WorkloadLike) -> Pool:
    """The workload's pool: the one it names, else the first of its accelerator type where one worker fits."""
    if workload.pool is not None:
        try:
            return spec.pool(workload.pool)
        except KeyError as error:
            raise ManifestError(f"pool: {error.args[0]}") from None
    candidates = list(spec.pools)
    if workload.accelerator_type is not None:
        candidates = [p for p in spec.pools if p.accelerator_type == workload.accelerator_type]
        if not candidates:
            raise ManifestError(
                f"accelerator_type: no pool has {workload.accelerator_type!r}; set pool or change accelerator_type"
            )
    per_worker = ray_resources_of(workload.resources)
    reasons = []
    for pool in candidates:
        try:
            replicas_for_workers(pool, 1, per_worker)
        except ValueError as error:
            reasons.append(str(error))
            continue
        return pool
    raise ManifestError("resources: " + "; ".join(reasons))


def _group(spec: ClusterSpec, workload: WorkloadLike, count: CountLike) -> GroupSize:
    pool = workload_pool(spec, workload)
    per_worker = ray_resources_of(workload.resources)
    try:
        low = replicas_for_workers(pool, count.min, per_worker)
        high = replicas_for_workers(pool, count.max, per_worker)
    except ValueError as error:
        raise ManifestError(f"resources: {error}") from None
    if high > pool.replicas.max:
        raise ManifestError(
            f"{count.max} workers need {high} replicas of pool {pool.name!r}, which has at most "
            f"{pool.replicas.max}; lower the count or raise the pool's max"
        )
    return GroupSize(pool, low, high)


def _require_llmos_image(spec: ClusterSpec, what: str) -> None:
    """Refuse Ray's own images: they have no llmos, so `what` would fail as soon as the cluster is up."""
    image = spec.kubernetes.image
    name = image.split("@")[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    if name.removeprefix("docker.io/") in RAY_OWN_IMAGES:
        raise ManifestError(
            f"kubernetes.image: {image} is Ray's own image, without llmos, so {what} would fail at start; build "
            "llmos's image from the repository's Dockerfile (`make image`), push it to your registry and set "
            "kubernetes.image to it"
        )


def _labels(spec: ClusterSpec, team: Team) -> dict[str, str]:
    return {**cluster_labels(spec), TEAM_LABEL: team.name}


def ray_job(
    spec: ClusterSpec,
    job: TrainingJobLike,
    job_yaml: str,
    *,
    deadline_seconds: int | None = None,
    start_deadline_seconds: int | None = None,
) -> list[dict[str, Any]]:
    """A ConfigMap holding the job file and the RayJob that runs `python -m jobs.train` on it.

    The Ray cluster has room for `workers.max` workers; `deadline_seconds` bounds the whole run
    (activeDeadlineSeconds), `start_deadline_seconds` the wait until it runs (preRunningDeadlineSeconds).
    """
    team = workload_team(spec, job)
    _require_llmos_image(spec, "the RayJob's `python -m jobs.train`")
    priority = job.priority or team.priority
    if priority not in [c.name for c in spec.priority_classes]:
        raise ManifestError(f"priority: {priority!r} is not a priority class of cluster {spec.name!r}")
    job_paths = {
        "storage_path": job.storage_path,
        "checkpoint.directory": job.checkpoint.directory,
        "metrics_path": job.metrics_path,
    }
    for field, path in job_paths.items():
        if path is not None:
            lost = "not shared between the job's pods and gone when its cluster shuts down"
            require_on_shared_storage(spec, field, path, lost)
    group = _group(spec, job, job.workers)
    size = GroupSize(group.pool, group.max, group.max)
    _require_admissible(spec, team, size)
    namespace = team.kubernetes_namespace
    config_name = f"{job.name}-job"
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(config_name, namespace, _labels(spec, team)),
        "data": {JOB_FILE: job_yaml},
    }
    volume = {"name": "llmos-job", "mountPath": JOB_DIRECTORY, "configMap": {"name": config_name}}
    body: dict[str, Any] = {
        # Kueue admits the RayJob whole, in its team's queue at its priority, and the job's Ray cluster is its
        # own: no llmos controller runs there to admit it again.
        "entrypoint": f"python -m jobs.train {JOB_DIRECTORY}/{JOB_FILE} --without-controller",
        "submissionMode": "SidecarMode",
        "shutdownAfterJobFinishes": True,
    }
    if deadline_seconds is not None:
        body["activeDeadlineSeconds"] = deadline_seconds
    if start_deadline_seconds is not None:
        body["preRunningDeadlineSeconds"] = start_deadline_seconds
    body["rayClusterSpec"] = ray_cluster_spec(spec, [size], autoscaling=False, head_volumes=[volume])
    labels = {
        **_labels(spec, team),
        QUEUE_NAME_LABEL: queue_name(spec, team),
        PRIORITY_CLASS_LABEL: priority_class_name(spec, priority),
    }
    rayjob = {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayJob",
        "metadata": metadata(job.name, namespace, labels),
        "spec": body,
    }
    return [config_map, rayjob]


def _require_admissible(spec: ClusterSpec, team: Team, size: GroupSize) -> None:
    """Refuse a RayJob Kueue would never admit: its worker pods above the team's quota of their pool, a head pod
    above the team's quota or with no flavor to go to, or both above the pool's capacity or the team's quota
    where the head pod can only go to the workers' flavor."""
    pool = size.pool
    pods = size.max * pool.hosts_per_replica
    workers = f"its {pods} worker pod{'s' if pods > 1 else ''} in pool {pool.name!r} (a pod takes a whole node)"
    workers_request = pool_request(pool, size.max)
    smaller = "set the job's pool to one with smaller nodes"
    require_within_quota(spec, team, workers, pool, workers_request, smaller)
    head = head_pod_request(spec)
    lower_head = "lower kubernetes.head_pod_cpus, head.cpus or head.memory"
    require_within_quota(spec, team, "its head pod", None, head, lower_head)
    require_head_flavor(spec, head)
    fewer = "lower the job's workers.max or resources, or add a pool without node taints for the head pod"
    require_room_beside_head(spec, team, pool, workers, workers_request, head, fewer)


def ray_service(spec: ClusterSpec, serve: ServeJobLike, serve_config: Mapping[str, Any]) -> dict[str, Any]:
    """A RayService running `serve_config` (a Ray Serve config, as `serve deploy` takes it)."""
    team = workload_team(spec, serve)
    _require_llmos_image(spec, "the RayService's Serve application (serving.app)")
    require_on_shared_storage(spec, "checkpoint", serve.checkpoint, "where no training job wrote it")
    group = _group(spec, serve, serve.replicas)
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayService",
        "metadata": metadata(serve.name, team.kubernetes_namespace, _labels(spec, team)),
        "spec": {
            "serveConfigV2": yaml.safe_dump(dict(serve_config), sort_keys=False),
            "rayClusterConfig": ray_cluster_spec(spec, [group], autoscaling=True),
        },
    }
