"""`llmos bench binding`: placement groups per second, created directly with Ray vs through the controller.

All paths run on one local cluster in one run, interleaved round by round so drift on a shared
machine hits them alike. Every path makes `count` groups of `size` bundles ({"CPU": 0.01} each) per
round, and a group counts when it is ready (all bundles reserved). Two modes, each side doing the
same thing as the other:

- one at a time: create one group, wait until it is ready, then the next.
  - Ray: `placement_group(bundles, strategy="PACK")`, then `ray.get(group.ready())`.
  - Ray pinned+detached: what binding asks Ray for: every bundle pinned to the CPU node by
    `ray.io/node-id`, a detached lifetime, and STRICT_PACK (binding's strategy when all bundles sit
    on one node, as here), so the difference to llmos is the controller's own cost.
  - Ray pinned to two nodes: the same, the groups alternating between the CPU node and the node
    with the most CPUs. Ray's own PACK spreads the groups over two nodes (`ray_nodes_used`), and a
    node's raylet reserves bundles ever more slowly as it holds more (it rebuilds its whole resource
    set at each change), while llmos packs every group on the CPU node: this path shows how much of
    the gap that is.
  - llmos: `Admin.acquire(request)`: one controller call doing admission, the placement decision, a
    journal write with fsync, binding to a placement group pinned node by node; then the group's ready.
  - llmos per node: the same with `group_bundles: per_node`, which binds a gang's bundles on one node
    as one Ray bundle (an option a request asks for: Ray libraries that start a worker per bundle
    need the default).
- batched: create all `count` groups, then wait until all are ready.
  - Ray (and Ray pinned+detached): `count` `placement_group(...)` calls in a loop, then one
    `ray.get([group.ready() ...])`.
  - llmos: one `Admin.acquire_many([request] * count)` call: every request admitted and journaled
    (fsync) before any group is created, then placed one by one in order, journaled and bound eight
    at a time (one fsync each), and the `count` groups handed back; then one `ray.get` on all their
    ready refs.

Every group is released after its round (removed, or cancelled through the controller), and the next
round starts only once Ray has handed every bundle back (no node offers a `*_group_<id>` resource of
them any more, and the CPUs are free again), untimed: a raylet still returning the last round's
bundles reserves new ones more slowly, which would tax whichever path came next. The order of the
paths rotates from round to round.

Each ratio comes with a 95% interval (`ratio_ci95`), bootstrapped over the rounds, and with
`runs` > 1 over the runs too: each run starts a fresh cluster, and the mean of one run can be off by
more than its rounds' spread says. With one run of fewer than 5 rounds the intervals are null and
`ci_note` says why: a percentile bootstrap over so few rounds is far narrower than the truth (of one
round, no width at all).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cluster.console import UserError, progress
from cluster.launcher import temporary_cluster
from cluster.spec import ClusterSpec, load_spec
from cluster.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
BUNDLE = {"CPU": 0.01}
TIMEOUT_S = 60.0
RELEASE_TIMEOUT_S = 30.0
MODES = ("one_at_a_time", "batched")
LLMOS_GROUP_BUNDLES = {"llmos": "per_bundle", "llmos_per_node": "per_node"}  # path -> what its requests ask for
PATHS = ("ray", "ray_pinned_detached", "ray_pinned_two_nodes", *LLMOS_GROUP_BUNDLES)
HEADLINE_MODE = "batched"
BOOTSTRAP_RESAMPLES = 10_000
# Fewer rounds than this in a single run get no interval: on 3 rounds a nominal 95% one covered the true
# ratio in about 3 simulated runs of 4 (15% noise a round), and on 1 round it has no width.
MIN_ROUNDS_FOR_INTERVAL = 5
WARMUP_GROUPS = 5  # groups per path in the untimed round that warms each one
CPU_POOL = "cpu"  # the pool whose node every pinned group goes to
BENCH_TEAM = "research"  # the team the llmos paths' requests belong to
TARGET_RATIO = 0.7  # the target for llmos against Ray's own rate
PLOTTED_PATHS = {  # path -> its label in the plot, each drawn against Ray's own rate
    "ray_pinned_detached": "Ray, pinned to the CPU node",
    "ray_pinned_two_nodes": "Ray, pinned to two nodes",
    "llmos": "llmos",
    "llmos_per_node": "llmos, per_node",
}


class Round(NamedTuple):
    rate: float  # groups per second
    nodes_used: int  # distinct nodes the groups' bundles went to
    group_ids: tuple[str, ...]  # Ray's ids (hex) of the groups made, all released by the round


def _ray_round(size: int, count: int, batched: bool, pin_to: tuple[str, ...] = ()) -> Round:
    """Ray's own rate; with `pin_to`, for groups made the way binding makes them (pinned, detached),
    the i-th group on node `pin_to[i % len(pin_to)]`."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    def options(index: int) -> dict:
        if not pin_to:
            return {"strategy": "PACK"}
        node = pin_to[index % len(pin_to)]
        return {
            "strategy": "STRICT_PACK",
            "lifetime": "detached",
            "bundle_label_selector": [{"ray.io/node-id": node}] * size,
        }

    groups = []
    try:
        started = time.perf_counter()
        if batched:
            for index in range(count):
                groups.append(placement_group([dict(BUNDLE)] * size, **options(index)))
            ray.get([group.ready() for group in groups], timeout=TIMEOUT_S)
        else:
            for index in range(count):
                groups.append(placement_group([dict(BUNDLE)] * size, **options(index)))
                ray.get(groups[-1].ready(), timeout=TIMEOUT_S)
        elapsed = time.perf_counter() - started
        nodes = {node for group in groups for node in placement_group_table(group)["bundles_to_node_id"].values()}
    finally:  # on a timeout too: a detached group outlives this driver
        for group in groups:
            remove_placement_group(group)
    return Round(count / elapsed, len(nodes), tuple(group.id.hex() for group in groups))


