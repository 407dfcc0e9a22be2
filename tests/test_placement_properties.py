"""Properties every policy keeps on random clusters and random sequences of gangs and releases.

An independent ledger (initial free resources minus every live placement's reservation) must match
the engine's books and never go negative: no node, CPU, memory, TPU host or GPU device is ever
oversubscribed. Gangs are all-or-nothing, constraints, label selectors and GPU types hold, TPU
gangs stay in one slice, and a "never fits" rejection is also a rejection on the empty cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.placement import (
    POLICIES,
    Bundle,
    ClusterSnapshot,
    Constraint,
    GangRequest,
    NodeSnapshot,
    Placement,
    PlacementEngine,
    Rejection,
    RejectionReason,
)
from cluster.placement.state import selector_matches

GIB = 1024**3
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
EPSILON = 1e-9


@st.composite
def clusters(draw) -> ClusterSnapshot:
    nodes = []
    for index in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["plain", "gpu", "gpu"]))
        common = {
            "name": f"n{index}",
            "pool": draw(st.sampled_from(["a", "b"])),
            "labels": {"zone": draw(st.sampled_from(["x", "y"]))},
            "cpus": draw(st.integers(1, 16)),
            "memory": draw(st.integers(1, 32)) * GIB,
        }
        if kind == "gpu":
            gpus = draw(st.integers(1, 4))
            common |= {
                "gpus": gpus,
                "gpu_type": draw(st.sampled_from(["A100", "H100"])),
                "gpu_free": tuple(draw(st.lists(st.sampled_from(SHARES), min_size=gpus, max_size=gpus))),
            }
        nodes.append(NodeSnapshot(**common))
    for slice_index in range(draw(st.integers(0, 2))):
        for host in range(draw(st.integers(1, 3))):
            nodes.append(
                NodeSnapshot(
                    name=f"s{slice_index}h{host}",
                    pool="tpu",
                    cpus=8,
                    memory=16 * GIB,
                    tpu_chips=4,
                    tpu_slice=f"slice{slice_index}",
                    tpu_chips_free=draw(st.sampled_from([0, 4, 4])),
                )
            )
    return ClusterSnapshot(nodes=tuple(nodes))


@st.composite
def gangs(draw, name: str) -> GangRequest:
    constraint = draw(st.sampled_from(list(Constraint)))
    bundles = []
    for _ in range(draw(st.integers(1, 3))):
        resources = {
            "CPU": draw(st.sampled_from([0, 0.5, 1, 2, 4])),
            "memory": draw(st.sampled_from([0, 1, 4])) * GIB,
        }
        if constraint is Constraint.SAME_TPU_SLICE or draw(st.integers(0, 5)) == 0:
            resources["TPU"] = draw(st.sampled_from([2, 4]))
        else:
            resources["GPU"] = draw(st.sampled_from([0, 0, 0.25, 0.5, 0.75, 1, 2]))
        if not any(resources.values()):
            resources["CPU"] = 1
        bundles.append(
            Bundle(
                resources=resources,
                gpu_types=draw(st.sampled_from([None, ("A100",), ("H100", "B200")])),
                label_selector=draw(st.sampled_from([{}, {"zone": "x"}, {"zone": "!x"}, {"zone": "in(x,y)"}])),
            )
        )
    return GangRequest(name=name, bundles=bundles, constraint=constraint)


@dataclass
class Ledger:
    """Free resources recomputed from scratch, to check the engine's books against."""

    snapshot: ClusterSnapshot
    live: list[Placement] = field(default_factory=list)

    def free(self) -> dict[str, dict]:
        free = {
            node.name: {
                "cpus": node.cpus if node.cpus_free is None else node.cpus_free,
                "memory": node.memory if node.memory_free is None else node.memory_free,
                "tpu": node.tpu_chips if node.tpu_chips_free is None else node.tpu_chips_free,
                "gpu": list(node.gpu_free if node.gpu_free is not None else (1.0,) * node.gpus),
            }
            for node in self.snapshot.nodes
        }
        for placement in self.live:
            for bundle in placement.bundles:
                books = free[bundle.node]
                books["cpus"] -= bundle.resources.get("CPU", 0)
                books["memory"] -= bundle.resources.get("memory", 0)
                books["tpu"] -= bundle.resources.get("TPU", 0)
                for device in bundle.gpu_devices:
                    books["gpu"][device] -= bundle.gpu_share
        return free


