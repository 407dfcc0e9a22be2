"""Placement engine: requests, books, gang constraints, rejections and each policy's scoring."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from cluster.placement import (
    Bundle,
    ClusterSnapshot,
    ClusterState,
    GangRequest,
    NodeSnapshot,
    Placement,
    PlacementEngine,
    Rejection,
    RejectionReason,
    TargetWorkload,
    TaskShape,
    make_policy,
    node_from_ray,
    place,
)
from cluster.placement.policies import POLICIES
from cluster.placement.request import UNITS
from cluster.placement.workload import WorkloadEstimator
from cluster.ray_mapping import POOL_LABEL, RAY_ACCELERATOR_TYPE_LABEL, RAY_TPU_SLICE_NAME_LABEL, TPU_SLICE_LABEL
from cluster.spec import load_spec
from manifests.raycluster import ray_cluster

EXAMPLE_SPEC = Path(__file__).resolve().parents[1] / "examples" / "cluster.yaml"

GIB = 1024**3


def node(name: str, cpus: float = 16, gpus: int = 0, **fields) -> NodeSnapshot:
    fields.setdefault("memory", 64 * GIB)
    if gpus:
        fields.setdefault("gpu_type", "A100")
    return NodeSnapshot(name=name, cpus=cpus, gpus=gpus, **fields)


def cluster(*nodes: NodeSnapshot) -> ClusterSnapshot:
    return ClusterSnapshot(nodes=nodes)


def gang(*bundles: dict, constraint: str = "same_pool", name: str = "job", **bundle_fields) -> GangRequest:
    return GangRequest(
        name=name, bundles=[Bundle(resources=b, **bundle_fields) for b in bundles], constraint=constraint
    )


def placed(decision) -> Placement:
    assert isinstance(decision, Placement), decision
    return decision


# A tiny target workload: 1-GPU tasks with 4 CPUs and half-GPU tasks with 2 CPUs, equally common.
WHOLE = TaskShape(cpu=4 * UNITS, gpu_count=1, gpu_share=UNITS)
HALF = TaskShape(cpu=2 * UNITS, gpu_count=1, gpu_share=UNITS // 2)
HALF_AND_WHOLE = TargetWorkload([WHOLE, HALF], [1, 1])


class TestRequests:
    def test_unknown_resource_names_the_fix(self):
        with pytest.raises(ValidationError, match="use CPU, memory, GPU, TPU"):
            Bundle(resources={"gpu": 1})

    def test_fractional_gpu_above_one_is_refused(self):
        with pytest.raises(ValidationError, match="whole devices"):
            Bundle(resources={"GPU": 1.5})

    def test_a_gpu_share_below_the_engines_resolution_is_refused(self):
        # Found by the admin-call fuzzer: 4.9e-92 GPU became one device with a zero share, which
        # fitted everywhere and then matched no device (an OversubscriptionError in the controller).
        with pytest.raises(ValidationError, match=r"smallest share of a device is 0\.0001"):
            Bundle(resources={"CPU": 2, "GPU": 4.855781060752736e-92})
        assert Bundle(resources={"GPU": 0.0001}).demand.gpu_share == 1

    def test_a_cpu_or_memory_amount_that_would_be_placed_as_nothing_is_refused(self):
        # Placed as zero units, 1e-9 CPU became a Ray bundle asking for nothing, which Ray refuses; the
        # controller had journaled the placement first and failed on every restart.
        with pytest.raises(ValidationError, match=r"CPU is 1e-09; the smallest share of a core is 0\.0001"):
            Bundle(resources={"CPU": 1e-9})
        with pytest.raises(ValidationError, match=r"memory is 0\.4 bytes; the smallest amount is 1 byte"):
            Bundle(resources={"memory": 0.4, "CPU": 1})
        assert Bundle(resources={"CPU": 0.0001, "memory": 1}).demand.cpu == 1

    def test_an_infinite_amount_is_refused_with_its_field(self):
        for amount in (float("inf"), float("nan")):
            with pytest.raises(ValidationError, match=r"resources\.CPU\n  Input should be a finite number"):
                Bundle(resources={"CPU": amount})

    def test_empty_bundle_is_refused(self):
        with pytest.raises(ValidationError, match="asks for nothing"):
            Bundle(resources={"CPU": 0})

    def test_tpu_slice_gang_needs_tpus(self):
        with pytest.raises(ValidationError, match="whole TPU host"):
            gang({"CPU": 1}, constraint="same_tpu_slice")

    def test_demand_is_fixed_point(self):
        demand = Bundle(resources={"CPU": 0.5, "GPU": 0.46, "memory": GIB}).demand
        assert (demand.cpu, demand.gpu_count, demand.gpu_share, demand.memory) == (5000, 1, 4600, GIB)
        assert Bundle(resources={"GPU": 4}).demand.gpu_total == 4 * UNITS


class TestDevicesAndBooks:
    def test_fractional_gpus_share_one_device_until_full(self):
        engine = PlacementEngine(cluster(node("g", gpus=2)), "bestfit")
        first = placed(engine.place(gang({"GPU": 0.5})))
        second = placed(engine.place(gang({"GPU": 0.5})))
        assert first.bundles[0].gpu_devices == second.bundles[0].gpu_devices
        assert engine.snapshot().nodes[0].gpu_free == (0.0, 1.0)

    def test_whole_gpus_take_idle_devices_of_one_node(self):
        engine = PlacementEngine(cluster(node("g", gpus=4)), "bestfit")
        engine.place(gang({"GPU": 0.25}))
        whole = placed(engine.place(gang({"GPU": 3})))
        assert whole.bundles[0].gpu_devices == (1, 2, 3)
        assert isinstance(engine.place(gang({"GPU": 1})), Rejection)

    def test_release_frees_exactly_what_was_taken(self):
        snapshot = cluster(node("g", gpus=2, cpus=8))
        engine = PlacementEngine(snapshot, "fgd", workload=HALF_AND_WHOLE)
        placement = placed(engine.place(gang({"GPU": 0.3, "CPU": 2, "memory": GIB}, {"GPU": 1, "CPU": 1})))
        engine.release(placement)
        assert engine.snapshot().nodes == PlacementEngine(snapshot).snapshot().nodes

    def test_snapshot_round_trip_keeps_partial_devices(self):
        partial = cluster(node("g", gpus=2, gpu_free=(0.25, 1.0), cpus_free=3))
        engine = PlacementEngine(partial, "bestfit")
        assert isinstance(engine.place(gang({"GPU": 0.5, "CPU": 1})), Placement)
        assert engine.snapshot().nodes[0].gpu_free == (0.25, 0.5)
        assert engine.snapshot().nodes[0].cpus_free == 2

    def test_oversubscribing_allocation_raises(self):
        state = ClusterState(cluster(node("g", gpus=1)))
        demand = Bundle(resources={"GPU": 1}).demand
        state.allocate(0, demand, (0,))
        with pytest.raises(RuntimeError):
            state.allocate(0, demand, (0,))


class TestWhereBundlesGo:
    def test_cpu_only_work_avoids_gpu_nodes_while_plain_nodes_have_room(self):
        engine = PlacementEngine(cluster(node("gpu", gpus=8, cpus=64), node("cpu", cpus=4)), "bestfit")
        assert placed(engine.place(gang({"CPU": 4}))).nodes == ("cpu",)
        assert placed(engine.place(gang({"CPU": 4}))).nodes == ("gpu",)

    def test_gpu_types_and_label_selectors_are_honoured(self):
        snapshot = cluster(
            node("a", gpus=1, gpu_type="A100", labels={"zone": "a"}),
            node("h", gpus=1, gpu_type="H100", labels={"zone": "b"}),
            node("t", gpus=1, gpu_type="T4", labels={"zone": "b"}),
        )
        engine = PlacementEngine(snapshot, "bestfit")
        assert placed(engine.place(gang({"GPU": 1}, gpu_types=("H100",)))).nodes == ("h",)
        assert placed(engine.place(gang({"GPU": 1}, label_selector={"zone": "!a"}))).nodes == ("t",)
        assert placed(engine.place(gang({"GPU": 1}, label_selector={"zone": "in(a,c)"}))).nodes == ("a",)

    @pytest.mark.parametrize("policy", sorted(POLICIES))
    def test_a_bundle_any_node_suits_leaves_the_only_node_another_can_use(self, policy):
        # Alike in size: the one bundle that needs ssd goes first, whatever the bundles' order or the policy.
        snapshot = cluster(node("ssd", gpus=8, labels={"disk": "ssd"}), node("plain", gpus=8))
        anywhere, on_ssd = Bundle(resources={"GPU": 8}), Bundle(resources={"GPU": 8}, label_selector={"disk": "ssd"})
        decision = place(snapshot, GangRequest(name="job", bundles=[anywhere, on_ssd]), policy)
        assert placed(decision).nodes == ("plain", "ssd")

    def test_a_bundle_copied_with_other_selectors_is_placed_by_the_copys(self):
        # The scheduler adds a cordon selector and narrows GPU types on copies of the submitted bundles,
        # often after the engine has already read the originals.
        snapshot = cluster(
            node("a", gpus=1, gpu_type="A100", labels={"zone": "a"}),
            node("h", gpus=1, gpu_type="H100", labels={"zone": "b"}),
        )
        original = Bundle(resources={"GPU": 1})
        assert placed(place(snapshot, GangRequest(name="job", bundles=[original]), "bestfit")).nodes == ("a",)
        for update, node_name in (({"label_selector": {"zone": "!a"}}, "h"), ({"gpu_types": ("H100",)}, "h")):
            copy = original.model_copy(update=update)
            assert placed(place(snapshot, GangRequest(name="job", bundles=[copy]), "bestfit")).nodes == (node_name,)

    def test_same_pool_keeps_a_gang_in_one_pool(self):
        snapshot = cluster(node("a0", gpus=2, pool="a"), node("b0", gpus=2, pool="b"), node("b1", gpus=2, pool="b"))
        placement = placed(PlacementEngine(snapshot, "fgd", workload=HALF_AND_WHOLE).place(gang(*[{"GPU": 2}] * 2)))
        assert sorted(placement.nodes) == ["b0", "b1"]

    def test_same_node_and_spread(self):
        snapshot = cluster(node("a", cpus=8), node("b", cpus=8), node("c", cpus=2))
        assert len(set(placed(place(snapshot, gang(*[{"CPU": 2}] * 3, constraint="same_node"))).nodes)) == 1
        assert sorted(placed(place(snapshot, gang(*[{"CPU": 2}] * 3, constraint="spread"))).nodes) == [
            "a",
            "b",
            "c",
        ]

    @pytest.mark.parametrize("policy", sorted(POLICIES))
    def test_a_spread_gang_holds_no_more_gpus_of_a_type_than_its_room(self, policy):
        small = [node(f"a{i}", gpus=4, gpu_type="A100") for i in range(3)]
        big = [node(f"h{i}", gpus=8, gpu_type="H100") for i in range(3)]
        spread = gang(*[{"GPU": 2}] * 4, constraint="spread")
        for room in ({"A100": 2}, {"H100": 2, "A100": 6}, {"H100": 4, "A100": 4}):
            engine = PlacementEngine(cluster(*small, *big), policy, workload=HALF_AND_WHOLE)
            placement = placed(engine.place(spread, gpu_room=room))
            held: dict[str, float] = {}
            for bundle in placement.bundles:
                gpu_type = "A100" if bundle.node.startswith("a") else "H100"
                held[gpu_type] = held.get(gpu_type, 0) + bundle.resources["GPU"]
            assert all(held.get(gpu_type, 0) <= limit for gpu_type, limit in room.items()), (room, held)
            assert len(set(placement.nodes)) == 4
        engine = PlacementEngine(cluster(*small, *big), policy, workload=HALF_AND_WHOLE)
        rejection = engine.place(spread, gpu_room={"A100": 2, "H100": 4})  # 6 of the 8 GPUs fit the room
        assert isinstance(rejection, Rejection) and rejection.reason is RejectionReason.NO_ROOM_NOW
        assert engine.snapshot() == PlacementEngine(cluster(*small, *big), policy).snapshot()  # nothing held
        # Room on a type the cluster lacks, and room for another constraint's gang, which sits on one type, limit
        # nothing.
        assert placed(engine.place(spread, gpu_room={"L4": 0}))
        assert placed(engine.place(gang(*[{"GPU": 2}] * 2), gpu_room={"H100": 0, "A100": 0}))

    def test_the_spread_matching_fallback_keeps_to_the_room(self):
        # Bundle by bundle, bestfit gives a 4-GPU bundle h2, the one H100 node with the CPUs the H100-only bundle
        # needs; the matching that follows must then keep the 4-GPU bundles off H100 when the room says so.
        snapshot = cluster(
            node("h0", cpus=2, gpus=8, gpu_type="H100"),
            node("a1", cpus=8, gpus=8, gpu_type="A100"),
            node("h2", cpus=8, gpus=4, gpu_type="H100"),
            node("a3", cpus=2, gpus=8, gpu_type="A100"),
        )
        anywhere = Bundle(resources={"GPU": 4, "CPU": 1})
        on_h100 = Bundle(resources={"GPU": 1, "CPU": 4}, gpu_types=("H100",))
        spread = GangRequest(name="job", bundles=[anywhere, anywhere, on_h100], constraint="spread")
        unlimited = placed(PlacementEngine(snapshot, "bestfit").place(spread))
        assert unlimited.nodes[2] == "h2" and "h0" in unlimited.nodes  # the matching's first answer: 5 H100 GPUs
        within = placed(PlacementEngine(snapshot, "bestfit").place(spread, gpu_room={"H100": 4}))
        assert sorted(within.nodes) == ["a1", "a3", "h2"]
        refused = PlacementEngine(snapshot, "bestfit").place(spread, gpu_room={"H100": 4, "A100": 4})
        assert isinstance(refused, Rejection)

    def test_the_room_holds_a_one_bundle_spread_gang_and_limits_no_gpu_node_of_no_type(self):
        snapshot = cluster(node("h0", gpus=8, gpu_type="H100"), node("u0", gpus=8, gpu_type=None))
        one = gang({"GPU": 4}, constraint="spread")
        assert placed(PlacementEngine(snapshot, "bestfit").place(one, gpu_room={"H100": 2})).nodes == ("u0",)
        snapshot = cluster(node("h0", gpus=8, gpu_type="H100"), node("u0", gpus=8, gpu_type=None, cpus=1))
        assert isinstance(
            PlacementEngine(snapshot, "bestfit").place(
                gang({"GPU": 4, "CPU": 2}, constraint="spread"), gpu_room={"H100": 2}
            ),
            Rejection,
        )
        two = gang({"GPU": 2}, {"GPU": 2}, constraint="spread")
        assert sorted(placed(PlacementEngine(snapshot, "bestfit").place(two, gpu_room={"H100": 2})).nodes) == [
            "h0",
            "u0",
        ]

    def test_a_spread_gang_within_its_room_is_found_where_the_bundles_must_trade_nodes(self):
        # Bundle by bundle, bestfit puts the 1-GPU bundle on c0, where the room allows no GPU; within the room,
        # a1 takes the 0.5-GPU, 4-CPU bundle and a2 (2 CPUs) the other: a choice the matching alone does not make.
        snapshot = cluster(
            node("c0", cpus=8, gpus=2, gpu_type="C"),
            node("a1", cpus=8, gpus=1, gpu_type="A"),
            node("a2", cpus=2, gpus=2, gpu_type="A"),
        )
        spread = gang({"GPU": 0.5, "CPU": 4}, {"GPU": 1, "CPU": 1}, constraint="spread")
        assert placed(PlacementEngine(snapshot, "bestfit").place(spread, gpu_room={"C": 0})).nodes == ("a1", "a2")

    def test_tpu_gang_takes_whole_hosts_of_the_smallest_slice_that_fits(self):
        hosts = [node(f"big{i}", tpu_chips=4, tpu_slice="big") for i in range(4)]
        hosts += [node(f"small{i}", tpu_chips=4, tpu_slice="small") for i in range(2)]
        engine = PlacementEngine(cluster(*hosts), "llmos")
        placement = placed(engine.place(gang(*[{"TPU": 2}] * 2, constraint="same_tpu_slice")))
        assert sorted(placement.nodes) == ["small0", "small1"]
        assert all(bundle.resources["TPU"] == 4 for bundle in placement.bundles)
        # The small slice is now busy; the next pair must fit inside the big slice alone.
        assert set(placed(engine.place(gang(*[{"TPU": 4}] * 2, constraint="same_tpu_slice"))).nodes) <= {
            f"big{i}" for i in range(4)
        }

    @pytest.mark.parametrize("policy", ["llmos", "bestfit", "fgd"])
    def test_each_bundle_of_a_pool_or_slice_gang_keeps_its_own_labels(self, policy):
        gpus = [node(f"g{i}", gpus=8, pool="g", labels={"llmos.io/node": f"g{i}"}) for i in range(2)]
        hosts = [node(f"t{i}", tpu_chips=4, tpu_slice="s", labels={"ray.io/tpu-worker-id": str(i)}) for i in range(2)]
        engine = PlacementEngine(cluster(*gpus, *hosts), policy, workload=HALF_AND_WHOLE)
        pinned_first = GangRequest(
            name="pinned",
            bundles=[
                Bundle(resources={"GPU": 8}, label_selector={"llmos.io/node": "g1"}),
                Bundle(resources={"GPU": 8}),
            ],
        )
        assert placed(engine.place(pinned_first)).nodes == ("g1", "g0")
        head_on_worker_0 = GangRequest(
            name="slice",
            constraint="same_tpu_slice",
            bundles=[
                Bundle(resources={"TPU": 4}),
                Bundle(resources={"TPU": 4}, label_selector={"ray.io/tpu-worker-id": "0"}),
            ],
        )
        assert placed(engine.place(head_on_worker_0)).nodes == ("t1", "t0")


class TestRejections:
    def test_too_big_for_any_node_never_fits_and_says_why(self):
        decision = place(cluster(node("g", gpus=4)), gang({"GPU": 8}))
        assert isinstance(decision, Rejection)
        assert decision.reason is RejectionReason.NEVER_FITS
        assert "asks for 8 GPUs" in decision.message and "has is 4" in decision.message

    def test_no_matching_label_never_fits(self):
        decision = place(cluster(node("g")), gang({"CPU": 1}, label_selector={"zone": "moon"}))
        assert decision.reason is RejectionReason.NEVER_FITS
        assert "label_selector" in decision.message

    def test_gang_too_big_for_one_node_never_fits(self):
        decision = place(cluster(node("a", cpus=4), node("b", cpus=4)), gang(*[{"CPU": 3}] * 2, constraint="same_node"))
        assert decision.reason is RejectionReason.NEVER_FITS
        assert "same_node" in decision.message

    def test_busy_cluster_is_no_room_now(self):
        engine = PlacementEngine(cluster(node("g", gpus=1)), "bestfit")
        engine.place(gang({"GPU": 1}))
        decision = engine.place(gang({"GPU": 1}))
        assert decision.reason is RejectionReason.NO_ROOM_NOW

    def test_a_rejected_gang_leaves_the_books_untouched(self):
        engine = PlacementEngine(cluster(node("a", gpus=2), node("b", gpus=1)), "bestfit")
        before = engine.snapshot()
        assert isinstance(engine.place(gang({"GPU": 2}, {"GPU": 2})), Rejection)
        assert engine.snapshot() == before


class TestRayView:
    def test_node_from_ray_reads_resources_and_llmos_labels(self):
        labels = {POOL_LABEL: "v5e", TPU_SLICE_LABEL: "v5e-s0", RAY_ACCELERATOR_TYPE_LABEL: "TPU-V5LITEPOD"}
        tpu = node_from_ray("h0", {"CPU": 8, "memory": 16 * GIB, "TPU": 4}, labels)
        assert (tpu.pool, tpu.tpu_slice, tpu.tpu_chips, tpu.gpu_type) == ("v5e", "v5e-s0", 4, None)
        gpu = node_from_ray(
            "g0",
            {"CPU": 8, "memory": GIB, "GPU": 4},
            {RAY_ACCELERATOR_TYPE_LABEL: "H100"},
            available={"CPU": 2, "memory": GIB, "GPU": 2.5},
        )
        assert (gpu.gpu_type, gpu.gpu_free, gpu.cpus_free) == ("H100", (1.0, 1.0, 0.5, 0.0), 2)

    def test_a_kuberay_tpu_host_is_in_the_slice_ray_detected(self):
        # A KubeRay worker group's labels are the same for every slice of the group; on a TPU VM, Ray itself
        # labels each host with its slice's name.
        spec = load_spec(EXAMPLE_SPEC)
        (group,) = [g for g in ray_cluster(spec)["spec"]["workerGroupSpecs"] if g["groupName"] == "tpu-v5p"]
        assert TPU_SLICE_LABEL not in group["labels"]
        total = {"CPU": 208, "memory": 448 * GIB, "TPU": 4}
        hosts = [
            node_from_ray(f"{slice_name}-{worker}", total, {**group["labels"], RAY_TPU_SLICE_NAME_LABEL: slice_name})
            for slice_name in ("slice-a", "slice-b")
            for worker in range(2)
        ]
        assert [host.tpu_slice for host in hosts] == ["slice-a", "slice-a", "slice-b", "slice-b"]
        placement = placed(
            PlacementEngine(cluster(*hosts), "llmos").place(gang(*[{"TPU": 4}] * 2, constraint="same_tpu_slice"))
        )
        assert len({host.tpu_slice for host in hosts if host.name in placement.nodes}) == 1


class TestWorkload:
    def test_fragmentation_follows_the_paper(self):
        # One node: devices with 0.3 and 1.0 free, 3 CPUs free. The 1-GPU, 4-CPU shape lacks CPU, so
        # all 1.3 free GPUs are a fragment for it; the half-GPU, 2-CPU shape can use the idle device
        # but not the 0.3 one. Expected: 0.5 * 1.3 + 0.5 * 0.3 = 0.8 GPUs.
        gpu_free = np.array([[3000, UNITS]])
        accessible = HALF_AND_WHOLE.accessible(["A100"])[[1]]
        fragment = HALF_AND_WHOLE.fragmentation(gpu_free, np.array([3 * UNITS]), accessible)
        assert fragment[0] == pytest.approx(0.8 * UNITS)

    def test_stranded_counts_cpu_as_a_limit_on_copies(self):
        # 4 idle GPUs but CPU for one 4-CPU copy: FGD calls all 4 usable, `stranded` only 1.
        workload = TargetWorkload([WHOLE], [1])
        free, cpu = np.full((1, 4), UNITS), np.array([5 * UNITS])
        accessible = workload.accessible(["A100"])[[1]]
        assert workload.fragmentation(free, cpu, accessible)[0] == 0
        assert workload.stranded(free, cpu, accessible)[0] == 3 * UNITS

    def test_most_common_covers_the_share_of_tasks_asked(self):
        demands = [Bundle(resources={"GPU": 1}).demand] * 90 + [Bundle(resources={"GPU": 0.5}).demand] * 10
        workload = TargetWorkload.most_common(demands)
        assert len(workload.covering(0.9).shapes) == 1
        assert len(workload.covering(0.95).shapes) == 2
        assert workload.covered_popularity(0.9).tolist() == [1.0, 0.0]

    def test_estimator_rebuilds_on_a_doubling_schedule(self):
        estimator = WorkloadEstimator()
        demand = Bundle(resources={"GPU": 1}).demand
        rebuilt = [estimator.observe([demand]) is not None for _ in range(8)]
        assert rebuilt == [True, True, False, True, False, False, False, True]

    def test_engine_learns_a_workload_when_given_none(self):
        engine = PlacementEngine(cluster(node("g", gpus=2)), "fgd")
        assert isinstance(engine.place(gang({"GPU": 0.5})), Placement)
        assert engine.policy.workload is not None


def choice(policy: str, snapshot: ClusterSnapshot, request: GangRequest, **kwargs) -> tuple[str, tuple[int, ...]]:
    decision = placed(PlacementEngine(snapshot, policy, **kwargs).place(request))
    return decision.bundles[0].node, decision.bundles[0].gpu_devices


class TestPolicyScoring:
    """Each policy on a small cluster where its rule, and only its rule, picks one node."""

    def test_bestfit_prefers_the_node_left_fullest(self):
        snapshot = cluster(node("roomy", gpus=8, cpus=64), node("snug", gpus=2, cpus=8))
        assert choice("bestfit", snapshot, gang({"GPU": 1, "CPU": 4}))[0] == "snug"

    def test_dotprod_prefers_free_resources_least_aligned_with_the_request(self):
        snapshot = cluster(node("gpu-rich", gpus=8, cpus=8), node("cpu-rich", gpus=2, cpus=96))
        assert choice("dotprod", snapshot, gang({"GPU": 1, "CPU": 1}))[0] == "cpu-rich"

    def test_packing_shares_a_used_gpu_then_a_used_node_then_the_smallest_idle_node(self):
        used = node("used", gpus=4, gpu_free=(0.6, 1.0, 1.0, 1.0))
        snapshot = cluster(node("idle8", gpus=8), node("idle2", gpus=2), used)
        assert choice("packing", snapshot, gang({"GPU": 0.5})) == ("used", (0,))
        assert choice("packing", snapshot, gang({"GPU": 1}))[0] == "used"
        idle_only = cluster(node("idle8", gpus=8), node("idle2", gpus=2))
        assert choice("packing", idle_only, gang({"GPU": 1}))[0] == "idle2"

    def test_clustering_keeps_one_kind_of_gpu_work_together(self):
        engine = PlacementEngine(cluster(node("a", gpus=4), node("b", gpus=4)), "clustering", seed=3)
        shared_node = placed(engine.place(gang({"GPU": 0.5}))).nodes[0]
        whole_node = placed(engine.place(gang({"GPU": 1}))).nodes[0]
        assert whole_node != shared_node
        assert placed(engine.place(gang({"GPU": 0.25}))).nodes[0] == shared_node

    def test_fgd_pairs_a_half_gpu_with_a_half_free_device(self):
        snapshot = cluster(node("idle", gpus=2, cpus=16), node("half", gpus=2, cpus=16, gpu_free=(1.0, 0.5)))
        assert choice("fgd", snapshot, gang({"GPU": 0.5, "CPU": 2}), workload=HALF_AND_WHOLE) == ("half", (1,))

    def test_fgd_score_is_the_simulators_truncated_sigmoid(self):
        from cluster.placement.policies.fgd import Fgd

        state = ClusterState(cluster(node("half", gpus=2, cpus=16, gpu_free=(1.0, 0.5))))
        demand = Bundle(resources={"GPU": 0.5, "CPU": 2}).demand
        scores = Fgd(workload=HALF_AND_WHOLE).score(state, demand, np.array([0]))
        # Before: the 0.5 device is a fragment for the 1-GPU shape (0.5 * 0.5 = 0.25 GPU). After
        # filling it, nothing is left there: the fragmentation falls by 0.25 GPU.
        assert scores.score[0] == int(100 / (1 + np.exp(-0.25)))
        assert scores.shared_device[0] == 1

    def test_llmos_breaks_fgd_ties_by_the_gpus_cpu_would_strand(self):
        # Two idle 4-GPU nodes; the workload is 1-GPU, 4-CPU tasks. FGD scores both nodes the same
        # for a 1-GPU, 8-CPU task: either way the remaining GPUs still fit a typical task. On the
        # 16-CPU node, though, only two typical tasks would then fit next to three free GPUs, one
        # GPU stranded; llmos sends the task to the 32-CPU node whatever the node order.
        workload = TargetWorkload([WHOLE], [1])
        snapshot = cluster(node("lean", gpus=4, cpus=16), node("rich", gpus=4, cpus=32))
        request = gang({"GPU": 1, "CPU": 8})
        fgd_picks = {choice("fgd", snapshot, request, workload=workload, seed=seed)[0] for seed in range(8)}
        assert fgd_picks == {"lean", "rich"}
        assert {choice("llmos", snapshot, request, workload=workload, seed=seed)[0] for seed in range(8)} == {"rich"}

    def test_random_picks_only_nodes_with_room_and_varies_with_the_seed(self):
        snapshot = cluster(node("full", gpus=1, gpu_free=(0.0,)), *[node(f"n{i}", gpus=1) for i in range(6)])
        picks = {choice("random", snapshot, gang({"GPU": 1}), seed=seed)[0] for seed in range(12)}
        assert "full" not in picks and len(picks) > 1

    def test_ray_hybrid_spreads_below_half_utilization_and_packs_above(self):
        # Five nodes, so Ray's top-k is 1 and the choice is deterministic given the node order.
        busy = {"cpus_free": 2.0}  # 87.5% CPU used
        warm = {"cpus_free": 6.0}  # 62.5% used
        cool = {"cpus_free": 12.0}  # 25% used: below the 0.5 spread threshold, scores 0
        snapshot = cluster(
            node("busy", **busy), node("warm", **warm), node("cool", **cool), node("idle1"), node("idle2")
        )
        order = ["idle2", "cool", "idle1", "warm", "busy"]
        assert choice("ray-hybrid", snapshot, gang({"CPU": 1}), node_order=order)[0] == "idle2"
        order = ["cool", "idle2", "idle1", "warm", "busy"]
        assert choice("ray-hybrid", snapshot, gang({"CPU": 1}), node_order=order)[0] == "cool"
        only_busy = cluster(node("busy", **busy), node("warm", **warm))
        assert choice("ray-hybrid", only_busy, gang({"CPU": 1}))[0] == "warm"

    def test_ray_hybrid_pack_fills_the_roomiest_node_first(self):
        snapshot = cluster(node("small", cpus=4), node("large", cpus=16), node("mid", cpus=8))
        placement = placed(PlacementEngine(snapshot, "ray-hybrid").place(gang(*[{"CPU": 4}] * 5)))
        assert placement.nodes == ("large",) * 4 + ("mid",)

    def test_unknown_policy_names_the_choices(self):
        with pytest.raises(ValueError, match="fgd"):
            make_policy("fdg")


@pytest.mark.parametrize("policy", ["clustering", "fgd", "llmos", "ray-hybrid"])
def test_scoring_each_distinct_node_state_once_changes_no_decision(policy: str, monkeypatch):
    snapshot = cluster(*[node(f"n{i}", gpus=4, cpus=16 + 8 * (i % 3)) for i in range(90)])
    shapes = [{"GPU": 0.5, "CPU": 2}, {"GPU": 1, "CPU": 6}, {"GPU": 0.25, "CPU": 1}, {"GPU": 2, "CPU": 4}]
    requests = [gang(shapes[(i * 7) % len(shapes)], name=f"r{i}") for i in range(150)]

    def decisions(threshold: int) -> list:
        monkeypatch.setattr("cluster.placement.engine.DISTINCT_STATES_ABOVE", threshold)
        engine = PlacementEngine(snapshot, policy, workload=HALF_AND_WHOLE, seed=5)
        return [engine.place(request) for request in requests]

    assert decisions(threshold=1) == decisions(threshold=10**9)


@pytest.mark.parametrize("policy", ["fgd", "llmos"])
def test_nodes_a_bundle_leaves_without_free_gpu_score_as_the_full_measure_does(policy: str):
    """The shortcut for GPU-less bundles on nodes with no free GPU share is exact, node for node."""
    snapshot = cluster(
        node("cpu-a", cpus=8),
        node("cpu-b", cpus=64),
        node("idle", cpus=32, gpus=8),
        node("partly", cpus=24, gpus=4, gpu_free=(0.0, 0.5, 1.0, 0.0)),
        node("full", cpus=16, gpus=4, gpu_free=(0.0, 0.0, 0.0, 0.0)),
        node("h100", cpus=26, gpus=8, gpu_type="H100", gpu_free=(0.25,) + (0.0,) * 7),
    )
    engine = PlacementEngine(snapshot, policy, workload=HALF_AND_WHOLE)
    state, scorer = engine.state, engine.policy
    everywhere = np.arange(state.size)
    for resources in ({"CPU": 1}, {"CPU": 6}, {"CPU": 0.01}, {"CPU": 1, "GPU": 0.5}, {"CPU": 2, "GPU": 1}):
        demand = Bundle(resources=resources).demand
        for nodes in (everywhere, everywhere[:2], everywhere[[0, 3, 4]], everywhere[4:]):
            fast, full = scorer.score(state, demand, nodes), scorer._score(state, demand, nodes)
            assert fast.score.tolist() == full.score.tolist(), (resources, nodes)
            if demand.is_fractional_gpu:
                assert fast.shared_device.tolist() == full.shared_device.tolist()


def test_every_policy_places_a_gang_that_fits_the_idle_cluster():
    """ "No room now" promises a place once resources are released; on an idle cluster none will be. Each
    policy packs same_node and same_pool gangs greedily, bundle by bundle, which can miss a packing: then
    the engine packs the gang best fit, by which never-fits is judged."""
    rng = random.Random(0)
    missed = []
    for _ in range(2000):
        nodes = []
        for index in range(rng.randint(1, 4)):
            gpus = rng.choice([0, 1, 2, 4, 8])
            gpu_type = rng.choice(["A100", "H100"]) if gpus else None
            pool, cpus = rng.choice(["a", "b"]), rng.choice([4, 8, 10, 16])
            nodes.append(
                NodeSnapshot(name=f"n{index}", pool=pool, cpus=cpus, memory=64 * GIB, gpus=gpus, gpu_type=gpu_type)
            )
        bundles = []
        for _ in range(rng.randint(2, 6)):
            gpu = rng.choice([0, 0, 0, 0.25, 0.3, 0.5, 0.6, 1, 2])
            bundles.append(Bundle(resources={"CPU": rng.choice([0.5, 1, 2, 3, 4, 6]), **({"GPU": gpu} if gpu else {})}))
        gang = GangRequest(name="g", bundles=bundles, constraint=rng.choice(["same_node", "same_pool", "spread"]))
        for policy in POLICIES:
            decision = PlacementEngine(ClusterSnapshot(nodes=tuple(nodes)), policy, seed=1).place(gang)
            if isinstance(decision, Rejection) and decision.reason is RejectionReason.NO_ROOM_NOW:
                missed.append((policy, gang.constraint.value, nodes, bundles))
    assert not missed, missed[:3]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_gangs_greedy_packing_misses_are_packed_on_the_idle_cluster_not_refused(policy):
    # 4+3+3 on each of two 10-CPU nodes; GPU shares .5+.25+.25 and .4+.3+.3 on the two devices of one node.
    # Largest first, best fit puts both 4s on one node and .5 and .4 on one device, and then has no room.
    two_cpu_nodes = [
        NodeSnapshot(name=f"cpu-{i}", pool="cpu", labels={"pool": "cpu"}, cpus=10, memory=32 * GIB) for i in range(2)
    ]
    gpu_node = NodeSnapshot(name="gpu-0", pool="gpu", cpus=32, memory=64 * GIB, gpus=2, gpu_type="H100")
    snapshot = ClusterSnapshot(nodes=(*two_cpu_nodes, gpu_node))
    cpus = GangRequest(
        name="cpus",
        constraint="same_pool",
        bundles=[Bundle(resources={"CPU": c}, label_selector={"pool": "cpu"}) for c in (4, 4, 3, 3, 3, 3)],
    )
    shares = GangRequest(
        name="shares",
        constraint="same_node",
        bundles=[Bundle(resources={"CPU": 1, "GPU": x}) for x in (0.5, 0.4, 0.3, 0.3, 0.25, 0.25)],
    )
    for gang in (cpus, shares):
        engine = PlacementEngine(snapshot, policy, seed=1)
        assert isinstance(engine.place(gang), Placement), gang.name


def _packs(
    nodes: list[NodeSnapshot], sizes: list[tuple[int, int]], constraint: str, assignment: tuple[int, ...]
) -> bool:
    """Whether bundles of (CPUs, GiB) put on nodes by `assignment` (a node index per bundle) fit and keep the
    constraint."""
    used = [nodes[i] for i in set(assignment)]
    if (constraint == "same_node" and len(used) > 1) or len({node.pool for node in used}) > 1:
        return False
    return all(
        sum(sizes[b][0] for b, n in enumerate(assignment) if n == i) <= node.cpus
        and sum(sizes[b][1] for b, n in enumerate(assignment) if n == i) * GIB <= node.memory
        for i, node in enumerate(nodes)
    )


def test_a_packed_gang_is_refused_as_never_fitting_exactly_when_no_assignment_exists():
    """Brute force over every assignment of CPU and memory bundles to nodes, against the engine's verdict on
    the empty cluster: 'never fits' only when none exists, and otherwise a placement."""
    rng = random.Random(7)
    for _ in range(400):
        nodes = [
            NodeSnapshot(name=f"n{i}", pool=rng.choice(["a", "b"]), cpus=rng.choice([4, 6, 10]), memory=16 * GIB)
            for i in range(rng.randint(1, 3))
        ]
        sizes = [(rng.choice([1, 2, 3, 4, 5]), rng.choice([1, 4, 8])) for _ in range(rng.randint(2, 5))]
        constraint = rng.choice(["same_pool", "same_node"])
        gang = GangRequest(
            name="g",
            constraint=constraint,
            bundles=[Bundle(resources={"CPU": cpu, "memory": memory * GIB}) for cpu, memory in sizes],
        )

        assignments = itertools.product(range(len(nodes)), repeat=len(sizes))
        exists = any(_packs(nodes, sizes, constraint, assignment) for assignment in assignments)
        decision = PlacementEngine(ClusterSnapshot(nodes=tuple(nodes)), "llmos", seed=0).place(gang)
        assert isinstance(decision, Placement) == exists, (nodes, sizes, constraint, decision)
        if not exists:
            assert decision.reason is RejectionReason.NEVER_FITS
