"""Admission of a TrainingJob through the llmos controller: book a gang, pin Ray Train's workers to it.

Ray Train V2 always creates its own placement group, so training asks the controller to book the
gang without binding one (`bind_placement_group=False`): the controller checks quota and priority
and books nodes (and GPU devices) as for any gang, and the job pins worker i to the node of bundle i
with a label selector on Ray's node id (`BundleBinding.pin`), so Ray Train's own placement group
reserves exactly the booked nodes. The request is released with `Admin.complete` when the run ends.

`gang_request` and `placement_for` are pure; `admit` is the one function that talks to the controller.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.admin import Admin
from cluster.console import UserError
from cluster.placement.request import Bundle, Constraint, GangRequest
from cluster.ray_mapping import POOL_LABEL
from cluster.requests import RequestState, RequestStatus, SubmitRequest, WorkloadKind
from cluster.spec import format_memory
from jobs.spec import TrainingJob

# How often the queue position is printed while a job waits to be placed.
WAIT_PROGRESS_S = 10.0


@dataclass(frozen=True)
class WorkerPlacement:
    """How many workers a run may have and which nodes each may run on."""

    min_workers: int
    max_workers: int
    # One selector for every worker, or one per worker (max_workers of them) to pin workers to nodes.
    label_selector: dict[str, str] | list[dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Admission:
    """A placed training request and where its workers go."""

    status: RequestStatus
    placement: WorkerPlacement

    @property
    def request_id(self) -> str:
        return self.status.id


def worker_bundle(job: TrainingJob, pool: str | None = None) -> Bundle:
    """One worker's bundle: the job's resources, on `pool` (else the job's own) or on any pool of its
    accelerator type."""
    resources = {"CPU": job.resources.cpus, "memory": float(job.resources.memory)}
    if job.resources.gpus:
        resources["GPU"] = job.resources.gpus
    pool = pool or job.pool
    if pool is not None:
        return Bundle(resources=resources, label_selector={POOL_LABEL: pool})
    if job.accelerator_type is not None:
        return Bundle(resources=resources, gpu_types=(job.accelerator_type,))
    return Bundle(resources=resources)


def gang_request(job: TrainingJob, workers: int, name: str | None = None, pool: str | None = None) -> SubmitRequest:
    """A books-only training gang of `workers` bundles in one pool, charged to the job's team.

    `name` tells the gang apart from the job's main one, and `pool` holds it to the pool that one runs in
    (the elastic driver's growth request: a gang is one pool, grown or not).
    """
    return SubmitRequest(
        team=job.team,
        priority=job.priority,
        kind=WorkloadKind.TRAINING,
        gang=GangRequest(
            name=name or job.name, bundles=(worker_bundle(job, pool),) * workers, constraint=Constraint.SAME_POOL
        ),
        bind_placement_group=False,
    )


def placement_for(bookings: list[RequestStatus]) -> WorkerPlacement:
    """Exactly one worker per booked bundle (across the bookings), worker i pinned to the node of bundle i."""
    selectors = [bundle.pin for status in bookings for bundle in status.bundles]
    return WorkerPlacement(len(selectors), len(selectors), selectors)


def sizes_to_try(job: TrainingJob) -> list[int]:
    """Worker counts from `workers.max` down to `workers.min`."""
    return list(range(job.workers.max, job.workers.min - 1, -1))


def rejection_message(job: TrainingJob, workers: int, reason: str) -> str:
    """The controller's reason, with the job fields that produced the request and how to change them."""
    where = f"pool {job.pool!r}" if job.pool else f"accelerator_type {job.accelerator_type!r}"
    if not job.pool and not job.accelerator_type:
        where = "any pool"
    asked = (
        f"{workers} worker{'s' if workers > 1 else ''} x ({job.resources.cpus:g} cpus, {job.resources.gpus:g} gpus, "
        f"{format_memory(job.resources.memory)}) on {where} for team {job.team!r}"
    )
    if "quota" in reason:
        fix = "lower workers.min or resources.gpus/cpus, or ask an admin for more quota (llmos quota)"
    else:
        fix = "lower workers.min, workers.max or resources.*, or pick another pool / accelerator_type"
    return f"training job {job.name!r} cannot be admitted: {reason}\n  it asks for {asked}\n  fix: {fix}"


def admit(
    job: TrainingJob,
    admin: Admin,
    *,
    on_progress: Callable[[str], None] = print,
    wait_timeout_s: float | None = None,
) -> Admission:
    """Book the job's gang: the largest size placed at once, else wait in the queue at `workers.min`.

    Raises UserError naming the job's fields when the controller rejects every size (can never fit,
    over the team's quota), or when `wait_timeout_s` passes while it still waits.
    """
    sizes = sizes_to_try(job)
    rejected: list[tuple[int, str]] = []
    status = None
    for index, workers in enumerate(sizes):
        status = admin.submit(gang_request(job, workers))
        if status.state.holding:
            return Admission(status, placement_for([status]))
        if status.state is RequestState.REJECTED:
            rejected.append((workers, status.reason))
            status = None
            continue
        if index < len(sizes) - 1:
            on_progress(f"{workers} workers not placed at once ({status.reason or status.state.value}); trying fewer")
            admin.cancel(status.id)
            status = None
    if status is None:
        workers, reason = rejected[-1]
        raise UserError(rejection_message(job, workers, reason))
    placed = _wait_placed(admin, status, on_progress, wait_timeout_s)
    return Admission(placed, placement_for([placed]))


def _wait_placed(
    admin: Admin, status: RequestStatus, on_progress: Callable[[str], None], timeout_s: float | None
) -> RequestStatus:
    """Wait until the request holds its nodes; one given up on (a timeout, Ctrl-C, the driver stopped) is cancelled,
    or it would be placed later for a driver no longer there to run it or give it back."""
    try:
        return _poll_until_placed(admin, status, on_progress, timeout_s)
    except BaseException:
        with contextlib.suppress(Exception):
            if not admin.status(status.id).state.final:
                admin.cancel(status.id)
        raise


def _poll_until_placed(
    admin: Admin, status: RequestStatus, on_progress: Callable[[str], None], timeout_s: float | None
) -> RequestStatus:
    started = time.monotonic()
    workers = len(status.request.gang.bundles)
    last_said = ""
    last_said_at = 0.0
    while True:
        if status.state.holding:
            return status
        if status.state.final:
            raise UserError(f"request {status.id} ended {status.state.value} while waiting: {status.reason}")
        waited = time.monotonic() - started
        said = f"queued ({workers} workers, request {status.id}): {status.state.value}: {status.reason or 'waiting'}"
        if said != last_said or waited - last_said_at >= WAIT_PROGRESS_S:
            on_progress(f"{said} [{waited:.0f}s]")
            last_said, last_said_at = said, waited
        if timeout_s is not None and waited > timeout_s:
            raise UserError(
                f"request {status.id} was not placed within {timeout_s:.0f}s ({status.reason}); it was cancelled"
            )
        time.sleep(0.5)
        status = admin.status(status.id)
