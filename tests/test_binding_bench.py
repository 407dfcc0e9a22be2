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
        assert all(len(rates) == 1 for path in result[mode]["rounds_pgs_per_s"].values() for rates in path.values())
    assert result["policy"] == "llmos"
    assert bench_admin.queue() == []
    assert binding._free_cpus() == pytest.approx(free_before, abs=1e-3)


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
