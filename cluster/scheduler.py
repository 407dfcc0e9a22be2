"""The controller's books and decisions, as pure Python: no Ray, no files, no clock of its own.

The scheduler holds every request and its state, the nodes as last seen, team usage against quotas,
and the decision log. Each call changes the books and returns nothing Ray-shaped: effects to apply
(`Bind` a placement to a Ray placement group, `Unbind` one) accumulate in `effects`. Changes are handed
to `journal`, one JSON line each, for the caller to persist before it acknowledges: decisions, quotas
and node controls at once, and each changed request once, in its latest state, when the caller asks
for them with `write_journal` (a request submitted, placed and bound in one call is written once).
The Ray actor in `cluster.controller` is the only place those effects happen.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from cluster import quota as quotas
from cluster.console import UserError
from cluster.placement.decision import BundlePlacement, Placement, Rejection, RejectionReason
from cluster.placement.engine import PlacementEngine
from cluster.placement.request import Constraint, GangRequest
from cluster.placement.snapshot import ClusterSnapshot, NodeSnapshot, node_from_ray
from cluster.placement.state import selector_matches
from cluster.preemption import choose_victims
from cluster.ray_mapping import (
    HEAD_POOL,
    POOL_LABEL,
    RAY_NODE_ID_LABEL,
    pool_labels,
    replica_nodes,
)
from cluster.requests import (
    BundleBinding,
    DecisionAction,
    DecisionRecord,
    GroupBundles,
    NodeControl,
    RequestState,
    RequestStatus,
    SubmitRequest,
    TeamUsage,
)
from cluster.spec import ClusterSpec, Pool, did_you_mean, quota_amount_problem

CORDON_LABEL = "llmos.io/cordoned"
UNBORN_PREFIX = "+"  # names the nodes a pool may still gain, in what-if placements only
DECISION_LOG_SIZE = 10_000
NEVER_FITS_VERDICTS_KEPT = 4_096  # gang shapes whose never-fits verdict is kept until the nodes change
OPERATION_KEYS_KEPT = 8  # a retry follows its own call within a minute; few calls change one request meanwhile


@dataclass(frozen=True)
class Bind:
    request_id: str
    placement_group: str
    bundles: tuple[BundleBinding, ...]


@dataclass(frozen=True)
class Unbind:
    request_id: str
    placement_group: str


Effect = Bind | Unbind


PLACEMENT_GROUP_PREFIX = "llmos-"


def placement_group_name(request_id: str) -> str:
    return f"{PLACEMENT_GROUP_PREFIX}{request_id}"


def team_of(request_id: str) -> str:
    """The team of a request id (`<team>-<seq>`), also of a request no longer kept whose decisions are."""
    return request_id.rpartition("-")[0]


class Scheduler:
    def __init__(
        self,
        spec: ClusterSpec,
        policy: str = "llmos",
        *,
        journal: Callable[[str], None] = lambda line: None,
        clock: Callable[[], float] = time.time,
        scale_up: bool = False,
    ):
        """`scale_up`: an autoscaler grows each pool up to its `max` on demand (KubeRay), so a gang that fits
        only on nodes yet to come waits for them (`scale_up_demand`), and a gang is refused as never
        fitting only if it fits no node set of the cluster at its largest."""
        self.spec = spec
        self.scale_up = scale_up
        self.policy = policy
        self.journal = journal
        self.clock = clock
        self.requests: dict[str, RequestStatus] = {}
        # The requests not yet final, so scheduling costs what is live, not every request ever made.
        self._live: dict[str, RequestStatus] = {}
        # The final requests kept, in the order they ended (`finished_seq`); beyond
        # `spec.controller.finished_requests_kept` the oldest are forgotten, so a controller that runs
        # for months holds bounded books.
        self._finished: dict[str, None] = {}
        self.idempotency_keys: dict[str, str] = {}  # a kept request's idempotency key -> its id
        self.quotas: dict[str, dict[str, float]] = {team.name: dict(team.quota) for team in spec.teams}
        # The teams whose quota an admin set (`set_quota`): only theirs outlive a restart over the ClusterSpec's,
        # so that a quota changed in the ClusterSpec takes effect on restart for the others.
        self._quotas_set: set[str] = set()
        self.usage: dict[str, dict[str, float]] = {team.name: {} for team in spec.teams}
        self.controls: dict[str, NodeControl] = {}
        self.decisions: deque[DecisionRecord] = deque(maxlen=DECISION_LOG_SIZE)
        self.effects: list[Effect] = []
        self._changed: dict[str, RequestStatus] = {}  # requests changed since the last `write_journal`
        self.nodes: dict[str, NodeSnapshot] = {}
        self.engine: PlacementEngine | None = None
        self._seq = 0
        self._decision_seq = 0
        self._finished_seq = 0
        # Waiting requests are retried only when capacity may have been freed; new ones always once.
        self._retry_all = True
        self._untried: set[str] = set()
        # A request over its team's quota can only fit once that team's use drops or its quota rises:
        # each team's count of such changes, and the count each quota-blocked request last saw.
        self._quota_changes: dict[str, int] = {team.name: 0 for team in spec.teams}
        self._quota_blocked: dict[str, int] = {}
        # By team, the lowest priority of its preemptible placed work, as of this scheduling pass (None: not read).
        self._preemptible_floors: dict[str, float] | None = None
        self._demands: dict[str, dict[str, float]] = {}  # request id -> its quota demand (requests are frozen)
        self._awaiting_nodes: dict[str, GangRequest] = {}  # request id -> its gang, that fits once pools grow
        # `_never_fits` verdicts for the live nodes, by gang (as JSON, its name left out) and GPU types: many
        # requests share a shape, and the verdict needs a placement on the whole empty cluster.
        self._never_fits_verdicts: dict[tuple[str, quotas.GpuTypesByBundle | None], str | None] = {}
        self._gpu_types_in_cluster = sorted({p.accelerator_type for p in spec.pools if p.accelerator.value == "gpu"})
        self._tpu_pools = [pool for pool in spec.pools if pool.tpu]

    # -- books ------------------------------------------------------------------------------------

    def _pool_kind(self, pool_name: str) -> tuple[str, str | None]:
        """Accelerator kind and type of a pool, for typed quota keys."""
        for pool in self.spec.pools:
            if pool.name == pool_name:
                return pool.accelerator.value, pool.accelerator_type
        return "cpu", None

    def _placed_usage(self, placement: Placement) -> dict[str, float]:
        """What a placement counts against its team's quota: what each bundle holds (a whole TPU host, all its
        chips) on its node's accelerator type."""
        usage: dict[str, float] = {}
        for bundle in placement.bundles:
            pool = self.nodes[bundle.node].pool
            quotas.add_usage(usage, quotas.bundle_usage(bundle.resources, *self._pool_kind(pool)))
        return usage

    def _request_usage(self, status: RequestStatus) -> dict[str, float]:
        total: dict[str, float] = {}
        for bundle in status.bundles:
            quotas.add_usage(total, quotas.bundle_usage(bundle.resources, *self._pool_kind(bundle.pool)))
        return total

    def _save(self, status: RequestStatus) -> None:
        """Record a change of `status`; every change of a request's state goes through here."""
        if status.state.final and status.finished_seq is None:
            self._finished_seq += 1
            status.finished_seq, status.finished_at = self._finished_seq, self.clock()
        self.requests[status.id] = status
        self._changed[status.id] = status
        self._index(status)

    def _index(self, status: RequestStatus) -> None:
        if status.state.final:
            self._live.pop(status.id, None)
            self._finished[status.id] = None
        else:
            self._live[status.id] = status
        if status.idempotency_key:
            self.idempotency_keys[status.idempotency_key] = status.id

    def _forget_oldest_finished(self) -> None:
        excess = len(self._finished) - self.spec.controller.finished_requests_kept
        for request_id in list(itertools.islice(self._finished, max(excess, 0))):
            del self._finished[request_id]
            forgotten = self.requests.pop(request_id)
            if forgotten.idempotency_key:
                self.idempotency_keys.pop(forgotten.idempotency_key, None)

    def write_journal(self) -> int:
        """Hand each request changed since the last call to `journal`, once, in its latest state.

        The caller calls this, then makes the journal durable, before it acknowledges any change.
        Returns how many requests were written.
        """
        written = 0
        for request_id, status in list(self._changed.items()):
            self.journal(_journal_line("request", status))
            del self._changed[request_id]  # one by one: if a line fails, the rest are still to be written
            written += 1
        # Only now: a request forgotten before its final state was journaled would come back live.
        self._forget_oldest_finished()
        return written

    def _decide(self, status: RequestStatus, action: DecisionAction, reason: str = "", nodes=()) -> None:
        self._decision_seq += 1
        record = DecisionRecord(
            seq=self._decision_seq,
            time=self.clock(),
            request_id=status.id,
            action=action,
            policy=self.policy if action is DecisionAction.PLACED else "",
            reason=reason,
            nodes=list(nodes),
        )
        self.decisions.append(record)
        self.journal(_journal_line("decision", record))

    def holders(self) -> list[RequestStatus]:
        return [status for status in self._live.values() if status.state.holding]

    def listed(
        self, *, include_finished: bool = False, team: str | None = None, states: Iterable[str] | None = None
    ) -> list[RequestStatus]:
        """Requests in arrival order: the live ones, and with `include_finished` the final ones kept; only
        `team`'s and those in `states` if given (naming a final state includes the final ones)."""
        if team is not None:
            self._known_team(team)
        wanted = None if states is None else {_request_state(state) for state in states}
        final_too = include_finished or any(state.final for state in wanted or ())
        return sorted(
            (
                status
                for status in (self.requests if final_too else self._live).values()
                if (team is None or status.team == team) and (wanted is None or status.state in wanted)
            ),
            key=lambda status: status.submitted_seq,
        )

    def waiting(self) -> list[RequestStatus]:
        """Waiting requests in the order they are considered: priority, then arrival."""
        return sorted(
            (status for status in self._live.values() if status.state.waiting),
            key=lambda status: (-status.priority_value, status.submitted_seq),
        )

    def team_usage(self, team: str) -> TeamUsage:
        self._known_team(team)
        return TeamUsage(team=team, quota=dict(self.quotas[team]), used=dict(self.usage[team]))

    def get(self, request_id: str) -> RequestStatus:
        try:
            return self.requests[request_id]
        except KeyError:
            kept = self.spec.controller.finished_requests_kept
            raise UserError(
                f"no request {request_id!r}: it is not waiting or placed, nor among the last {kept} finished "
                "requests the controller keeps (controller.finished_requests_kept); `llmos queue --all` lists them"
            ) from None

    def _known_team(self, team: str) -> None:
        if team not in self.quotas:
            teams = ", ".join(sorted(self.quotas)) or "none (add teams to the ClusterSpec)"
            raise UserError(f"unknown team {team!r}{did_you_mean(team, self.quotas)}; teams: {teams}")

    # -- inventory --------------------------------------------------------------------------------

    def set_nodes(self, nodes: Iterable[NodeSnapshot]) -> None:
        """The alive nodes as Ray reports them (capacity; the books know what is free).

        Requests holding bundles on a node that is gone are taken off and queued again.
        """
        # A node whose pool label names no pool of the spec (renamed while it runs, or labelled by hand) holds no
        # work: no pool tells what its devices count against, so its typed quotas would go uncharged.
        pools = {pool.name for pool in self.spec.pools}
        nodes = {node.name: node for node in nodes if node.pool in pools}
        if nodes == self.nodes and self.engine is not None:
            return
        # A node back under its name is a new Ray node (its raylet restarted, its pod re-created): what ran on
        # the old one went with it. Seen here, or, for books restored while it happened, by the Ray node id
        # each bundle was placed on.
        replaced = {
            name
            for name, node in nodes.items()
            if name in self.nodes
            and node.labels.get(RAY_NODE_ID_LABEL) != self.nodes[name].labels.get(RAY_NODE_ID_LABEL)
        }

        def left(bundle: BundleBinding) -> bool:
            node = nodes.get(bundle.node)
            if node is None or bundle.node in replaced:
                return True
            ray_node_id = node.labels.get(RAY_NODE_ID_LABEL)
            return bool(bundle.node_id and ray_node_id and bundle.node_id != ray_node_id)

        self.nodes = nodes
        self._never_fits_verdicts.clear()
        for status in self.holders():
            gone = sorted({bundle.node for bundle in status.bundles if left(bundle)})
            if gone:
                self._take_off(
                    status,
                    DecisionAction.REQUEUED,
                    f"node {', '.join(gone)} left the cluster",
                    failure=True,
                )
        self._rebuild_engine()

    def _rebuild_engine(self) -> None:
        self._retry_all = True
        if not self.nodes:
            self.engine = None
            return
        free = {name: _FreeResources.of(node) for name, node in self.nodes.items()}
        for status in self.holders():
            for bundle in status.bundles:
                free[bundle.node].take(bundle)
        snapshot = ClusterSnapshot(
            nodes=tuple(free[name].snapshot(self._labels_of(node)) for name, node in sorted(self.nodes.items()))
        )
        self.engine = PlacementEngine(snapshot, self.policy, node_order=sorted(self.nodes))

    def _trial_engine(self, snapshot: ClusterSnapshot) -> PlacementEngine:
        """A what-if engine that decides as the live one does (same policy, same learned workload)."""
        workload = self.engine.policy.workload if self.engine else None
        return PlacementEngine(snapshot, self.policy, workload=workload, node_order=sorted(self.nodes))

    def _live_nodes(self) -> tuple[NodeSnapshot, ...]:
        """The live nodes as the engine holds them (what is free, cordons); none while no worker node is up."""
        return self.engine.snapshot().nodes if self.engine else ()

    def _labels_of(self, node: NodeSnapshot) -> dict[str, str]:
        control = self.controls.get(node.name)
        if control and control.cordoned:
            return {**node.labels, CORDON_LABEL: "true"}
        return node.labels

    # -- requests ---------------------------------------------------------------------------------

    def check(self, request: SubmitRequest) -> int:
        """Refuse a request that names an unknown team, priority class or pool; else its priority value."""
        self._known_team(request.team)
        priority_class = request.priority or self.spec.team(request.team).priority
        try:
            priority_value = self.spec.priority_value(priority_class)
        except KeyError:
            classes = [c.name for c in self.spec.priority_classes]
            raise UserError(
                f"priority: unknown priority class {priority_class!r}{did_you_mean(priority_class, classes)}; "
                f"use one of {', '.join(classes)}"
            ) from None
        self._check_pools_named(request.gang)
        self._check_gpu_types_named(request.gang)
        return priority_value

    def submit(self, request: SubmitRequest, idempotency_key: str | None = None) -> RequestStatus:
        priority_value = self.check(request)
        priority_class = request.priority or self.spec.team(request.team).priority
        self._seq += 1
        status = RequestStatus(
            id=f"{request.team}-{self._seq:05d}",  # `team_of` reads the team back
            request=request,
            priority_value=priority_value,
            state=RequestState.QUEUED,
            submitted_seq=self._seq,
            submitted_at=self.clock(),
            idempotency_key=idempotency_key,
        )
        never = self._never_admissible(status)
        if never:
            status.state, status.reason = RequestState.REJECTED, never
            self._save(status)
            self._decide(status, DecisionAction.REJECTED, never)
            return status
        self._save(status)
        self._decide(status, DecisionAction.ADMITTED, f"priority {priority_class} ({priority_value})")
        self._untried.add(status.id)
        return status

    def submit_many(
        self, requests: list[SubmitRequest], idempotency_keys: list[str | None] | None = None
    ) -> list[RequestStatus]:
        """Submit a batch in order: all of it, or, if any request is invalid, none of it.

        Each request stays its own gang: the next `schedule` places each one whole or not at all, in
        priority order, charging each to its team's quota before the next is considered.
        """
        keys = idempotency_keys or [None] * len(requests)
        if len(keys) != len(requests):
            raise UserError(f"{len(keys)} idempotency keys for {len(requests)} requests; pass one per request")
        for index, request in enumerate(requests):
            try:
                self.check(request)
            except UserError as error:
                raise UserError(f"requests[{index}]: {error}; nothing was submitted") from None
        return [self.submit(request, key) for request, key in zip(requests, keys, strict=True)]

    def _check_pools_named(self, gang: GangRequest) -> None:
        pools = {pool.name for pool in self.spec.pools}
        for index, bundle in enumerate(gang.bundles):
            wanted = bundle.label_selector.get("llmos.io/pool")
            if wanted is None:
                continue
            names = wanted.removeprefix("!")
            names = names[3:-1].split(",") if names.startswith("in(") else [names]
            unknown = [name.strip() for name in names if name.strip() not in pools]
            if unknown:
                raise UserError(
                    f"gang.bundles[{index}].label_selector: unknown pool {unknown[0]!r}"
                    f"{did_you_mean(unknown[0], pools)}; pools: {', '.join(sorted(pools))}"
                )

    def _check_gpu_types_named(self, gang: GangRequest) -> None:
        types = self._gpu_types_in_cluster
        for index, bundle in enumerate(gang.bundles):
            unknown = [name for name in bundle.gpu_types or () if name not in types]
            if unknown:
                raise UserError(
                    f"gang.bundles[{index}].gpu_types: {unknown[0]!r} is not a GPU type of this cluster"
                    f"{did_you_mean(unknown[0], types)}; GPU types: {', '.join(types) or 'none'}"
                )

    def _demand(self, status: RequestStatus) -> dict[str, float]:
        """What the request counts against its team's quota."""
        demand = self._demands.get(status.id)
        if demand is None:
            gang = status.request.gang
            demand = self._demands[status.id] = quotas.gang_demand(gang, self._smallest_tpu_host(gang))
        return demand

    def _tpu_pools_for(self, gang: GangRequest) -> list[Pool]:
        """The TPU pools whose labels every TPU bundle's selector allows. A selector on labels each host has of its
        own (its name, its slice) rules out no pool: it may match a host of any."""
        tpu_bundles = [bundle for bundle in gang.bundles if bundle.resources.get("TPU")]
        return [
            pool
            for pool in self._tpu_pools
            if all(_selector_allows(bundle.label_selector, pool_labels(pool)) for bundle in tpu_bundles)
        ]

    def _smallest_tpu_host(self, gang: GangRequest) -> int:
        """The fewest chips a TPU host the gang may land on has (0 if none): what each bundle of a same_tpu_slice
        gang holds at least."""
        return min((pool.tpu.chips_per_host for pool in self._tpu_pools_for(gang)), default=0)

    def _tpu_quota_problems(self, status: RequestStatus, used: dict[str, float]) -> dict[str, list[str]]:
        """By TPU pool the gang may use, how what it would hold there (a same_tpu_slice gang: whole hosts of that
        pool) passes its team's quota beside `used`; [] where it stays within."""
        gang, quota = status.request.gang, self.quotas[status.team]
        problems = {}
        for pool in self._tpu_pools_for(gang):
            chips = quotas.gang_demand(gang, pool.tpu.chips_per_host)["tpu"]
            problems[pool.name] = quotas.exceeded(
                quota, used, quotas.bundle_usage({"TPU": chips}, "tpu", pool.accelerator_type)
            )
        return problems

    def _never_admissible(self, status: RequestStatus) -> str | None:
        # Not kept: a request refused here is never tried.
        gang = status.request.gang
        host_chips = self._smallest_tpu_host(gang)
        demand = quotas.gang_demand(gang, host_chips)
        quota, typed_short = self.quotas[status.team], {}
        # Only types the cluster has count: a request no node type can serve is told it never fits.
        if demand.get("gpu"):
            candidates, alone = self._gpu_types_alone(status)
            short = [
                quotas.gpus_on_one_type(gang, bundle)
                for bundle, may, left in zip(gang.bundles, candidates, alone, strict=True)
                if may and not left
            ]
            if short:
                typed_short["gpu"] = max(short)
        never = quotas.never_admissible(quota, demand, typed_short)
        if not never and demand.get("gpu") and gang.constraint is Constraint.SPREAD:
            gpu_bundles = [
                (bundle.resources["GPU"], types)
                for bundle, types in zip(gang.bundles, alone, strict=True)
                if types is not None
            ]
            never = quotas.spread_over_typed_quotas(quota, gpu_bundles)
        if never and demand.get("tpu", 0.0) > quotas.gang_demand(gang).get("tpu", 0.0):
            never += f" (a same_tpu_slice gang holds one whole TPU host, {host_chips} chips, per bundle)"
        if demand.get("tpu") and not never:
            tpu_problems = self._tpu_quota_problems(status, {})
            if tpu_problems and all(tpu_problems.values()):
                everywhere = "over the team's quota on every TPU pool it may use, even with nothing else running"
                never = f"{everywhere}: {_per_pool(tpu_problems)}"
        return never

    def _never_fits(self, status: RequestStatus, gpu_types: quotas.GpuTypesByBundle | None = None) -> str | None:
        """Why the gang, as asked (each GPU bundle on its `gpu_types` only, if given), fits no node set of the
        cluster even empty and uncordoned, or None."""
        key = (status.request.gang.model_dump_json(exclude={"name"}), gpu_types)
        if key in self._never_fits_verdicts:
            return self._never_fits_verdicts[key]
        if len(self._never_fits_verdicts) >= NEVER_FITS_VERDICTS_KEPT:
            self._never_fits_verdicts.clear()
        gang = self._gang_for_engine(status, gpu_types, cordoned_too=True)
        snapshot = self._with_unborn_nodes(self._empty_uncordoned_nodes(), len(gang.bundles))
        decision = self._trial_engine(snapshot).place(gang)
        verdict = None
        if isinstance(decision, Rejection) and decision.reason is RejectionReason.NEVER_FITS:
            largest = " at its largest (every pool at its max)" if self.scale_up else ""
            verdict = f"can never fit this cluster{largest}: {decision.message}"
        self._never_fits_verdicts[key] = verdict
        return verdict

    def _never_within_typed_quota(self, status: RequestStatus) -> str | None:
        """Why the gang fits no node set of the GPU types its team's typed quotas allow it even with nothing
        else of the team running, or None."""
        gpus = self._demand(status).get("gpu")
        if not gpus:
            return None
        quota = self.quotas[status.team]
        if status.request.gang.constraint is Constraint.SPREAD:
            return self._spread_never_within_typed_quota(status, quota)
        candidates, alone = self._gpu_types_alone(status)
        if alone == candidates or self._never_fits(status, alone) is None:
            return None
        typed = ", ".join(f"gpu:{name} quota {quota[f'gpu:{name}']:g}" for name in _ruled_out(candidates, alone))
        return (
            f"over the team's typed quota even with nothing else running: asks {gpus:g} gpu, {typed}, and "
            f"{', '.join(_types_in(alone))} alone cannot hold it"
        )

    def _spread_never_within_typed_quota(self, status: RequestStatus, quota: dict[str, float]) -> str | None:
        """Why no distinct nodes of the cluster, even empty and at its largest, hold a spread gang's bundles within
        the typed GPU quotas of its team with nothing else of the team running; None if some do, or where the
        search gave up."""
        room = quotas.gpu_room(quota, {})
        if not room:
            return None
        gang = self._gang_for_engine(status, cordoned_too=True)
        snapshot = self._with_unborn_nodes(self._empty_uncordoned_nodes(), len(gang.bundles))
        if self._trial_engine(snapshot).spread_fits_within(gang, room) is not False:
            return None
        typed = ", ".join(f"gpu:{name} quota {amount:g}" for name, amount in sorted(room.items()))
        return (
            f"over the team's typed quota even with nothing else running: no {len(gang.bundles)} distinct nodes of "
            f"this cluster hold its bundles within {typed}"
        )

    def _gpu_types_alone(self, status: RequestStatus) -> tuple[quotas.GpuTypesByBundle, quotas.GpuTypesByBundle]:
        """Per bundle, the GPU types of the cluster it may use, and those its team's typed quotas allow it with
        nothing else of the team running."""
        gang, in_cluster = status.request.gang, self._gpu_types_in_cluster
        return (
            quotas.gpu_types_by_bundle(gang, in_cluster, {}, {}),
            quotas.gpu_types_by_bundle(gang, in_cluster, self.quotas[status.team], {}),
        )

    def _unborn_nodes(self, bundles: int) -> list[NodeSnapshot]:
        """Empty nodes the pools may still gain up to their max, when an autoscaler grows them; else none.
        At most `bundles` replicas of each pool: no more can hold a bundle each."""
        if not self.scale_up:
            return []
        unborn = []
        for pool in self.spec.pools:
            live = [node for node in self.nodes.values() if node.pool == pool.name]
            replicas = math.ceil(len(live) / pool.tpu.hosts_per_slice) if pool.tpu else len(live)
            for replica in range(replicas, min(pool.replicas.max, replicas + bundles)):
                for declared in replica_nodes(pool, replica):
                    # Names and slices of their own, so that none is taken for a live node or slice.
                    names = {declared.name, *([f"{pool.name}-s{replica}"] if pool.tpu else [])}
                    labels = {k: UNBORN_PREFIX + v if v in names else v for k, v in declared.labels.items()}
                    unborn.append(node_from_ray(UNBORN_PREFIX + declared.name, declared.resources, labels))
        return unborn

    def _with_unborn_nodes(self, nodes: tuple[NodeSnapshot, ...], bundles: int) -> ClusterSnapshot:
        """`nodes` and the nodes the pools may still gain (enough for `bundles` bundles)."""
        return ClusterSnapshot(nodes=nodes + tuple(self._unborn_nodes(bundles)))

    def scale_up_demand(self) -> dict[str, int]:
        """Nodes each pool must have for the gangs waiting on new nodes to fit, live ones included, for
        the pools that must grow; {} when none waits. (What Ray's autoscaler is asked to hold.)"""
        waiting = [status for status in self.waiting() if status.id in self._awaiting_nodes]
        if not waiting:
            return {}
        bundles = sum(len(self._awaiting_nodes[status.id].bundles) for status in waiting)
        trial = self._trial_engine(self._with_unborn_nodes(self._live_nodes(), bundles))
        unborn = {node.name: node for node in trial.snapshot().nodes if node.name.startswith(UNBORN_PREFIX)}
        used = set()
        for status in waiting:
            room = quotas.gpu_room(self.quotas[status.team], self.usage[status.team])
            decision = trial.place(self._awaiting_nodes[status.id], gpu_room=room)
            if not isinstance(decision, Rejection):
                used |= {bundle.node for bundle in decision.bundles if bundle.node in unborn}
        return {
            pool: sum(node.pool == pool for node in self.nodes.values()) + len(new)
            for pool, new in self._new_nodes_by_pool(used, unborn).items()
        }

    def _new_nodes_by_pool(self, used: set[str], unborn: dict[str, NodeSnapshot]) -> dict[str, list[NodeSnapshot]]:
        """The nodes to come that placements `used`, by pool; a TPU pool's whole slices, since a slice comes whole."""
        grown = {}
        for pool in self.spec.pools:
            new = [unborn[name] for name in used if unborn[name].pool == pool.name]
            if pool.tpu:
                slices = {node.tpu_slice for node in new}
                new = [node for node in unborn.values() if node.tpu_slice in slices]
            if new:
                grown[pool.name] = new
        return grown

    def _gang_for_engine(
        self,
        status: RequestStatus,
        gpu_types: quotas.GpuTypesByBundle | None = None,
        tpu_pools: set[str] | None = None,
        *,
        cordoned_too: bool = False,
    ) -> GangRequest:
        """The gang as the engine must see it: cordoned nodes excluded (unless `cordoned_too`), GPU types and
        TPU pools narrowed by quota."""
        gang = status.request.gang
        # Gangs name no TPU pools, so the narrowing is a label selector. It replaces a bundle's own pool selector:
        # `tpu_pools` are among the pools that one allows (`_tpu_pools_for`).
        tpu_selector = f"in({','.join(sorted(tpu_pools))})" if tpu_pools is not None else None
        bundles = []
        for index, bundle in enumerate(gang.bundles):
            selector = dict(bundle.label_selector)
            if not cordoned_too:
                selector[CORDON_LABEL] = "!true"
            if tpu_selector and bundle.resources.get("TPU"):
                selector[POOL_LABEL] = tpu_selector
            update: dict = {"label_selector": selector} if selector != bundle.label_selector else {}
            if gpu_types is not None and gpu_types[index] is not None:
                # Never wider than the bundle asked (`quotas.gpu_types_by_bundle`). Nothing left (an empty tuple)
                # matches no node.
                update["gpu_types"] = tuple(sorted(gpu_types[index]))
            bundles.append(bundle.model_copy(update=update))
        return gang.model_copy(update={"name": status.id, "bundles": tuple(bundles)})

    def cancel(
        self, request_id: str, reason: str = "cancelled by the user", *, operation_key: str | None = None
    ) -> RequestStatus:
        status = self.get(request_id)
        if operation_key and operation_key in status.operation_keys:
            return status
        if status.state.final:
            raise UserError(f"request {request_id} is already {status.state.value}; nothing to cancel")
        _remember(status, operation_key)
        self._finish(status, RequestState.CANCELLED, reason, DecisionAction.CANCELLED)
        return status

    def complete(self, request_id: str, *, failed: bool = False, reason: str = "") -> RequestStatus:
        """The workload ended: release what it holds."""
        status = self.get(request_id)
        if status.state.final:
            return status
        state = RequestState.FAILED if failed else RequestState.FINISHED
        self._finish(status, state, reason or state.value, DecisionAction.RELEASED)
        return status

    def _finish(self, status: RequestStatus, state: RequestState, reason: str, action: DecisionAction) -> None:
        freed = status.nodes
        if status.state.holding:
            self._release(status)
        status.state, status.reason = state, reason
        self._save(status)
        self._decide(status, action, reason, freed)
        self._forget_pending(status)

    def _forget_pending(self, status: RequestStatus) -> None:
        """Drop what the books keep for a request that may still be placed: it has ended."""
        self._quota_blocked.pop(status.id, None)
        self._demands.pop(status.id, None)
        self._awaiting_nodes.pop(status.id, None)
        self._untried.discard(status.id)

    def mark_running(self, request_id: str, details: dict | None = None) -> RequestStatus:
        status = self.get(request_id)
        if not status.state.holding:
            raise UserError(f"request {request_id} is {status.state.value}, not placed; it cannot run")
        _check_details(details or {})
        status.state = RequestState.RUNNING
        status.details.update(details or {})
        self._save(status)
        return status

    def report(self, request_id: str, details: dict) -> RequestStatus:
        status = self.get(request_id)
        _check_details(details)
        status.details.update(details)
        self._save(status)
        return status

    # -- placing ----------------------------------------------------------------------------------

    def schedule(self, max_binds: int | None = None) -> bool:
        """Place what can be placed, highest priority first; preempt lower priorities if that makes room.

        With `max_binds`, stop once that many placements wait to be bound, so the caller can persist
        and bind them before going on; the next call continues in the same order. Returns True if it
        stopped with requests left to try.
        """
        if self.engine is None and not self.scale_up:
            return False  # nothing to place on, and no node will come unless one is started
        binds = sum(isinstance(effect, Bind) for effect in self.effects)
        self._preemptible_floors = None
        retry_all = False
        while True:
            retry_all = retry_all or self._retry_all
            if retry_all:
                self._retry_all = False
                candidates = self.waiting()
            else:
                candidates = [status for status in self.waiting() if status.id in self._untried]
            for status in candidates:
                if max_binds is not None and binds >= max_binds:
                    self._retry_all = self._retry_all or retry_all  # the rest are tried on the next call
                    return True
                if self._quota_blocked.get(status.id) == self._quota_changes[status.team]:
                    continue  # still over its team's quota: nothing that team holds was freed since
                effects_before = len(self.effects)
                self._try_place(status)
                self._untried.discard(status.id)
                binds += sum(isinstance(effect, Bind) for effect in self.effects[effects_before:])
                if self._retry_all and not retry_all:
                    # Room freed mid-pass (a preemption): it goes to the waiting requests in order, older ones
                    # included, not to whichever new request comes next.
                    break
            else:
                return False

    def _try_place(self, status: RequestStatus, *, may_preempt_own: bool = True) -> None:
        self._awaiting_nodes.pop(status.id, None)  # each try decides afresh whether it waits for nodes
        quota, used = self.quotas[status.team], self.usage[status.team]
        demand = self._demand(status)

        def over_quota(reason: str) -> None:
            if not (may_preempt_own and self._runs_lower_own_priorities(status)):
                self._over_quota_unless_never_fits(status, reason)
            elif self._preempt_for(status, self._gang_for_engine(status)):
                self._try_place(status, may_preempt_own=False)  # its team's quota holds it now
            elif not self._rejected_on_first_try(status):
                # Not held until its team's use changes: its own lower priorities would make room within the
                # quota, and room another team frees may be what they lacked.
                self._wait(status, reason)

        over = quotas.exceeded(quota, used, demand)
        if over:
            over_quota("over quota: " + "; ".join(over))
            return
        gpu_types = None
        if demand.get("gpu"):
            gpu_types = quotas.gpu_types_by_bundle(status.request.gang, self._gpu_types_in_cluster, quota, used)
            if frozenset() in gpu_types:
                candidates = _ruled_out(self._gpu_types_alone(status)[0], gpu_types)
                over_quota(f"over quota: no GPU type among {', '.join(candidates)} has typed quota left")
                return
        tpu_pools = None
        if demand.get("tpu"):
            # The engine picks TPU hosts blind to quotas, and a host's chips are what a same_tpu_slice gang is
            # charged: it may only pick among the pools where that stays within the team's quota.
            tpu_problems = self._tpu_quota_problems(status, used)
            within = {pool for pool, over in tpu_problems.items() if not over}
            if not within:
                over_quota("over quota on every TPU pool it may use: " + _per_pool(tpu_problems))
                return
            tpu_pools = within if len(within) < len(tpu_problems) else None
        gang = self._gang_for_engine(status, gpu_types, tpu_pools)
        room = quotas.gpu_room(quota, used)
        if self.engine is None:  # no worker node is up yet: only nodes to come can hold it
            decision = Rejection(gang.name, self.policy, RejectionReason.NEVER_FITS, "no worker node is up")
        else:
            decision = self.engine.place(gang, gpu_room=room)
        if (
            isinstance(decision, Rejection)
            # Never fitting, or a spread gang that may not fit within its typed quotas whatever frees up.
            and (decision.reason is RejectionReason.NEVER_FITS or (room and gang.constraint is Constraint.SPREAD))
            and self._rejected_on_first_try(status)
        ):
            return
        if isinstance(decision, Rejection):
            growth = self._growth_for(gang, room)
            if growth:
                # Nodes on the way cost no one anything; preempting for a gang they would hold costs work.
                self._awaiting_nodes[status.id] = gang
                self._wait(status, f"waiting for the cluster to scale up: {growth}")
                return
            if decision.reason is RejectionReason.NEVER_FITS:
                # Not even the empty open cluster holds it, so preempting would free nothing it could use.
                if held_back := self._held_back_by_cordons(status, gpu_types):
                    self._wait(status, held_back)
                elif held_back := self._held_back_by_typed_quota(status, gpu_types):
                    self._wait(status, held_back)  # not only the team's use: a node of a type left may join
                else:
                    self._wait(status, decision.message)
                return
            if not self._preempt_for(status, gang):
                self._wait(status, self._over_typed_room(gang, room, quota) or decision.message)
                return
            # Victims of its own team gave back typed quota too.
            decision = self.engine.place(gang, gpu_room=quotas.gpu_room(quota, used))
            if isinstance(decision, Rejection):
                self._wait(status, decision.message)
                return
        per_node = status.request.group_bundles is GroupBundles.PER_NODE
        bundles = [
            _binding_of(bundle, self.nodes[bundle.node], group_bundle)
            for bundle, group_bundle in zip(decision.bundles, _group_bundles(decision.bundles, per_node), strict=True)
        ]
        usage = self._placed_usage(decision)
        over_as_placed = quotas.exceeded(quota, used, usage)
        if over_as_placed:
            self.engine.release(decision)
            # Not quota-blocked for good: nodes of another accelerator type may free up and be chosen next time.
            self._wait(status, "over quota as placed: " + "; ".join(over_as_placed))
            return
        self._quota_blocked.pop(status.id, None)
        quotas.add_usage(used, usage)
        status.bundles = bundles
        status.state, status.reason = RequestState.PLACED, ""
        status.placed_at = self.clock()
        bound = status.request.bind_placement_group
        status.placement_group = placement_group_name(status.id) if bound else None
        self._save(status)
        self._decide(status, DecisionAction.PLACED, f"{decision.policy}: {_describe_nodes(bundles)}", status.nodes)
        if bound:
            self.effects.append(Bind(status.id, status.placement_group, tuple(bundles)))

    def _rejected_on_first_try(self, status: RequestStatus) -> bool:
        """Reject the request if this is its first try and it can never fit the cluster, even over quota: waiting
        for quota would only hide that. Later tries never reject: a request accepted earlier is never dropped
        because nodes left."""
        if status.id not in self._untried:
            return False
        never = self._never_fits(status) or self._never_within_typed_quota(status)
        if never is None:
            return False
        status.state, status.reason = RequestState.REJECTED, never
        self._forget_pending(status)
        self._save(status)
        self._decide(status, DecisionAction.REJECTED, never)
        return True

    def _empty_uncordoned_nodes(self) -> tuple[NodeSnapshot, ...]:
        """The live nodes as if empty and uncordoned (`self.nodes` carry no cordon label: the engine adds it)."""
        return tuple(_FreeResources.of(node).snapshot(node.labels) for _, node in sorted(self.nodes.items()))

    def _capacity_engine(self) -> PlacementEngine:
        """A what-if engine on the live nodes, empty and uncordoned."""
        return self._trial_engine(ClusterSnapshot(nodes=self._empty_uncordoned_nodes()))

    def _held_back_by_cordons(self, status: RequestStatus, gpu_types: quotas.GpuTypesByBundle | None) -> str:
        """Why a gang no open node set can hold, even empty, will fit once cordoned nodes are uncordoned;
        "" if it would not."""
        cordoned = sorted(name for name, control in self.controls.items() if control.cordoned and name in self.nodes)
        if not cordoned:
            return ""
        decision = self._capacity_engine().place(self._gang_for_engine(status, gpu_types, cordoned_too=True))
        if isinstance(decision, Rejection):
            return ""
        could = sorted({bundle.node for bundle in decision.bundles}.intersection(cordoned))
        if not could:
            return ""
        others = f" (cordoned now: {', '.join(cordoned)})" if len(cordoned) > len(could) else ""
        return (
            f"no uncordoned nodes can hold it, cordoned {', '.join(could)} could{others}: "
            "it is placed once uncordoned (llmos uncordon NODE)"
        )

    def _held_back_by_typed_quota(self, status: RequestStatus, gpu_types: quotas.GpuTypesByBundle | None) -> str:
        """Why a gang no node set of the GPU types its team's typed quota leaves it can hold, even empty,
        fits once the quota allows other types; "" if the types are not narrowed or that would not help."""
        if gpu_types is None or not self.nodes:
            return ""
        candidates, alone = self._gpu_types_alone(status)
        ruled_out = _ruled_out(candidates, gpu_types)
        if not ruled_out:
            return ""
        decision = self._capacity_engine().place(self._gang_for_engine(status, cordoned_too=True))
        if isinstance(decision, Rejection):
            return ""
        types = f"GPU type{'s' if len(ruled_out) > 1 else ''} {', '.join(ruled_out)}"
        when = "its quota rises" if alone == gpu_types else "the team's use falls or its quota rises"
        return (
            f"over quota: no typed quota left for {types}, and {', '.join(_types_in(gpu_types))} alone "
            f"cannot hold it; it is placed once {when}"
        )

    def _over_typed_room(self, gang: GangRequest, room: dict[str, float], quota: dict[str, float]) -> str:
        """Why a spread gang the cluster has room for now waits: the GPU types with room enough under its team's
        typed quotas cannot hold its bundles together; "" if that is not why."""
        if gang.constraint is not Constraint.SPREAD or not room or self.engine is None:
            return ""
        decision = self.engine.place(gang)
        if isinstance(decision, Rejection):
            return ""
        self.engine.release(decision)
        left = ", ".join(f"gpu:{name} {amount:g} left" for name, amount in sorted(room.items()))
        in_use = any(amount + quotas.EPSILON < quota[f"gpu:{name}"] for name, amount in room.items())
        when = (
            "the team's use of those types falls or nodes of them free up" if in_use else "nodes of those types free up"
        )
        return (
            f"over quota: its bundles fit the cluster now, but not together on the GPU types its team's typed "
            f"quotas leave room on ({left}); it is placed once {when}"
        )

    def _growth_for(self, gang: GangRequest, room: dict[str, float]) -> str:
        """The nodes yet to come that would let `gang` fit the cluster as it is now (within the typed GPU `room`),
        in words; "" if none would."""
        snapshot = self._with_unborn_nodes(self._live_nodes(), len(gang.bundles))
        unborn = {node.name: node for node in snapshot.nodes if node.name.startswith(UNBORN_PREFIX)}
        if not unborn:
            return ""
        decision = self._trial_engine(snapshot).place(gang, gpu_room=room)
        if isinstance(decision, Rejection):
            return ""
        used = {bundle.node for bundle in decision.bundles if bundle.node in unborn}
        growth = []
        for pool, new in self._new_nodes_by_pool(used, unborn).items():
            # A TPU pool grows by whole slices, other pools by nodes.
            tpu = self.spec.pool(pool).tpu is not None
            count, unit = (len({node.tpu_slice for node in new}), "slice") if tpu else (len(new), "node")
            growth.append(f"{count} more {unit}{'s' if count > 1 else ''} of pool {pool}")
        return ", ".join(growth)

    def _over_quota_unless_never_fits(self, status: RequestStatus, reason: str) -> None:
        """Over quota now: the request waits for its team's quota, unless on its first try it can never fit, which
        waiting for quota would only hide."""
        if not self._rejected_on_first_try(status):
            self._over_quota(status, reason)

    def _over_quota(self, status: RequestStatus, reason: str) -> None:
        self._quota_blocked[status.id] = self._quota_changes[status.team]
        self._wait(status, reason)

    def _wait(self, status: RequestStatus, reason: str) -> None:
        if status.reason != reason:
            status.reason = reason
            self._save(status)
            self._decide(status, DecisionAction.WAITING, reason)

    def _runs_lower_own_priorities(self, status: RequestStatus) -> bool:
        """Over its team's quota, a request may preempt its own team's lower priorities to make room within it, as
        Kueue's `withinClusterQueue: LowerPriority` does on Kubernetes: whether its team holds such preemptible
        work. Looked for before any victim search, so a team's queue of equals costs no trial placements."""
        if self.engine is None:
            return False
        if self._preemptible_floors is None:
            # Once a pass, not once a request: listing the holders walks every live request. A pass places in
            # priority order, so what it places meanwhile is never below the request it considers.
            self._preemptible_floors = {}
            for holder in self.holders():
                if holder.request.preemptible:
                    floor = self._preemptible_floors.get(holder.team, math.inf)
                    self._preemptible_floors[holder.team] = min(floor, holder.priority_value)
        if self._preemptible_floors.get(status.team, math.inf) >= status.priority_value:
            return False
        self._preemptible_floors = None  # the victims it may take change what their teams hold
        return True

    def _preempt_for(self, status: RequestStatus, gang: GangRequest) -> bool:
        holders = self.holders()
        quota = self.quotas[status.team]

        def fits_without(victims: list[RequestStatus]) -> bool:
            trial = self._trial_engine(self.engine.snapshot())
            used = dict(self.usage[status.team])
            for victim in victims:
                trial.release(_placement_of(victim))
                if victim.team == status.team:
                    quotas.add_usage(used, self._request_usage(victim), sign=-1)
            decision = trial.place(gang, gpu_room=quotas.gpu_room(quota, used))
            # Room the request could not use within its quota is no reason to preempt anyone.
            return not isinstance(decision, Rejection) and not quotas.exceeded(
                quota, used, self._placed_usage(decision)
            )

        victims = choose_victims(status, holders, fits_without, self._nodes_suiting(gang))
        if not victims:
            return False
        for victim in victims:
            self._take_off(
                victim, DecisionAction.PREEMPTED, f"preempted for {status.id} (priority {status.priority_value})"
            )
        return True

    def _nodes_suiting(self, gang: GangRequest) -> set[str]:
        """The live nodes whose labels and GPU type suit some bundle of `gang`, whatever they hold now."""
        state = self.engine.state
        return {
            name
            for bundle in gang.bundles
            for name, suits in zip(state.names, state.static_mask(bundle.demand), strict=True)
            if suits
        }

    def _release(self, status: RequestStatus) -> None:
        self._retry_all = True
        if self.engine is not None and all(node in self.nodes for node in status.nodes):
            self.engine.release(_placement_of(status))
        quotas.add_usage(self.usage[status.team], self._request_usage(status), sign=-1)
        self._quota_changes[status.team] += 1
        if status.placement_group:
            self.effects.append(Unbind(status.id, status.placement_group))
        status.bundles = []
        status.placement_group = None

    def _take_off(
        self,
        status: RequestStatus,
        action: DecisionAction,
        reason: str,
        *,
        failure: bool = False,
        drained: bool = False,
    ) -> None:
        """Move a holding request off its nodes and requeue it; one that is not preemptible ends failed instead,
        unless its node left (`failure`) or is drained: those take the node away whatever the request says."""
        nodes = status.nodes
        self._release(status)
        if failure:
            status.failures += 1
        else:
            status.preemptions += 1
        requeued = status.request.preemptible or failure or drained
        status.state = RequestState.PREEMPTED if requeued else RequestState.FAILED
        status.reason = reason if requeued else f"{reason}; it is not preemptible, so it ended instead of waiting again"
        self._save(status)
        self._decide(status, action, status.reason, nodes)
        if not requeued:
            self._forget_pending(status)

    def preempt(
        self, request_id: str, reason: str = "preempted by an admin", *, operation_key: str | None = None
    ) -> RequestStatus:
        status = self.get(request_id)
        if operation_key and operation_key in status.operation_keys:
            return status
        if not status.state.holding:
            raise UserError(
                f"request {request_id} is {status.state.value}; only placed or running requests can be preempted"
            )
        _remember(status, operation_key)
        self._take_off(status, DecisionAction.PREEMPTED, reason)
        return status

    # -- operators ----------------------------------------------------------------------------------

    def _known_node(self, node: str) -> NodeSnapshot:
        if node in self.nodes:  # first: a worker pool's name may start with "head-" too
            return self.nodes[node]
        if node.startswith(f"{HEAD_POOL}-"):
            raise UserError(f"{node} is the head node; it runs no placed work, so it cannot be cordoned or drained")
        nodes = ", ".join(sorted(self.nodes)) or "none"
        raise UserError(f"unknown node {node!r}{did_you_mean(node, self.nodes)}; nodes: {nodes}")

    def cordon(self, node: str, cordoned: bool = True) -> NodeControl:
        self._known_node(node)
        control = self.controls.get(node, NodeControl(node=node))
        control.cordoned = cordoned
        if not cordoned:
            control.drained = False
        self.controls[node] = control
        self.journal(_journal_line("control", control))
        self._rebuild_engine()
        return control

    def drain(self, node: str) -> list[str]:
        """Cordon the node and move its work elsewhere (requeued; placed again where there is room)."""
        self.cordon(node)
        self.controls[node].drained = True
        self.journal(_journal_line("control", self.controls[node]))
        moved = []
        for status in self.holders():
            if node in status.nodes:
                self._take_off(status, DecisionAction.REQUEUED, f"node {node} is being drained", drained=True)
                moved.append(status.id)
        return moved

    def set_quota(self, team: str, changes: dict[str, float | None]) -> TeamUsage:
        """Change a team's quota (None removes a key). Refused if it would fall below current use."""
        self._known_team(team)
        valid = self.spec.quota_keys()
        new = dict(self.quotas[team])
        for key, amount in changes.items():
            if key not in valid:
                raise UserError(
                    f"quota key {key!r} is not a resource of this cluster{did_you_mean(key, valid)}; "
                    f"valid keys: {', '.join(valid)}"
                )
            if amount is None:
                new.pop(key, None)
                continue
            # The admin API hands on what its caller passed, unparsed (`llmos quota set` parses `gpu=8` itself).
            if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
                raise UserError(f"quota {key} is {amount!r}; give a finite number, 0 or more")
            if problem := quota_amount_problem(key, amount):
                raise UserError(problem)
            used = self.usage[team].get(key, 0.0)
            if amount + quotas.EPSILON < used:
                raise UserError(
                    f"team {team} uses {used:g} {key} now, more than the new quota {amount:g}; "
                    "preempt or cancel its requests first, then lower the quota"
                )
            new[key] = float(amount)
        self.quotas[team] = new
        self._quotas_set.add(team)
        self._quota_changes[team] += 1
        self._retry_all = True
        self.journal(_quota_line(team, new))
        return self.team_usage(team)

    # -- recovery -----------------------------------------------------------------------------------

    def end_with_cluster(self, reason: str) -> list[str]:
        """The Ray cluster these books were kept for is gone, and what ran in it went with it: every live
        request fails with `reason` (a queued one too: whoever waited on it went as well, and placed later
        it would hold its share for no one), freeing its quota, and node controls are dropped (a new
        cluster's nodes are new machines). Nothing is unbound: its groups went with the cluster.
        Returns the ids of the requests ended."""
        ended = sorted(self._live.values(), key=lambda status: status.submitted_seq)
        for status in ended:
            self._finish(status, RequestState.FAILED, reason, DecisionAction.RELEASED)
        self.effects = [effect for effect in self.effects if not isinstance(effect, Unbind)]
        for control in self.controls.values():
            control.cordoned = control.drained = False
            self.journal(_journal_line("control", control))
        self.controls.clear()
        return [status.id for status in ended]

    def restore(self, entries: Iterable[dict]) -> None:
        """Rebuild the books from the journal (requests, decisions, quotas, node controls)."""
        for entry in entries:
            if "request" in entry:
                status = RequestStatus.model_validate(entry["request"])
                self.requests[status.id] = status
                self._index(status)
                self._seq = max(self._seq, status.submitted_seq)
            elif "decision" in entry:
                record = DecisionRecord.model_validate(entry["decision"])
                self.decisions.append(record)
                self._decision_seq = max(self._decision_seq, record.seq)
            elif "quota" in entry and entry["quota"]["team"] in self.quotas:  # else: a team no longer in the spec
                self.quotas[entry["quota"]["team"]] = dict(entry["quota"]["quota"])
                self._quotas_set.add(entry["quota"]["team"])
            elif "control" in entry:
                control = NodeControl.model_validate(entry["control"])
                self.controls[control.node] = control
            elif "sequence" in entry:
                self._seq = max(self._seq, entry["sequence"]["requests"])
                self._decision_seq = max(self._decision_seq, entry["sequence"]["decisions"])
        # A journal keeps a commit's changes in the order each request first changed, not the order they ended.
        finished = sorted((self.requests[request_id] for request_id in self._finished), key=_finish_order)
        self._finished = {status.id: None for status in finished}
        self._finished_seq = max((status.finished_seq or 0 for status in finished), default=0)
        self._forget_oldest_finished()
        self.usage = {team: {} for team in self.quotas}
        for status in self.holders():
            quotas.add_usage(self.usage.setdefault(status.team, {}), self._request_usage(status))
        # Every try leaves a request placed, rejected or waiting with a reason, so one queued with none was never
        # tried, and its first try may still reject it as never fitting.
        self._untried = {
            status.id for status in self._live.values() if status.state is RequestState.QUEUED and not status.reason
        }
        self._end_requests_of_removed_teams()

    def _end_requests_of_removed_teams(self) -> None:
        """Live requests of a team taken out of the ClusterSpec end failed: no quota holds them any more and
        no credential of the team is left to end them. Their placement groups are removed."""
        removed = sorted(
            (status for status in self._live.values() if status.team not in self.quotas),
            key=lambda status: status.submitted_seq,
        )
        for status in removed:
            self._quota_changes.setdefault(status.team, 0)
            reason = f"its team {status.team!r} is no longer in the ClusterSpec"
            self._finish(status, RequestState.FAILED, reason, DecisionAction.RELEASED)
        for team in {status.team for status in removed}:
            # A team that only had requests waiting holds no usage entry.
            self.usage.pop(team, None)
            del self._quota_changes[team]

    def checkpoint(self) -> list[str]:
        """The whole state as journal lines, for compacting the journal; written by pydantic as the
        journal's lines are, since it holds every request ever made and is written inside a call."""
        # The counters too: the requests and decisions forgotten since must not have their ids given again.
        lines = [json.dumps({"sequence": {"requests": self._seq, "decisions": self._decision_seq}})]
        # Only the quotas an admin set, as the journal holds them: the others come from the ClusterSpec on restore.
        lines += [_quota_line(team, quota) for team, quota in self.quotas.items() if team in self._quotas_set]
        lines += [_journal_line("control", control) for control in self.controls.values()]
        lines += [_journal_line("request", status) for status in self.requests.values()]
        lines += [_journal_line("decision", record) for record in self.decisions]
        return lines


