"""Deploying a ServeJob through the controller, so serving and training share one set of books.

Each replica is one serving request of the team (group = the deployment, `group_min` = its minimum
replicas, so preemption never takes it below that). The controller books the replicas; Serve then
starts them pinned to the booked nodes through Ray's `ray.io/node-id` label, and a reconciler
(`serving.reconcile`) keeps the replica count in step with the books afterwards: down when the
controller preempts a replica, up when a queued or requeued one is placed. A deployment the cluster
can never hold is rejected at once with the controller's reason, instead of Serve waiting in
DEPLOYING forever.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from cluster.console import UserError
from cluster.ray_mapping import POOL_LABEL
from cluster.requests import RequestState, RequestStatus, SubmitRequest, WorkloadKind
from serving.reconcile import run_replicas, serving_bundles, start_reconciler, stop_reconciler
from serving.spec import ServeJob


class Deployment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    url: str
    replicas: int
    nodes: list[str]
    requests: list[str]


def replica_request(job: ServeJob, index: int) -> SubmitRequest:
    resources = {"CPU": job.resources.cpus, "memory": float(job.resources.memory)}
    if job.resources.gpus:
        resources["GPU"] = job.resources.gpus
    bundle: dict = {"resources": resources}
    if job.pool:
        bundle["label_selector"] = {POOL_LABEL: job.pool}
    if job.accelerator_type:
        bundle["gpu_types"] = [job.accelerator_type]
    return SubmitRequest.model_validate(
        {
            "team": job.team,
            "priority": job.priority,
            "kind": WorkloadKind.SERVING,
            "gang": {"name": f"{job.name}-replica-{index}", "bundles": [bundle]},
            "group": job.name,
            "group_min": job.replicas.min,
            "bind_placement_group": False,
        }
    )


def _placed(admin, request_ids: list[str]) -> list[RequestStatus]:
    return [status for status in map(admin.status, request_ids) if status.state is RequestState.PLACED]


def deploy(
    job: ServeJob,
    admin,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    wait_s: float = 60.0,
    on_progress: Callable[[str], None] = lambda message: None,
) -> Deployment:
    """Book the replicas, then start them in Serve: `wait_s` bounds the wait for the minimum replicas to be
    placed, and again the wait for Serve to run them. A deployment that fails or is interrupted releases
    what it booked and removes what it started."""
    from ray import serve

    from serving.app import resolve_checkpoint

    try:
        # Resolved once, so every replica, and each one the reconciler starts later, loads the same weights
        # however many checkpoints a training run writes meanwhile.
        job = job.model_copy(update={"checkpoint": str(resolve_checkpoint(job.checkpoint))})
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    _refuse_a_second(job.name, admin)
    submitted = admin.submit_many([replica_request(job, index) for index in range(job.replicas.max)])
    request_ids = [status.id for status in submitted]
    started = False
    try:
        rejected = [status for status in submitted if status.state is RequestState.REJECTED]
        if rejected:
            raise UserError(f"serve job {job.name} cannot be deployed: {rejected[0].reason}")
        placed = _wait_placed(job, admin, request_ids, wait_s, on_progress)
        # Replicas the cluster has no room for now stay queued: the reconciler starts them once placed.
        booked = serving_bundles(placed)
        nodes = [bundle.node for bundle in booked]
        on_progress(f"starting {len(placed)} replica(s) of {job.name} on {', '.join(sorted(set(nodes)))}")
        # One proxy, as the RayService config has it: a proxy started on each node with a replica binds the same
        # port (SO_REUSEPORT), and one that has no routes yet answered 404 to the requests the kernel gave it.
        serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
        started = True
        try:
            run_replicas(job, booked)
        except Exception as error:
            raise UserError(f"Serve could not start {job.name}: {error}") from None
        _wait_running(job.name, wait_s, on_progress)
        for status in placed:
            # One preempted meanwhile is no longer placed; the reconciler follows it from here.
            with contextlib.suppress(UserError):
                admin.mark_running(status.id, {"deployment": job.name})
        start_reconciler(job, [admin.reporter(request_id) for request_id in request_ids], booked)
    except BaseException:
        # Best effort: an error here must not hide the one that ended the deploy.
        with contextlib.suppress(Exception):
            if started:
                serve.delete(job.name)
            _cancel_all(admin, request_ids)
        raise
    queued = len(request_ids) - len(placed)
    if queued:
        on_progress(f"{queued} more replica(s) queued; they start when the controller places them")
    return Deployment(
        name=job.name,
        url=f"http://{host}:{port}{job.route_prefix.rstrip('/')}/v1/completions",
        replicas=len(placed),
        nodes=nodes,
        requests=request_ids,
    )


def _serving_replicas(admin) -> list[RequestStatus]:
    """The replica requests of every deployment that are queued or hold a node."""
    return [status for status in admin.queue() if status.request.kind is WorkloadKind.SERVING]


def _refuse_a_second(name: str, admin) -> None:
    """A name is one deployment: deploying it again would book a second set of replicas under the first's."""
    from ray import serve

    booked = [status.id for status in _serving_replicas(admin) if status.request.group == name]
    if booked or name in serve.status().applications:
        raise UserError(
            f"a deployment named {name!r} already runs"
            + (f" (replica requests {', '.join(booked)})" if booked else "")
            + f"; delete it first (`llmos serve delete {name}`) or give this one another name"
        )


