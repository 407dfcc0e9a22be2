"""Which running requests to preempt so a higher-priority request fits: a pure policy.

Cheapest victims first: the lowest priority; at equal priority serving replicas before training
gangs (a replica restarts in seconds, a gang loses the steps since its last checkpoint); then the
fewest GPUs; then the most recently placed (least work lost). The greedy set is then pruned of any
victim the request does not actually need.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

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
) -> list[RequestStatus] | None:
    """The victims to preempt so `request` fits, or None if no allowed set makes room.

    `fits_without(victims)` answers whether the request would be placed were those released.
    """
    # Group names are the team's own (a deployment's name): two teams' groups of one name are two groups.
    placed_in_group = Counter((holder.team, holder.request.group) for holder in holders if holder.request.group)
    candidates = sorted(
        (holder for holder in holders if holder.request.preemptible and holder.priority_value < request.priority_value),
        key=_cost,
    )
    victims: list[RequestStatus] = []
    taken_from_group: Counter = Counter()
    for candidate in candidates:
        group = (candidate.team, candidate.request.group)
        if candidate.request.group and placed_in_group[group] - taken_from_group[group] <= candidate.request.group_min:
            continue
        victims.append(candidate)
        taken_from_group[group] += 1
        if fits_without(victims):
            break
    else:
        return None
    for victim in reversed(list(victims)):
        fewer = [other for other in victims if other is not victim]
        if fewer and fits_without(fewer):
            victims = fewer
    return victims
