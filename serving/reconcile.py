"""Keeps a Serve deployment in step with the controller's books of its replicas.

Each replica of a deployment is one serving request (see `serving.deploy`). The controller may
take one off its node (a higher priority preempts it, its node leaves or is drained) and place it
again later; replicas the cluster had no room for at deploy time stay queued and may be placed
any time. A detached actor per deployment (`llmos-serve-<name>` in the `llmos` namespace) follows
those requests and makes Serve run exactly one replica per request that holds a node, pinned to
the booked nodes: it scales the deployment down when a replica is preempted, so Ray frees the
resources the controller gave to someone else, and back up when a replica is placed again.

Serve, not the reconciler, picks which replica a smaller deployment stops: one on the node with the
fewest replicas, which need not be the node whose booking went. Nor does Ray place a new replica
by the books: any booked node with room will do. So once Serve runs what it was asked, the
reconciler compares where the replicas run with where they are booked, and stops one on a node
running more than its bookings while another runs fewer: Ray frees what that node's new holder
waits for, and Serve starts the replica again where a booking has room.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import Counter
from typing import Any

import ray

from cluster.admin import ProgressReporter
from cluster.requests import BundleBinding, RequestState, RequestStatus
from serving.config import DEPLOYMENT, replica_actor_options
from serving.spec import ServeJob

RECONCILE_INTERVAL_S = 1.0
# How often the replicas' nodes are compared with the bookings, and the least time after a replica is stopped
# for that before another may be: Serve needs a health check (every 10 s) to see it gone and start it again.
PLACEMENT_CHECK_S = 5.0
MOVE_PAUSE_S = 30.0
NAMESPACE = "llmos"
SERVE_NAMESPACE = "serve"


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


def misplaced_replica(booked: list[BundleBinding], running: list[tuple[str, str]]) -> str | None:
    """Of the replicas Serve runs (`running`: actor name, Ray node id), one to stop because its node runs more
    replicas than are booked there while another booked node runs fewer; None when each node runs what is
    booked there, or the books lack Ray's node ids."""
    wanted = Counter(bundle.node_id for bundle in booked)
    if "" in wanted:
        return None
    have = Counter(node for _, node in running)
    if all(have[node] >= count for node, count in wanted.items()):
        return None
    return next((name for name, node in running if have[node] > wanted[node]), None)


def serve_running(deployment: str) -> list[tuple[str, str]] | None:
    """The deployment's replicas as (actor name, Ray node id), once Serve runs every replica it was asked for;
    None while it starts or stops any."""
    from ray import serve
    from ray.util.state import list_actors

    application = serve.status().applications.get(deployment)
    if application is None or application.status.value != "RUNNING" or DEPLOYMENT not in application.deployments:
        return None
    states = application.deployments[DEPLOYMENT].replica_states
    alive = list_actors(
        filters=[("class_name", "=", f"ServeReplica:{deployment}:{DEPLOYMENT}"), ("state", "=", "ALIVE")]
    )
    if set(states) != {"RUNNING"} or states["RUNNING"] != len(alive):
        return None
    return [(actor.name, actor.node_id) for actor in alive]


def deployment_version(job: ServeJob) -> str:
    """The same for the same job, so that deploying it again keeps the replicas that still fit."""
    return hashlib.sha256(job.model_dump_json().encode()).hexdigest()[:16]


def run_replicas(job: ServeJob, booked: list[BundleBinding]) -> None:
    """Deploy (or update) the application with one replica per booked bundle, pinned to those nodes.

    Returns once Serve has the new config, not once it runs: `serve.run` waits, without a timeout, until
    the application runs, and a replica that cannot start would hold the reconciler there for good.
    """
    from ray import serve

    from serving.app import CompletionServer

    deployment = CompletionServer.options(
        num_replicas=len(booked), ray_actor_options=replica_actor_options(job, booked)
    )
    # Serve gives a deployment deployed without a version a new one each time, and replaces every replica: one
    # booking taken back would restart them all. Versioned by the job, a new count only scales the deployment,
    # while the booked nodes stay the same set: the pin to them is in the actor options, which Serve versions too.
    # Serve 2.60's public options() refuses a version (`_internal` lets it through); its deploy path honours one.
    application = deployment.options(version=deployment_version(job), _internal=True).bind(job.model_dump(mode="json"))
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
        self._next_placement_check = 0.0  # time.monotonic() of the next comparison of nodes with bookings
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
        if booked is None and time.monotonic() >= self._next_placement_check:
            self._next_placement_check = time.monotonic() + PLACEMENT_CHECK_S
            self._move_a_misplaced_replica(serving_bundles(statuses))

    def _move_a_misplaced_replica(self, booked: list[BundleBinding]) -> None:
        """Stop one replica running where it is not booked (see the module doc); Serve starts it again."""
        running = serve_running(self.job.name) if booked else None
        victim = misplaced_replica(booked, running) if running is not None else None
        if victim is None:
            return
        node = dict(running)[victim]
        with contextlib.suppress(ValueError):  # gone already: Serve replaces it either way
            ray.kill(ray.get_actor(victim, namespace=SERVE_NAMESPACE), no_restart=True)
        self.changes.append({"time": time.time(), "stopped_misplaced": victim, "node_id": node})
        self._next_placement_check = time.monotonic() + MOVE_PAUSE_S

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
