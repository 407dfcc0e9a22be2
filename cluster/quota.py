"""Team quota arithmetic: pure functions over resource dictionaries keyed like ClusterSpec quotas.

Keys are `cpu`, `memory` (bytes), `gpu`, `tpu` (chips) and typed keys `gpu:<model>` /
`tpu:<generation>` that only count usage on that accelerator type. A typed key can only be checked
once the accelerator type is known, so admission narrows each GPU bundle's allowed types to those whose
typed quota still has room, and the engine then only picks among those; a spread gang's bundles, which may
land on several types, are also held to what each type's quota leaves for all of them together.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from cluster.placement.request import Bundle, Constraint, GangRequest

_RESOURCE_OF_KEY = {"cpu": "CPU", "memory": "memory", "gpu": "GPU", "tpu": "TPU"}
# Quota checks tolerate fixed-point noise from fractional GPUs summed as floats.
EPSILON = 1e-6
# Per bundle of a gang, the GPU types it may use; None for a bundle that asks no GPU.
GpuTypesByBundle = tuple[frozenset[str] | None, ...]


def gang_demand(gang: GangRequest, tpu_host_chips: int = 0) -> dict[str, float]:
    """Untyped quota keys a gang uses wherever it lands.

    A same_tpu_slice gang holds one whole TPU host per bundle, so each bundle counts at least
    `tpu_host_chips` (the fewest chips a TPU host of the cluster has), whatever it asked.
    """
    demand: dict[str, float] = defaultdict(float)
    for bundle in gang.bundles:
        for key, resource in _RESOURCE_OF_KEY.items():
            demand[key] += bundle.resources.get(resource, 0.0)
        if gang.constraint is Constraint.SAME_TPU_SLICE:
            demand["tpu"] += max(tpu_host_chips - bundle.resources.get("TPU", 0.0), 0.0)
    return {key: amount for key, amount in demand.items() if amount}


def bundle_usage(resources: Mapping[str, float], accelerator: str, accelerator_type: str | None) -> dict[str, float]:
    """Quota keys one placed bundle uses on a node of the given pool kind and type."""
    usage = {key: resources.get(resource, 0.0) for key, resource in _RESOURCE_OF_KEY.items()}
    if accelerator_type and accelerator in ("gpu", "tpu"):
        usage[f"{accelerator}:{accelerator_type}"] = usage[accelerator]
    return {key: amount for key, amount in usage.items() if amount}


def add_usage(total: dict[str, float], usage: Mapping[str, float], sign: float = 1.0) -> None:
    for key, amount in usage.items():
        total[key] = total.get(key, 0.0) + sign * amount
        if abs(total[key]) < EPSILON:
            del total[key]


def exceeded(quota: Mapping[str, float], used: Mapping[str, float], demand: Mapping[str, float]) -> list[str]:
    """Keys of `demand` where `used + demand` would pass the quota, as readable phrases."""
    problems = []
    for key, amount in demand.items():
        if key in quota and used.get(key, 0.0) + amount > quota[key] + EPSILON:
            problems.append(f"{key} {used.get(key, 0.0):g} used + {amount:g} asked > quota {quota[key]:g}")
    return problems


def allowed_types(
    kind: str,
    candidates: Iterable[str],
    quota: Mapping[str, float],
    used: Mapping[str, float],
    amount: float,
) -> set[str]:
    """Accelerator types of `kind` whose typed quota (if any) still has room for `amount`."""
    allowed = set()
    for accelerator_type in candidates:
        key = f"{kind}:{accelerator_type}"
        if key not in quota or used.get(key, 0.0) + amount <= quota[key] + EPSILON:
            allowed.add(accelerator_type)
    return allowed


def gpu_room(quota: Mapping[str, float], used: Mapping[str, float]) -> dict[str, float]:
    """Per GPU type with a typed quota, the GPUs the team may still hold on it: the limit a spread gang, whose
    bundles may cross types, is placed within (`PlacementEngine.place`)."""
    return {key[len("gpu:") :]: quota[key] - used.get(key, 0.0) for key in quota if key.startswith("gpu:")}


def gpu_types_by_bundle(
    gang: GangRequest, in_cluster: Sequence[str], quota: Mapping[str, float], used: Mapping[str, float]
) -> GpuTypesByBundle:
    """Per bundle, the GPU types of the cluster it may use whose typed quota (if any) has room for it beside
    `used`; None for a bundle that asks no GPU. A bundle that names no type may use any."""
    return tuple(
        frozenset(
            allowed_types(
                "gpu",
                (name for name in in_cluster if bundle.gpu_types is None or name in bundle.gpu_types),
                quota,
                used,
                gpus_on_one_type(gang, bundle),
            )
        )
        if bundle.resources.get("GPU")
        else None
        for bundle in gang.bundles
    )


def gpus_on_one_type(gang: GangRequest, bundle: Bundle) -> float:
    """The GPUs one GPU type must hold wherever `bundle` lands: the whole gang's, as every constraint but spread
    keeps a gang in one pool, of one type; a spread gang may cross types, so the bundle's own, and its typed
    quotas are only known to hold once placed."""
    if gang.constraint is Constraint.SPREAD:
        return bundle.resources.get("GPU", 0.0)
    return sum(other.resources.get("GPU", 0.0) for other in gang.bundles)


def never_admissible(
    quota: Mapping[str, float], demand: Mapping[str, float], typed_short: Mapping[str, float]
) -> str | None:
    """Why a request could not be admitted even with nothing else of its team running, or None.

    `typed_short`: by accelerator kind, what one type must hold where every type of that kind the request may use
    (at least one) has a typed quota too small for it."""
    alone = [
        f"asks {demand[key]:g} {key}, quota {quota[key]:g}"
        for key in demand
        if key in quota and demand[key] > quota[key] + EPSILON
    ]
    if alone:
        return "over the team's quota even with nothing else running: " + "; ".join(alone)
    short = [
        f"every {kind} type this request may use has a typed quota smaller than the {amount:g} it needs on one type"
        for kind, amount in typed_short.items()
    ]
    return "; ".join(short) or None


SHARE_SEARCH_STEPS = 100_000  # bundle-to-type assignments tried before a spread gang is given the benefit of the doubt
SHARE_SEARCH_BUNDLES = 256  # and the most GPU bundles it is tried for


def spread_over_typed_quotas(quota: Mapping[str, float], bundles: Sequence[tuple[float, frozenset[str]]]) -> str | None:
    """Why a spread gang is over its team's typed quotas even with nothing else running, or None.

    `bundles`: each GPU bundle's GPUs and the types it may use. Bundles come whole, so it is over when no share of
    them among their types keeps every typed quota (a type without one takes any number); nodes aside, which are
    for placement. None too when the search runs past SHARE_SEARCH_STEPS: only a sure answer rejects."""
    keys = sorted({f"gpu:{name}" for _, types in bundles for name in types})
    if not any(key in quota for key in keys):
        return None
    gpus = sum(amount for amount, _ in bundles)
    typed = ", ".join(f"{key} quota {quota[key]:g}" for key in keys if key in quota)
    room = sum(quota.get(key, math.inf) for key in keys)
    if room + EPSILON < gpus:
        return (
            f"over the team's typed quota even with nothing else running: asks {gpus:g} gpu, and the GPU types its "
            f"spread bundles may use hold {room:g} together ({typed})"
        )
    if _shares_out(quota, sorted(bundles, key=lambda bundle: -bundle[0])):
        return None
    return (
        f"over the team's typed quota even with nothing else running: its {len(bundles)} spread bundles "
        f"({', '.join(f'{amount:g}' for amount, _ in bundles)} gpu) cannot be shared out among the GPU types they "
        f"may use without passing one's quota ({typed})"
    )


def _shares_out(quota: Mapping[str, float], bundles: Sequence[tuple[float, frozenset[str]]]) -> bool:
    """Whether the bundles (largest first) can each go to one of their types within the typed quotas; True also
    when the search runs past SHARE_SEARCH_STEPS or there are more than SHARE_SEARCH_BUNDLES."""
    if len(bundles) > SHARE_SEARCH_BUNDLES:
        return True  # one level of recursion a bundle
    left = {key: quota.get(key, math.inf) for _, types in bundles for key in (f"gpu:{name}" for name in types)}
    steps = SHARE_SEARCH_STEPS
    tried: set[tuple[int, tuple[float, ...]]] = set()

    def share(index: int) -> bool:
        nonlocal steps
        if index == len(bundles):
            return True
        state = (index, tuple(round(left[key], 6) for key in sorted(left)))
        if state in tried:
            return False
        tried.add(state)
        steps -= 1
        if steps < 0:
            return True
        amount, types = bundles[index]
        for key in sorted(f"gpu:{name}" for name in types):
            if left[key] + EPSILON >= amount:
                left[key] -= amount
                found = share(index + 1)
                left[key] += amount
                if found:
                    return True
        return False

    return share(0)
