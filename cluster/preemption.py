"""Which running requests to preempt so a higher-priority request fits: a pure policy.

Cheapest victims first: the lowest priority; at equal priority serving replicas before training
gangs (a replica restarts in seconds, a gang loses the steps since its last checkpoint); then the
fewest GPUs; then the most recently placed (least work lost). The greedy set is then pruned of any
victim the request does not actually need. Where the greedy set would take a deployment below its
`group_min`, every candidate is pruned instead, the members of such groups first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence, Set

from cluster.requests import RequestStatus, WorkloadKind


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
    # over: from every candidate, let go first of the members of groups taken past their minimum.
    if not candidates or not fits_without(candidates):
        return None
    taken = Counter(_group(candidate) for candidate in candidates if candidate.request.group)

    def over_minimum(victim: RequestStatus) -> bool:
        group = _group(victim)
        return bool(victim.request.group) and placed_in_group[group] - taken[group] < victim.request.group_min

    needed = _without_unneeded(sorted(candidates, key=over_minimum), fits_without)
    return needed if keeps_group_min(needed) else None


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
