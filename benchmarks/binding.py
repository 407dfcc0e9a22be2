"""`llmos bench binding`: placement groups per second, created directly with Ray vs through the controller.

All paths run on one local cluster in one run, interleaved round by round so drift on a shared
machine hits them alike. A placement group counts when it is ready (all bundles reserved):
- Ray: `placement_group(bundles, strategy="PACK")`, then wait until ready.
- Ray pinned+detached: the same, with every bundle pinned by `ray.io/node-id` and a detached
  lifetime: what binding asks Ray for, so the difference to llmos is the controller's own cost.
- llmos: `Admin.acquire` (admission, placement decision, journal fsync, binding to a placement group
  pinned node by node, the group handed back), then wait until ready.
Every group is released after its round (removed, or cancelled through the controller).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from cluster.console import progress
from cluster.launcher import temporary_cluster
from cluster.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
BUNDLE = {"CPU": 0.01}
TIMEOUT_S = 60.0


def _ray_round(size: int, count: int, pin_to: str | None = None) -> float:
    """Ray's own rate; with `pin_to`, for groups made the way binding makes them (pinned, detached)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    options = {}
    if pin_to:
        options = {"lifetime": "detached", "bundle_label_selector": [{"ray.io/node-id": pin_to}] * size}
    groups = []
    started = time.perf_counter()
    for _ in range(count):
        group = placement_group([dict(BUNDLE)] * size, strategy="PACK", **options)
        ray.get(group.ready(), timeout=TIMEOUT_S)
        groups.append(group)
    elapsed = time.perf_counter() - started
    for group in groups:
        remove_placement_group(group)
    return count / elapsed


def _llmos_round(admin, size: int, count: int) -> float:
    import ray

    request = {"team": "research", "gang": {"name": "bench", "bundles": [{"resources": BUNDLE}] * size}}
    placed = []
    started = time.perf_counter()
    for _ in range(count):
        status, group = admin.acquire(request)
        if group is None:
            raise RuntimeError(f"benchmark request was not placed at once: {status.state.value} {status.reason}")
        ray.get(group.ready(), timeout=TIMEOUT_S)
        placed.append(status.id)
    elapsed = time.perf_counter() - started
    for request_id in placed:
        admin.cancel(request_id)
    return count / elapsed


def run(
    spec_path: Path = REPO / "examples" / "cluster.yaml",
    *,
    sizes: tuple[int, ...] = (1, 8),
    count: int = 50,
    rounds: int = 3,
    policy: str = "llmos",
    on_progress: Callable[[str], None] = progress,
) -> dict:
    from cluster.admin import Admin
    from cluster.inventory import connect

    on_progress("starting a local cluster for the benchmark")
    with temporary_cluster(load_spec(spec_path), on_progress=on_progress):
        connect()
        admin = Admin(policy=policy)
        cpu_node = next(node.node_id for node in admin.nodes() if node.pool == "cpu")
        ray_rates: dict[int, list[float]] = {size: [] for size in sizes}
        pinned_rates: dict[int, list[float]] = {size: [] for size in sizes}
        llmos_rates: dict[int, list[float]] = {size: [] for size in sizes}
        for size in sizes:  # warm every path (worker start-up, first GCS calls)
            _ray_round(size, 5)
            _ray_round(size, 5, pin_to=cpu_node)
            _llmos_round(admin, size, 5)
        for round_index in range(rounds):
            for size in sizes:
                ray_rates[size].append(_ray_round(size, count))
                pinned_rates[size].append(_ray_round(size, count, pin_to=cpu_node))
                llmos_rates[size].append(_llmos_round(admin, size, count))
                on_progress(
                    f"round {round_index + 1}/{rounds}, {size}-bundle gangs: Ray {ray_rates[size][-1]:.0f}/s, "
                    f"Ray pinned+detached {pinned_rates[size][-1]:.0f}/s, llmos {llmos_rates[size][-1]:.0f}/s"
                )

    def means(rates: dict[int, list[float]]) -> dict[str, float]:
        return {str(size): round(statistics.mean(values), 1) for size, values in rates.items()}

    ray_mean, pinned_mean, llmos_mean = means(ray_rates), means(pinned_rates), means(llmos_rates)
    return {
        "ray_pgs_per_s": ray_mean,
        "llmos_pgs_per_s": llmos_mean,
        "ratio": {size: round(llmos_mean[size] / ray_mean[size], 3) for size in ray_mean},
        # Ray's own rate for groups pinned node by node and detached, as binding must make them.
        "ray_pinned_detached_pgs_per_s": pinned_mean,
        "ratio_to_pinned_detached": {size: round(llmos_mean[size] / pinned_mean[size], 3) for size in ray_mean},
        "policy": policy,
        "groups_per_round": count,
        "rounds": rounds,
    }
