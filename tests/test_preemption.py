"""The victim policy on its own: against every subset of a few holders, it finds victims whenever some allowed set
makes room, and only allowed ones."""

from __future__ import annotations

import itertools
import random

from cluster.placement.request import Bundle, GangRequest
from cluster.preemption import choose_victims
from cluster.requests import BundleBinding, RequestState, RequestStatus, SubmitRequest, WorkloadKind

REQUEST_PRIORITY = 500


def placed_request(index: int, request: SubmitRequest, priority_value: int) -> RequestStatus:
    """`request` placed on node n, the `index`-th to be placed (the later, the cheaper to preempt)."""
    gpus = request.gang.bundles[0].resources["GPU"]
    return RequestStatus(
        id=f"research-{index:05d}",
        request=request,
        priority_value=priority_value,
        state=RequestState.PLACED,
        bundles=[BundleBinding(bundle_index=0, node="n", pool="p", resources={"GPU": gpus}, group_bundle_index=0)],
        submitted_seq=index,
        submitted_at=float(index),
        placed_at=float(index),
    )


def holder(index: int, rng: random.Random) -> RequestStatus:
    group = rng.choice([None, "chat", "embed"])
    request = SubmitRequest(
        team="research",
        gang=GangRequest(name=f"h{index}", bundles=[Bundle(resources={"GPU": rng.choice([1, 4])})]),
        kind=rng.choice([WorkloadKind.SERVING, WorkloadKind.TRAINING]),
        preemptible=rng.random() < 0.9,
        group=group,
        group_min=rng.randint(0, 2) if group else 0,
    )
    return placed_request(index, request, rng.choice([100, 500]))  # 500: the request's own, never preempted


URGENT = RequestStatus(
    id="prod-00001",
    request=SubmitRequest(team="prod", gang=GangRequest(name="urgent", bundles=[Bundle(resources={"GPU": 8})])),
    priority_value=REQUEST_PRIORITY,
    state=RequestState.QUEUED,
    submitted_seq=0,
    submitted_at=0.0,
)


def allowed(victims: tuple[RequestStatus, ...], holders: list[RequestStatus]) -> bool:
    placed = {}
    for other in holders:
        if other.request.group:
            placed[other.request.group] = placed.get(other.request.group, 0) + 1
    taken = {}
    for victim in victims:
        if not victim.request.preemptible or victim.priority_value >= REQUEST_PRIORITY:
            return False
        if victim.request.group:
            taken[victim.request.group] = taken.get(victim.request.group, 0) + 1
    return all(
        placed[victim.request.group] - taken[victim.request.group] >= victim.request.group_min
        for victim in victims
        if victim.request.group
    )


def fits_once_one_of_taken(freeing: list[set[str]]):
    """The request fits once the victims include one of the `freeing` sets (the holders of a node it could use)."""
    return lambda victims: any(needed <= {victim.id for victim in victims} for needed in freeing)


def test_victims_are_found_whenever_an_allowed_set_makes_room_and_are_always_allowed():
    rng = random.Random(7)
    found = 0
    for _ in range(1500):
        holders = [holder(index, rng) for index in range(rng.randint(1, 6))]
        ids = [status.id for status in holders]
        freeing = [set(rng.sample(ids, rng.randint(1, len(ids)))) for _ in range(rng.randint(1, 2))]
        fits_without = fits_once_one_of_taken(freeing)
        victims = choose_victims(URGENT, holders, fits_without, {"n"})
        possible = any(
            fits_without(subset) and allowed(subset, holders)
            for size in range(1, len(holders) + 1)
            for subset in itertools.combinations(holders, size)
        )
        assert (victims is not None) == possible, (ids, freeing, victims and [victim.id for victim in victims])
        if victims is not None:
            found += 1
            assert fits_without(victims) and allowed(tuple(victims), holders)
            # None of them is needless: the request fits without none of them.
            assert all(not fits_without([other for other in victims if other is not v]) for v in victims)
    assert found > 200  # the instances are not mostly hopeless


def test_a_large_deployment_gives_up_the_replicas_the_request_needs_within_the_search_budget():
    # 20 replicas of which 3 may go (group_min 17); the request fits once the 3 oldest go. Greedy takes the 3
    # cheapest (the newest) first and stops at the group's minimum; the search must let go of 17 others without
    # trying the 3 it cannot do without again at every level.
    replica = SubmitRequest(
        team="research",
        gang=GangRequest(name="chat", bundles=[Bundle(resources={"GPU": 1})]),
        kind=WorkloadKind.SERVING,
        group="chat",
        group_min=17,
    )
    replicas = [placed_request(index, replica, priority_value=100) for index in range(20)]
    oldest = {replica.id for replica in replicas[:3]}
    tried = []

    def fits_without(victims: list[RequestStatus]) -> bool:
        tried.append(len(victims))
        return oldest <= {victim.id for victim in victims}

    victims = choose_victims(URGENT, replicas, fits_without, {"n"})
    assert victims is not None and {victim.id for victim in victims} == oldest
    assert len(tried) < 64
