"""Which running requests to preempt so a higher-priority request fits: a pure policy.

Cheapest victims first: the lowest priority; at equal priority serving replicas before training
gangs (a replica restarts in seconds, a gang loses the steps since its last checkpoint); then the
fewest GPUs; then the most recently placed (least work lost). The greedy set is then pruned of any
victim the request does not actually need. Where no greedy set leaves every deployment its `group_min`, a
bounded search goes down from every candidate, letting go of members of groups taken past their minimum.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence, Set

from cluster.requests import RequestStatus, WorkloadKind

VICTIM_SEARCH_TRIALS = 64  # placements tried in search of victims that leave every group its minimum


def _cost(victim: RequestStatus) -> tuple:
    gpus = sum(bundle.resources.get("GPU", 0.0) for bundle in victim.bundles)
    return (
        victim.priority_value,
        0 if victim.request.kind is WorkloadKind.SERVING else 1,
        gpus,
        -(victim.placed_at or 0.0),
    )


def choose_victims(
    request: RequestStatus,
    holders: Sequence[RequestStatus],
    fits_without: Callable[[list[RequestStatus]], bool],
    usable_nodes: Set[str],
) -> list[RequestStatus] | None:
    """The victims to preempt so `request` fits, or None if no allowed set makes room.

    `fits_without(victims)` answers whether the request would be placed were those released;
    `usable_nodes` are the nodes some bundle of the request may land on: another team's holder elsewhere frees
    nothing it can use.
    """
    # Group names are the team's own (a deployment's name): two teams' groups of one name are two groups.
    placed_in_group = Counter(_group(holder) for holder in holders if holder.request.group)

    def keeps_group_min(victims: list[RequestStatus]) -> bool:
        taken = Counter(_group(victim) for victim in victims if victim.request.group)
        return all(
            placed_in_group[_group(victim)] - taken[_group(victim)] >= victim.request.group_min
            for victim in victims
            if victim.request.group
        )

    candidates = sorted(
        (
            holder
            for holder in holders
            if holder.request.preemptible
            and holder.priority_value < request.priority_value
            # The request's own team's work frees quota wherever it runs.
            and (holder.team == request.team or not usable_nodes.isdisjoint(holder.nodes))
        ),
        key=_cost,
    )
    victims: list[RequestStatus] = []
    for candidate in candidates:
        with_candidate = [*victims, candidate]
        if keeps_group_min(with_candidate):
            victims = with_candidate
            if fits_without(victims):
                return _without_unneeded(victims, fits_without)
        elif fits_without(with_candidate):
            # Its group's allowance went to cheaper victims; those the request does not need give it back.
            needed = _without_unneeded(with_candidate, fits_without)
            if keeps_group_min(needed):
                return needed
    # Cheaper members of a group spent its allowance before the one the request needs came, and it was passed
    # over: search down from every candidate instead.
    if not candidates or not fits_without(candidates):
        return None
    return _within_group_minimums(candidates, fits_without, placed_in_group)


def _group(holder: RequestStatus) -> tuple[str, str | None]:
    return holder.team, holder.request.group


def _without_unneeded(
    victims: list[RequestStatus], fits_without: Callable[[list[RequestStatus]], bool]
) -> list[RequestStatus]:
    """`victims` less each one, last first (the costliest, in cost order), that the request fits without."""
    for victim in reversed(list(victims)):
        fewer = [other for other in victims if other is not victim]
        if fewer and fits_without(fewer):
            victims = fewer
    return victims


def _within_group_minimums(
    victims: list[RequestStatus],
    fits_without: Callable[[list[RequestStatus]], bool],
    placed_in_group: Counter,
) -> list[RequestStatus] | None:
    """Victims among `victims` (with which the request fits) that leave every group its `group_min`, or None.

    Depth first: a group taken past its minimum lets go of one member the request can do without, costliest first,
    then the next such group; each set tried once, at most VICTIM_SEARCH_TRIALS placements tried in all. Letting go
    of a victim never frees more, so a member the request cannot do without is in every answer below, and is not
    tried again there."""
    trials = VICTIM_SEARCH_TRIALS
    seen: set[frozenset[int]] = set()

    def over_minimum(victims: list[RequestStatus]) -> list[RequestStatus]:
        taken = Counter(_group(victim) for victim in victims if victim.request.group)
        for victim in victims:
            group = _group(victim)
            if victim.request.group and placed_in_group[group] - taken[group] < victim.request.group_min:
                return [other for other in victims if _group(other) == group]
        return []

    def search(victims: list[RequestStatus], needed: frozenset[int]) -> list[RequestStatus] | None:
        nonlocal trials
        members = over_minimum(victims)
        if not members:
            return _without_unneeded(victims, fits_without)  # letting go keeps every group within its minimum
        for member in reversed(members):
            if id(member) in needed:
                continue
            fewer = [victim for victim in victims if victim is not member]
            key = frozenset(map(id, fewer))
            if key in seen or trials <= 0:
                continue
            seen.add(key)
            trials -= 1
            if not fits_without(fewer):
                needed |= {id(member)}  # in every set below this one too
            elif (found := search(fewer, needed)) is not None:
                return found
        return None

    return search(victims, frozenset())