def _llmos_round(admin, size: int, count: int, batched: bool, group_bundles: str) -> Round:
    import ray

    request = {
        "team": BENCH_TEAM,
        "group_bundles": group_bundles,
        "gang": {"name": "bench", "bundles": [{"resources": BUNDLE}] * size},
    }
    acquired = []
    try:
        started = time.perf_counter()
        if batched:
            acquired = admin.acquire_many([request] * count)
            _check_placed(acquired)
            ray.get([group.ready() for _, group in acquired], timeout=TIMEOUT_S)
        else:
            for _ in range(count):
                acquired.append(admin.acquire(request))
                _check_placed(acquired[-1:])
                ray.get(acquired[-1][1].ready(), timeout=TIMEOUT_S)
        elapsed = time.perf_counter() - started
        nodes = {bundle.node for status, _ in acquired for bundle in status.bundles}
    finally:  # on an error too, or the controller holds them (and the next round waits behind them)
        for status, _ in acquired:
            admin.cancel(status.id)
    return Round(count / elapsed, len(nodes), tuple(group.id.hex() for _, group in acquired))


def _free_cpus() -> float:
    import ray

    return ray.available_resources().get("CPU", 0.0)


def _wait_released(group_ids: tuple[str, ...], free_cpus: float) -> None:
    """Until no node offers a resource of these groups' bundles (`CPU_group_<id>`, ...) and `free_cpus`
    CPUs are free again: Ray drops the groups' resources before it counts their CPUs as free."""
    import ray

    def released() -> bool:
        available = ray.available_resources()
        gone = not any(name.endswith(group_ids) for name in available)
        return gone and abs(available.get("CPU", 0.0) - free_cpus) < 1e-3

    wait_for(released, RELEASE_TIMEOUT_S, "Ray to release the benchmark's placement groups", interval_s=0.02)


def _check_placed(acquired: list) -> None:
    for status, group in acquired:
        if group is None:
            raise RuntimeError(f"benchmark request was not placed at once: {status.state.value} {status.reason}")


def run(
    spec_path: Path = REPO / "examples" / "cluster.yaml",
    *,
    sizes: tuple[int, ...] = (1, 8),
    modes: tuple[str, ...] = MODES,
    count: int = 50,
    rounds: int = 3,
    runs: int = 1,
    policy: str = "llmos",
    on_progress: Callable[[str], None] = progress,
) -> dict:
    """Start a local cluster of `spec_path` and measure on it (see `measure`), `runs` times over, each on
    a fresh cluster: a run's rates move together (how the processes of that cluster share the cores),
    so only several runs show how far the mean of one may be off."""
    from cluster.admin import Admin
    from cluster.inventory import connect

    spec = load_spec(spec_path)
    check_spec(spec, spec_path, sizes=sizes, count=count)
    collected = []
    for run_index in range(runs):
        on_progress(f"{f'run {run_index + 1}/{runs}: ' if runs > 1 else ''}starting a local cluster for the benchmark")
        with temporary_cluster(spec, on_progress=on_progress):
            connect()
            admin = Admin(policy=policy)
            collected.append(
                collect(admin, sizes=sizes, modes=modes, count=count, rounds=rounds, on_progress=on_progress)
            )
            policy_name = admin.ping()["policy"]
    return summarize(collected, policy_name)


