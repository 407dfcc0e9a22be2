"""The llmos controller: one detached, named Ray actor per cluster that owns the books and acts.

It wraps the pure `Scheduler` with the side effects: it reads Ray's live node table, binds
placements to placement groups (`cluster.binding`), and journals every change to a file store on
the head node, flushed before a call returns, so an acknowledged change survives a killed
controller. On (re)start it restores the journal and reconciles with Ray: placement groups that
exist are kept (nothing is bound twice), missing ones are bound, orphans are removed. A controller
whose state dir holds no journal while Ray holds llmos placement groups has lost its books (a head
node restarted without a persistent state dir, or another state dir): it changes nothing and refuses
every call but `ping` and `shutdown` with the reason (`state_lost`), instead of removing the groups
as orphans.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
from ray.autoscaler.sdk import request_resources

from cluster import binding, store
from cluster.auth import ADMIN, UNKNOWN, Action, AuditLog, Credentials, authorize
from cluster.console import UserError
from cluster.inventory import declared_pools, ray_cluster_id, ray_node_table
from cluster.launcher import controller_state_dir, llmos_home
from cluster.placement.snapshot import NodeSnapshot, node_from_ray
from cluster.ray_mapping import HEAD_POOL, POOL_LABEL, whole_node_requests
from cluster.requests import DecisionRecord, NodeControl, RequestStatus, SubmitRequest, TeamUsage
from cluster.scheduler import PLACEMENT_GROUP_PREFIX, Bind, Scheduler, Unbind, team_of
from cluster.spec import ClusterSpec
from cluster.store import Journal
from cluster.waiting import wait_for

CONTROLLER_NAME = "llmos-controller"
NAMESPACE = binding.NAMESPACE
DEFAULT_POLICY = "llmos"
POLL_INTERVAL_S = 0.5
# A batch's placements are journaled (one fsync) and bound this many at a time.
BIND_EVERY = 8
# Creating a placement group waits on a GCS round trip with the GIL released: binder threads overlap
# those round trips with each other and with the decisions that follow.
BIND_THREADS = 4
START_RETRY_S = 60.0

logger = logging.getLogger("llmos.controller")


def _freeze_survivors(phase: str, info: dict) -> None:
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


def _retried_while_ray_recovers(read: Callable[[], Any], what: str) -> Any:
    """`read()`, tried again for up to `START_RETRY_S` while it fails. Ray restarts the controller after its head
    or its process failed, when the GCS may still refuse calls for a while, and an actor whose constructor raises
    is not restarted again: one refused call would leave the cluster without a controller."""
    deadline = time.monotonic() + START_RETRY_S
    while True:
        try:
            return read()
        except Exception:
            if time.monotonic() >= deadline:
                raise
            logger.warning("%s failed; trying again", what, exc_info=True)
            time.sleep(1.0)


def freeze_survivors_of_full_collections() -> None:
    """From now on, move what survives each of Python's full collections out of the collector's reach.

    The controller's books (requests, their models, the decision log) are long-lived trees of objects.
    Full collections found nothing to free among them, yet scanned them all while every call waited,
    longer as the books grew: from 35 to 344 ms over 10,000 requests on the 2-core machine.
    What survives a full collection is reachable, so freezing it hides no garbage that exists then,
    and objects dropped later are still freed by their reference counts. Only a reference cycle among
    frozen objects that becomes garbage later would never be freed; after 7,500 requests, failed calls
    among them, unfreezing and collecting found no such cycle. Idempotent.
    """
    if _freeze_survivors not in gc.callbacks:
        gc.callbacks.append(_freeze_survivors)


class Controller:
    """Ray actor body. Every public method holds the lock, so calls and the inventory loop interleave safely."""

    def __init__(
        self,
        spec: dict,
        state_dir: str | None,
        policy: str = DEFAULT_POLICY,
        poll_interval_s: float = POLL_INTERVAL_S,
        scale_up: bool = False,
    ):
        """`state_dir` None: `$LLMOS_HOME/controller/<cluster>` as the head node sees it (on KubeRay, the
        head pod's persistent volume). `scale_up`: Ray's autoscaler grows the pools up to their max
        (KubeRay), and the controller asks it for the nodes waiting gangs need."""
        self.spec = ClusterSpec.model_validate(spec)
        self.state_dir = Path(state_dir) if state_dir else controller_state_dir(llmos_home(), self.spec.name)
        self.journal = Journal(self.state_dir)
        self._unpooled_nodes_seen: set[str] = set()  # Ray node ids of workers of no pool, warned of once
        self._pool_names = {pool.name for pool in self.spec.pools}
        self.scale_up_requested: dict[str, int] | None = None  # nodes per pool Ray's autoscaler was asked for
        restored = self._load_books(policy, scale_up)
        self.node_ids: dict[str, str] = {}
        self.credentials = Credentials(self.state_dir / "credentials", [team.name for team in self.spec.teams])
        self.audit = AuditLog(self.state_dir / "audit.jsonl")
        self.started_at = time.time()
        self.groups: dict[str, Any] = {}  # request id -> the placement group this controller created
        self._binder = ThreadPoolExecutor(BIND_THREADS, thread_name_prefix="llmos-bind")
        self._binds_in_flight: list[tuple[str, Future]] = []  # (request id, its group being created)
        self._reconcile_due = False  # a commit failed part way: Ray's groups may not match the books
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        with self._lock:
            self.state_lost = _retried_while_ray_recovers(lambda: self._read_ray(bool(restored)), "reading Ray's state")
            if self.state_lost is None:
                self.scheduler.schedule()
                try:
                    self._commit()
                except Exception:  # the books are durable; the inventory loop binds what failed again
                    logger.exception("binding the restored books failed; retrying on the next inventory refresh")
            else:
                logger.error(self.state_lost)
        if self.state_lost is None:
            threading.Thread(target=self._poll, args=(poll_interval_s,), daemon=True, name="llmos-inventory").start()
        freeze_survivors_of_full_collections()
        gc.collect()  # the restored books and the libraries loaded so far are frozen now

    # -- side effects ---------------------------------------------------------------------------------

    def _read_ray(self, restored: bool) -> str | None:
        """Bring the restored books in line with Ray as it is now; why this controller must not act, or None.
        Each step may be repeated after a failed try: Ray is only read, and what is ended stays ended."""
        self._end_books_of_a_stopped_cluster()
        self._apply_inventory(*self._read_inventory())
        state_lost = None if restored else self._groups_without_books()
        if state_lost is None:
            self._reconcile()
        return state_lost

    def _end_books_of_a_stopped_cluster(self) -> None:
        """Books kept for another Ray cluster (this one was stopped and started anew, as `llmos down` and `up`
        do, or re-created on KubeRay with the same state volume) hold requests whose workloads went with
        it: they end, durably, before this cluster's id is recorded, so a crash in between ends them again."""
        ray_cluster = ray_cluster_id()
        booked_on = store.read_ray_cluster(self.state_dir)
        if booked_on is not None and booked_on != ray_cluster:
            ended = self.scheduler.end_with_cluster(
                f"the Ray cluster it was booked in ({booked_on[:12]}) stopped, and what ran in it went with it"
            )
            self.scheduler.write_journal()
            self._flush()
            logger.warning("ended %d request(s) of Ray cluster %s: %s", len(ended), booked_on, ", ".join(ended))
        if booked_on != ray_cluster:
            store.write_ray_cluster(self.state_dir, ray_cluster)

    def _read_inventory(self) -> tuple[list[NodeSnapshot], dict[str, str]]:
        """The nodes Ray reports alive and not draining, and their Ray node ids by llmos name.

        A draining node (its raylet got SIGTERM: a Kubernetes pod deleted, a spot VM's notice, an
        autoscaler scale-down) keeps running until its deadline, but it is leaving: taking it out of
        the books now requeues its gangs while their workers can still checkpoint and stop cleanly.
        """
        nodes = {}
        node_ids = {}
        draining = ray._private.state.state.get_draining_nodes()
        # Oldest first, so that of a node's raylet restarted under its name (both alive until the GCS misses
        # the old one's heartbeats) the new one is kept.
        for node in ray_node_table(alive_only=True):
            if node.node_id in draining or node.is_head:
                continue
            pool = node.labels.get(POOL_LABEL)
            if pool not in self._pool_names:
                if node.node_id not in self._unpooled_nodes_seen:
                    self._unpooled_nodes_seen.add(node.node_id)
                    logger.warning(
                        "node %s (%s) has %s, so no pool of the ClusterSpec holds it and nothing is placed there; "
                        "start it with `llmos up`, or give it the label of a pool",
                        node.name,
                        node.address,
                        f"{POOL_LABEL}={pool}, which names no pool" if pool else f"no {POOL_LABEL} label",
                    )
                continue
            node_ids[node.name] = node.node_id
            nodes[node.name] = node_from_ray(node.name, node.resources_total, node.labels)
        return list(nodes.values()), node_ids

    def _apply_inventory(self, nodes: list[NodeSnapshot], node_ids: dict[str, str]) -> None:
        self.node_ids = node_ids
        self.scheduler.set_nodes(nodes)

    def _groups_without_books(self) -> str | None:
        """Why this controller, starting with an empty journal, must not act: the llmos placement
        groups Ray holds belong to books it does not have, and reconciling would remove them all."""
        unknown = sorted(binding.live_groups())
        if not unknown:
            return None
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        return (
            f"the controller's state was lost: Ray holds {len(unknown)} llmos placement group(s) ({shown}), "
            f"but the state dir {self.state_dir} on the head node holds no journal (a head node restarted "
            "without a persistent state dir, or a controller started with another --state-dir). Nothing was "
            "changed. Stop this controller (`llmos controller stop`) and start it with the state dir that holds "
            "its journal (`llmos controller start --state-dir DIR`), or give up those requests and remove their "
            "groups and whatever runs in them (`llmos controller start --remove-unknown-groups`)."
        )

    def _reconcile(self) -> None:
        """Make Ray's placement groups match the books after a restart, from one read of Ray's table: the
        effects are queued only once it was read, so a failed read queues none and can be tried again."""
        live = binding.live_groups()
        # A booking made without a group (`bind_placement_group: false`, as training's) has nothing to bind.
        bound = [status for status in self.scheduler.holders() if status.placement_group]
        expected = {status.placement_group for status in bound}
        self.scheduler.effects += [
            Bind(status.id, status.placement_group, tuple(status.bundles))
            for status in bound
            if status.placement_group not in live
        ]
        self.scheduler.effects += [
            Unbind(name.removeprefix(PLACEMENT_GROUP_PREFIX), name) for name in sorted(live.keys() - expected)
        ]

    def _commit(self, wait: bool = True) -> None:
        """Persist first (one write and one fsync for everything the call changed), then act: a crash
        in between is repaired by `_reconcile`.

        Placement groups are created on the binder threads; with `wait`, this returns once Ray has
        taken every one, else the caller goes on deciding while they are created, and must commit
        with `wait` before it answers.
        """
        self.scheduler.write_journal()
        self._flush()
        effects, self.scheduler.effects = self.scheduler.effects, []
        try:
            for effect in effects:
                if isinstance(effect, Bind):
                    created = self._binder.submit(
                        binding.bind, effect.placement_group, list(effect.bundles), self.node_ids
                    )
                    self._binds_in_flight.append((effect.request_id, created))
                    continue
                self._finish_binds()  # in order: a group is never removed before it was made
                self.groups.pop(effect.request_id, None)
                binding.unbind(effect.placement_group)
            if wait:
                self._finish_binds()
        except Exception as error:
            # The effects after the failed one were not carried out, the failed one not at all: the next
            # inventory refresh makes Ray's groups match the durable books.
            self._reconcile_due = True
            why = next(iter(str(error).splitlines()), "")
            raise UserError(
                f"the change is saved, but Ray refused a placement group change ({type(error).__name__}: {why}); "
                "the controller makes Ray's groups match its books on its next inventory refresh"
            ) from error
        if self.journal.needs_compaction:
            try:
                self.journal.compact(self.scheduler.checkpoint())
            except OSError:  # the call's change is durable; the journal is compacted (or started) later
                logger.exception("compacting the journal in %s failed", self.state_dir)
        if self.scheduler.scale_up:
            self._request_nodes()

    def _flush(self) -> None:
        """Make the books' changes durable; if they cannot be, drop them, as a restart would, and say so."""
        try:
            self.journal.flush()
        except store.JournalWriteFailed as error:
            logger.exception("the journal could not be written; the books go back to what it holds")
            self._reload_books()
            raise UserError(
                f"the change was not saved, so it was not made: {error}. The books are as the journal holds them "
                f"(`llmos queue` shows them). Free space under {self.state_dir} on the head node, or fix its disk, "
                "and try again"
            ) from error

    def _load_books(self, policy: str, scale_up: bool) -> list[dict]:
        """The books as the journal holds them; the entries they were restored from."""
        self.scheduler = Scheduler(self.spec, policy, journal=self.journal.append, scale_up=scale_up)
        entries = self.journal.load()
        self.scheduler.restore(entries)
        return entries

    def _reload_books(self) -> None:
        """The books as the journal holds them. What a failed write left in memory only is dropped, its effects
        with it, none of which was carried out: Ray's placement groups match these books."""
        nodes = list(self.scheduler.nodes.values())
        self._load_books(self.scheduler.policy, self.scheduler.scale_up)
        self.scheduler.set_nodes(nodes)

    def _request_nodes(self) -> None:
        """Ask Ray's autoscaler for the nodes the gangs waiting on new nodes need: whole nodes of each pool,
        live ones included, since it fits a request against nodes' totals, not what is free. The request
        stands until replaced; an empty one lets idle nodes go again."""
        demand = self.scheduler.scale_up_demand()
        if demand == self.scale_up_requested:
            return
        requests = whole_node_requests(self.spec, demand)
        try:
            request_resources(
                bundles=[request["resources"] for request in requests],
                bundle_label_selectors=[request["label_selector"] for request in requests],
            )
        except Exception:  # the call's own changes are durable and bound: the next commit asks again
            logger.exception("asking Ray's autoscaler for %s failed", demand)
            return
        self.scale_up_requested = demand
        logger.info("asked Ray's autoscaler for %s", demand or "nothing")

    def _finish_binds(self) -> None:
        """Wait for the groups in flight; every one that was made is kept, then the first error is raised."""
        in_flight, self._binds_in_flight = self._binds_in_flight, []
        errors = []
        for request_id, created in in_flight:
            try:
                self.groups[request_id] = created.result()
            except Exception as error:  # raised below, once the others are recorded
                errors.append(error)
        if errors:
            raise errors[0]

    def _poll(self, interval_s: float) -> None:
        while not self._stopping.wait(interval_s):
            self.audit.flush_ended()  # a flood's count is written once its minute is over, however quiet after
            try:
                # Ray is asked outside the lock: a GCS busy making placement groups answers slowly,
                # and the calls that made them must not wait behind it.
                inventory = self._read_inventory()
                with self._lock:
                    self._apply_inventory(*inventory)
                    if self._reconcile_due:
                        self._reconcile()
                        self._reconcile_due = False  # only once it ran: a failed one is tried again next tick
                    self.scheduler.schedule()
                    self._commit()
            except Exception:  # the loop must outlive a failed GCS call; the next tick retries
                logger.exception("inventory refresh failed")

    def _act(self, change, *args) -> Any:
        with self._lock:
            try:
                result = change(*args)
                self.scheduler.schedule()
            finally:
                self._commit()
            return detached(result)

    def _refuse_if_state_lost(self, action: Action) -> None:
        if self.state_lost is not None and action is not Action.SHUTDOWN:
            raise UserError(self.state_lost)

    def _allow(self, credential: str | None, action: Action, target: str = "", team: str | None = None) -> str:
        """The caller's principal, if it may take `action`; a refusal is audited and changes nothing."""
        principal = self._principal(credential, action, target)
        self._authorize(principal, action, target, team)
        return principal

    def _principal(self, credential: str | None, action: Action, target: str) -> str:
        """Whom `credential` names; an unknown one is refused, audited."""
        self._refuse_if_state_lost(action)
        try:
            return self.credentials.principal(credential)
        except UserError as refusal:
            self.audit.record(UNKNOWN, action.value, target, "refused", str(refusal))
            raise

    def _authorize(self, principal: str, action: Action, target: str, team: str | None) -> None:
        try:
            authorize(principal, action, team)
        except UserError as refusal:
            self.audit.record(principal, action.value, target, "refused", str(refusal))
            raise

    def _audited(self, principal: str, action: Action, target: str, change, *args) -> Any:
        try:
            result = self._act(change, *args)
        except UserError as error:
            self.audit.record(principal, action.value, target, "failed", str(error))
            raise
        self.audit.record(principal, action.value, target, "ok")
        return result

    def _owned(self, credential: str | None, action: Action, request_id: str) -> tuple[str, RequestStatus]:
        # The caller is named before the lookup: an unknown one learns nothing of which ids exist.
        principal = self._principal(credential, action, request_id)
        with self._lock:
            status = self.scheduler.get(request_id)
        self._authorize(principal, action, request_id, status.team)
        return principal, status

    # -- the API: every call but ping names its caller with a credential -------------------------------

    def ping(self) -> dict:
        with self._lock:
            return {
                "policy": self.scheduler.policy,
                "requests": len(self.scheduler.requests),
                "nodes": len(self.node_ids),
                "state_dir": str(self.state_dir),
                "started_at": self.started_at,
                "pid": os.getpid(),
                "state_lost": self.state_lost,
                "scale_up": self.scheduler.scale_up,
                "scale_up_requested": self.scale_up_requested or {},
                "pools": [pool.model_dump() for pool in declared_pools(self.spec)],
            }

    def whoami(self, credential: str | None) -> str:
        return self.credentials.principal(credential)

    def acquire(
        self, credential: str | None, request: dict, idempotency_key: str | None = None
    ) -> tuple[RequestStatus, Any]:
        """Submit, and hand back the placement group too when the request was placed at once."""
        return self.acquire_many(credential, [request], [idempotency_key])[0]

    def acquire_many(
        self, credential: str | None, requests: list[dict], idempotency_keys: list[str | None] | None = None
    ) -> list[tuple[RequestStatus, Any]]:
        """`acquire` for a batch, in one call and under one hold of the lock.

        Every request is checked first; an invalid or forbidden one refuses the whole batch and
        changes nothing. Each request is then its own gang, placed whole or not at all, in priority
        order within its team's quota. Every request is journaled (one write, one fsync) before any
        placement group is created; placements are then journaled and bound `BIND_EVERY` at a time,
        and the call returns once all of them are durable.
        """
        with self._lock:  # held throughout, so the inventory loop cannot slip in before the groups are handed back
            statuses = self.submit_many(credential, requests, idempotency_keys)
            return [(status, self._group_of(status)) for status in statuses]  # already detached

    def submit(self, credential: str | None, request: dict, idempotency_key: str | None = None) -> RequestStatus:
        return self.submit_many(credential, [request], [idempotency_key])[0]

    def submit_many(
        self, credential: str | None, requests: list[dict], idempotency_keys: list[str | None] | None = None
    ) -> list[RequestStatus]:
        """Submit a batch: all of it or, if any request is malformed, unknown or forbidden, none of it."""
        keys = list(idempotency_keys or [None] * len(requests))
        if len(keys) != len(requests):
            raise UserError(f"{len(keys)} idempotency keys for {len(requests)} requests; pass one per request")
        batch = len(requests) > 1
        parsed = []
        for index, request in enumerate(requests):
            try:
                parsed.append(request if isinstance(request, SubmitRequest) else SubmitRequest.model_validate(request))
            except ValueError as error:
                where = f"requests[{index}]: " if batch else ""
                raise UserError(f"{where}malformed request: {error}") from None
        if not parsed:
            return []
        principal = ""
        for request in parsed:  # a forbidden request refuses the batch before anything changes
            principal = self._allow(credential, Action.SUBMIT, request.gang.name, request.team)

        def submit_new() -> list[RequestStatus]:
            for index, request in enumerate(parsed):
                try:
                    self.scheduler.check(request)
                except UserError as error:
                    raise UserError(
                        f"requests[{index}]: {error}; nothing was submitted" if batch else str(error)
                    ) from None
            # A key seen before (a retried call) returns the first submission instead of queueing a twin.
            seen = self.scheduler.idempotency_keys
            fresh, earlier_in_batch = [], set()
            for i, key in enumerate(keys):
                if not key or (key not in seen and key not in earlier_in_batch):
                    fresh.append(i)
                earlier_in_batch.add(key)
            submitted = self.scheduler.submit_many([parsed[i] for i in fresh], [keys[i] for i in fresh])
            by_index = dict(zip(fresh, submitted, strict=True))
            return [by_index.get(i) or self.scheduler.get(seen[key]) for i, key in enumerate(keys)]

        with self._lock:
            try:
                result = submit_new()
                # Pipelined: persist and bind every few placements, so Ray reserves the first groups
                # while the rest are still being placed; the call returns once all are durable and
                # every group has been made.
                while self.scheduler.schedule(max_binds=BIND_EVERY):
                    self._commit(wait=False)
            except UserError as error:
                for request in parsed:
                    self.audit.record(principal, Action.SUBMIT.value, request.gang.name, "failed", str(error))
                raise
            finally:
                self._commit()
            result = detached(result)
        for request in parsed:
            self.audit.record(principal, Action.SUBMIT.value, request.gang.name, "ok")
        return result

    def _group_of(self, status: RequestStatus):
        if not status.placement_group:
            return None
        if status.id not in self.groups:  # bound by an earlier incarnation of this controller
            self.groups[status.id] = binding.find(status.placement_group)
        return self.groups[status.id]

    def status(self, credential: str | None, request_id: str) -> RequestStatus:
        _, status = self._owned(credential, Action.READ_OWN, request_id)
        with self._lock:
            return detached(status)

    def queue(
        self,
        credential: str | None,
        include_finished: bool = False,
        team: str | None = None,
        states: list[str] | None = None,
    ) -> list[RequestStatus]:
        principal = self._allow(credential, Action.READ_OWN, team=team)
        with self._lock:
            statuses = self.scheduler.listed(include_finished=include_finished, team=team, states=states)
            return [detached(status) for status in statuses if principal in (ADMIN, status.team)]

    def cancel(self, credential: str | None, request_id: str, operation_key: str | None = None) -> RequestStatus:
        principal, _ = self._owned(credential, Action.CANCEL, request_id)
        return self._audited(
            principal,
            Action.CANCEL,
            request_id,
            lambda: self.scheduler.cancel(request_id, operation_key=operation_key),
        )

    def complete(
        self, credential: str | None, request_id: str, failed: bool = False, reason: str = ""
    ) -> RequestStatus:
        principal, _ = self._owned(credential, Action.REPORT, request_id)
        return self._audited(
            principal,
            Action.REPORT,
            request_id,
            lambda: self.scheduler.complete(request_id, failed=failed, reason=reason),
        )

    def mark_running(self, credential: str | None, request_id: str, details: dict | None = None) -> RequestStatus:
        principal, _ = self._owned(credential, Action.REPORT, request_id)
        return self._audited(
            principal, Action.REPORT, request_id, lambda: self.scheduler.mark_running(request_id, details)
        )

    def report(self, credential: str | None, request_id: str, details: dict) -> RequestStatus:
        # Not audited when allowed: a workload reports at every logged step, and the books keep the last report.
        self._owned(credential, Action.REPORT, request_id)
        return self._act(self.scheduler.report, request_id, details)

    def placement_group(self, credential: str | None, request_id: str):
        """The Ray placement group of a placed request (for workloads to schedule into), or None."""
        _, status = self._owned(credential, Action.READ_OWN, request_id)
        with self._lock:
            return self._group_of(status)

    def cordon(self, credential: str | None, node: str, cordoned: bool = True) -> NodeControl:
        action = Action.CORDON
        principal = self._allow(credential, action, node)
        return self._audited(principal, action, node, self.scheduler.cordon, node, cordoned)

    def drain(self, credential: str | None, node: str) -> list[str]:
        principal = self._allow(credential, Action.DRAIN, node)
        return self._audited(principal, Action.DRAIN, node, self.scheduler.drain, node)

    def set_quota(self, credential: str | None, team: str, changes: dict) -> TeamUsage:
        principal = self._allow(credential, Action.SET_QUOTA, team)
        return self._audited(principal, Action.SET_QUOTA, team, self.scheduler.set_quota, team, changes)

    def preempt(self, credential: str | None, request_id: str, operation_key: str | None = None) -> RequestStatus:
        principal = self._allow(credential, Action.PREEMPT, request_id)
        return self._audited(
            principal,
            Action.PREEMPT,
            request_id,
            lambda: self.scheduler.preempt(request_id, operation_key=operation_key),
        )

    def usage(self, credential: str | None) -> list[TeamUsage]:
        principal = self._allow(credential, Action.READ_OWN)
        with self._lock:
            return [self.scheduler.team_usage(team) for team in self.scheduler.quotas if principal in (ADMIN, team)]

    def nodes(self, credential: str | None) -> list[dict]:
        """Each schedulable node with the controller's books: capacity, allocated, controls; a team sees only
        its own requests there."""
        principal = self._allow(credential, Action.READ_OWN)
        with self._lock:
            allocated: dict[str, dict[str, float]] = {name: {} for name in self.scheduler.nodes}
            requests: dict[str, list[str]] = {name: [] for name in self.scheduler.nodes}
            for status in self.scheduler.holders():
                for bundle in status.bundles:
                    for key, amount in bundle.resources.items():
                        allocated[bundle.node][key] = allocated[bundle.node].get(key, 0.0) + amount
                    if status.id not in requests[bundle.node] and principal in (ADMIN, status.team):
                        requests[bundle.node].append(status.id)
            rows = []
            for name, snapshot in sorted(self.scheduler.nodes.items()):
                control = self.scheduler.controls.get(name, NodeControl(node=name))
                rows.append(
                    {
                        "name": name,
                        "pool": snapshot.pool,
                        "node_id": self.node_ids.get(name, ""),
                        "capacity": {"CPU": snapshot.cpus, "GPU": snapshot.gpus, "TPU": snapshot.tpu_chips},
                        "allocated": allocated[name],
                        "requests": requests[name],
                        "cordoned": control.cordoned,
                        "drained": control.drained,
                    }
                )
            return rows

    def decisions(
        self, credential: str | None, limit: int = 50, request_id: str | None = None, after_seq: int = 0
    ) -> list[DecisionRecord]:
        if limit < 0:
            raise UserError(f"limit: {limit} is negative; ask for 1 or more decisions, or 0 for all")
        principal = self._allow(credential, Action.READ_OWN)
        with self._lock:
            records = [
                d
                for d in self.scheduler.decisions
                if d.seq > after_seq
                and (request_id is None or d.request_id == request_id)
                and (principal == ADMIN or team_of(d.request_id) == principal)
            ]
        if request_id is not None and not records and not after_seq:
            self._owned(credential, Action.READ_OWN, request_id)  # an unknown id is refused, not shown as none
        return records[-limit:] if limit else records

    def audit_log(self, credential: str | None, limit: int = 100) -> list[dict]:
        self._allow(credential, Action.READ_AUDIT)
        return self.audit.entries(limit)

    def shutdown(self, credential: str | None) -> None:
        principal = self._allow(credential, Action.SHUTDOWN)
        self.audit.record(principal, Action.SHUTDOWN.value, "controller", "ok")
        self._stopping.set()
        with self._lock:
            self._binder.shutdown()
            self.journal.close()
            self.audit.close()


def detached(result: Any) -> Any:
    """What a call returns, copied while the lock is held: Ray pickles it after the method returns, when
    the inventory loop or another call may be changing the same request. The books change a request by
    assigning its fields, or, for the progress a workload reports, by updating `details` in place."""
    if isinstance(result, RequestStatus):
        return result.model_copy(update={"details": dict(result.details)})
    if isinstance(result, NodeControl):
        return result.model_copy()
    if isinstance(result, list):
        return [detached(item) for item in result]
    return result


RemoteController = ray.remote(Controller)


def start(
    spec: ClusterSpec,
    state_dir: str | None,
    policy: str = DEFAULT_POLICY,
    remove_unknown_groups: bool = False,
    scale_up: bool = False,
):
    """Start the controller actor; refuses if one is already running, or if `state_dir` lost the books of
    the llmos placement groups Ray holds (`Controller.state_lost`), unless `remove_unknown_groups`: then
    those groups, and whatever runs in them, are removed and a controller with empty books starts.
    `scale_up`: an autoscaler grows the pools (see `Controller`)."""
    if get() is not None:
        raise UserError(
            f"a controller is already running ({CONTROLLER_NAME} in namespace {NAMESPACE}); "
            "use it, or stop it first with `llmos controller stop`"
        )
    try:
        handle = RemoteController.options(
            name=CONTROLLER_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            max_restarts=-1,
            num_cpus=0,
            max_concurrency=64,
            # On the head node: it survives the loss of any worker node, and so does its state dir.
            label_selector={POOL_LABEL: HEAD_POOL},
        ).remote(spec.model_dump(mode="json"), state_dir, policy, scale_up=scale_up)
    except ValueError as error:
        raise UserError(f"a controller is already being started elsewhere: {error}") from None
    state_lost = ray.get(handle.ping.remote(), timeout=120)["state_lost"]
    if state_lost is None:
        return handle
    ray.kill(handle, no_restart=True)
    wait_for(lambda: get() is None, 30, "the refused controller to stop")  # so a retry is not "already running"
    if not remove_unknown_groups:
        raise UserError(state_lost)
    removed = binding.unbind_all()
    logger.warning("removed %d llmos placement groups the state dir had no books of: %s", len(removed), removed)
    return start(spec, state_dir, policy, scale_up=scale_up)


def get():
    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def stop(credential: str | None) -> bool:
    """Stop the controller (admin only); placements stay and a new controller picks them up."""
    handle = get()
    if handle is None:
        return False
    try:
        ray.get(handle.shutdown.remote(credential), timeout=30)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, UserError):
            raise UserError(str(error.cause)) from None
        raise
    except ray.exceptions.RayError:
        pass  # already dying: kill it for good below
    ray.kill(handle, no_restart=True)
    return True
