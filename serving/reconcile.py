"""Keeps a Serve deployment in step with the controller's books of its replicas.

Each replica of a deployment is one serving request (see `serving.deploy`). The controller may
take one off its node (a higher priority preempts it, its node leaves or is drained) and place it
again later; replicas the cluster had no room for at deploy time stay queued and may be placed
any time. A detached actor per deployment (`llmos-serve-<name>` in the `llmos` namespace) follows
those requests and makes Serve run exactly one replica per request that holds a node, pinned to
the booked nodes: it scales the deployment down when a replica is preempted, so Ray frees the
resources the controller gave to someone else, and back up when a replica is placed again.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import ray

from cluster.admin import ProgressReporter
from cluster.requests import BundleBinding, RequestState, RequestStatus
from serving.config import replica_actor_options
from serving.spec import ServeJob

RECONCILE_INTERVAL_S = 1.0
NAMESPACE = "llmos"


def reconciler_name(deployment: str) -> str:
    return f"llmos-serve-{deployment}"


def serving_bundles(statuses: list[RequestStatus]) -> list[BundleBinding]:
    """The bundle of every replica request that holds one, by node: what Serve should run on."""
    held = [bundle for status in statuses if status.state.holding for bundle in status.bundles]
    return sorted(held, key=lambda bundle: bundle.node)


def changed_bookings(statuses: list[RequestStatus], pins: list[dict[str, str]]) -> list[BundleBinding] | None:
    """The bundles Serve should now run on, if they differ from those its replicas are pinned by (`pins`);
    None to leave Serve as it is. Pins, not node names: a node that comes back under its old name has a
    new Ray id. With no replica booked (every node lost), Serve keeps what it has until one is placed."""
    booked = serving_bundles(statuses)
    if not booked or [bundle.pin for bundle in booked] == pins:
        return None
    return booked


def run_replicas(job: ServeJob, booked: list[BundleBinding]) -> None:
    """Deploy (or update) the application with one replica per booked bundle, pinned to those nodes.

    Returns once Serve has the new config, not once it runs: `serve.run` waits, without a timeout, until
    the application runs, and a replica that cannot start would hold the reconciler there for good.
    """
    from ray import serve

    from serving.app import CompletionServer

    application = CompletionServer.options(
        num_replicas=len(booked), ray_actor_options=replica_actor_options(job, booked)
    ).bind(job.model_dump(mode="json"))
    target = serve.RunTarget(application, name=job.name, route_prefix=job.route_prefix)
    serve.run_many([target], wait_for_applications_running=False)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ReplicaReconciler:
    """Follows the replica requests of one deployment and scales Serve to match (see the module doc)."""

    def __init__(self, job: dict, reporters: list[ProgressReporter], booked: list[BundleBinding], interval_s: float):
        self.job = ServeJob.model_validate(job)
        self.reporters = reporters
        self.nodes = [bundle.node for bundle in booked]
        self.pins = [bundle.pin for bundle in booked]
        self.changes: list[dict[str, Any]] = []
        self.last_error = ""
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), daemon=True, name="llmos-serve-sync")
        self._thread.start()

    def _loop(self, interval_s: float) -> None:
        while not self._stopping.wait(interval_s):
            try:
                self.reconcile()
                self.last_error = ""
            except Exception as error:  # a failed round (controller restarting, Serve busy) is retried next tick
                self.last_error = f"{type(error).__name__}: {error}"

    def reconcile(self) -> None:
        statuses = [reporter.status() for reporter in self.reporters]
        booked = changed_bookings(statuses, self.pins)
        if booked is not None:
            run_replicas(self.job, booked)
            nodes = [bundle.node for bundle in booked]
            self.changes.append({"time": time.time(), "replicas": len(nodes), "nodes": nodes, "was": self.nodes})
            self.nodes, self.pins = nodes, [bundle.pin for bundle in booked]
        for reporter, status in zip(self.reporters, statuses, strict=True):
            if status.state is RequestState.PLACED:
                reporter.mark_running({"deployment": self.job.name})

    def state(self) -> dict[str, Any]:
        return {
            "replicas": len(self.nodes),
            "nodes": self.nodes,
            "changes": self.changes,
            "last_error": self.last_error,
        }

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=RECONCILE_INTERVAL_S * 5)


def start_reconciler(job: ServeJob, reporters: list[ProgressReporter], booked: list[BundleBinding]):
    """Start (or replace) the deployment's reconciler; it lives on until `stop_reconciler`."""
    stop_reconciler(job.name)
    return ReplicaReconciler.options(name=reconciler_name(job.name), namespace=NAMESPACE, lifetime="detached").remote(
        job.model_dump(mode="json"), reporters, booked, RECONCILE_INTERVAL_S
    )


def find_reconciler(deployment: str):
    try:
        return ray.get_actor(reconciler_name(deployment), namespace=NAMESPACE)
    except ValueError:
        return None


def stop_reconciler(deployment: str) -> None:
    handle = find_reconciler(deployment)
    if handle is None:
        return
    with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        ray.get(handle.stop.remote(), timeout=30)  # its thread ends between rounds; the kill ends a stuck one
    ray.kill(handle, no_restart=True)