def _selector_allows(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether `selector` allows the nodes of a pool whose nodes all carry `labels`, reading only the keys those
    labels have."""
    return all(selector_matches(labels, key, value) for key, value in selector.items() if key in labels)


def _per_pool(problems: dict[str, list[str]]) -> str:
    return "; ".join(f"pool {pool}: {', '.join(over)}" for pool, over in problems.items())


def _types_in(gpu_types: quotas.GpuTypesByBundle) -> list[str]:
    """The GPU types some bundle may use, sorted."""
    return sorted(set().union(*(types for types in gpu_types if types)))


def _ruled_out(candidates: quotas.GpuTypesByBundle, allowed: quotas.GpuTypesByBundle) -> list[str]:
    """The GPU types some bundle may use among `candidates` but not among `allowed`, sorted."""
    return sorted(set().union(*(may - left for may, left in zip(candidates, allowed, strict=True) if may)))


def _request_state(name: str) -> RequestState:
    try:
        return RequestState(name)
    except ValueError:
        states = [state.value for state in RequestState]
        raise UserError(f"unknown state {name!r}{did_you_mean(name, states)}; states: {', '.join(states)}") from None


def _finish_order(status: RequestStatus) -> tuple[int, int]:
    """Requests journaled before `finished_seq` existed count as ending first, in submission order."""
    return status.finished_seq or 0, status.submitted_seq


def _remember(status: RequestStatus, operation_key: str | None) -> None:
    """Keep the key of the call about to change `status`, journaled with it, so that a retry is not applied."""
    if operation_key:
        status.operation_keys = [*status.operation_keys, operation_key][-OPERATION_KEYS_KEPT:]


def _check_details(details: object) -> None:
    """Refuse details the journal cannot hold, before they are taken: a journal line that fails to write would
    leave the change it records undone on a restart."""
    if not isinstance(details, dict):
        raise UserError(f"details: {type(details).__name__} is not a mapping; report {{name: value, ...}}")
    try:
        json.dumps(details)
    except (TypeError, ValueError, RecursionError) as error:
        raise UserError(
            f"details: {error}; report plain numbers, text, lists and mappings "
            "(convert numpy or torch values with float() or int())"
        ) from None


def _journal_line(kind: str, record: BaseModel) -> str:
    """`{kind: record}` as one JSON line; pydantic writes the record's JSON several times faster than
    `json.dumps` of its dump, and the journal takes a line per decision and per changed request."""
    return f'{{"{kind}":{record.model_dump_json()}}}'


def _quota_line(team: str, quota: dict[str, float]) -> str:
    return json.dumps({"quota": {"team": team, "quota": quota}})


def _binding_of(bundle: BundlePlacement, node: NodeSnapshot, group_bundle_index: int) -> BundleBinding:
    return BundleBinding(
        node_id=node.labels.get(RAY_NODE_ID_LABEL, ""),
        bundle_index=bundle.bundle_index,
        node=bundle.node,
        pool=node.pool,
        resources=dict(bundle.resources),
        gpu_devices=list(bundle.gpu_devices),
        gpu_share=bundle.gpu_share,
        group_bundle_index=group_bundle_index,
    )


def _group_bundles(bundles: Sequence[BundlePlacement], per_node: bool) -> list[int]:
    """The Ray bundle that holds each of `bundles` (a placement's, in bundle order): its own, or with
    `per_node` one per node, numbered in the order the nodes first appear.

    A fractional GPU keeps a Ray bundle of its own even then: Ray reserves a bundle's GPU share on one
    device, and two shares the engine put on two devices would add up to a share neither has.
    """
    if not per_node:
        return [bundle.bundle_index for bundle in bundles]
    indexes = []
    node_bundle: dict[str, int] = {}
    made = 0  # Ray bundles so far
    for bundle in bundles:
        if 0 < bundle.gpu_share < 1:
            indexes.append(made)
            made += 1
            continue
        if bundle.node not in node_bundle:
            node_bundle[bundle.node] = made
            made += 1
        indexes.append(node_bundle[bundle.node])
    return indexes


def _placement_of(status: RequestStatus) -> Placement:
    return Placement(
        request=status.id,
        policy="",
        bundles=tuple(
            BundlePlacement(b.bundle_index, b.node, dict(b.resources), tuple(b.gpu_devices), b.gpu_share)
            for b in status.bundles
        ),
    )


def _describe_nodes(bundles: list[BundleBinding]) -> str:
    counts: dict[str, int] = {}
    for bundle in bundles:
        counts[bundle.node] = counts.get(bundle.node, 0) + 1
    return ", ".join(f"{node} x{count}" if count > 1 else node for node, count in counts.items())


@dataclass
class _FreeResources:
    """A node's free resources while the books' holdings are subtracted (to seed a fresh engine)."""

    node: NodeSnapshot
    cpus: float
    memory: int
    gpu: list[float]
    tpu: int

    @classmethod
    def of(cls, node: NodeSnapshot) -> _FreeResources:
        return cls(node, node.cpus, node.memory, [1.0] * node.gpus, node.tpu_chips)

    def take(self, bundle: BundleBinding) -> None:
        self.cpus -= bundle.resources.get("CPU", 0.0)
        self.memory -= int(bundle.resources.get("memory", 0))
        self.tpu -= int(bundle.resources.get("TPU", 0))
        for device in bundle.gpu_devices:
            self.gpu[device] = round(self.gpu[device] - bundle.gpu_share, 4)

    def snapshot(self, labels: dict[str, str]) -> NodeSnapshot:
        return self.node.model_copy(
            update={
                "labels": labels,
                "cpus_free": max(self.cpus, 0.0),
                "memory_free": max(self.memory, 0),
                "gpu_free": tuple(max(share, 0.0) for share in self.gpu),
                "tpu_chips_free": max(self.tpu, 0) if self.node.tpu_chips else None,
            }
        )
