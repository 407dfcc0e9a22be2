"""The controller's books without Ray: admission, quotas, priorities, preemption, node loss, recovery."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest

from cluster.console import UserError
from cluster.controller import detached
from cluster.placement.request import Bundle, Constraint, GangRequest
from cluster.placement.snapshot import NodeSnapshot, node_from_ray
from cluster.ray_mapping import replica_nodes
from cluster.requests import DecisionAction, RequestState, RequestStatus, SubmitRequest, WorkloadKind
from cluster.scheduler import Bind, Scheduler, Unbind, team_of
from cluster.spec import ClusterSpec

POLICY = "bestfit"
SPEC = ClusterSpec.model_validate(
    {
        "pools": [
            {"name": "cpu", "accelerator": "cpu", "node": {"cpus": 8, "memory": "32Gi"}, "nodes": {"max": 2}},
            {
                "name": "h100",
                "accelerator": "gpu",
                "accelerator_type": "H100",
                "node": {"cpus": 32, "memory": "256Gi", "gpus": 8},
                "nodes": {"max": 2},
            },
            {
                "name": "a100",
                "accelerator": "gpu",
                "accelerator_type": "A100-80G",
                "node": {"cpus": 16, "memory": "128Gi", "gpus": 4},
                "nodes": {"max": 1},
            },
        ],
        "teams": [
            {"name": "research", "priority": "low", "quota": {"gpu": 24, "cpu": 64}},
            {"name": "prod", "priority": "high", "quota": {"gpu": 16, "gpu:H100": 8}},
            {"name": "small", "quota": {"gpu": 2}},
        ],
    }
)


def node(name: str, pool: str, cpus: int, gpus: int = 0, gpu_type: str | None = None) -> NodeSnapshot:
    labels = {"llmos.io/pool": pool, "llmos.io/node": name}
    if gpu_type:
        labels["ray.io/accelerator-type"] = gpu_type
    return NodeSnapshot(
        name=name, pool=pool, labels=labels, cpus=cpus, memory=256 * 2**30, gpus=gpus, gpu_type=gpu_type
    )


NODES = [
    node("cpu-0", "cpu", 8),
    node("h100-0", "h100", 32, 8, "H100"),
    node("h100-1", "h100", 32, 8, "H100"),
    node("a100-0", "a100", 16, 4, "A100-80G"),
]


def gang(name: str, workers: int, gpus: float, cpus: float = 1, **kwargs) -> GangRequest:
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return GangRequest(name=name, bundles=[Bundle(resources=resources, **kwargs)] * workers)


@pytest.fixture()
def journal() -> list[dict]:
    return []


@pytest.fixture()
def scheduler(journal) -> Scheduler:
    books = Scheduler(SPEC, POLICY, journal=lambda line: journal.append(json.loads(line)))
    books.set_nodes(NODES)
    return books


def submit(books: Scheduler, team: str, workers: int, gpus: float, cpus: float = 1, **kwargs) -> str:
    status = books.submit(SubmitRequest(team=team, gang=gang(f"{team}-job", workers, gpus, cpus), **kwargs))
    books.schedule()
    return status.id


def test_gang_is_placed_and_charged_to_its_team(scheduler: Scheduler, journal):
    request_id = submit(scheduler, "research", workers=4, gpus=2)
    status = scheduler.get(request_id)
    assert status.state is RequestState.PLACED
    assert len({bundle.node for bundle in status.bundles}) == 1  # same_pool packs onto one H100 node
    assert scheduler.usage["research"]["gpu"] == 8
    assert scheduler.effects == [Bind(request_id, f"llmos-{request_id}", tuple(status.bundles))]
    assert any("decision" in entry and entry["decision"]["action"] == "placed" for entry in journal)


def test_request_over_quota_waits_and_one_over_quota_alone_is_rejected(scheduler: Scheduler):
    first = submit(scheduler, "small", workers=1, gpus=2)
    second = submit(scheduler, "small", workers=1, gpus=1)
    assert scheduler.get(first).state is RequestState.PLACED
    waiting = scheduler.get(second)
    assert waiting.state is RequestState.QUEUED
    assert waiting.reason.startswith("over quota: gpu 2 used + 1 asked > quota 2")
    too_big = submit(scheduler, "small", workers=1, gpus=4)
    assert scheduler.get(too_big).state is RequestState.REJECTED
    assert "over the team's quota even with nothing else running: asks 4 gpu, quota 2" in scheduler.get(too_big).reason
    scheduler.complete(first)
    scheduler.schedule()
    assert scheduler.get(second).state is RequestState.PLACED


def test_a_request_over_quota_is_retried_only_when_its_team_frees_something(scheduler: Scheduler, monkeypatch):
    held = submit(scheduler, "small", workers=1, gpus=2)
    blocked = submit(scheduler, "small", workers=1, gpus=1)
    other = submit(scheduler, "research", workers=1, gpus=1)
    tried: list[str] = []
    try_place = scheduler._try_place
    monkeypatch.setattr(scheduler, "_try_place", lambda status: (tried.append(status.id), try_place(status)))
    scheduler.complete(other)  # research frees a GPU: small's quota is as full as before
    scheduler.schedule()
    assert blocked not in tried and scheduler.get(blocked).state is RequestState.QUEUED
    scheduler.set_quota("small", {"gpu": 3})  # a higher quota unblocks it
    scheduler.schedule()
    assert scheduler.get(blocked).state is RequestState.PLACED
    scheduler.complete(blocked)
    scheduler.set_quota("small", {"gpu": 2})
    again = submit(scheduler, "small", workers=1, gpus=1)
    assert scheduler.get(again).state is RequestState.QUEUED
    scheduler.complete(held)  # its own team frees two GPUs
    scheduler.schedule()
    assert scheduler.get(again).state is RequestState.PLACED


def test_typed_quota_steers_to_another_gpu_type(scheduler: Scheduler):
    on_h100 = submit(scheduler, "prod", workers=1, gpus=8)
    assert scheduler.get(on_h100).nodes[0].startswith("h100")
    steered = submit(scheduler, "prod", workers=1, gpus=4)
    assert scheduler.get(steered).nodes == ["a100-0"]  # gpu:H100 quota of 8 is used up
    assert scheduler.usage["prod"]["gpu:H100"] == 8 and scheduler.usage["prod"]["gpu:A100-80G"] == 4


def test_each_bundle_keeps_to_its_own_gpu_types(scheduler: Scheduler):
    def on_types(*types_per_bundle: tuple[str, ...], constraint: str = "same_pool"):
        bundles = [Bundle(resources={"CPU": 1, "GPU": 1}, gpu_types=types) for types in types_per_bundle]
        status = scheduler.submit(
            SubmitRequest(team="research", gang=GangRequest(name="typed", bundles=bundles, constraint=constraint))
        )
        scheduler.schedule()
        return status

    mixed = on_types(("H100",), ("A100-80G",), constraint="spread")
    assert [bundle.node.split("-")[0] for bundle in mixed.bundles] == ["h100", "a100"]
    one_pool = on_types(("H100",), ("A100-80G",))  # one pool cannot hold both types
    assert one_pool.state is RequestState.REJECTED and "same_pool" in one_pool.reason


def test_request_that_can_never_fit_is_rejected_at_once(scheduler: Scheduler):
    request_id = submit(scheduler, "research", workers=1, gpus=12)
    status = scheduler.get(request_id)
    assert status.state is RequestState.REJECTED
    assert status.reason.startswith("can never fit this cluster")
    assert "asks for 12 GPUs; the most any matching node has is 8" in status.reason


def test_request_that_can_never_fit_is_rejected_at_once_even_while_its_team_is_over_quota(scheduler: Scheduler):
    held = [submit(scheduler, "research", workers=4, gpus=4), submit(scheduler, "research", workers=1, gpus=4)]
    assert all(scheduler.get(request_id).state is RequestState.PLACED for request_id in held)
    never = scheduler.get(submit(scheduler, "research", workers=1, gpus=12))  # 20 + 12 > 24, and no node has 12
    assert never.state is RequestState.REJECTED
    assert "asks for 12 GPUs; the most any matching node has is 8" in never.reason
    on_h100 = submit(scheduler, "prod", workers=1, gpus=8)
    assert scheduler.get(on_h100).state is RequestState.PLACED  # prod's gpu:H100 quota of 8 is used up
    h100_only = scheduler.submit(
        SubmitRequest(team="prod", gang=gang("prod-job", 1, 9, label_selector={"llmos.io/pool": "h100"}))
    )
    scheduler.schedule()
    assert h100_only.state is RequestState.REJECTED
    assert "asks for 9 GPUs; the most any matching node has is 8" in h100_only.reason


def test_higher_priority_preempts_the_cheapest_lower_priority_work(scheduler: Scheduler):
    training = submit(scheduler, "research", workers=2, gpus=4, kind=WorkloadKind.TRAINING)
    serving = submit(scheduler, "research", workers=1, gpus=4, kind=WorkloadKind.SERVING)
    filler = submit(scheduler, "research", workers=2, gpus=4, kind=WorkloadKind.TRAINING)  # the cluster is full
    assert all(scheduler.get(r).state is RequestState.PLACED for r in (training, serving, filler))
    scheduler.effects.clear()
    urgent = submit(scheduler, "prod", workers=1, gpus=4)
    assert scheduler.get(urgent).state is RequestState.PLACED
    # The serving replica goes first at equal priority and is enough on its own.
    assert scheduler.get(serving).state is RequestState.PREEMPTED
    assert scheduler.get(serving).preemptions == 1
    assert {scheduler.get(r).state for r in (training, filler)} == {RequestState.PLACED}
    assert scheduler.effects[0] == Unbind(serving, f"llmos-{serving}")
    assert isinstance(scheduler.effects[1], Bind) and scheduler.effects[1].request_id == urgent


def test_equal_priority_never_preempts(scheduler: Scheduler):
    for _ in range(5):
        submit(scheduler, "research", workers=1, gpus=4)
    late = submit(scheduler, "research", workers=1, gpus=4)
    assert scheduler.get(late).state is RequestState.QUEUED
    assert all(status.preemptions == 0 for status in scheduler.requests.values())


def test_group_minimum_protects_serving_replicas(scheduler: Scheduler):
    replicas = [
        submit(scheduler, "research", workers=1, gpus=4, kind=WorkloadKind.SERVING, group="svc", group_min=2)
        for _ in range(5)
    ]
    urgent = submit(scheduler, "prod", workers=1, gpus=8)
    assert scheduler.get(urgent).state is RequestState.PLACED
    assert sum(scheduler.get(r).state is RequestState.PLACED for r in replicas) >= 2


def test_a_group_minimum_counts_the_team_own_group_not_another_team_group_of_the_same_name(scheduler: Scheduler):
    def replicas(team: str, gpus: float) -> list[str]:
        replica = gang("chat", 1, gpus, label_selector={"llmos.io/pool": "h100"})
        serving = {"kind": WorkloadKind.SERVING, "group": "chat", "group_min": 2}
        return [scheduler.submit(SubmitRequest(team=team, gang=replica, **serving)).id for _ in range(2)]

    chat = replicas("research", 4) + replicas("small", 1)
    scheduler.schedule()
    urgent = scheduler.get(submit(scheduler, "prod", workers=1, gpus=8))
    assert urgent.state is RequestState.QUEUED  # each team's deployment has only its minimum
    assert all(scheduler.get(replica).state is RequestState.PLACED for replica in chat)


def pinned_to(books: Scheduler, node_name: str, group: str | None = None, **kwargs) -> RequestStatus:
    """A research request of 4 GPUs placed on `node_name`, in `group` (of group_min 1) if given."""
    grouped = {"group": group, "group_min": 1} if group else {}
    on_node = gang("pinned", 1, 4, label_selector={"llmos.io/node": node_name})
    status = books.submit(SubmitRequest(team="research", gang=on_node, **grouped, **kwargs))
    books.schedule()
    assert status.nodes == [node_name]
    return status


def ticking(books: Scheduler) -> None:
    """Each request placed later than the one before: the most recently placed is the cheapest victim."""
    ticks = iter(range(1, 1000))
    books.clock = lambda: float(next(ticks))


def test_a_replica_on_a_node_the_request_cannot_use_does_not_spend_its_group_allowance(scheduler: Scheduler):
    scheduler.set_nodes([n for n in NODES if n.name != "h100-1"])
    ticking(scheduler)
    in_way = pinned_to(scheduler, "h100-0", "dep", kind=WorkloadKind.SERVING)
    training = pinned_to(scheduler, "h100-0", kind=WorkloadKind.TRAINING)
    elsewhere = pinned_to(scheduler, "a100-0", "dep", kind=WorkloadKind.SERVING)
    # The A100 replica is the cheapest victim, but preempting it frees nothing an H100 gang can use.
    urgent = scheduler.submit(SubmitRequest(team="prod", gang=gang("urgent", 1, 8, gpu_types=("H100",))))
    scheduler.schedule()
    assert urgent.state is RequestState.PLACED and urgent.nodes == ["h100-0"]
    assert in_way.state is training.state is RequestState.PREEMPTED
    assert elsewhere.state is RequestState.PLACED


def test_a_victim_not_needed_gives_back_its_group_allowance(scheduler: Scheduler):
    scheduler.set_nodes([n for n in NODES if n.name != "a100-0"])
    ticking(scheduler)
    in_way = pinned_to(scheduler, "h100-0", "dep", kind=WorkloadKind.SERVING)
    other = pinned_to(scheduler, "h100-0", kind=WorkloadKind.SERVING)
    kept = pinned_to(scheduler, "h100-1", preemptible=False)
    cheapest = pinned_to(scheduler, "h100-1", "dep", kind=WorkloadKind.SERVING)
    # The cheapest replica is taken first and spends its group's allowance, but h100-1 cannot be freed.
    urgent = scheduler.get(submit(scheduler, "prod", workers=1, gpus=8))
    assert urgent.state is RequestState.PLACED and urgent.nodes == ["h100-0"]
    assert in_way.state is other.state is RequestState.PREEMPTED
    assert cheapest.state is kept.state is RequestState.PLACED


def test_a_group_member_passed_over_for_a_cheaper_one_is_taken_when_only_it_frees_the_node(scheduler: Scheduler):
    scheduler.set_nodes([n for n in NODES if n.name != "a100-0"])
    ticking(scheduler)
    needed = pinned_to(scheduler, "h100-0", "dep", kind=WorkloadKind.SERVING)
    beside_it = pinned_to(scheduler, "h100-0", kind=WorkloadKind.TRAINING)
    kept = pinned_to(scheduler, "h100-1", preemptible=False)
    cheapest = pinned_to(scheduler, "h100-1", "dep", kind=WorkloadKind.SERVING)
    # Cheapest first: the h100-1 replica spends the group's allowance of one, so the h100-0 replica is passed
    # over, and the training gang after it frees nothing on its own; only the h100-0 pair frees a node.
    urgent = scheduler.get(submit(scheduler, "prod", workers=1, gpus=8))
    assert urgent.state is RequestState.PLACED and urgent.nodes == ["h100-0"]
    assert needed.state is beside_it.state is RequestState.PREEMPTED
    assert cheapest.state is kept.state is RequestState.PLACED


def test_a_drain_requeues_work_that_is_not_preemptible_and_an_admin_preemption_ends_it(scheduler: Scheduler):
    pinned = scheduler.get(submit(scheduler, "research", workers=1, gpus=8, preemptible=False))
    drained_node = pinned.nodes[0]
    assert scheduler.drain(drained_node) == [pinned.id]
    scheduler.schedule()
    assert pinned.state is RequestState.PLACED and pinned.nodes != [drained_node] and pinned.preemptions == 1
    scheduler.preempt(pinned.id)
    assert pinned.state is RequestState.FAILED and pinned.state.final
    assert pinned.reason == "preempted by an admin; it is not preemptible, so it ended instead of waiting again"
    assert scheduler.usage["research"] == {} and pinned not in scheduler.waiting()
    assert pinned.id not in scheduler._demands


def test_a_cancel_or_preemption_retried_with_its_key_is_not_applied_twice_even_after_a_restore(journal):
    books = Scheduler(SPEC, POLICY, journal=lambda line: journal.append(json.loads(line)))
    books.set_nodes(NODES)
    preempted, cancelled = (submit(books, "research", workers=1, gpus=8) for _ in range(2))
    books.preempt(preempted, operation_key="preempt-1")
    books.cancel(cancelled, operation_key="cancel-1")
    books.schedule()
    books.write_journal()
    # The controller journaled both calls and died before answering; the restarted one gets them again.
    restarted = Scheduler(SPEC, POLICY)
    restarted.restore(journal)
    again = restarted.get(preempted)
    assert again.state is RequestState.PLACED  # placed again since
    assert restarted.preempt(preempted, operation_key="preempt-1") is again
    assert again.state is RequestState.PLACED and again.preemptions == 1
    assert restarted.cancel(cancelled, operation_key="cancel-1").state is RequestState.CANCELLED
    # A new call is applied, and a repeated one without its key is refused as before.
    restarted.preempt(preempted, operation_key="preempt-2")
    assert again.state is RequestState.PREEMPTED and again.preemptions == 2
    assert again.operation_keys == ["preempt-1", "preempt-2"]
    with pytest.raises(UserError, match="already cancelled; nothing to cancel"):
        restarted.cancel(cancelled)
    with pytest.raises(UserError, match="only placed or running requests can be preempted"):
        restarted.preempt(preempted, operation_key="preempt-3")
    assert "preempt-3" not in again.operation_keys  # a refused call leaves no key to be found by its retry


def test_what_the_controller_hands_back_does_not_change_with_the_books(scheduler: Scheduler):
    # Ray pickles a controller call's result after the call has let go of the lock.
    request_id = submit(scheduler, "research", workers=2, gpus=1)
    scheduler.report(request_id, {"step": 10})
    control = scheduler.cordon("cpu-0")
    live = scheduler.get(request_id)
    status, (listed,), handed_control = detached(live), detached([live]), detached(control)
    scheduler.report(request_id, {"step": 20, "loss": 2.5})
    scheduler.preempt(request_id)
    scheduler.cordon("cpu-0", cordoned=False)
    assert live.details == {"step": 20, "loss": 2.5} and live.state is RequestState.PREEMPTED and not live.nodes
    for handed in (status, listed):
        assert handed.details == {"step": 10} and handed.state is RequestState.PLACED and len(handed.nodes) == 2
    assert handed_control.cordoned and not control.cordoned


def with_ray_id(node_id: str) -> list[NodeSnapshot]:
    """NODES as Ray nodes: each labelled with a Ray node id, `node_id` telling one generation from another."""
    return [n.model_copy(update={"labels": {**n.labels, "ray.io/node-id": f"{n.name}-{node_id}"}}) for n in NODES]


def test_a_node_back_under_its_name_as_a_new_ray_node_requeues_what_ran_on_the_old_one(scheduler: Scheduler):
    scheduler.set_nodes(with_ray_id("first"))
    request_id = submit(scheduler, "research", workers=1, gpus=8)
    scheduler.set_nodes(with_ray_id("first"))  # the same nodes: nothing happens
    status = scheduler.get(request_id)
    assert status.state is RequestState.PLACED and status.failures == 0
    restarted = status.nodes[0]
    scheduler.set_nodes(
        [
            n.model_copy(update={"labels": {**n.labels, "ray.io/node-id": "new"}}) if n.name == restarted else n
            for n in with_ray_id("first")
        ]
    )
    assert status.state is RequestState.PREEMPTED and status.failures == 1
    assert status.reason == f"node {restarted} left the cluster"
    scheduler.schedule()
    assert status.state is RequestState.PLACED


def test_books_restored_while_a_node_came_back_as_a_new_ray_node_requeue_what_ran_on_the_old_one():
    entries: list[str] = []
    books = Scheduler(SPEC, POLICY, journal=entries.append)
    books.set_nodes(with_ray_id("first"))
    request_id = submit(books, "research", workers=1, gpus=8)
    books.write_journal()
    # The controller was down while the node's raylet restarted: the restored books have not seen the old node.
    restored = Scheduler(SPEC, POLICY)
    restored.restore(json.loads(line) for line in entries)
    restored.set_nodes(with_ray_id("second"))
    status = restored.get(request_id)
    assert status.state is RequestState.PREEMPTED and status.failures == 1
    assert status.reason == f"node {books.get(request_id).nodes[0]} left the cluster"
    # Restored onto the same Ray nodes, it stays where it is.
    unchanged = Scheduler(SPEC, POLICY)
    unchanged.restore(json.loads(line) for line in entries)
    unchanged.set_nodes(with_ray_id("first"))
    assert unchanged.get(request_id).state is RequestState.PLACED


def test_lost_node_requeues_its_gang_which_lands_elsewhere(scheduler: Scheduler):
    request_id = submit(scheduler, "research", workers=2, gpus=4)
    lost = scheduler.get(request_id).nodes[0]
    scheduler.set_nodes([n for n in NODES if n.name != lost])
    status = scheduler.get(request_id)
    assert status.state is RequestState.PREEMPTED and status.failures == 1
    assert f"node {lost} left the cluster" in status.reason
    assert scheduler.usage["research"].get("gpu", 0) == 0
    scheduler.schedule()
    assert scheduler.get(request_id).state is RequestState.PLACED
    assert lost not in scheduler.get(request_id).nodes


def test_cordon_and_drain(scheduler: Scheduler):
    request_id = submit(scheduler, "research", workers=1, gpus=8)
    busy = scheduler.get(request_id).nodes[0]
    other = "h100-1" if busy == "h100-0" else "h100-0"
    scheduler.cordon(other)
    blocked = submit(scheduler, "research", workers=1, gpus=8)
    assert scheduler.get(blocked).state is RequestState.QUEUED
    scheduler.cordon(other, cordoned=False)
    scheduler.schedule()
    assert scheduler.get(blocked).nodes == [other]
    moved = scheduler.drain(busy)
    assert moved == [request_id]
    scheduler.schedule()
    assert scheduler.get(request_id).state is RequestState.PREEMPTED  # no other 8-GPU node is free
    with pytest.raises(UserError, match="head node"):
        scheduler.drain("head-0")
    head_named = SPEC.model_copy(update={"pools": [SPEC.pools[0].model_copy(update={"name": "head-cpu"})]})
    books = Scheduler(head_named, "bestfit")
    books.set_nodes(node_from_ray(n.name, n.resources, n.labels) for n in replica_nodes(head_named.pools[0], 0))
    assert books.cordon("head-cpu-0").cordoned, "a worker of pool head-cpu is no head node"
    with pytest.raises(UserError, match="unknown node 'h100-9'"):
        scheduler.cordon("h100-9")
    with pytest.raises(UserError, match="unknown node 'h100_0' \\(did you mean 'h100-0'\\?\\)"):
        scheduler.drain("h100_0")


def test_a_gang_only_cordoned_nodes_can_hold_waits_for_them_and_never_lands_on_one(scheduler: Scheduler):
    for name in ("cpu-0", "h100-0", "h100-1"):
        scheduler.cordon(name)
    pair = submit(scheduler, "research", workers=2, gpus=4)
    whole = submit(scheduler, "research", workers=1, gpus=8)
    cpu_only = submit(scheduler, "research", workers=1, gpus=0, cpus=20)  # more than a100-0 has
    for request_id, could in ((pair, "h100-0"), (whole, "h100-0"), (cpu_only, "h100-0")):
        status = scheduler.get(request_id)
        assert status.state is RequestState.QUEUED  # accepted: a cordon is not the cluster shrinking
        assert status.reason == (
            f"no uncordoned nodes can hold it, cordoned {could} could (cordoned now: cpu-0, h100-0, h100-1): "
            "it is placed once uncordoned (llmos uncordon NODE)"
        )
    scheduler.cordon("h100-0", cordoned=False)
    scheduler.schedule()
    assert scheduler.get(pair).nodes == ["h100-0", "h100-0"]
    assert scheduler.get(whole).state is RequestState.QUEUED  # h100-1 has room, but is still cordoned
    assert scheduler.get(whole).reason.startswith("no room now")
    scheduler.cordon("h100-1", cordoned=False)
    scheduler.schedule()
    assert scheduler.get(whole).nodes == ["h100-1"]


def test_a_gang_its_typed_quota_leaves_no_gpu_type_for_waits_or_is_rejected_and_says_why(scheduler: Scheduler):
    never = scheduler.get(submit(scheduler, "prod", workers=2, gpus=8))
    assert never.state is RequestState.REJECTED
    assert never.reason == (
        "over the team's typed quota even with nothing else running: asks 16 gpu, gpu:H100 quota 8, "
        "and A100-80G alone cannot hold it"
    )
    on_h100 = submit(scheduler, "prod", workers=1, gpus=8)
    blocked = submit(scheduler, "prod", workers=1, gpus=8)  # the A100 node has only 4 GPUs
    status = scheduler.get(blocked)
    assert status.state is RequestState.QUEUED
    assert status.reason == (
        "over quota: no typed quota left for GPU type H100, and A100-80G alone cannot hold it; "
        "it is placed once the team's use falls or its quota rises"
    )
    scheduler.complete(on_h100)
    scheduler.schedule()
    assert scheduler.get(blocked).nodes[0].startswith("h100")


def test_a_bundle_that_names_no_gpu_type_may_use_any_beside_one_that_names_one(scheduler: Scheduler):
    scheduler.set_nodes([n for n in NODES if n.name != "h100-1"])
    bundles = [Bundle(resources={"CPU": 1, "GPU": 8}, gpu_types=("H100",)), Bundle(resources={"CPU": 1, "GPU": 4})]
    mixed = scheduler.submit(
        SubmitRequest(team="research", gang=GangRequest(name="mixed", bundles=bundles, constraint="spread"))
    )
    scheduler.schedule()
    assert mixed.state is RequestState.PLACED and mixed.nodes == ["h100-0", "a100-0"]


def test_a_spread_gang_may_cross_gpu_types_whose_typed_quotas_each_hold_part_of_it(scheduler: Scheduler):
    scheduler.set_quota("research", {"gpu:H100": 4, "gpu:A100-80G": 4})
    spread_gang = gang("spread", 2, 4).model_copy(update={"constraint": Constraint.SPREAD})
    spread = scheduler.submit(SubmitRequest(team="research", gang=spread_gang))
    scheduler.schedule()
    assert spread.state is RequestState.PLACED
    assert scheduler.usage["research"]["gpu:H100"] == scheduler.usage["research"]["gpu:A100-80G"] == 4
    one_pool = scheduler.get(submit(scheduler, "research", workers=2, gpus=4))  # same_pool: one type holds all 8
    assert one_pool.state is RequestState.REJECTED
    assert one_pool.reason.startswith("every gpu type this request may use has a typed quota smaller than the 8")


@pytest.mark.parametrize("policy", ["bestfit", "fgd", "llmos"])
def test_a_spread_gang_is_placed_within_its_typed_quotas_not_offered_the_same_overfull_placement_again(policy):
    books = Scheduler(SPEC, policy)
    books.set_nodes([*NODES, node("a100-1", "a100", 16, 4, "A100-80G"), node("a100-2", "a100", 16, 4, "A100-80G")])
    books.set_quota("research", {"gpu:A100-80G": 2})
    spread = books.submit(
        SubmitRequest(team="research", gang=gang("spread", 3, 1).model_copy(update={"constraint": Constraint.SPREAD}))
    )
    books.schedule()
    # Each bundle alone fits the A100 quota, all three do not: before, the engine put all three on the three A100
    # nodes (the best fit for 1 GPU), the placement was refused as over quota, and the same one came each time.
    assert spread.state is RequestState.PLACED, spread.reason
    assert len(set(spread.nodes)) == 3
    assert books.usage["research"]["gpu:A100-80G"] <= 2
    assert books.usage["research"].get("gpu:H100", 0) >= 1


def test_a_spread_gang_its_typed_quotas_cannot_hold_together_waits_or_is_rejected_and_says_why(scheduler: Scheduler):
    scheduler.set_nodes([*NODES, node("a100-1", "a100", 16, 4, "A100-80G")])
    scheduler.set_quota("research", {"gpu:A100-80G": 1, "gpu:H100": 2})
    spread_gang = gang("spread", 3, 1).model_copy(update={"constraint": Constraint.SPREAD})
    held = scheduler.submit(SubmitRequest(team="research", gang=gang("on-h100", 1, 1, gpu_types=("H100",))))
    scheduler.schedule()
    assert held.state is RequestState.PLACED
    waiting = scheduler.submit(SubmitRequest(team="research", gang=spread_gang))
    scheduler.schedule()
    assert waiting.state is RequestState.QUEUED
    assert waiting.reason == (
        "over quota: its bundles fit the cluster now, but not together on the GPU types its team's typed quotas "
        "leave room on (gpu:A100-80G 1 left, gpu:H100 1 left); it is placed once the team's use of those types "
        "falls or nodes of them free up"
    )
    scheduler.complete(held.id)
    scheduler.schedule()
    assert waiting.state is RequestState.PLACED
    assert scheduler.usage["research"] == {"cpu": 3, "gpu": 3, "gpu:A100-80G": 1, "gpu:H100": 2}

    scheduler.complete(waiting.id)
    scheduler.set_quota("research", {"gpu:H100": 1})  # with A100-80G's 1: 2 GPUs of the types there are
    never = scheduler.submit(SubmitRequest(team="research", gang=spread_gang.model_copy(update={"name": "never"})))
    assert never.state is RequestState.REJECTED
    assert never.reason == (
        "over the team's typed quota even with nothing else running: asks 3 gpu, and the GPU types its spread "
        "bundles may use hold 2 together (gpu:A100-80G quota 1, gpu:H100 quota 1)"
    )
    # Enough in all, but bundles come whole: one 2-GPU bundle on each type, and the third passes a quota.
    scheduler.set_quota("research", {"gpu:H100": 3, "gpu:A100-80G": 3})
    whole = scheduler.submit(
        SubmitRequest(team="research", gang=gang("whole", 3, 2).model_copy(update={"constraint": Constraint.SPREAD}))
    )
    assert whole.state is RequestState.REJECTED
    assert whole.reason == (
        "over the team's typed quota even with nothing else running: its 3 spread bundles (2, 2, 2 gpu) cannot be "
        "shared out among the GPU types they may use without passing one's quota (gpu:A100-80G quota 3, gpu:H100 "
        "quota 3)"
    )


def test_an_accelerator_the_cluster_has_no_node_type_for_is_refused_as_never_fitting_not_for_quota():
    cpu_only = SPEC.model_copy(update={"pools": [SPEC.pool("cpu")]})
    books = Scheduler(cpu_only, POLICY)
    books.set_nodes([node("cpu-0", "cpu", 8)])
    for resources in ({"CPU": 1, "GPU": 1}, {"CPU": 1, "TPU": 4}):
        request = books.submit(
            SubmitRequest(team="small", gang=GangRequest(name="g", bundles=[Bundle(resources=resources)]))
        )
        books.schedule()
        assert request.state is RequestState.REJECTED
        assert request.reason.startswith("can never fit this cluster: bundles[0]: asks for")


def test_the_queue_lists_by_arrival_filtered_by_team_and_state(scheduler: Scheduler):
    on_h100 = submit(scheduler, "research", workers=1, gpus=8)
    small_placed = submit(scheduler, "small", workers=1, gpus=2)
    over_quota = submit(scheduler, "small", workers=1, gpus=2)
    done = submit(scheduler, "research", workers=1, gpus=1)
    scheduler.complete(done)

    def listed(**filters) -> list[str]:
        return [status.id for status in scheduler.listed(**filters)]

    assert listed() == [on_h100, small_placed, over_quota]
    assert listed(include_finished=True) == [on_h100, small_placed, over_quota, done]
    assert listed(team="small") == [small_placed, over_quota]
    assert listed(states=["queued"]) == [over_quota]
    assert listed(team="research", states=["placed", "finished"]) == [on_h100, done]  # a final state: kept ones too
    with pytest.raises(UserError, match="unknown state 'queud' \\(did you mean 'queued'\\?\\); states: queued, "):
        scheduler.listed(states=["queud"])
    with pytest.raises(UserError, match="unknown team 'reserch' \\(did you mean 'research'\\?\\)"):
        scheduler.listed(team="reserch")


def test_books_of_a_stopped_ray_cluster_end_every_live_request_durably(scheduler: Scheduler, journal):
    placed = submit(scheduler, "research", workers=1, gpus=8)
    rejected = submit(scheduler, "small", workers=1, gpus=4)  # over small's quota of 2 even alone
    queued = submit(scheduler, "research", workers=2, gpus=8)  # no room: h100-0 is taken
    done = submit(scheduler, "research", workers=1, gpus=1)
    scheduler.complete(done)
    scheduler.cordon("cpu-0")
    scheduler.effects.clear()
    assert scheduler.end_with_cluster("gone") == [placed, queued]
    assert scheduler.effects == []  # its groups went with the cluster: nothing to unbind
    scheduler.write_journal()
    restored = Scheduler(SPEC, POLICY)
    restored.restore(journal)
    for books in (scheduler, restored):
        assert [books.get(i).state for i in (placed, queued, done)] == [
            RequestState.FAILED,
            RequestState.FAILED,
            RequestState.FINISHED,
        ]
        assert books.get(placed).reason == "gone" and books.usage["research"].get("gpu", 0) == 0
        assert not any(control.cordoned for control in books.controls.values())
    assert scheduler.get(rejected).state is RequestState.REJECTED


def test_quota_cannot_drop_below_current_use_and_bad_input_changes_nothing(scheduler: Scheduler):
    submit(scheduler, "research", workers=2, gpus=4)
    before = scheduler.team_usage("research")
    with pytest.raises(UserError, match="uses 8 gpu now, more than the new quota 4"):
        scheduler.set_quota("research", {"gpu": 4})
    with pytest.raises(UserError, match="quota key 'gpus' is not a resource of this cluster \\(did you mean 'gpu'"):
        scheduler.set_quota("research", {"gpus": 20})
    for amount in (float("nan"), float("inf")):  # either would compare as no limit
        with pytest.raises(UserError, match=f"quota gpu is {amount}; give a finite number, 0 or more"):
            scheduler.set_quota("research", {"gpu": amount})
    with pytest.raises(UserError, match="unknown team 'nobody'"):
        scheduler.set_quota("nobody", {"gpu": 1})
    with pytest.raises(UserError, match="unknown team 'nobody'; teams: "):
        scheduler.submit(SubmitRequest(team="nobody", gang=gang("x", 1, 1)))
    with pytest.raises(UserError, match="unknown team 'reserch' \\(did you mean 'research'\\?\\)"):
        scheduler.submit(SubmitRequest(team="reserch", gang=gang("x", 1, 1)))
    with pytest.raises(UserError, match="unknown pool 'tpu'"):
        scheduler.submit(SubmitRequest(team="research", gang=gang("x", 1, 0, label_selector={"llmos.io/pool": "tpu"})))
    with pytest.raises(UserError, match="no request 'research-99999'"):
        scheduler.cancel("research-99999")
    assert scheduler.team_usage("research") == before
    assert scheduler.set_quota("research", {"gpu": 32}).quota["gpu"] == 32


def test_books_restored_from_the_journal_match(scheduler: Scheduler, journal):
    submit(scheduler, "research", workers=2, gpus=4)
    submit(scheduler, "prod", workers=1, gpus=8)
    submit(scheduler, "small", workers=1, gpus=2)
    submit(scheduler, "small", workers=1, gpus=2)
    scheduler.set_quota("research", {"cpu": 32})
    scheduler.cordon("cpu-0")
    scheduler.write_journal()
    restored = Scheduler(SPEC, POLICY)
    restored.restore(journal)
    restored.set_nodes(NODES)
    assert restored.requests == scheduler.requests
    assert restored.usage == scheduler.usage
    assert restored.quotas == scheduler.quotas
    assert restored.controls == scheduler.controls
    assert list(restored.decisions) == list(scheduler.decisions)
    assert restored.effects == []  # restoring binds nothing; the controller checks what Ray has
    restored.schedule()
    assert restored.get("small-00004").state is RequestState.QUEUED


def test_fractional_gpus_share_one_device_and_never_oversubscribe(scheduler: Scheduler):
    ids = [submit(scheduler, "research", workers=1, gpus=0.46, cpus=0.5) for _ in range(45)]
    placed = [scheduler.get(r) for r in ids if scheduler.get(r).state is RequestState.PLACED]
    share: dict[tuple[str, int], float] = {}
    for status in placed:
        (bundle,) = status.bundles
        assert len(bundle.gpu_devices) == 1
        key = (bundle.node, bundle.gpu_devices[0])
        share[key] = share.get(key, 0) + bundle.gpu_share
    assert all(total <= 1.0 + 1e-9 for total in share.values())
    # Two 0.46 shares fit per device, so 20 GPUs hold 40 although 45 x 0.46 = 20.7 GPUs is within quota:
    # summing a node's free GPU (as Ray does) would have admitted more than the devices can hold.
    assert len(placed) == 40
    assert scheduler.get(ids[-1]).state is RequestState.QUEUED
    assert scheduler.usage["research"]["gpu"] == pytest.approx(40 * 0.46)


def test_accepted_work_is_kept_when_the_nodes_it_needs_leave(scheduler: Scheduler):
    request_id = submit(scheduler, "research", workers=1, gpus=8)
    scheduler.set_nodes([n for n in NODES if not n.name.startswith("h100")])
    scheduler.schedule()
    status = scheduler.get(request_id)
    assert status.state is RequestState.PREEMPTED  # waits for 8-GPU nodes to come back, is not rejected
    assert "asks for 8 GPUs" in status.reason
    scheduler.set_nodes(NODES)
    scheduler.schedule()
    assert scheduler.get(request_id).state is RequestState.PLACED


def test_books_only_request_is_placed_without_a_placement_group(scheduler: Scheduler):
    status = scheduler.submit(
        SubmitRequest(
            team="research", gang=gang("ray-train", 2, 4), kind=WorkloadKind.TRAINING, bind_placement_group=False
        )
    )
    scheduler.schedule()
    placed = scheduler.get(status.id)
    assert placed.state is RequestState.PLACED and placed.placement_group is None
    assert scheduler.effects == []
    assert scheduler.usage["research"]["gpu"] == 8  # booked all the same
    scheduler.complete(status.id)
    assert scheduler.effects == [] and scheduler.usage["research"] == {}


def test_each_changed_request_is_journaled_once_per_commit_in_its_latest_state(scheduler: Scheduler, journal):
    status = scheduler.submit(SubmitRequest(team="research", gang=gang("job", 2, 1)))
    scheduler.schedule()  # submitted, then placed: two changes of one request
    assert not [entry for entry in journal if "request" in entry]  # nothing until the caller commits
    assert [entry["decision"]["action"] for entry in journal] == ["admitted", "placed"]
    assert scheduler.write_journal() == 1
    written = [entry["request"] for entry in journal if "request" in entry]
    assert len(written) == 1
    assert written[0]["state"] == "placed" and written[0]["placement_group"] == f"llmos-{status.id}"
    assert scheduler.write_journal() == 0  # nothing changed since


def test_room_a_preemption_frees_goes_to_the_waiting_in_order_not_to_the_next_new_request():
    spec = ClusterSpec.model_validate(
        {
            "pools": [SPEC.pools[1].model_copy(update={"nodes": SPEC.pools[1].nodes.model_copy(update={"max": 1})})],
            "teams": [{"name": name} for name in ("a", "b", "c")],
        }
    )
    books = Scheduler(spec, POLICY)
    books.set_nodes([node for node in NODES if node.name == "h100-0"])

    def request(team: str, gpus: int, priority: str) -> SubmitRequest:
        return SubmitRequest(team=team, priority=priority, gang=gang(f"{team}-{priority}", 1, gpus))

    whole_node = books.submit(request("a", 8, "normal"))
    books.schedule()
    waiting = books.submit(request("b", 4, "normal"))  # no room: waits its turn
    books.schedule()
    # One batch: an urgent gang preempts the whole-node holder and uses half the node; the other half is for the
    # request that waited, not for the batch's next gang, of the same priority but later.
    urgent, later = books.submit_many([request("c", 4, "high"), request("c", 4, "normal")])
    books.schedule()
    assert urgent.state is RequestState.PLACED and whole_node.state is RequestState.PREEMPTED
    assert waiting.state is RequestState.PLACED and later.state is RequestState.QUEUED


def test_over_its_quota_a_request_that_lacked_room_to_preempt_its_own_is_tried_when_another_team_frees_it():
    spec = ClusterSpec.model_validate(
        {"pools": [SPEC.pools[1]], "teams": [{"name": "team", "quota": {"gpu": 8}}, {"name": "other"}]}
    )
    books = Scheduler(spec, POLICY)
    books.set_nodes([node for node in NODES if node.pool == "h100"])

    def run(team: str, name: str, gpus: int, priority: str, **kwargs) -> RequestStatus:
        status = books.submit(SubmitRequest(team=team, priority=priority, gang=gang(name, 1, gpus), **kwargs))
        books.schedule()
        return status

    # Each H100 node: 4 GPUs of the other team's, 4 of the team's low-priority work.
    other, low = run("other", "x", 4, "high", preemptible=False), run("team", "l1", 4, "low")
    run("other", "y", 4, "high", preemptible=False), run("team", "l2", 4, "low")
    whole_node = run("team", "h", 8, "normal")  # over the team's quota of 8; preempting its own frees no whole node
    assert whole_node.state is RequestState.QUEUED and whole_node.reason.startswith("over quota")
    books.complete(other.id)  # the other team frees half a node: with the team's low work there, a whole one
    books.schedule()
    assert whole_node.state is RequestState.PLACED and low.state is RequestState.PREEMPTED


def test_submit_many_is_all_or_nothing_and_each_gang_keeps_to_its_quota(scheduler: Scheduler, journal):
    bad = [
        SubmitRequest(team="small", gang=gang("a", 1, 1)),
        SubmitRequest(team="small", gang=gang("b", 1, 1, label_selector={"llmos.io/pool": "tpu"})),
    ]
    with pytest.raises(UserError, match=r"requests\[1\]: .*unknown pool 'tpu'.*nothing was submitted"):
        scheduler.submit_many(bad)
    assert scheduler.requests == {} and journal == [] and scheduler.write_journal() == 0
    # Three 1-GPU gangs and a 2-bundle gang for a team with 2 GPUs of quota, in one batch.
    batch = [SubmitRequest(team="small", gang=gang(f"one-{i}", 1, 1)) for i in range(3)]
    statuses = scheduler.submit_many(
        [*batch, SubmitRequest(team="small", gang=gang("pair", 2, 1))], ["k0", "k1", "k2", "k3"]
    )
    scheduler.schedule()
    states = [scheduler.get(status.id).state for status in statuses]
    assert states == [RequestState.PLACED, RequestState.PLACED, RequestState.QUEUED, RequestState.QUEUED]
    assert scheduler.usage["small"]["gpu"] == 2
    for status in statuses[2:]:  # waiting gangs hold nothing: whole or not at all
        assert scheduler.get(status.id).bundles == [] and "over quota" in scheduler.get(status.id).reason
    assert [status.idempotency_key for status in statuses] == ["k0", "k1", "k2", "k3"]
    assert [effect.request_id for effect in scheduler.effects] == [status.id for status in statuses[:2]]
    # One journal entry per request, and the books restored from it match.
    assert scheduler.write_journal() == 4
    restored = Scheduler(SPEC, POLICY)
    restored.restore(journal)
    assert restored.requests == scheduler.requests and restored.usage == scheduler.usage
    with pytest.raises(UserError, match="2 idempotency keys for 1 requests"):
        scheduler.submit_many(batch[:1], ["a", "b"])


def test_scheduling_a_few_binds_at_a_time_places_as_one_pass_does():
    def books() -> Scheduler:
        fresh = Scheduler(SPEC, POLICY, clock=lambda: 0.0)
        fresh.set_nodes(NODES)
        requests = [
            SubmitRequest(team=team, gang=gang(f"{team}-{i}", workers, gpus), priority=priority)
            for i, (team, workers, gpus, priority) in enumerate(
                [("research", 2, 2, None), ("small", 1, 1, None), ("prod", 1, 4, "high"), ("small", 1, 1, None)]
                + [("research", 1, 1, None)] * 4
                + [("small", 1, 1, None), ("prod", 4, 2, "high")]
            )
        ]
        fresh.submit_many(requests)
        return fresh

    one_pass, stepwise = books(), books()
    assert one_pass.schedule() is False
    steps = 0
    while stepwise.schedule(max_binds=3):
        assert sum(isinstance(effect, Bind) for effect in stepwise.effects) == 3  # the caller binds these
        stepwise.effects.clear()
        steps += 1
    assert steps == 2
    assert stepwise.requests == one_pass.requests
    assert list(stepwise.decisions) == list(one_pass.decisions)
    assert stepwise.usage == one_pass.usage


def test_finished_requests_leave_the_lists_scheduling_walks_and_stay_readable(scheduler: Scheduler, journal):
    def scanned(books: Scheduler) -> tuple[list[str], list[str]]:
        statuses = list(books.requests.values())
        waiting = sorted((s for s in statuses if s.state.waiting), key=lambda s: (-s.priority_value, s.submitted_seq))
        return [s.id for s in waiting], [s.id for s in statuses if s.state.holding]

    def walked(books: Scheduler) -> tuple[list[str], list[str]]:
        return [s.id for s in books.waiting()], [s.id for s in books.holders()]

    done = submit(scheduler, "research", workers=1, gpus=1)
    scheduler.complete(done)
    running = submit(scheduler, "research", workers=2, gpus=4)
    scheduler.mark_running(running)
    cancelled = submit(scheduler, "research", workers=2, gpus=8)  # waits for a whole second H100 node
    assert scheduler.get(cancelled).state is RequestState.QUEUED
    scheduler.cancel(cancelled)
    moved = submit(scheduler, "small", workers=1, gpus=2)
    submit(scheduler, "small", workers=1, gpus=2)  # over small's quota: waits
    submit(scheduler, "research", workers=1, gpus=8)  # the other H100 node
    urgent = submit(scheduler, "prod", workers=1, gpus=8)  # preempts one of research's gangs for a whole node
    assert scheduler.get(urgent).state is RequestState.PLACED
    lost = scheduler.get(moved).nodes[0]
    scheduler.set_nodes([n for n in NODES if n.name != lost])  # requeues `moved`
    assert scheduler.get(moved).state is RequestState.PREEMPTED
    scheduler.schedule()

    states = {status.state for status in scheduler.requests.values()}
    assert {RequestState.FINISHED, RequestState.CANCELLED, RequestState.PREEMPTED, RequestState.PLACED} <= states
    assert scheduler.get(done).state is RequestState.FINISHED  # still answers `status`
    assert walked(scheduler) == scanned(scheduler)
    assert done not in walked(scheduler)[0] + walked(scheduler)[1]

    scheduler.write_journal()
    restored = Scheduler(SPEC, POLICY)
    restored.restore(journal)
    assert walked(restored) == scanned(restored) == scanned(scheduler)


def test_a_diverged_loss_a_workload_reports_survives_the_journal(scheduler: Scheduler, journal):
    request_id = submit(scheduler, "research", workers=1, gpus=1)
    scheduler.report(request_id, {"step": 7, "loss": float("nan"), "grad_norm": float("inf")})
    scheduler.write_journal()
    restored = Scheduler(SPEC, POLICY)
    restored.restore(journal)
    details = restored.get(request_id).details
    assert details["step"] == 7 and math.isnan(details["loss"]) and details["grad_norm"] == float("inf")


def test_per_node_group_bundles_share_a_ray_bundle_per_node_but_not_a_fractional_gpu(scheduler: Scheduler):
    on_h100 = {"llmos.io/pool": "h100"}
    mixed = GangRequest(
        name="dense",
        constraint="same_node",
        bundles=[Bundle(resources={"CPU": 1, "GPU": 1}, label_selector=on_h100)] * 3
        + [Bundle(resources={"CPU": 1, "GPU": 0.5}, label_selector=on_h100)] * 2
        + [Bundle(resources={"CPU": 2}, label_selector=on_h100)],
    )
    spread = GangRequest(name="spread", constraint="spread", bundles=[Bundle(resources={"CPU": 1})] * 3)
    per_node = [
        scheduler.submit(SubmitRequest(team="research", gang=g, group_bundles="per_node")) for g in (mixed, spread)
    ]
    as_asked = scheduler.submit(SubmitRequest(team="research", gang=mixed))
    scheduler.schedule()
    dense, spread_out, default = (scheduler.get(status.id) for status in (*per_node, as_asked))
    assert len({bundle.node for bundle in dense.bundles}) == 1
    # The whole GPUs and the CPUs share the node's Ray bundle; each 0.5 GPU has one of its own.
    assert [bundle.group_bundle_index for bundle in dense.bundles] == [0, 0, 0, 1, 2, 0]
    assert [bundle.group_bundle_index for bundle in spread_out.bundles] == [0, 1, 2]
    assert [bundle.group_bundle_index for bundle in default.bundles] == list(range(6))
    # A journal written before group bundles existed restores each bundle as its own Ray bundle.
    old_entry = default.model_dump(mode="json")
    for bundle in old_entry["bundles"]:
        del bundle["group_bundle_index"]
    restored = Scheduler(SPEC, POLICY)
    restored.restore([{"request": old_entry}])
    assert [bundle.group_bundle_index for bundle in restored.get(default.id).bundles] == list(range(6))


def test_the_oldest_finished_requests_are_forgotten_and_stay_forgotten_after_a_restore(journal):
    spec = SPEC.model_copy(update={"controller": SPEC.controller.model_copy(update={"finished_requests_kept": 3})})
    books = Scheduler(spec, POLICY, journal=lambda line: journal.append(json.loads(line)))
    books.set_nodes(NODES)

    def job(key: str) -> str:
        return books.submit(SubmitRequest(team="research", gang=gang("job", 1, 1)), idempotency_key=key).id

    ids = [job(f"key-{i}") for i in range(6)]
    live = books.submit(SubmitRequest(team="research", gang=gang("live", 1, 8))).id
    books.schedule()
    waiting = books.submit(SubmitRequest(team="research", gang=gang("waits", 2, 6))).id  # 14 + 12 GPUs > quota 24
    books.schedule()
    assert books.get(waiting).state is RequestState.QUEUED
    # Finished out of submission order: what is kept is the last to finish, not the last submitted.
    for request_id in [ids[5], ids[0], ids[3], ids[1], ids[4], ids[2]]:
        books.complete(request_id)
    books.write_journal()

    kept = [ids[1], ids[4], ids[2]]
    finished = [s.id for s in books.requests.values() if s.state.final]
    assert sorted(finished) == sorted(kept)
    assert books.get(live).state is RequestState.PLACED
    assert books.get(waiting).state is RequestState.QUEUED  # submitted before every finish: live, so kept
    assert all(books.get(request_id).finished_at is not None for request_id in kept)
    with pytest.raises(UserError, match=r"nor among the last 3 finished requests the controller keeps"):
        books.get(ids[0])
    assert set(books.idempotency_keys) == {"key-1", "key-4", "key-2"}
    # The decision log outlives a forgotten request; its team is read from the id, as `decisions` does.
    assert {team_of(d.request_id) for d in books.decisions if d.request_id == ids[0]} == {"research"}
    assert team_of("ml-research-00012") == "ml-research"

    restored = Scheduler(spec, POLICY)
    restored.restore(journal)  # the journal still holds every line; the restore forgets the same ones
    assert restored.requests == books.requests
    assert restored.idempotency_keys == books.idempotency_keys
    assert [s.id for s in restored.waiting()] == [s.id for s in books.waiting()]
    restored.complete(live)
    restored.write_journal()
    assert ids[1] not in restored.requests  # the oldest kept gives way to the newest finish
    assert {json.loads(line)["request"]["id"] for line in restored.checkpoint() if '"request"' in line} == set(
        restored.requests
    )


# -- pools an autoscaler grows (KubeRay) ---------------------------------------------------------------


def growing(live: list[NodeSnapshot], spec: ClusterSpec = SPEC) -> Scheduler:
    books = Scheduler(spec, POLICY, scale_up=True)
    books.set_nodes(live)
    return books


def test_a_gang_that_fits_only_on_nodes_to_come_waits_for_them_and_lands_when_they_join():
    live = [n for n in NODES if n.name != "h100-1"]  # h100 may grow to 2 nodes
    fixed = Scheduler(SPEC, POLICY)
    fixed.set_nodes(live)
    assert fixed.get(submit(fixed, "research", workers=2, gpus=8)).state is RequestState.REJECTED  # no autoscaler

    books = growing(live)
    request_id = submit(books, "research", workers=2, gpus=8)
    status = books.get(request_id)
    assert status.state is RequestState.QUEUED
    assert status.reason == "waiting for the cluster to scale up: 1 more node of pool h100"
    assert books.scale_up_demand() == {"h100": 2}  # whole nodes, the live one included
    assert books.effects == []

    books.set_nodes(NODES)  # the autoscaler's node joins
    books.schedule()
    assert books.get(request_id).state is RequestState.PLACED
    assert sorted(books.get(request_id).nodes) == ["h100-0", "h100-1"]
    assert books.scale_up_demand() == {}


def test_a_spread_gang_no_distinct_nodes_hold_within_its_typed_quotas_is_rejected_at_once(scheduler: Scheduler):
    # Three 4-GPU bundles on three distinct nodes: the cluster's GPU nodes are two H100s and one A100, and a
    # quota of 6 H100 GPUs holds one bundle there, so the A100 node would have to take two.
    scheduler.set_quota("research", {"gpu:H100": 6})
    spread_gang = gang("spread", 3, 4).model_copy(update={"constraint": Constraint.SPREAD})
    never = scheduler.submit(SubmitRequest(team="research", gang=spread_gang))
    scheduler.schedule()
    assert never.state is RequestState.REJECTED
    assert never.reason == (
        "over the team's typed quota even with nothing else running: no 3 distinct nodes of this cluster hold its "
        "bundles within gpu:H100 quota 6"
    )
    # With room for two bundles on H100, the same gang fits.
    scheduler.set_quota("research", {"gpu:H100": 8})
    fits = scheduler.submit(SubmitRequest(team="research", gang=spread_gang.model_copy(update={"name": "fits"})))
    scheduler.schedule()
    assert fits.state is RequestState.PLACED


def test_a_spread_gang_waits_for_nodes_of_the_types_its_typed_quotas_leave_room_on():
    data = SPEC.model_dump(mode="json")
    data["pools"][2]["nodes"] = {"min": 0, "max": 3}
    more_a100 = ClusterSpec.model_validate(data)
    books = growing([NODES[1], NODES[3]], more_a100)  # h100-0 and a100-0 up; h100 may grow to 2, a100 to 3
    books.set_quota("research", {"gpu:A100-80G": 4})
    spread_gang = gang("spread", 3, 4).model_copy(update={"constraint": Constraint.SPREAD})
    spread = books.submit(SubmitRequest(team="research", gang=spread_gang))
    books.schedule()
    # Two more A100 nodes would hold it best, but its quota holds one bundle on A100: it needs another H100 node.
    assert spread.state is RequestState.QUEUED
    assert spread.reason == "waiting for the cluster to scale up: 1 more node of pool h100"
    assert books.scale_up_demand() == {"h100": 2}
    books.set_nodes([NODES[1], NODES[2], NODES[3]])  # the autoscaler's node joins
    books.schedule()
    assert spread.state is RequestState.PLACED and sorted(spread.nodes) == ["a100-0", "h100-0", "h100-1"]


def test_gangs_waiting_for_nodes_are_summed_and_a_cancelled_one_no_longer_counts():
    books = growing([NODES[0], NODES[3]])  # no H100 node up yet: the pool may grow to 2
    first = submit(books, "research", workers=1, gpus=8)
    second = submit(books, "research", workers=1, gpus=8)
    assert books.scale_up_demand() == {"h100": 2}
    books.cancel(second)
    assert books.scale_up_demand() == {"h100": 1}
    books.cancel(first)
    assert books.scale_up_demand() == {}


def test_at_its_largest_the_cluster_still_refuses_what_never_fits():
    books = growing([n for n in NODES if n.name != "h100-1"])
    status = books.get(submit(books, "research", workers=3, gpus=8))
    assert status.state is RequestState.REJECTED
    assert status.reason.startswith("can never fit this cluster at its largest (every pool at its max): ")
    assert books.scale_up_demand() == {}


def test_nodes_to_come_are_waited_for_before_lower_priorities_are_preempted():
    books = growing([n for n in NODES if n.name != "h100-1"])
    research = submit(books, "research", workers=1, gpus=8)  # fills the one H100 node up
    urgent = submit(books, "prod", workers=1, gpus=8)
    assert books.get(research).state is RequestState.PLACED and books.get(research).preemptions == 0
    assert books.get(urgent).reason == "waiting for the cluster to scale up: 1 more node of pool h100"
    assert books.scale_up_demand() == {"h100": 2}


TPU_SPEC = {
    "pools": [
        {"name": "cpu", "accelerator": "cpu", "node": {"cpus": 8, "memory": "32Gi"}, "nodes": {"max": 1}},
        {
            "name": "tpu",
            "accelerator": "tpu",
            "accelerator_type": "v5p",
            "node": {"cpus": 208, "memory": "448Gi"},
            "tpu": {"topology": "2x2x2", "chips_per_host": 4, "hosts_per_slice": 2},
            "slices": {"max": 1},
        },
    ],
}


def test_a_tpu_pool_grows_by_whole_slices():
    one_tpu_pool = {**TPU_SPEC["pools"][1], "slices": {"max": 3}}
    spec = ClusterSpec.model_validate({"pools": [one_tpu_pool], "teams": [{"name": "research", "quota": {"tpu": 64}}]})
    books = growing(first_nodes(spec, "tpu"), spec)
    slice_gang = GangRequest(
        name="slice", constraint="same_tpu_slice", bundles=[Bundle(resources={"CPU": 1, "TPU": 4})] * 2
    )
    ids = [books.submit(SubmitRequest(team="research", gang=slice_gang)).id for _ in range(2)]
    books.schedule()
    placed, waiting = (books.get(request_id) for request_id in ids)
    assert placed.state is RequestState.PLACED
    assert waiting.reason == "waiting for the cluster to scale up: 1 more slice of pool tpu"
    assert books.scale_up_demand() == {"tpu": 4}  # the live slice's two hosts and a new slice's two
    one_host = GangRequest(name="host", bundles=[Bundle(resources={"CPU": 1, "TPU": 4})])
    books.submit(SubmitRequest(team="research", gang=one_host))
    books.schedule()
    assert books.scale_up_demand() == {"tpu": 6}  # half a slice is not to be had: another whole one


def test_with_no_worker_node_up_yet_gangs_wait_for_the_first_ones():
    books = growing([])  # every pool scaled to zero
    request_id = submit(books, "research", workers=1, gpus=8)
    assert books.get(request_id).reason == "waiting for the cluster to scale up: 1 more node of pool h100"
    never = submit(books, "research", workers=1, gpus=12)
    assert books.get(never).state is RequestState.REJECTED
    assert books.scale_up_demand() == {"h100": 1}
    books.set_nodes([NODES[1]])
    books.schedule()
    assert books.get(request_id).nodes == ["h100-0"] and books.scale_up_demand() == {}

    fixed = Scheduler(SPEC, POLICY)  # no autoscaler: nothing is tried until a node is started
    fixed.set_nodes([])
    assert fixed.get(submit(fixed, "research", workers=1, gpus=8)).state is RequestState.QUEUED


def test_each_bundle_records_rays_id_of_its_node_for_workloads_to_pin_to():
    books = Scheduler(SPEC, POLICY)
    books.set_nodes(with_ray_id("1"))
    status = books.get(submit(books, "research", workers=2, gpus=8))
    assert [bundle.node_id for bundle in status.bundles] == [f"{node}-1" for node in status.nodes]
    assert status.bundles[0].pin == {"ray.io/node-id": f"{status.nodes[0]}-1"}


def test_a_gang_that_no_longer_waits_for_nodes_stops_asking_for_them():
    books = growing([n for n in NODES if n.name != "h100-1"])
    submit(books, "research", workers=1, gpus=8)  # fills the one H100 node
    waiting = submit(books, "research", workers=1, gpus=8)
    other = submit(books, "prod", workers=1, gpus=4)
    assert books.scale_up_demand() == {"h100": 2}
    books.set_quota("research", {"gpu": 8})  # now over its team's quota: no node would let it run
    books.complete(other)  # frees capacity, so what waits is tried again
    books.schedule()
    assert books.get(waiting).reason.startswith("over quota")
    assert books.scale_up_demand() == {}


def first_nodes(spec: ClusterSpec, *pools: str) -> list[NodeSnapshot]:
    """The nodes of each pool's first replica (a TPU pool's first slice), as the controller reads them from Ray."""
    hosts = [host for pool in pools for host in replica_nodes(spec.pool(pool), 0)]
    return [node_from_ray(host.name, host.resources, host.labels) for host in hosts]


def tpu_books(teams: list[dict]) -> Scheduler:
    spec = ClusterSpec.model_validate({**TPU_SPEC, "teams": teams})
    books = Scheduler(spec, POLICY)
    books.set_nodes([node("cpu-0", "cpu", 8), *first_nodes(spec, "tpu")])
    return books


def slice_gang(chips_per_bundle: int) -> GangRequest:
    bundle = Bundle(resources={"CPU": 1, "TPU": chips_per_bundle})
    return GangRequest(name="slice", constraint="same_tpu_slice", bundles=[bundle] * 2)


def test_a_tpu_slice_gang_is_charged_and_admitted_by_the_whole_hosts_it_holds():
    books = tpu_books([{"name": "small", "quota": {"tpu": 4}}, {"name": "big", "quota": {"tpu": 8}}])
    # Two bundles of 2 chips ask 4 chips, but each holds a whole 4-chip host: 8 chips.
    small = books.submit(SubmitRequest(team="small", gang=slice_gang(2)))
    assert small.state is RequestState.REJECTED
    assert "asks 8 tpu, quota 4 (a same_tpu_slice gang holds one whole TPU host, 4 chips, per bundle)" in small.reason
    big = books.submit(SubmitRequest(team="big", gang=slice_gang(2)))
    books.schedule()
    assert big.state is RequestState.PLACED and books.usage["big"]["tpu"] == 8


def test_a_typed_tpu_quota_too_small_for_the_gang_alone_is_refused_at_once():
    books = tpu_books(
        [
            {"name": "lo", "priority": "low"},
            {"name": "hi", "priority": "high", "quota": {"tpu:v5p": 8}},
            {"name": "tiny", "priority": "high", "quota": {"tpu:v5p": 4}},
        ]
    )
    held = books.submit(SubmitRequest(team="lo", gang=slice_gang(4)))
    books.schedule()
    never = books.submit(SubmitRequest(team="tiny", gang=slice_gang(4)))
    books.schedule()
    assert never.state is RequestState.REJECTED
    assert never.reason == (
        "over the team's quota on every TPU pool it may use, even with nothing else running: "
        "pool tpu: tpu:v5p 0 used + 8 asked > quota 4"
    )
    assert held.state is RequestState.PLACED and held.preemptions == 0
    within = books.submit(SubmitRequest(team="hi", gang=slice_gang(4)))
    books.schedule()
    assert within.state is RequestState.PLACED and held.state is RequestState.PREEMPTED


def test_preemption_frees_only_room_the_request_may_use_within_its_typed_quota():
    v4 = {
        "name": "tpu-v4",
        "accelerator": "tpu",
        "accelerator_type": "v4",
        "node": {"cpus": 240, "memory": "400Gi"},
        "tpu": {"topology": "2x2x1", "chips_per_host": 4, "hosts_per_slice": 1},
        "slices": {"max": 1},
    }
    teams = [{"name": "lo", "priority": "low"}, {"name": "hi", "priority": "high", "quota": {"tpu:v4": 0}}]
    spec = ClusterSpec.model_validate({**TPU_SPEC, "pools": [*TPU_SPEC["pools"], v4], "teams": teams})
    books = Scheduler(spec, POLICY)
    books.set_nodes(first_nodes(spec, "tpu", "tpu-v4"))
    on_v5p = books.submit(SubmitRequest(team="lo", gang=slice_gang(4)))
    books.schedule()
    one_host = GangRequest(name="host", constraint="same_tpu_slice", bundles=[Bundle(resources={"TPU": 4})])
    on_v4 = books.submit(SubmitRequest(team="lo", gang=one_host))
    books.schedule()
    assert on_v4.nodes == ["tpu-v4-s0-h0"]
    urgent = books.submit(SubmitRequest(team="hi", gang=one_host))
    books.schedule()
    # The v4 gang, placed last, is the cheaper victim, but hi may not use v4 chips: taking it off would free
    # nothing hi can use.
    assert urgent.state is RequestState.PLACED and urgent.nodes[0].startswith("tpu-s0-")
    assert on_v4.state is RequestState.PLACED and on_v4.preemptions == 0
    assert on_v5p.state is RequestState.PREEMPTED


def small_and_big_tpu_hosts(quota: dict[str, float]) -> Scheduler:
    """One-host slices of 4 chips (pool v4) and of 8 chips (pool big), for a team `t` of `quota`."""
    pools = [
        {
            "name": "v4",
            "accelerator": "tpu",
            "accelerator_type": "v4",
            "node": {"cpus": 240, "memory": "400Gi"},
            "tpu": {"topology": "2x2x1", "chips_per_host": 4, "hosts_per_slice": 1},
            "slices": {"max": 1},
        },
        {
            "name": "big",
            "accelerator": "tpu",
            "accelerator_type": "v5e",
            "node": {"cpus": 224, "memory": "384Gi"},
            "tpu": {"topology": "2x4", "chips_per_host": 8, "hosts_per_slice": 1},
            "slices": {"max": 1},
        },
    ]
    spec = ClusterSpec.model_validate({"pools": pools, "teams": [{"name": "t", "quota": quota}]})
    books = Scheduler(spec, POLICY)
    books.set_nodes(first_nodes(spec, *(pool["name"] for pool in pools)))
    return books


def one_tpu_host(**bundle) -> GangRequest:
    return GangRequest(name="host", constraint="same_tpu_slice", bundles=[Bundle(resources={"TPU": 4}, **bundle)])


def test_a_tpu_slice_gang_lands_on_hosts_whose_chips_its_quota_can_hold():
    books = small_and_big_tpu_hosts({"tpu": 4})
    fits_quota = books.submit(SubmitRequest(team="t", gang=one_tpu_host()))
    books.schedule()
    assert fits_quota.state is RequestState.PLACED and fits_quota.nodes == ["v4-s0-h0"]  # not the 8-chip host
    assert books.usage["t"]["tpu"] == 4


def test_a_tpu_slice_gang_is_admitted_by_the_smallest_host_it_may_land_on_not_the_cluster_smallest():
    books = small_and_big_tpu_hosts({"tpu": 4})
    never = books.submit(SubmitRequest(team="t", gang=one_tpu_host(label_selector={"llmos.io/pool": "big"})))
    assert never.state is RequestState.REJECTED
    assert never.reason == (
        "over the team's quota even with nothing else running: asks 8 tpu, quota 4 "
        "(a same_tpu_slice gang holds one whole TPU host, 8 chips, per bundle)"
    )


def test_fractional_gpus_summed_as_floats_fill_a_typed_quota_exactly(scheduler: Scheduler):
    scheduler.set_quota("small", {"gpu:H100": 0.3})
    shares = [
        scheduler.submit(SubmitRequest(team="small", gang=gang("share", 1, 0.1, gpu_types=("H100",)))) for _ in range(3)
    ]
    scheduler.schedule()
    assert [share.state for share in shares] == [RequestState.PLACED] * 3  # 0.1 + 0.1 + 0.1 > 0.3 in floats


def test_a_gang_held_back_by_typed_quota_is_placed_when_a_node_of_a_type_left_to_it_joins(scheduler: Scheduler):
    scheduler.set_nodes([n for n in NODES if n.name != "a100-0"])  # the A100 node is down
    on_h100 = submit(scheduler, "prod", workers=1, gpus=8)  # prod's gpu:H100 quota of 8 is used up
    held = scheduler.get(submit(scheduler, "prod", workers=1, gpus=4))
    assert held.reason.startswith("over quota: no typed quota left for GPU type H100, and A100-80G alone")
    scheduler.set_nodes(NODES)
    scheduler.schedule()
    assert held.state is RequestState.PLACED and held.nodes == ["a100-0"]
    assert scheduler.get(on_h100).state is RequestState.PLACED


def test_a_quota_change_while_no_worker_node_is_up_keeps_the_gang_waiting():
    books = growing([])
    waiting = books.get(submit(books, "prod", workers=1, gpus=8))
    assert waiting.reason == "waiting for the cluster to scale up: 1 more node of pool h100"
    books.set_quota("prod", {"gpu:H100": 4})  # no type left that could hold it
    books.schedule()
    assert waiting.state is RequestState.QUEUED and waiting.reason == "no worker node is up"


def test_a_gpu_type_the_cluster_does_not_have_is_refused_naming_the_types_it_has(scheduler: Scheduler):
    typo = GangRequest(name="typo", bundles=[Bundle(resources={"GPU": 1}, gpu_types=("H100", "h100"))])
    with pytest.raises(
        UserError,
        match=r"gang.bundles\[0\].gpu_types: 'h100' is not a GPU type of this cluster "
        r"\(did you mean 'H100'\?\); GPU types: A100-80G, H100",
    ):
        scheduler.submit(SubmitRequest(team="research", gang=typo))
    assert scheduler.requests == {}


def test_requests_of_a_team_taken_out_of_the_spec_end_when_the_books_are_restored(scheduler: Scheduler, journal):
    placed = submit(scheduler, "small", workers=1, gpus=2)
    waiting = submit(scheduler, "small", workers=1, gpus=1)  # over small's quota of 2
    scheduler.set_quota("small", {"cpu": 8})  # journaled for a team the restored spec has not
    kept = submit(scheduler, "research", workers=1, gpus=1)
    scheduler.write_journal()
    without_small = SPEC.model_copy(update={"teams": [team for team in SPEC.teams if team.name != "small"]})
    restored = Scheduler(without_small, POLICY)
    restored.restore(journal)
    for request_id in (placed, waiting):
        assert restored.get(request_id).state is RequestState.FAILED
        assert restored.get(request_id).reason == "its team 'small' is no longer in the ClusterSpec"
    assert [effect.request_id for effect in restored.effects if isinstance(effect, Unbind)] == [placed]
    assert set(restored.usage) == set(restored.quotas) == {"research", "prod"}
    restored.set_nodes(NODES)
    restored.schedule()
    assert restored.get(kept).state is RequestState.PLACED and restored.usage["research"]["gpu"] == 1


def test_details_the_journal_cannot_hold_are_refused_and_change_nothing(scheduler: Scheduler, journal):
    running = scheduler.get(submit(scheduler, "research", workers=1, gpus=1))
    scheduler.write_journal()
    nested: dict = {}
    for _ in range(5_000):
        nested = {"deeper": nested}
    for details in ({"loss": Fraction(1, 2)}, {"step": {1, 2}}, 5, nested):
        with pytest.raises(UserError, match=r"^details: .*(not JSON serializable|is not a mapping|recursion)"):
            scheduler.report(running.id, details)
        with pytest.raises(UserError, match=r"^details: "):
            scheduler.mark_running(running.id, details)
    assert running.state is RequestState.PLACED and running.details == {}
    assert scheduler.write_journal() == 0
    scheduler.report(running.id, {"loss": float("nan"), "step": 3})  # a diverged loss is still a report
    assert scheduler.write_journal() == 1


def test_a_journal_line_that_fails_to_write_leaves_the_rest_to_the_next_write(scheduler: Scheduler, journal):
    first, second = (scheduler.get(submit(scheduler, "research", workers=1, gpus=1)) for _ in range(2))
    written = scheduler.journal

    def disk_full_once(line: str) -> None:
        scheduler.journal = written
        raise OSError(28, "No space left on device")

    scheduler.journal = disk_full_once
    with pytest.raises(OSError):
        scheduler.write_journal()
    assert scheduler.write_journal() == 2
    assert [line["request"]["id"] for line in journal if "request" in line][-2:] == [first.id, second.id]


def test_a_node_of_a_pool_the_spec_does_not_name_holds_nothing(scheduler: Scheduler):
    # An H100 node of a pool renamed in the spec while it runs: what landed there would escape gpu:H100.
    renamed = node("h100old-0", "h100old", 32, 8, "H100")
    scheduler.set_nodes([*NODES, renamed])
    scheduler.set_quota("research", {"gpu:H100": 4})
    on_h100 = SubmitRequest(team="research", gang=gang("on-h100", 1, 4, gpu_types=("H100",)))
    requests = [scheduler.submit(on_h100) for _ in range(3)]
    scheduler.schedule()
    assert "h100old-0" not in scheduler.nodes
    assert [status.state for status in requests] == [RequestState.PLACED, RequestState.QUEUED, RequestState.QUEUED]
    assert all(status.nodes != ["h100old-0"] for status in requests)
    assert scheduler.usage["research"]["gpu:H100"] == 4


def test_a_team_taken_out_of_the_spec_with_only_waiting_requests_restores(scheduler: Scheduler, journal):
    scheduler.set_nodes([])
    waiting = submit(scheduler, "small", workers=1, gpus=1)  # no worker node is up: it waits, holding nothing
    scheduler.write_journal()
    assert scheduler.get(waiting).state is RequestState.QUEUED
    without_small = SPEC.model_copy(update={"teams": [team for team in SPEC.teams if team.name != "small"]})
    restored = Scheduler(without_small, POLICY)
    restored.restore(journal)
    assert restored.get(waiting).state is RequestState.FAILED
    assert set(restored.usage) == set(restored.quotas) == {"research", "prod"}


def test_a_request_rejected_on_its_first_try_leaves_nothing_pending(scheduler: Scheduler):
    never = scheduler.get(submit(scheduler, "research", workers=1, gpus=9))  # no node has 9 GPUs
    assert never.state is RequestState.REJECTED
    assert never.id not in scheduler._demands and never.id not in scheduler._untried


def test_a_never_fits_verdict_holds_only_for_the_nodes_it_was_reached_on(scheduler: Scheduler):
    scheduler.set_nodes([n for n in NODES if not n.name.startswith("h100")])
    first = scheduler.get(submit(scheduler, "research", workers=1, gpus=8))
    assert first.state is RequestState.REJECTED and "the most any matching node has is 4" in first.reason
    scheduler.set_nodes(NODES)
    held = [submit(scheduler, "research", workers=2, gpus=8), submit(scheduler, "research", workers=1, gpus=4)]
    assert all(scheduler.get(request_id).state is RequestState.PLACED for request_id in held)
    # The same shape, over research's quota now (20 + 8 > 24), is judged on the nodes up now: it waits.
    second = scheduler.get(submit(scheduler, "research", workers=1, gpus=8))
    assert second.state is RequestState.QUEUED and second.reason.startswith("over quota")


def test_over_its_quota_a_request_preempts_its_own_teams_lower_priorities_wherever_they_run(scheduler: Scheduler):
    scheduler.set_quota("research", {"gpu": 8})

    def research(gpus: float, gpu_type: str, priority: str, **kwargs) -> str:
        on_type = gang(f"{priority}-{gpu_type}", 1, gpus, gpu_types=[gpu_type])
        status = scheduler.submit(SubmitRequest(team="research", priority=priority, gang=on_type, **kwargs))
        scheduler.schedule()
        return status.id

    kept = research(2, "H100", "low", preemptible=False)
    equal = research(2, "H100", "high")
    on_a100 = research(2, "A100-80G", "low")
    assert scheduler.get(on_a100).nodes == ["a100-0"]
    urgent = research(4, "H100", "high")
    # 6 of 8 used: only the preemptible low-priority job, on a node the H100 gang cannot use, frees its quota.
    assert scheduler.get(urgent).state is RequestState.PLACED
    assert scheduler.get(on_a100).state is RequestState.PREEMPTED
    (preempted,) = [d for d in scheduler.decisions if d.request_id == on_a100 and d.action is DecisionAction.PREEMPTED]
    assert preempted.reason.startswith(f"preempted for {urgent}")
    assert scheduler.get(kept).state is scheduler.get(equal).state is RequestState.PLACED
    # Equal priorities wait for the quota; so does work whose team's lower priorities cannot be preempted.
    waits = scheduler.get(research(2, "H100", "high"))
    assert waits.state is RequestState.QUEUED and waits.reason.startswith("over quota")
    assert scheduler.get(kept).state is RequestState.PLACED
