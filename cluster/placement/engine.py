"""The placement engine: a gang request in, a placement or a rejection out.

The engine keeps the books of one cluster (a `ClusterState`), asks its policy to score and choose
nodes bundle by bundle, and commits a gang only when every bundle has a place. Rules that hold
whatever the policy:

- labels, GPU types, CPU, memory, TPU chips and each GPU device's free share are never exceeded;
- a fractional GPU goes to one device, whole GPUs to idle devices of one node;
- CPU-only bundles avoid GPU and TPU nodes while a plain node has room;
- a same_tpu_slice gang takes whole, idle hosts of exactly one slice, one bundle per host;
- a rejection says whether the request could ever fit (`never_fits`) or just not now.

Node scores are cached per bundle shape and recomputed only for nodes whose version changed, so a
decision costs a few vector operations plus scoring the handful of nodes the last decisions touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from cluster.placement.decision import BundlePlacement, Decision, Placement, Rejection, RejectionReason
from cluster.placement.policies import Policy, make_policy
from cluster.placement.policies.base import best_scored
from cluster.placement.request import UNITS, Constraint, Demand, GangRequest, to_units
from cluster.placement.snapshot import ClusterSnapshot
from cluster.placement.state import ClusterState
from cluster.placement.workload import TargetWorkload, WorkloadEstimator

SPREAD_SEARCH_STEPS = 20_000  # nodes tried in search of distinct nodes for a spread gang within its typed GPU room
SPREAD_SEARCH_BUNDLES = 256  # bundles of the largest spread gang that search is tried for
PACK_SEARCH_STEPS = 20_000  # placements tried in search of a packing of a same_node or same_pool gang: never-fits
# The same search on the live cluster, where each waiting gang's every try pays it (about 20 µs a placement tried).
LIVE_PACK_SEARCH_STEPS = 1_000
PACK_SEARCH_BUNDLES = 64  # bundles of the largest packed gang that search is tried for

# Below this many stale nodes, finding the distinct node states costs more than it saves.
DISTINCT_STATES_ABOVE = 64


@dataclass
class _ScoreCache:
    seen: np.ndarray  # each node's version when last scored (-1: never)
    fits: np.ndarray
    score: np.ndarray
    shared_device: np.ndarray


@dataclass(frozen=True)
class _Choice:
    bundle_index: int
    node: int
    reserved: Demand  # what the bundle holds; a whole TPU host reserves all its chips
    devices: tuple[int, ...]


def _largest_first(demand: Demand) -> tuple[int, int, int, int]:
    # Scarce resources first, as Ray's placement groups order bundles: GPU, TPU, memory, CPU.
    return (demand.gpu_total, demand.tpu, demand.memory, demand.cpu)


def _distinct_nodes(candidates: Sequence[np.ndarray]) -> list[int] | None:
    """A different node for every bundle, each from its candidates (best first), or None if impossible.

    Bipartite matching by augmenting paths: exact, unlike placing bundles one by one, which can take
    the only node a later bundle fits.
    """
    owner: dict[int, int] = {}

    def assign(bundle: int, visited: set[int]) -> bool:
        for node in candidates[bundle]:
            node = int(node)
            if node in visited:
                continue
            visited.add(node)
            if node not in owner or assign(owner[node], visited):
                owner[node] = bundle
                return True
        return False

    if not all(assign(bundle, set()) for bundle in range(len(candidates))):
        return None
    nodes = [0] * len(candidates)
    for node, bundle in owner.items():
        nodes[bundle] = node
    return nodes


class _Planner:
    """Places gangs on one cluster state with one policy; remembers node scores between calls."""

    def __init__(self, state: ClusterState, policy: Policy, tie_rank: np.ndarray):
        self.state = state
        self.policy = policy
        self.tie_rank = tie_rank
        self._plain_nodes = ~state.has_accelerator
        self._caches: dict[Demand, _ScoreCache] = {}
        # Whether the last `plan` of a spread gang within a GPU room stopped its search unfinished.
        self.spread_search_gave_up = False

    def forget_scores(self) -> None:
        self._caches.clear()

    def _scores(self, demand: Demand) -> _ScoreCache:
        state = self.state
        cache = self._caches.get(demand) if self.policy.cacheable else None
        if cache is None:
            size = state.size
            cache = _ScoreCache(
                np.full(size, -1, dtype=np.int64),
                np.zeros(size, dtype=bool),
                np.zeros(size),
                np.zeros(size, dtype=np.int64),
            )
            if self.policy.cacheable:
                self._caches[demand] = cache
        stale = np.flatnonzero((cache.seen != state.version) & state.static_mask(demand))
        if len(stale):
            cache.seen[stale] = state.version[stale]
            fits = state.fits(demand, stale)
            cache.fits[stale] = fits
            roomy = stale[fits]
            if len(roomy):
                score, shared_device = self._score_distinct(demand, roomy)
                cache.score[roomy] = score
                if demand.is_fractional_gpu:
                    cache.shared_device[roomy] = (
                        shared_device if shared_device is not None else state.best_fit_devices(roomy, demand.gpu_share)
                    )
        return cache

    def _score_distinct(self, demand: Demand, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores nodes, once per distinct node state when many are stale (a new bundle shape meets a
        cluster of mostly identical nodes); a cacheable policy scores equal states equally."""
        if not self.policy.cacheable or len(nodes) < DISTINCT_STATES_ABOVE:
            scored = self.policy.score(self.state, demand, nodes)
            return scored.score, scored.shared_device
        _, first, inverse = np.unique(self.state.scoring_keys(nodes), axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        scored = self.policy.score(self.state, demand, nodes[first])
        shared_device = scored.shared_device[inverse] if scored.shared_device is not None else None
        return scored.score[inverse], shared_device

    def _candidates(self, mask: np.ndarray, demand: Demand) -> np.ndarray:
        if not demand.wants_accelerator:
            plain = mask & self._plain_nodes
            if plain.any():
                mask = plain
        return np.flatnonzero(mask)

    def choose(self, demand: Demand, allowed: np.ndarray | None = None) -> tuple[int, tuple[int, ...]] | None:
        """The policy's node (and devices) for one bundle among `allowed` nodes, or None if none has room."""
        cache = self._scores(demand)
        candidates = self._candidates(cache.fits if allowed is None else cache.fits & allowed, demand)
        if not len(candidates):
            return None
        node = self.policy.choose(self.state, candidates, cache.score[candidates], self.tie_rank)
        return node, self.state.devices_for(node, demand, int(cache.shared_device[node]))

    def _choose_in_gang(self, demand: Demand, allowed: np.ndarray | None) -> tuple[int, tuple[int, ...]] | None:
        if not self.policy.packs_gangs:
            return self.choose(demand, allowed)
        state = self.state
        mask = state.static_mask(demand) if allowed is None else state.static_mask(demand) & allowed
        nodes = self._candidates(mask, demand)
        nodes = nodes[state.fits(demand, nodes)]
        if not len(nodes):
            return None
        node = best_scored(nodes, self._gang_scores(demand, nodes), self.tie_rank)
        return node, self._devices_on(node, demand)

    def _gang_scores(self, demand: Demand, nodes: np.ndarray) -> np.ndarray:
        """The policy's gang scores of `nodes` (all with room for `demand`); from the score cache when
        the policy's gang scores are its single-bundle scores, so unchanged nodes are not rescored."""
        if self.policy.cacheable and type(self.policy).gang_score is Policy.gang_score:
            return self._scores(demand).score[nodes]
        return self.policy.gang_score(self.state, demand, nodes)

    def _devices_on(self, node: int, demand: Demand) -> tuple[int, ...]:
        """Devices for a bundle the policy did not score: best fit for a fractional GPU, as Ray does."""
        if not demand.gpu_count:
            return ()
        shared = int(self.state.best_fit_devices(np.array([node]), demand.gpu_share)[0])
        return self.state.devices_for(node, demand, shared)

    def _order(self, demands: Sequence[Demand]) -> list[int]:
        """Largest first; of bundles alike in size, the one fewest nodes suit first, so that a bundle any node
        suits does not take the only node another can use."""
        if len({(demand.gpu_types, demand.label_selector) for demand in demands}) == 1:
            suiting = [0] * len(demands)  # every bundle suits the same nodes (the common gang): no counting
        else:
            suiting = [int(self.state.static_mask(demand).sum()) for demand in demands]
        return sorted(
            range(len(demands)), key=lambda index: (_largest_first(demands[index]), -suiting[index]), reverse=True
        )

    def plan(
        self, demands: Sequence[Demand], constraint: Constraint, gpu_room: np.ndarray | None = None
    ) -> list[_Choice] | None:
        """Allocates every bundle on the state and returns the choices, or returns None untouched.
        `gpu_room`: per GPU type code, the GPU units a spread gang may hold on that type in all, and last, for
        nodes of no GPU type (code -1), more than it asks."""
        order = self._order(demands)
        self.spread_search_gave_up = False
        if constraint is Constraint.SAME_TPU_SLICE:
            return self._plan_tpu_slice(demands, order)
        if len(demands) == 1:
            return self._place(demands, order, None, distinct=False, gpu_room=gpu_room)
        if constraint is Constraint.SPREAD:
            return self._place(demands, order, None, distinct=True, gpu_room=gpu_room) or self._spread_by_matching(
                demands, gpu_room
            )
        if constraint is Constraint.SAME_NODE:
            for node in self._nodes_for_whole_gang(demands, order):
                only = np.zeros(self.state.size, dtype=bool)
                only[node] = True
                placed = self._place(demands, order, only, distinct=False)
                if placed is not None:
                    return placed
            return None
        for pool in self._pools_for_gang(demands, order):
            placed = self._place(demands, order, self.state.pool_of == pool, distinct=False)
            if placed is not None:
                return placed
        return None

    def undo(self, placed: Sequence[_Choice]) -> None:
        for choice in reversed(placed):
            self.state.release(choice.node, choice.reserved, choice.devices)

    def _place(
        self,
        demands: Sequence[Demand],
        order: list[int],
        allowed: np.ndarray | None,
        distinct: bool,
        gpu_room: np.ndarray | None = None,
    ) -> list[_Choice] | None:
        if self.policy.packs_gangs and not distinct and len(demands) > 1:
            return self._pack(demands, order, allowed)
        placed: list[_Choice] = []
        used = np.zeros(self.state.size, dtype=bool)
        room = None if gpu_room is None else gpu_room.copy()
        for index in order:
            demand = demands[index]
            mask = allowed
            if distinct:
                mask = ~used if allowed is None else allowed & ~used
            if room is not None and demand.gpu_count:
                # Nodes of GPU types with room left for this bundle.
                with_room = room[self.state.gpu_type_of] >= demand.gpu_total
                mask = with_room if mask is None else mask & with_room
            choice = self._choose_in_gang(demand, mask) if len(demands) > 1 else self.choose(demand, mask)
            if choice is None:
                self.undo(placed)
                return None
            node, devices = choice
            self.state.allocate(node, demand, devices)
            placed.append(_Choice(index, node, demand, devices))
            used[node] = True
            if room is not None and demand.gpu_count:
                room[self.state.gpu_type_of[node]] -= demand.gpu_total
        return placed

    def _pack(self, demands: Sequence[Demand], order: list[int], allowed: np.ndarray | None) -> list[_Choice] | None:
        """Ray's PACK: the best node takes every remaining bundle that fits before the next is opened."""
        state = self.state
        remaining = list(order)
        placed: list[_Choice] = []
        closed = np.zeros(state.size, dtype=bool)
        while remaining:
            open_nodes = ~closed if allowed is None else allowed & ~closed
            choice = self._choose_in_gang(demands[remaining[0]], open_nodes)
            if choice is None:
                self.undo(placed)
                return None
            node, devices = choice
            first = remaining.pop(0)
            state.allocate(node, demands[first], devices)
            placed.append(_Choice(first, node, demands[first], devices))
            for index in list(remaining):
                demand = demands[index]
                here = np.array([node])
                if state.static_mask(demand)[node] and state.fits(demand, here)[0]:
                    devices = self._devices_on(node, demand)
                    state.allocate(node, demand, devices)
                    placed.append(_Choice(index, node, demand, devices))
                    remaining.remove(index)
            closed[node] = True
        return placed

    def _spread_by_matching(self, demands: Sequence[Demand], gpu_room: np.ndarray | None) -> list[_Choice] | None:
        """When the policy's bundle-by-bundle choices dead-end, any distinct nodes with room will do, within
        `gpu_room`: a limit several bundles share is no matching constraint, so with one the assignment is a
        bounded search instead."""
        everywhere = np.arange(self.state.size)
        candidates = [self._gang_preference([demand], demand, everywhere) for demand in demands]
        nodes = (
            _distinct_nodes(candidates)
            if gpu_room is None
            else self._distinct_nodes_within(demands, candidates, gpu_room)
        )
        if nodes is None:
            return None
        placed = [
            _Choice(index, node, demands[index], self._devices_on(node, demands[index]))
            for index, node in enumerate(nodes)
        ]
        for choice in placed:
            self.state.allocate(choice.node, choice.reserved, choice.devices)
        return placed

    def _distinct_nodes_within(
        self, demands: Sequence[Demand], candidates: Sequence[np.ndarray], gpu_room: np.ndarray
    ) -> list[int] | None:
        """A different node for every bundle, each from its candidates (best first), with the GPUs on each type
        within `gpu_room`; depth first, the bundle with the fewest candidates first, at most SPREAD_SEARCH_STEPS
        nodes tried and for at most SPREAD_SEARCH_BUNDLES bundles, else None."""
        if len(demands) > SPREAD_SEARCH_BUNDLES:
            self.spread_search_gave_up = True
            return None  # one level of recursion a bundle
        type_of = self.state.gpu_type_of
        order = sorted(range(len(demands)), key=lambda index: len(candidates[index]))
        nodes = [0] * len(demands)
        taken: set[int] = set()
        left = gpu_room.copy()
        steps = SPREAD_SEARCH_STEPS

        def assign(position: int) -> bool:
            nonlocal steps
            if position == len(order):
                return True
            index = order[position]
            needs = demands[index].gpu_total if demands[index].gpu_count else 0
            for node in map(int, candidates[index]):
                gpu_type = type_of[node]
                if node in taken or (needs and left[gpu_type] < needs):
                    continue
                steps -= 1
                if steps < 0:
                    self.spread_search_gave_up = True
                    return False
                taken.add(node)
                left[gpu_type] -= needs
                nodes[index] = node
                if assign(position + 1):
                    return True
                taken.discard(node)
                left[gpu_type] += needs
            return False

        return nodes if assign(0) else None

    def pack_exhaustively(
        self,
        demands: Sequence[Demand],
        constraint: Constraint,
        max_steps: int = PACK_SEARCH_STEPS,
        scopes: list[np.ndarray] | None = None,
    ) -> tuple[list[_Choice] | None, bool]:
        """A same_node or same_pool gang packed by a depth-first search over nodes and, for a fractional GPU, the
        device: for gangs that greedy packing, which never takes a bundle back, misses. Nodes alike (free
        resources, devices, and the bundles they suit) and devices of equal free share are tried once per
        bundle, and alike bundles in one order only. Returns the placement (allocated) or None, and whether the
        search was complete: it stops after `max_steps` placements tried, and is not tried past
        PACK_SEARCH_BUNDLES bundles. `scopes`: `scopes_that_may_hold`, where the caller has them already."""
        state = self.state
        if len(demands) > PACK_SEARCH_BUNDLES:
            return None, False  # one level of recursion a bundle
        order = self._order(demands)
        suits = np.array([state.static_mask(demand) for demand in demands])
        steps = max_steps
        placed: list[_Choice] = []

        def node_key(node: int) -> bytes:
            free = (state.cpu_free[node], state.mem_free[node], state.tpu_free[node], state.capacity_class[node])
            return np.array(free).tobytes() + np.sort(state.gpu_free[node]).tobytes() + suits[:, node].tobytes()

        def device_options(node: int, demand: Demand) -> list[tuple[int, ...]]:
            if not demand.is_fractional_gpu:
                return [state.devices_for(node, demand, 0)]
            free = state.gpu_free[node]
            shares = sorted({int(share) for share in free if share >= demand.gpu_share})
            return [(int(np.flatnonzero(free == share)[0]),) for share in shares]  # tightest first

        def search(position: int, allowed: np.ndarray) -> bool:
            nonlocal steps
            if position == len(order):
                return True
            index = order[position]
            demand = demands[index]
            nodes = np.flatnonzero(allowed & suits[index])
            if position and demands[order[position - 1]] == demand:
                # Alike bundles are interchangeable: of their orders on nodes, only the nondecreasing one is tried.
                nodes = nodes[nodes >= placed[-1].node]
            seen: set[bytes] = set()
            for node in map(int, nodes[state.fits(demand, nodes)]):
                key = node_key(node)
                if key in seen:
                    continue
                seen.add(key)
                for devices in device_options(node, demand):
                    steps -= 1
                    if steps < 0:
                        return False
                    state.allocate(node, demand, devices)
                    placed.append(_Choice(index, node, demand, devices))
                    if search(position + 1, allowed):
                        return True
                    placed.pop()
                    state.release(node, demand, devices)
            return False

        for scope in self.scopes_that_may_hold(demands, constraint) if scopes is None else scopes:
            if search(0, scope):
                return placed, True
            if steps < 0:
                return None, False
        return None, True

    def _copies_that_fit(self, demand: Demand, nodes: np.ndarray, wanted: int) -> int:
        """How many bundles of this shape the `nodes` (a mask) could take beside what they hold, each on its own,
        counting at most `wanted` a node."""
        state = self.state
        chosen = np.flatnonzero(nodes)
        copies = np.full(len(chosen), wanted)
        for free, need in ((state.cpu_free, demand.cpu), (state.mem_free, demand.memory), (state.tpu_free, demand.tpu)):
            if need:
                copies = np.minimum(copies, free[chosen] // need)
        if demand.gpu_count:
            per_device = state.gpu_free[chosen] // demand.gpu_share
            copies = np.minimum(copies, per_device.sum(axis=1) // demand.gpu_count)
        return int(copies.sum())

    def scopes_that_may_hold(self, demands: Sequence[Demand], constraint: Constraint) -> list[np.ndarray]:
        """The nodes (a mask per node for same_node, per pool for same_pool) where the sum of what is free holds
        the gang, and as many bundles of each shape fit as it has; alike nodes once. Where none, no packing is."""
        state = self.state
        suits = [state.static_mask(demand) for demand in demands]
        total = np.sum([(demand.cpu, demand.memory, demand.tpu, demand.gpu_total) for demand in demands], axis=0)
        free = np.column_stack([state.cpu_free, state.mem_free, state.tpu_free, state.gpu_free.sum(axis=1)])
        if constraint is Constraint.SAME_NODE:
            roomy = np.flatnonzero((free >= total).all(axis=1))
            alike = np.column_stack(
                [free[roomy], state.capacity_class[roomy], np.sort(state.gpu_free[roomy]), *(s[roomy] for s in suits)]
            )
            _, first = np.unique(alike, axis=0, return_index=True)  # alike nodes: one search answers for all
            scopes = [np.arange(state.size) == node for node in roomy[np.sort(first)]]
        else:
            pools = [state.pool_of == pool for pool in range(len(state.pools))]
            scopes = [scope for scope in pools if (free[scope].sum(axis=0) >= total).all()]
        shapes: dict[Demand, tuple[int, np.ndarray]] = {}
        for demand, suited in zip(demands, suits, strict=True):
            count, _ = shapes.get(demand, (0, suited))
            shapes[demand] = (count + 1, suited)
        return [
            scope
            for scope in scopes
            if all(
                self._copies_that_fit(demand, scope & suited, count) >= count
                for demand, (count, suited) in shapes.items()
            )
        ]

    def _static_for_all(self, demands: Sequence[Demand]) -> np.ndarray:
        mask = np.ones(self.state.size, dtype=bool)
        for demand in demands:
            mask &= self.state.static_mask(demand)
        return mask

    def _gang_preference(self, demands: Sequence[Demand], largest: Demand, nodes: np.ndarray) -> np.ndarray:
        """`nodes` that fit the largest bundle, best first by the policy's gang score, then the tie
        order; plain nodes before accelerator nodes when no bundle wants an accelerator."""
        nodes = nodes[self.state.static_mask(largest)[nodes] & self.state.fits(largest, nodes)]
        if not len(nodes):
            return nodes
        scores = self._gang_scores(largest, nodes)
        cpu_only = not any(demand.wants_accelerator for demand in demands)
        on_accelerator = self.state.has_accelerator[nodes] & cpu_only
        return nodes[np.lexsort((self.tie_rank[nodes], -scores, on_accelerator))]

    def _nodes_for_whole_gang(self, demands: Sequence[Demand], order: list[int]) -> np.ndarray:
        state = self.state
        whole_gpus = sum(demand.gpu_count for demand in demands if not demand.is_fractional_gpu)
        mask = (
            self._static_for_all(demands)
            & (state.cpu_free >= sum(demand.cpu for demand in demands))
            & (state.mem_free >= sum(demand.memory for demand in demands))
            & (state.tpu_free >= sum(demand.tpu for demand in demands))
            & ((state.gpu_free == UNITS).sum(axis=1) >= whole_gpus)
            & (state.gpu_free.sum(axis=1) >= sum(demand.gpu_total for demand in demands))
        )
        return self._gang_preference(demands, demands[order[0]], np.flatnonzero(mask))

    def _pools_for_gang(self, demands: Sequence[Demand], order: list[int]) -> list[int]:
        """Pools where every bundle has a node that suits it and with room for the whole gang in total, the one
        with the best node for the largest bundle first. Each bundle keeps its own labels: one may ask for a
        node the others may not."""
        state = self.state
        suits = [state.static_mask(demand) for demand in demands]
        ranked = self._gang_preference(demands, demands[order[0]], np.flatnonzero(suits[order[0]]))
        pools: list[int] = []
        for node in ranked:
            pool = int(state.pool_of[node])
            if pool in pools:
                continue
            in_pool = [mask & (state.pool_of == pool) for mask in suits]
            if not all(mask.any() for mask in in_pool):
                continue
            members = np.logical_or.reduce(in_pool)
            if (
                state.cpu_free[members].sum() >= sum(demand.cpu for demand in demands)
                and state.mem_free[members].sum() >= sum(demand.memory for demand in demands)
                and state.gpu_free[members].sum() >= sum(demand.gpu_total for demand in demands)
                and state.tpu_free[members].sum() >= sum(demand.tpu for demand in demands)
            ):
                pools.append(pool)
        return pools

    def _plan_tpu_slice(self, demands: Sequence[Demand], order: list[int]) -> list[_Choice] | None:
        """Whole idle hosts of one slice; the slice with the fewest idle hosts that suffices wins."""
        state = self.state
        # Hosts any bundle suits; which bundle takes which host is matched per bundle (`_assign_hosts`).
        idle_hosts = (
            np.logical_or.reduce([state.static_mask(demand) for demand in demands])
            & (state.slice_of >= 0)
            & (state.tpu_cap > 0)
            & (state.tpu_free == state.tpu_cap)
        )
        best: tuple[tuple[int, int], list[_Choice]] | None = None
        for slice_code in np.unique(state.slice_of[idle_hosts]):
            hosts = np.flatnonzero(idle_hosts & (state.slice_of == slice_code))
            if len(hosts) < len(demands):
                continue
            assignment = self._assign_hosts(demands, order, hosts)
            if assignment is None:
                continue
            key = (len(hosts), int(self.tie_rank[hosts].min()))
            if best is None or key < best[0]:
                best = (key, assignment)
        if best is None:
            return None
        for choice in best[1]:
            state.allocate(choice.node, choice.reserved, choice.devices)
        return best[1]

    def _assign_hosts(self, demands: Sequence[Demand], order: list[int], hosts: np.ndarray) -> list[_Choice] | None:
        """One whole host per bundle, if the slice's idle hosts can hold them all."""
        state = self.state
        whole_host = [[replace(demands[index], tpu=int(state.tpu_cap[host])) for host in hosts] for index in order]
        candidates = [
            hosts[
                [
                    demands[index].tpu <= taken.tpu
                    and state.static_mask(demands[index])[host]
                    and state.fits(taken, np.array([host]))[0]
                    for host, taken in zip(hosts, whole_host[position], strict=True)
                ]
            ]
            for position, index in enumerate(order)
        ]
        chosen = _distinct_nodes(candidates)
        if chosen is None:
            return None
        assignment = []
        for position, (index, host) in enumerate(zip(order, chosen, strict=True)):
            taken = whole_host[position][int(np.flatnonzero(hosts == host)[0])]
            assignment.append(_Choice(index, host, taken, self._devices_on(host, taken)))
        return assignment


# Constraints whose gangs each policy packs greedily, bundle by bundle: the others are placed exactly (spread
# and TPU-slice gangs fall back to a matching).
_PACKED = (Constraint.SAME_NODE, Constraint.SAME_POOL)


class PlacementEngine:
    """Places gangs on one cluster with one policy and keeps the books of what is free.

    `place` commits a placement into the books; `release` frees it again (a departure);
    `snapshot` reads the books back as plain data.
    """

    def __init__(
        self,
        snapshot: ClusterSnapshot,
        policy: str | Policy = "llmos",
        *,
        workload: TargetWorkload | None = None,
        seed: int = 0,
        node_order: Sequence[str] | None = None,
    ):
        """`workload`: the task shapes fgd and llmos optimise for; learned from requests if None.
        `node_order`: who wins ties (e.g. Ray's node-id order); a random order drawn from `seed` if None.
        """
        self.state = ClusterState(snapshot)
        self.policy = make_policy(policy, workload=workload, seed=seed) if isinstance(policy, str) else policy
        self._estimator = WorkloadEstimator() if self.policy.needs_workload and self.policy.workload is None else None
        if node_order is None:
            tie_rank = np.random.default_rng(seed).permutation(self.state.size)
        else:
            position = {name: rank for rank, name in enumerate(node_order)}
            tie_rank = np.array([position.get(name, len(position)) for name in self.state.names])
        self._planner = _Planner(self.state, self.policy, tie_rank)
        self._empty_planner: _Planner | None = None
        self._best_fit_planner: _Planner | None = None

    def place(self, request: GangRequest, *, gpu_room: Mapping[str, float] | None = None) -> Decision:
        """`gpu_room`: the GPUs a spread gang may hold in all on each GPU type named (what its team's typed
        quotas leave); other types, and gangs of other constraints, which sit on one type, are not limited."""
        demands = [bundle.demand for bundle in request.bundles]
        self._learn(demands)
        room = None
        if gpu_room and request.constraint is Constraint.SPREAD:
            unlimited = sum(demand.gpu_total for demand in demands)
            # Indexed by GPU type code; the last entry, for nodes of no type (code -1), limits nothing.
            room = np.array(
                [
                    *(to_units(gpu_room[name]) if name in gpu_room else unlimited for name in self.state.gpu_types),
                    unlimited,
                ]
            )
        placed = self._planner.plan(demands, request.constraint, room)
        if placed is None and len(demands) > 1 and request.constraint in _PACKED:
            placed = self._packed_another_way(demands, request.constraint)
        if placed is None:
            return self._reject(request, demands)
        return Placement(
            request=request.name,
            policy=self.policy.name,
            bundles=tuple(self._describe(choice) for choice in sorted(placed, key=lambda c: c.bundle_index)),
        )

    def spread_fits_within(self, request: GangRequest, gpu_room: Mapping[str, float]) -> bool | None:
        """Whether a spread gang has distinct nodes with room on the cluster as the books have it, within
        `gpu_room` (as `place`); None where the bounded search gave up. Leaves the books as they were."""
        decision = self.place(request, gpu_room=gpu_room)
        if isinstance(decision, Placement):
            self.release(decision)
            return True
        return None if self._planner.spread_search_gave_up else False

    def _packed_another_way(self, demands: list[Demand], constraint: Constraint) -> list[_Choice] | None:
        """A gang the policy's own greedy packing missed, packed on the live state best fit, else by the bounded
        search that never-fits is judged by: without this, a gang that fits the idle cluster by that judge could
        wait for a release that never comes."""
        scopes = self._planner.scopes_that_may_hold(demands, constraint)
        if not scopes:
            return None  # no pool (or node) even adds up to the gang: the common case, decided cheaply
        if self.policy.name != "bestfit":
            if self._best_fit_planner is None:
                self._best_fit_planner = _Planner(self.state, make_policy("bestfit"), self._planner.tie_rank)
            placed = self._best_fit_planner.plan(demands, constraint)
            if placed is not None:
                return placed
        # Best fit allocated nothing where it failed: the scopes still hold.
        return self._planner.pack_exhaustively(demands, constraint, LIVE_PACK_SEARCH_STEPS, scopes)[0]

    def release(self, placement: Placement) -> None:
        for bundle in placement.bundles:
            resources = bundle.resources
            reserved = Demand(
                cpu=to_units(resources.get("CPU", 0.0)),
                memory=round(resources.get("memory", 0.0)),
                gpu_count=len(bundle.gpu_devices),
                gpu_share=to_units(bundle.gpu_share),
                tpu=to_units(resources.get("TPU", 0.0)),
            )
            self.state.release(self.state.index[bundle.node], reserved, bundle.gpu_devices)

    def snapshot(self) -> ClusterSnapshot:
        return self.state.to_snapshot()

    def _learn(self, demands: list[Demand]) -> None:
        if self._estimator is None:
            return
        estimate = self._estimator.observe(demands)
        if estimate is not None:
            self.policy.workload = estimate
            self._planner.forget_scores()

    def _describe(self, choice: _Choice) -> BundlePlacement:
        reserved = choice.reserved
        amounts = {
            "CPU": reserved.cpu / UNITS,
            "memory": float(reserved.memory),
            "GPU": reserved.gpu_total / UNITS,
            "TPU": reserved.tpu / UNITS,
        }
        return BundlePlacement(
            bundle_index=choice.bundle_index,
            node=self.state.names[choice.node],
            resources={key: amount for key, amount in amounts.items() if amount},
            gpu_devices=choice.devices,
            gpu_share=reserved.gpu_share / UNITS,
        )

    def _reject(self, request: GangRequest, demands: list[Demand]) -> Rejection:
        never = self._never_fits(demands, request.constraint)
        if never is not None:
            return Rejection(request.name, self.policy.name, RejectionReason.NEVER_FITS, never)
        return Rejection(
            request.name,
            self.policy.name,
            RejectionReason.NO_ROOM_NOW,
            f"no room now for {len(demands)} bundle(s) placed {request.constraint.value}; "
            "it fits the empty cluster, so queue it until resources are released",
        )

    def _never_fits(self, demands: list[Demand], constraint: Constraint) -> str | None:
        """Why the request could not be placed even on the empty cluster, or None if it could."""
        state = self.state
        for index, demand in enumerate(demands):
            suitable = np.flatnonzero(state.static_mask(demand))
            if not len(suitable):
                return (
                    f"bundles[{index}]: no node matches label_selector {dict(demand.label_selector)} "
                    f"with gpu_types {sorted(demand.gpu_types) if demand.gpu_types else 'any'}"
                )
            if not state.fits_capacity(demand, suitable).any():
                return f"bundles[{index}]: {_largest_shortfall(state, demand, suitable)}"
        if len(demands) == 1 and constraint is not Constraint.SAME_TPU_SLICE:
            return None
        if self._empty_planner is None:
            # Best-fit packing decides, whatever the policy: deterministic, and exact for spread and TPU
            # gangs (matching); for same_node and same_pool it is a packing heuristic, so "never" means
            # "not even best-fit packing on the empty cluster finds a place".
            self._empty_planner = _Planner(state.empty_copy(), make_policy("bestfit"), self._planner.tie_rank)
        placed = self._empty_planner.plan(demands, constraint)
        if placed is None and constraint in _PACKED:
            placed, complete = self._empty_planner.pack_exhaustively(demands, constraint)
            if placed is None and not complete:
                return None  # the search gave up: the benefit of the doubt, as a request wrongly refused is lost
        if placed is None:
            return (
                f"the {len(demands)} bundles cannot be placed {constraint.value} even on the empty cluster; "
                "use fewer or smaller bundles, or another constraint"
            )
        self._empty_planner.undo(placed)
        return None


def _largest_shortfall(state: ClusterState, demand: Demand, nodes: np.ndarray) -> str:
    needs = (
        ("CPUs", demand.cpu / UNITS, state.cpu_cap[nodes] / UNITS),
        ("bytes of memory", demand.memory, state.mem_cap[nodes]),
        ("GPUs", demand.gpu_total / UNITS, state.gpu_count[nodes]),
        ("TPU chips", demand.tpu / UNITS, state.tpu_cap[nodes] / UNITS),
    )
    for what, need, capacity in needs:
        if need > capacity.max():
            return f"asks for {need:g} {what}; the most any matching node has is {capacity.max():g}"
    return "no single matching node has all of its CPU, memory, GPU and TPU at once"


def place(
    snapshot: ClusterSnapshot,
    request: GangRequest,
    policy: str = "llmos",
    *,
    workload: TargetWorkload | None = None,
    seed: int = 0,
) -> Decision:
    """One decision on a snapshot, nothing remembered: the pure form of `PlacementEngine.place`."""
    return PlacementEngine(snapshot, policy, workload=workload, seed=seed).place(request)