def check_spec(spec: ClusterSpec, spec_path: Path, *, sizes: tuple[int, ...], count: int) -> None:
    """Refuse, before a cluster starts, a spec the benchmark cannot run on: it needs a pool named `cpu`
    (every pinned group goes to its node), another pool (the second node of the two-node path), the team
    `research` (the llmos paths' requests), and room on the cpu node, and in the team's cpu quota, for a
    round's groups at once."""
    pools = {pool.name: pool for pool in spec.pools}
    teams = {team.name: team for team in spec.teams}
    if CPU_POOL not in pools or len(pools) < 2 or BENCH_TEAM not in teams:
        raise UserError(
            f"--spec {spec_path}: the binding benchmark needs a pool named {CPU_POOL!r}, another pool for its "
            f"two-node path, and a team named {BENCH_TEAM!r}; the spec has pools {', '.join(pools)} and teams "
            f"{', '.join(teams)}"
        )
    room = {f"the {CPU_POOL} node's {pools[CPU_POOL].node.cpus} CPUs": float(pools[CPU_POOL].node.cpus)}
    quota = teams[BENCH_TEAM].quota.get("cpu")
    if quota is not None:
        room[f"team {BENCH_TEAM}'s cpu quota of {quota:g}"] = quota
    groups, size = max(count, WARMUP_GROUPS), max(sizes)
    bundles_that_fit = int(min(room.values()) / BUNDLE["CPU"] + 1e-6)
    if groups * size > bundles_that_fit:
        largest = bundles_that_fit // size
        fix = f"give --count {largest} or less" if largest >= WARMUP_GROUPS else "give smaller --sizes"
        raise UserError(
            f"--count {count}: a round holds {groups} groups of {size} bundles of {BUNDLE['CPU']:g} CPU at once, "
            f"{groups * size * BUNDLE['CPU']:g} CPUs, more than {' and '.join(room)} in {spec_path}; {fix}"
        )


def measure(
    admin,
    *,
    sizes: tuple[int, ...] = (1, 8),
    modes: tuple[str, ...] = MODES,
    count: int = 50,
    rounds: int = 3,
    on_progress: Callable[[str], None] = progress,
) -> dict:
    """Every path, and each of `modes` and `sizes`, on the cluster `admin`'s controller runs on, which
    must be idle, summarized (see `summarize`)."""
    collected = collect(admin, sizes=sizes, modes=modes, count=count, rounds=rounds, on_progress=on_progress)
    return summarize([collected], admin.ping()["policy"])


class Collected(NamedTuple):
    """One run's rounds: every path's rate in each round, by (mode, path, size)."""

    modes: tuple[str, ...]
    sizes: tuple[int, ...]
    count: int
    rates: dict[tuple[str, str, int], list[float]]
    nodes_used: dict[tuple[str, str, int], int]  # the most nodes one round's groups went to


def collect(
    admin,
    *,
    sizes: tuple[int, ...],
    modes: tuple[str, ...],
    count: int,
    rounds: int,
    on_progress: Callable[[str], None],
) -> Collected:
    """`rounds` interleaved rounds of every path on the cluster `admin`'s controller runs on."""
    rates: dict[tuple[str, str, int], list[float]] = {
        (mode, path, size): [] for mode in modes for path in PATHS for size in sizes
    }
    nodes_used: dict[tuple[str, str, int], int] = {}
    nodes = admin.nodes()
    cpu_node = next(node for node in nodes if node.pool == CPU_POOL)
    roomiest = max((node for node in nodes if node is not cpu_node), key=lambda node: node.capacity.get("CPU", 0))
    pins = {"ray": (), "ray_pinned_detached": (cpu_node.node_id,)}
    pins["ray_pinned_two_nodes"] = (cpu_node.node_id, roomiest.node_id)
    free_cpus = _free_cpus()

    def measure_round(mode: str, path: str, size: int, groups: int) -> float:
        batched = mode == "batched"
        if path in LLMOS_GROUP_BUNDLES:
            measured = _llmos_round(admin, size, groups, batched, LLMOS_GROUP_BUNDLES[path])
        else:
            measured = _ray_round(size, groups, batched, pin_to=pins[path])
        nodes_used[mode, path, size] = max(nodes_used.get((mode, path, size), 0), measured.nodes_used)
        _wait_released(measured.group_ids, free_cpus)
        return measured.rate

    for mode in modes:  # warm every path (worker start-up, first GCS calls)
        for size in sizes:
            for path in PATHS:
                measure_round(mode, path, size, WARMUP_GROUPS)
    for round_index in range(rounds):
        order = PATHS[round_index % len(PATHS) :] + PATHS[: round_index % len(PATHS)]
        for mode in modes:
            for size in sizes:
                for path in order:
                    rates[mode, path, size].append(measure_round(mode, path, size, count))
                on_progress(
                    f"round {round_index + 1}/{rounds}, {mode}, {size}-bundle gangs: "
                    + ", ".join(f"{path} {rates[mode, path, size][-1]:.0f}/s" for path in PATHS)
                )
    return Collected(modes, sizes, count, rates, nodes_used)


