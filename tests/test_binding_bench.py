"""`llmos bench binding` on the shared cluster, at a size a test can afford: every path makes real
placement groups, the output carries the issue's keys, and the engine's packing shows in it."""

from __future__ import annotations

import pytest
import ray
from controllers import own_controller
from ray.util.placement_group import placement_group, remove_placement_group

from benchmarks import binding
from cluster.waiting import wait_for


@pytest.fixture(scope="module")
def bench_admin(local_cluster, tmp_path_factory):
    with own_controller(tmp_path_factory, "binding-bench", "llmos") as admin:
        yield admin


def test_measure_reports_every_path_and_releases_what_it_made(bench_admin):
    free_before = binding._free_cpus()
    result = binding.measure(bench_admin, sizes=(1, 8), count=4, rounds=1, on_progress=lambda _: None)

    for key in ("ray_pgs_per_s", "llmos_pgs_per_s", "ratio"):
        assert set(result[key]) == {"1", "8"}
        assert all(value > 0 for value in result[key].values())
    ratio = result["llmos_pgs_per_s"]["8"] / result["ray_pgs_per_s"]["8"]
    assert result["ratio"]["8"] == pytest.approx(ratio, rel=0.01)
    assert result["headline_mode"] == "batched"
    assert result["batched"]["ray_pgs_per_s"] == result["ray_pgs_per_s"]
    assert all(rate > 0 for rate in result["batched"]["llmos_per_node_pgs_per_s"].values())
    for mode in binding.MODES:
        # The engine packs every benchmark gang on the one CPU node.
        assert result[mode]["llmos_nodes_used"] == {"1": 1, "8": 1}
        rounds = result[mode]["rounds_pgs_per_s"]
        assert all(len(runs) == 1 and len(runs[0]) == 1 for path in rounds.values() for runs in path.values())
    assert result["policy"] == "llmos"
    assert bench_admin.queue() == []
    assert binding._free_cpus() == pytest.approx(free_before, abs=1e-3)


def test_measure_runs_only_the_modes_and_sizes_asked_for(bench_admin):
    result = binding.measure(
        bench_admin, sizes=(2,), modes=("one_at_a_time",), count=3, rounds=2, on_progress=lambda _: None
    )

    assert "batched" not in result
    assert result["headline_mode"] == "one_at_a_time"
    assert result["ratio"] == result["one_at_a_time"]["ratio"]
    assert set(result["ratio"]) == {"2"}
    assert (result["runs"], result["rounds"]) == (1, 2)
    [llmos_rates] = result["one_at_a_time"]["rounds_pgs_per_s"]["llmos"]["2"]
    [ray_rates] = result["one_at_a_time"]["rounds_pgs_per_s"]["ray"]["2"]
    assert len(llmos_rates) == len(ray_rates) == 2
    assert result["one_at_a_time"]["ratio_by_run"]["2"] == [result["ratio"]["2"]]
    # Two rounds of one run are too few for an interval: none, and the note says what to give.
    assert result["ratio_ci95"]["2"] is None
    assert "--rounds 5" in result["ci_note"]


def _collected(rates_by_run: dict[str, list[list[float]]]) -> binding.Collected:
    """Runs of batched 8-bundle rounds, with every path not given as fast as Ray."""
    rates = {("batched", path, 8): [] for path in binding.PATHS}
    for path in binding.PATHS:
        rates["batched", path, 8] = rates_by_run.get(path, rates_by_run["ray"])
    return binding.Collected(("batched",), (8,), 50, rates, {("batched", path, 8): 1 for path in binding.PATHS})


def _runs(rates_by_run: dict[str, list[list[float]]]) -> list[binding.Collected]:
    run_count = len(rates_by_run["ray"])
    return [_collected({path: runs[index] for path, runs in rates_by_run.items()}) for index in range(run_count)]


def test_ratio_interval_resamples_whole_rounds():
    """Rounds run back to back under the same load: a round slow on both sides keeps its ratio, so a
    steady ratio gets a narrow interval however much the rates swing, and a noisy one a wide one."""
    ray_rates = [100.0, 300.0, 150.0, 250.0, 200.0, 120.0]
    steady = binding.summarize(_runs({"ray": [ray_rates], "llmos": [[0.7 * rate for rate in ray_rates]]}), "llmos")
    assert steady["ratio"] == {"8": 0.7}
    assert steady["ratio_ci95"]["8"] == pytest.approx([0.7, 0.7], abs=1e-3)

    noisy_rates = [60.0, 240.0, 90.0, 200.0, 160.0, 100.0]
    noisy = binding.summarize(_runs({"ray": [ray_rates], "llmos": [noisy_rates]}), "llmos")
    low, high = noisy["ratio_ci95"]["8"]
    assert low < sum(noisy_rates) / sum(ray_rates) < high
    assert high - low > 0.05