def _wait_placed(job: ServeJob, admin, request_ids: list[str], wait_s: float, on_progress) -> list[RequestStatus]:
    deadline = time.monotonic() + wait_s
    while len(placed := _placed(admin, request_ids)) < job.replicas.min:
        if time.monotonic() > deadline:
            waiting = admin.status(next(i for i in request_ids if i not in {s.id for s in placed}))
            raise UserError(
                f"only {len(placed)} of the {job.replicas.min} replicas serve job {job.name} needs were placed "
                f"within {wait_s:.0f}s: {waiting.reason}"
            )
        on_progress(f"waiting for replicas: {len(placed)}/{job.replicas.min} placed")
        time.sleep(0.5)
    return placed


def _wait_running(name: str, wait_s: float, on_progress) -> None:
    from ray import serve

    deadline = time.monotonic() + wait_s
    said = ""
    while True:
        application = serve.status().applications.get(name)
        state = application.status.value if application is not None else "NOT_STARTED"
        if state == "RUNNING":
            return
        if state == "DEPLOY_FAILED":
            raise UserError(f"Serve could not start {name}: {application.message}")
        if time.monotonic() > deadline:
            raise UserError(
                f"Serve did not run {name} within {wait_s:.0f}s of its replicas being placed (it is {state}): "
                f"`serve status` says why; the bookings are released"
            )
        if state != said:
            on_progress(f"waiting for Serve to run {name}: {state}")
            said = state
        time.sleep(0.5)


def _cancel_all(admin, request_ids: list[str]) -> None:
    for request_id in request_ids:
        if not admin.status(request_id).state.final:
            admin.cancel(request_id)


def delete(name: str, admin) -> list[str]:
    """Remove the Serve application and release its replicas' bookings (queued ones too); returns their ids.
    A name that is neither an application nor held by bookings is refused, naming the deployments."""
    from ray import serve

    replicas = _serving_replicas(admin)
    bookings = [status.id for status in replicas if status.request.group == name]
    applications = serve.status().applications  # empty, and no Serve started, while none runs
    if name not in applications and not bookings:
        known = sorted(set(applications) | {status.request.group for status in replicas if status.request.group})
        raise UserError(f"no deployment {name!r}; deployments: {', '.join(known) or 'none'} (llmos serve status)")
    stop_reconciler(name)
    if name in applications:
        serve.delete(name)
    for request_id in bookings:
        admin.complete(request_id, reason=f"deployment {name} deleted")
    return bookings