def check_books(engine: PlacementEngine, ledger: Ledger) -> None:
    expected = ledger.free()
    for node in engine.snapshot().nodes:
        books = expected[node.name]
        assert books["cpus"] >= -EPSILON and abs(books["cpus"] - node.cpus_free) < 1e-6
        assert books["memory"] >= 0 and books["memory"] == node.memory_free
        assert books["tpu"] >= 0 and books["tpu"] == node.tpu_chips_free
        for share, engine_share in zip(books["gpu"], node.gpu_free, strict=True):
            assert -EPSILON <= share <= 1 + EPSILON and abs(share - engine_share) < 1e-6


def check_placement(snapshot: ClusterSnapshot, request: GangRequest, placement: Placement) -> None:
    nodes = {node.name: node for node in snapshot.nodes}
    assert sorted(bundle.bundle_index for bundle in placement.bundles) == list(range(len(request.bundles)))
    for placed in placement.bundles:
        bundle, node = request.bundles[placed.bundle_index], nodes[placed.node]
        for key, expression in bundle.label_selector.items():
            assert selector_matches(node.labels, key, expression)
        gpus = bundle.resources.get("GPU", 0)
        if gpus:
            assert bundle.gpu_types is None or node.gpu_type in bundle.gpu_types
            assert len(set(placed.gpu_devices)) == len(placed.gpu_devices) == max(1, int(gpus))
            assert placed.gpu_share == min(gpus, 1.0)
        else:
            assert placed.gpu_devices == ()
        for key in ("CPU", "memory"):
            assert placed.resources.get(key, 0) == bundle.resources.get(key, 0)
        assert placed.resources.get("TPU", 0) >= bundle.resources.get("TPU", 0)
    used = [nodes[bundle.node] for bundle in placement.bundles]
    if request.constraint is Constraint.SAME_NODE:
        assert len({node.name for node in used}) == 1
    if request.constraint is Constraint.SAME_POOL:
        assert len({node.pool for node in used}) == 1
    if request.constraint is Constraint.SPREAD:
        assert len({node.name for node in used}) == len(used)
    if request.constraint is Constraint.SAME_TPU_SLICE:
        assert len({node.tpu_slice for node in used}) == 1 and None not in {node.tpu_slice for node in used}
        assert len({node.name for node in used}) == len(used)
        assert all(bundle.resources["TPU"] == nodes[bundle.node].tpu_chips for bundle in placement.bundles)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshot=clusters(), policy=st.sampled_from(list(POLICIES)), data=st.data())
def test_books_constraints_and_all_or_nothing(snapshot: ClusterSnapshot, policy: str, data) -> None:
    engine = PlacementEngine(snapshot, policy, seed=data.draw(st.integers(0, 3)))
    ledger = Ledger(snapshot)
    for step in range(data.draw(st.integers(1, 8))):
        if ledger.live and data.draw(st.integers(0, 3)) == 0:
            released = ledger.live.pop(data.draw(st.integers(0, len(ledger.live) - 1)))
            engine.release(released)
        else:
            request = data.draw(gangs(f"r{step}"))
            before = engine.snapshot()
            decision = engine.place(request)
            if isinstance(decision, Placement):
                check_placement(snapshot, request, decision)
                ledger.live.append(decision)
            else:
                assert isinstance(decision, Rejection)
                assert engine.snapshot() == before, "a rejected gang must leave no trace"
                if decision.reason is RejectionReason.NEVER_FITS:
                    # Exact for single bundles, spread and TPU gangs (any policy agrees); for same_node
                    # and same_pool it is defined by best-fit packing of the empty cluster.
                    exact = len(request.bundles) == 1 or request.constraint in (
                        Constraint.SPREAD,
                        Constraint.SAME_TPU_SLICE,
                    )
                    judges = list(POLICIES) if exact else ["bestfit"]
                    for judge in judges:
                        assert isinstance(PlacementEngine(snapshot.emptied(), judge).place(request), Rejection)
        check_books(engine, ledger)