def summarize(runs: list[Collected], policy: str) -> dict:
    """Means over every round of every run; each ratio with its 95% interval (`_ratio`), or None and
    `ci_note` saying why. The headline keys are the batched mode's, or the first mode's without it."""
    first = runs[0]
    modes, sizes = first.modes, first.sizes

    def rounds_of(mode: str, path: str, size: int) -> np.ndarray:  # (runs, rounds)
        return np.array([collected.rates[mode, path, size] for collected in runs])

    def run_means(mode: str, path: str, size: int) -> np.ndarray:  # (runs,)
        return rounds_of(mode, path, size).mean(axis=1)

    def ratios(mode: str, path: str, baseline: str) -> tuple[dict[str, float], dict[str, list[float]]]:
        means, intervals = {}, {}
        for size in sizes:
            means[str(size)], intervals[str(size)] = _ratio(
                rounds_of(mode, path, size), rounds_of(mode, baseline, size)
            )
        return means, intervals

    result: dict = {}
    for mode in modes:
        mean = {
            path: {str(size): round(float(rounds_of(mode, path, size).mean()), 1) for size in sizes} for path in PATHS
        }
        ratio, ratio_ci95 = ratios(mode, "llmos", "ray")
        to_pinned, to_pinned_ci95 = ratios(mode, "llmos", "ray_pinned_detached")
        per_node, per_node_ci95 = ratios(mode, "llmos_per_node", "ray")
        result[mode] = {
            "ray_pgs_per_s": mean["ray"],
            "llmos_pgs_per_s": mean["llmos"],
            "ratio": ratio,
            "ratio_ci95": ratio_ci95,
            # Ray's own rate for groups pinned node by node and detached, as binding must make them.
            "ray_pinned_detached_pgs_per_s": mean["ray_pinned_detached"],
            "ratio_to_pinned_detached": to_pinned,
            "ratio_to_pinned_detached_ci95": to_pinned_ci95,
            # Ray's own PACK spreads its groups over this many nodes; the engine packs them (most in a round).
            "ray_nodes_used": {str(size): max(run.nodes_used[mode, "ray", size] for run in runs) for size in sizes},
            "llmos_nodes_used": {str(size): max(run.nodes_used[mode, "llmos", size] for run in runs) for size in sizes},
            "ray_pinned_two_nodes_pgs_per_s": mean["ray_pinned_two_nodes"],
            # Requests that ask for one Ray bundle per node (`group_bundles: per_node`).
            "llmos_per_node_pgs_per_s": mean["llmos_per_node"],
            "ratio_per_node": per_node,
            "ratio_per_node_ci95": per_node_ci95,
            # Each run's ratio, and every round's rate of every run, to show the spread on a shared machine.
            "ratio_by_run": {
                str(size): [
                    round(float(ratio), 3) for ratio in run_means(mode, "llmos", size) / run_means(mode, "ray", size)
                ]
                for size in sizes
            },
            "rounds_pgs_per_s": {
                path: {
                    str(size): [[round(rate, 1) for rate in run.rates[mode, path, size]] for run in runs]
                    for size in sizes
                }
                for path in PATHS
            },
        }
    # The headline keys: groups created as fast as each side can, the rate the cluster sustains;
    # one at a time adds a round trip per group on both sides (figures above).
    headline_mode = HEADLINE_MODE if HEADLINE_MODE in modes else modes[0]
    headline = {key: result[headline_mode][key] for key in ("ray_pgs_per_s", "llmos_pgs_per_s", "ratio", "ratio_ci95")}
    rounds = len(first.rates[modes[0], "ray", sizes[0]])
    return {
        **headline,
        "ci_note": _interval_note(len(runs), rounds),
        "headline_mode": headline_mode,
        **result,
        "policy": policy,
        "groups_per_round": first.count,
        "rounds": rounds,
        "runs": len(runs),
    }


