"""The Python admin API: `from cluster.admin import Admin`.

`Admin(address=None)` connects to the running cluster (the local one by default), starts the
controller if none runs yet, and returns pydantic models. The `llmos` CLI is a thin layer over it,
and training and serving use it to obtain their placements.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from cluster import controller
from cluster.auth import ADMIN
from cluster.console import UserError
from cluster.inventory import PoolInfo, connect, read_nodes, summarize_pools
from cluster.launcher import LocalCluster, controller_state_dir
from cluster.requests import (
    DecisionRecord,
    NodeControl,
    RequestState,
    RequestStatus,
    SubmitRequest,
    TeamUsage,
)
from cluster.spec import ClusterSpec, load_spec, parse_model

# How long calls keep retrying while the controller actor restarts.
RESTART_GRACE_S = 60.0
CALL_TIMEOUT_S = 120.0


class NodeBooks(BaseModel):
    """A schedulable node as the controller's books see it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    pool: str
    node_id: str
    capacity: dict[str, float]
    allocated: dict[str, float]
    requests: list[str]
    cordoned: bool
    drained: bool


class PoolUtilization(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pool: str
    nodes: int
    capacity: dict[str, float]
    allocated: dict[str, float]
    utilization: dict[str, float]


def _current_controller(handle):
    """The controller that answers to its name now: one stopped for good and started again (`llmos
    controller stop`, then any call) is a new actor that a handle to the old one never reaches."""
    return controller.get() or handle


def read_credential_file(path: str, source: str) -> str:
    """The credential in the file at `path` (named by `source`, a flag or a variable), as a clear error if unreadable
    or empty."""
    try:
        credential = Path(path).read_text().strip()
    except OSError as error:
        raise UserError(f"{source}: cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{source}: {path} is not a text file; give the file that holds the credential") from None
    if not credential:
        raise UserError(f"{source}: {path} is empty; give the file that holds the credential")
    return credential


class ProgressReporter:
    """Sends a workload's progress to the controller without waiting for it: picklable, for Ray workers.

    Training hands one to its rank-0 worker so progress goes straight to the controller every log step
    (one actor call, no round trip); the credential travels inside and is never printed.
    """

    def __init__(self, handle, credential: str | None, request_id: str):
        self._controller = handle
        self._credential = credential
        self.request_id = request_id

    def report(self, details: dict) -> None:
        self._controller.report.remote(self._credential, self.request_id, details)

    def status(self, timeout_s: float = 30.0) -> RequestStatus:
        return self._wait(self.status_later, timeout_s)

    def status_later(self):
        """The request's status as an ObjectRef, for a caller that must not wait on the controller."""
        return self._controller.status.remote(self._credential, self.request_id)

    def mark_running(self, details: dict, timeout_s: float = 30.0) -> RequestStatus:
        return self._wait(
            lambda: self._controller.mark_running.remote(self._credential, self.request_id, details), timeout_s
        )

    def _wait(self, call: Callable[[], Any], timeout_s: float) -> Any:
        import ray

        try:
            return ray.get(call(), timeout=timeout_s)
        except ray.exceptions.ActorDiedError:  # asked once more, of the controller its name finds now
            self._controller = _current_controller(self._controller)
            return ray.get(call(), timeout=timeout_s)

    def __repr__(self) -> str:
        return f"ProgressReporter({self.request_id})"


class Admin:
    def __init__(
        self,
        address: str | None = None,
        *,
        spec: ClusterSpec | str | Path | None = None,
        state_dir: str | Path | None = None,
        policy: str = controller.DEFAULT_POLICY,
        start: bool = True,
        credential: str | None = None,
        remove_unknown_groups: bool = False,
        scale_up: bool = False,
    ):
        """Connect; start the controller when none runs (with `spec`, else the local cluster's spec).
        A controller whose state dir has no books of the llmos placement groups Ray holds refuses to
        start; `remove_unknown_groups` removes those groups (and what runs in them) first. `scale_up`: an
        autoscaler grows the pools up to their max, and the controller it starts asks it for nodes.

        The credential names the caller: a team's, or the admin's. Without one, `LLMOS_CREDENTIAL` or
        the file named by `LLMOS_CREDENTIAL_FILE` is used, else the admin credential the controller
        keeps on this machine (so the cluster's owner needs nothing). It is never printed or logged.
        """
        # An empty one given is refused, never taken for none given: that would fall back to the admin's.
        if credential is not None and not credential.strip():
            raise UserError("the credential given is empty; give a team's or the admin's credential")
        self.address = connect(address)
        handle = controller.get()
        if handle is None:
            if not start:
                raise UserError("no llmos controller is running; start one with `llmos controller start`")
            handle = self._start(spec, state_dir, policy, remove_unknown_groups, scale_up)
        self._controller = handle
        self._credential = credential if credential is not None else self._credential_from_environment()

    def _credential_from_environment(self) -> str | None:
        # Set but empty is an error, never none given: `LLMOS_CREDENTIAL=$(cat missing)` must not make an admin.
        for variable in ("LLMOS_CREDENTIAL", "LLMOS_CREDENTIAL_FILE"):
            if variable in os.environ and not os.environ[variable].strip():
                raise UserError(f"{variable} is set but empty; set it to a credential (or its file), or unset it")
        if "LLMOS_CREDENTIAL" in os.environ:
            return os.environ["LLMOS_CREDENTIAL"].strip()
        if "LLMOS_CREDENTIAL_FILE" in os.environ:
            return read_credential_file(os.environ["LLMOS_CREDENTIAL_FILE"], "LLMOS_CREDENTIAL_FILE")
        local = Path(self._call("ping", authenticated=False)["state_dir"]) / "credentials" / ADMIN
        try:
            return local.read_text().strip()
        except OSError:
            return None  # the controller refuses each call with a clear message

    @staticmethod
    def _start(
        spec: ClusterSpec | str | Path | None,
        state_dir: str | Path | None,
        policy: str,
        remove_unknown_groups: bool,
        scale_up: bool,
    ):
        local = LocalCluster.find()
        if spec is None:
            if local is None:
                raise UserError("pass the ClusterSpec to start the controller with (spec=... or --spec FILE)")
            spec = local.spec
        elif not isinstance(spec, ClusterSpec):
            spec = load_spec(spec)
        if state_dir is None and local is not None:
            state_dir = controller_state_dir(local.home, spec.name)
        # Elsewhere (KubeRay) the controller picks its default under the head node's LLMOS_HOME itself.
        return controller.start(spec, str(state_dir) if state_dir else None, policy, remove_unknown_groups, scale_up)

    def _call(self, method: str, *args: Any, authenticated: bool = True, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        import ray

        if authenticated:
            args = (self._credential, *args)
        deadline = time.monotonic() + RESTART_GRACE_S
        while True:
            try:
                return ray.get(getattr(self._controller, method).remote(*args), timeout=timeout_s)
            except ray.exceptions.RayTaskError as error:
                if isinstance(error.cause, UserError):
                    raise UserError(str(error.cause)) from None
                raise
            except ray.exceptions.GetTimeoutError:
                raise UserError(
                    f"the llmos controller did not answer {method} within {timeout_s:g} s; it may still carry it "
                    "out: see `llmos queue` before asking again"
                ) from None
            except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError):
                # The controller is being restarted (max_restarts=-1) and may have journaled the call first:
                # submits, cancels and preemptions carry a key it will not apply twice, the rest set a state.
                if time.monotonic() > deadline:
                    raise UserError("the llmos controller did not come back within a minute") from None
                time.sleep(0.5)
                self._controller = _current_controller(self._controller)

    # -- reading ---------------------------------------------------------------------------------------

    def ping(self) -> dict:
        return self._call("ping", authenticated=False)

    def whoami(self) -> str:
        """The principal this Admin acts as: a team name, or "admin"."""
        return self._call("whoami")

    def audit_log(self, limit: int = 100) -> list[dict]:
        """Who did what, allowed or refused (admin only)."""
        return self._call("audit_log", limit)

    def stop_controller(self) -> bool:
        """Stop the controller (admin only); placements stay for the next controller."""
        return controller.stop(self._credential)

    def pools(self) -> list[PoolInfo]:
        """Every pool of the controller's spec, with capacity and Ray's free resources from the live node table,
        and how many nodes it may grow to."""
        declared = [PoolInfo.model_validate(pool) for pool in self._call("ping", authenticated=False)["pools"]]
        return summarize_pools(read_nodes(), declared)

    def nodes(self) -> list[NodeBooks]:
        return [NodeBooks.model_validate(row) for row in self._call("nodes")]

    def utilization(self) -> list[PoolUtilization]:
        """Share of each pool's capacity that llmos has placed work on."""
        by_pool: dict[str, list[NodeBooks]] = defaultdict(list)
        for node in self.nodes():
            by_pool[node.pool].append(node)
        rows = []
        for pool, members in sorted(by_pool.items()):
            capacity: dict[str, float] = defaultdict(float)
            allocated: dict[str, float] = defaultdict(float)
            for node in members:
                for key, amount in node.capacity.items():
                    capacity[key] += amount
                for key in ("CPU", "GPU", "TPU"):
                    allocated[key] += node.allocated.get(key, 0.0)
            rows.append(
                PoolUtilization(
                    pool=pool,
                    nodes=len(members),
                    capacity=dict(capacity),
                    allocated=dict(allocated),
                    utilization={key: allocated[key] / capacity[key] for key in capacity if capacity[key]},
                )
            )
        return rows

    def queue(
        self, include_finished: bool = False, team: str | None = None, states: list[str] | None = None
    ) -> list[RequestStatus]:
        """Requests in arrival order, the final ones kept only with `include_finished`; only `team`'s and
        those in `states` (RequestState values) if given. A team's credential sees its own team's only."""
        return self._call("queue", include_finished, team, states)

    def status(self, request_id: str) -> RequestStatus:
        return self._call("status", request_id)

    def usage(self) -> list[TeamUsage]:
        return self._call("usage")

    def decisions(self, limit: int = 50, request_id: str | None = None, after_seq: int = 0) -> list[DecisionRecord]:
        """The newest `limit` decisions (all with 0), of one request if given, later than `after_seq`:
        follow the log by passing the last seq seen (it keeps the last 10,000)."""
        return self._call("decisions", limit, request_id, after_seq)

    def placement_group(self, request_id: str):
        """The Ray placement group of a placed request, to schedule actors into."""
        return self._call("placement_group", request_id)

    def wait(
        self, request_id: str, states: tuple[RequestState, ...] = (RequestState.PLACED,), timeout_s: float = 60.0
    ) -> RequestStatus:
        """Block until the request reaches one of `states` (or a final state); UserError if it has not
        within `timeout_s`."""
        status = self.wait_many([request_id], states, timeout_s)[0]
        if not _reached(status, states):
            raise UserError(f"request {request_id} is still {status.state.value} after {timeout_s:g}s: {status.reason}")
        return status

    def wait_many(
        self, request_ids: list[str], states: tuple[RequestState, ...] = (RequestState.PLACED,), timeout_s: float = 60.0
    ) -> list[RequestStatus]:
        """Block until every request reaches one of `states` (or a final state), or `timeout_s` passes; their
        statuses then, in order, whether they reached it or not."""
        deadline = time.monotonic() + timeout_s
        latest: dict[str, RequestStatus] = {}
        pending = list(dict.fromkeys(request_ids))
        while True:
            latest.update((request_id, self.status(request_id)) for request_id in pending)
            pending = [request_id for request_id in pending if not _reached(latest[request_id], states)]
            if not pending or time.monotonic() > deadline:
                return [latest[request_id] for request_id in request_ids]
            time.sleep(0.2)

    # -- changing --------------------------------------------------------------------------------------

    def submit(self, request: SubmitRequest | dict) -> RequestStatus:
        return self.submit_many([request])[0]

    def submit_many(self, requests: list[SubmitRequest | dict]) -> list[RequestStatus]:
        """Submit several requests in one controller call, journaled together (group commit).

        All of them are accepted or, if any is malformed, names an unknown team, pool or priority
        class, or is forbidden to this credential, none is (the error names its index). Each is its
        own gang: placed whole or not at all, in priority order, within its team's quota.
        """
        parsed = self._parse_all(requests)
        # The same key on a retried call returns the first submission instead of queueing a twin.
        return self._call("submit_many", parsed, [uuid.uuid4().hex for _ in parsed])

    def acquire(self, request: SubmitRequest | dict, timeout_s: float = 0.0) -> tuple[RequestStatus, Any]:
        """Submit and obtain the Ray placement group to schedule into: what training and serving call.

        Returns at once if the request was placed or rejected, or with no `timeout_s` (the group is None
        while it waits); otherwise waits up to `timeout_s` for it to be placed (UserError if it still
        waits then; it stays queued). Bundle i's worker goes into the group's bundle
        `status.bundles[i].group_bundle_index` (i itself unless the request asked for
        `group_bundles: per_node`).
        """
        return self.acquire_many([request], timeout_s)[0]

    def acquire_many(
        self, requests: list[SubmitRequest | dict], timeout_s: float = 0.0
    ) -> list[tuple[RequestStatus, Any]]:
        """`acquire` for several gangs at once (e.g. the replicas of a deployment), in one controller call.

        Accepted all or none, as `submit_many`. Every request is journaled before any placement group
        is created, and placements are journaled and bound a few at a time (one fsync each), so Ray
        reserves the first groups while the rest are placed; all is durable before the call returns.
        Each request is placed whole or not at all; with `timeout_s`, requests still waiting are
        waited for (UserError if one still waits then).
        """
        parsed = self._parse_all(requests)
        results = self._call("acquire_many", parsed, [uuid.uuid4().hex for _ in parsed])
        if timeout_s > 0:
            deadline = time.monotonic() + timeout_s
            for index, (status, _) in enumerate(results):
                if status.state.waiting:
                    status = self.wait(status.id, timeout_s=max(deadline - time.monotonic(), 0.0))
                    results[index] = (status, self.placement_group(status.id))
        return results

    @staticmethod
    def _parse_all(requests: list[SubmitRequest | dict]) -> list[dict]:
        parsed = []
        for index, request in enumerate(requests):
            if not isinstance(request, SubmitRequest):
                request = parse_model(SubmitRequest, request, "request" if len(requests) == 1 else f"requests[{index}]")
            parsed.append(request.model_dump(mode="json"))
        return parsed

    def cancel(self, request_id: str) -> RequestStatus:
        return self._call("cancel", request_id, uuid.uuid4().hex)

    def complete(self, request_id: str, failed: bool = False, reason: str = "") -> RequestStatus:
        return self._call("complete", request_id, failed, reason)

    def mark_running(self, request_id: str, details: dict | None = None) -> RequestStatus:
        return self._call("mark_running", request_id, details)

    def report(self, request_id: str, details: dict) -> RequestStatus:
        return self._call("report", request_id, details)

    def reporter(self, request_id: str) -> ProgressReporter:
        """A picklable handle a workload's own processes use to report progress on `request_id`."""
        return ProgressReporter(self._controller, self._credential, request_id)

    def cordon(self, node: str) -> NodeControl:
        return self._call("cordon", node, True)

    def uncordon(self, node: str) -> NodeControl:
        return self._call("cordon", node, False)

    def drain(self, node: str) -> list[str]:
        """Stop placing on the node and requeue what runs there; returns the moved request ids."""
        return self._call("drain", node)

    def set_quota(self, team: str, **changes: float | None) -> TeamUsage:
        return self._call("set_quota", team, changes)

    def preempt(self, request_id: str) -> RequestStatus:
        return self._call("preempt", request_id, uuid.uuid4().hex)


def _reached(status: RequestStatus, states: tuple[RequestState, ...]) -> bool:
    return status.state in states or status.state.final