def test_ratio_interval_over_runs_covers_the_spread_between_runs():
    """Two runs, each steady within itself but at a different level: the rounds alone would make the
    interval narrow; drawing the runs too spans both levels."""
    ray_rates = [300.0, 310.0, 290.0, 305.0, 295.0]
    runs = _runs(
        {
            "ray": [ray_rates, ray_rates],
            "llmos": [[0.66 * rate for rate in ray_rates], [0.76 * rate for rate in ray_rates]],
        }
    )
    both = binding.summarize(runs, "llmos")
    assert both["runs"] == 2 and both["rounds"] == 5
    assert both["ratio"] == {"8": 0.71}
    assert both["batched"]["ratio_by_run"] == {"8": [0.66, 0.76]}
    assert both["ratio_ci95"]["8"] == pytest.approx([0.66, 0.76], abs=1e-3)
    one = binding.summarize(runs[:1], "llmos")
    assert one["ratio_ci95"]["8"] == pytest.approx([0.66, 0.66], abs=1e-3)


@pytest.mark.parametrize("rounds", [1, 3, 4])
def test_one_run_of_few_rounds_reports_no_interval_and_says_why(rounds: int):
    ray_rates = [300.0, 200.0, 250.0, 280.0][:rounds]
    result = binding.summarize(_runs({"ray": [ray_rates], "llmos": [[0.7 * rate for rate in ray_rates]]}), "llmos")
    assert result["ratio"] == {"8": 0.7}
    for key in ("ratio_ci95", "ratio_to_pinned_detached_ci95", "ratio_per_node_ci95"):
        assert result["batched"][key] == {"8": None}
    assert result["ratio_ci95"] == {"8": None}
    assert "--rounds 5 or more, or --runs 2 or more" in result["ci_note"]


@pytest.mark.parametrize(("runs", "rounds"), [(1, 5), (2, 2)])
def test_five_rounds_or_two_runs_report_an_interval(runs: int, rounds: int):
    ray_rates = [300.0, 200.0, 250.0, 280.0, 260.0][:rounds]
    llmos = [[share * rate for rate in ray_rates] for share in (0.6, 0.8)[:runs]]
    result = binding.summarize(_runs({"ray": [ray_rates] * runs, "llmos": llmos}), "llmos")
    low, high = result["ratio_ci95"]["8"]
    assert low <= result["ratio"]["8"] <= high
    assert result["ci_note"] is None


def test_a_result_without_intervals_is_still_drawn(tmp_path):
    ray_rates = [300.0, 310.0]
    result = binding.summarize(_runs({"ray": [ray_rates], "llmos": [[0.7 * rate for rate in ray_rates]]}), "llmos")
    binding.plot(result, tmp_path / "binding.png")
    assert (tmp_path / "binding.png").read_bytes().startswith(b"\x89PNG")


def test_plot_draws_a_saved_result(tmp_path):
    """The plot needs nothing but the JSON, so a saved result can be drawn again."""
    import json

    ray_rates = [300.0, 310.0, 290.0]
    result = binding.summarize(_runs({"ray": [ray_rates], "llmos": [[0.7 * rate for rate in ray_rates]]}), "llmos")
    saved = json.loads(json.dumps(result))
    path = tmp_path / "plots" / "binding.png"
    binding.plot(saved, path)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_release_wait_watches_the_resources_of_the_groups_bundles(local_cluster):
    """The wait between rounds looks for resources named after each released group's id: Ray must name
    them so, or the wait would watch nothing but the CPUs."""
    free_cpus = binding._free_cpus()
    group = placement_group([{"CPU": 0.01}])
    ray.get(group.ready(), timeout=30)
    group_id = group.id.hex()

    def offered() -> bool:
        return any(name.endswith(group_id) for name in ray.available_resources())

    wait_for(offered, 30, f"the resources of placement group {group_id}", interval_s=0.05)
    remove_placement_group(group)
    binding._wait_released((group_id,), free_cpus)
    assert not offered()