def _has_interval(runs: int, rounds: int) -> bool:
    return runs > 1 or rounds >= MIN_ROUNDS_FOR_INTERVAL


def _interval_note(runs: int, rounds: int) -> str | None:
    """Why the 95% intervals are null, or None when they are not."""
    if _has_interval(runs, rounds):
        return None
    return (
        f"no 95% intervals (null): a bootstrap over {rounds} round{'s' if rounds > 1 else ''} of one run would be "
        f"far narrower than the truth; give --rounds {MIN_ROUNDS_FOR_INTERVAL} or more, or --runs 2 or more"
    )


def _ratio(rates: np.ndarray, baseline_rates: np.ndarray) -> tuple[float, list[float] | None]:
    """mean(rates) / mean(baseline_rates), both (runs, rounds) arrays, and its 95% percentile interval,
    bootstrapped at both levels: runs drawn with replacement, then rounds within each. A round's two
    rates are drawn together, since they ran back to back under the same load. With one run the
    interval shows only the noise from round to round, and with fewer than MIN_ROUNDS_FOR_INTERVAL
    rounds there is none (None)."""
    ratio = round(float(rates.mean() / baseline_rates.mean()), 3)
    paired = np.stack([rates, baseline_rates])  # (2, runs, rounds)
    _, run_count, round_count = paired.shape
    if not _has_interval(run_count, round_count):
        return ratio, None
    generator = np.random.default_rng(0)
    run_picks = generator.integers(0, run_count, size=(BOOTSTRAP_RESAMPLES, run_count, 1))
    round_picks = generator.integers(0, round_count, size=(BOOTSTRAP_RESAMPLES, run_count, round_count))
    resampled = paired[:, run_picks, round_picks].mean(axis=(2, 3))  # (2, resamples)
    low, high = np.percentile(resampled[0] / resampled[1], [2.5, 97.5])
    return ratio, [round(float(low), 3), round(float(high), 3)]


def plot(result: dict, path: Path) -> None:
    """Every path's rate as a share of Ray's own, with its 95% interval, by mode and gang size, against
    the target: drawn from `result` alone, so a saved JSON can be drawn again."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [mode for mode in MODES if mode in result]
    figure, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
    width = 0.8 / len(PLOTTED_PATHS)
    for axis, mode in zip(axes[0], modes, strict=True):
        rounds = result[mode]["rounds_pgs_per_s"]
        sizes = list(rounds["ray"])
        for offset, (path_name, label) in enumerate(PLOTTED_PATHS.items()):
            shares, errors = [], [[], []]
            for size in sizes:
                share, interval = _ratio(np.array(rounds[path_name][size]), np.array(rounds["ray"][size]))
                low, high = interval or (share, share)
                shares.append(share)
                errors[0].append(max(share - low, 0.0))
                errors[1].append(max(high - share, 0.0))
            positions = np.arange(len(sizes)) + (offset - (len(PLOTTED_PATHS) - 1) / 2) * width
            bars = axis.bar(positions, shares, width, yerr=errors, capsize=3, label=label)
            axis.bar_label(bars, labels=[f"{share:.2f}" for share in shares], fontsize=7, padding=2)
        axis.axhline(1.0, color="0.4", linewidth=1, label="Ray's own rate (PACK)")
        axis.axhline(TARGET_RATIO, color="tab:red", linestyle="--", linewidth=1, label=f"target {TARGET_RATIO}x")
        axis.set_xticks(np.arange(len(sizes)), [f"{size}-bundle gangs" for size in sizes])
        axis.set_ylabel("placement groups per second / Ray's own")
        axis.set_title(f"{mode.replace('_', ' ')} ({result['groups_per_round']} groups a round)")
        axis.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    runs = f"{result['runs']} runs" if result["runs"] > 1 else "1 run"
    intervals = "95% intervals" if _has_interval(result["runs"], result["rounds"]) else "too few rounds for intervals"
    figure.suptitle(f"Binding: {runs} of {result['rounds']} interleaved rounds, {intervals}", fontsize=10)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
