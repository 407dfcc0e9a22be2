"""The controller on a real local cluster: binding to placement groups, faults, quotas, bad input."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import ray
from controllers import live_llmos_groups, llmos_cli, own_controller
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from waiting import WAIT_S, wait_for

from cluster import binding, controller
from cluster.admin import Admin
from cluster.console import UserError
from cluster.launcher import LocalCluster
from cluster.requests import DecisionAction, RequestState
from cluster.spec import SpecError


@pytest.fixture(scope="module")
def admin(local_cluster: LocalCluster, tmp_path_factory) -> Admin:
    with own_controller(tmp_path_factory, "controller-state", "bestfit") as admin:
        yield admin


@pytest.fixture(autouse=True)
def clean_queue(request):
    """Each test starts with nothing placed or queued, and leaves nothing behind."""
    yield
    if "admin" in request.fixturenames:
        admin: Admin = request.getfixturevalue("admin")
        for status in admin.queue():
            admin.cancel(status.id)


def gang(name: str, bundles: list[dict], constraint: str = "same_pool") -> dict:
    return {"name": name, "constraint": constraint, "bundles": bundles}


def node_ids(admin: Admin) -> dict[str, str]:
    return {node.name: node.node_id for node in admin.nodes()}


def test_every_bundle_lands_exactly_where_the_engine_decided(admin: Admin):
    spread = admin.submit(
        {"team": "research", "gang": gang("spread", [{"resources": {"CPU": 1}}] * 3, constraint="spread")}
    )
    gpus = admin.submit({"team": "research", "gang": gang("gpus", [{"resources": {"CPU": 1, "GPU": 2}}] * 3)})
    ids = node_ids(admin)
    for submitted in (spread, gpus):
        status = admin.wait(submitted.id)
        assert status.state is RequestState.PLACED
        group = admin.placement_group(status.id)
        assert group.wait(WAIT_S)
        assert binding.bundle_nodes(group) == [ids[node] for node in status.nodes]
    assert len(set(admin.status(spread.id).nodes)) == 3


def test_per_node_group_bundles_are_reserved_on_the_engines_node_and_hold_their_workers(admin: Admin):
    on_h100 = {"llmos.io/pool": "h100"}
    bundles = [{"resources": {"CPU": 1, "GPU": 1}, "label_selector": on_h100}] * 3
    bundles += [{"resources": {"CPU": 1, "GPU": 0.5}, "label_selector": on_h100}] * 2
    request = {"team": "research", "group_bundles": "per_node", "gang": gang("dense", bundles, "same_node")}
    status, group = admin.acquire(request)
    assert status.state is RequestState.PLACED
    assert [bundle.group_bundle_index for bundle in status.bundles] == [0, 0, 0, 1, 2]
    assert group.wait(WAIT_S)
    node = node_ids(admin)[status.bundles[0].node]
    assert binding.bundle_nodes(group) == [node] * 3
    table = ray.util.placement_group_table(group)
    assert table["bundles"] == {0: {"CPU": 3.0, "GPU": 3.0}, 1: {"CPU": 1.0, "GPU": 0.5}, 2: {"CPU": 1.0, "GPU": 0.5}}

    @ray.remote(num_cpus=1, num_gpus=1)
    def worker_node() -> str:
        return ray.get_runtime_context().get_node_id()

    # The worker of gang bundle 2 runs in the Ray bundle that holds it, and so on the engine's node.
    strategy = PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=status.bundles[2].group_bundle_index
    )
    assert ray.get(worker_node.options(scheduling_strategy=strategy).remote(), timeout=WAIT_S) == node


def test_fractional_gpu_gang_that_ray_would_hang_on_is_rejected_at_once(admin: Admin):
    a100 = node_ids(admin)["a100-0"]
    # Ray sums the node's GPUs (5 x 0.6 = 3.0 <= 4) but gives each bundle one device: it waits forever.
    hanging = placement_group([{"GPU": 0.6}] * 5, bundle_label_selector=[{"ray.io/node-id": a100}] * 5)
    try:
        assert not hanging.wait(10)
    finally:
        remove_placement_group(hanging)
    selector = {"llmos.io/pool": "a100"}
    five = admin.submit(
        {
            "team": "prod",
            "gang": gang("five", [{"resources": {"GPU": 0.6}, "label_selector": selector}] * 5, "same_node"),
        }
    )
    assert five.state is RequestState.REJECTED
    assert "can never fit this cluster" in five.reason
    four = admin.submit(
        {
            "team": "prod",
            "gang": gang("four", [{"resources": {"GPU": 0.6}, "label_selector": selector}] * 4, "same_node"),
        }
    )
    status = admin.wait(four.id)
    assert status.state is RequestState.PLACED
    assert sorted(device for bundle in status.bundles for device in bundle.gpu_devices) == [0, 1, 2, 3]
    assert admin.placement_group(four.id).wait(WAIT_S)


def test_controller_killed_with_20_requests_queued_loses_none(admin: Admin):
    blocker = admin.submit({"team": "prod", "gang": gang("blocker", [{"resources": {"CPU": 1, "GPU": 8}}])})
    assert admin.wait(blocker.id).state is RequestState.PLACED
    # A booking without a group of its own, as training and serving make: nothing to bind after a restart.
    booked = admin.submit(
        {"team": "prod", "bind_placement_group": False, "gang": gang("booked", [{"resources": {"CPU": 1}}])}
    )
    assert booked.state is RequestState.PLACED and booked.placement_group is None
    queued = [
        admin.submit({"team": "research", "gang": gang(f"q{i}", [{"resources": {"CPU": 1, "GPU": 8}}])}).id
        for i in range(20)
    ]
    before = {status.id: (status.state, status.nodes, status.placement_group) for status in admin.queue()}
    assert [before[request_id][0] for request_id in queued] == [RequestState.QUEUED] * 20
    groups_before = live_llmos_groups()
    old_pid = admin.ping()["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: admin.ping()["pid"] != old_pid, what="the controller to restart")
    after = {status.id: (status.state, status.nodes, status.placement_group) for status in admin.queue()}
    assert after == before
    # The same group, same id: kept, not bound a second time.
    assert live_llmos_groups() == groups_before
    assert list(groups_before) == [f"llmos-{blocker.id}"]


def test_node_removed_while_gang_runs_is_requeued_elsewhere(admin: Admin, local_cluster: LocalCluster):
    (extra,) = local_cluster.add_replica("a100")
    try:
        wait_for(lambda: extra.name in node_ids(admin), what=f"{extra.name} in the controller's inventory")
        admin.cordon("a100-0")
        request = admin.submit(
            {
                "team": "research",
                "gang": gang(
                    "elastic", [{"resources": {"CPU": 1, "GPU": 2}, "label_selector": {"llmos.io/pool": "a100"}}] * 2
                ),
            }
        )
        assert admin.wait(request.id).nodes == [extra.name, extra.name]
        admin.uncordon("a100-0")
        local_cluster.remove_node(extra.name)
        moved = wait_for(
            lambda: (
                (s := admin.status(request.id)).state is RequestState.PLACED and s.nodes == ["a100-0", "a100-0"] and s
            ),
            what="the gang to be placed again on a100-0",
        )
        assert moved.failures == 1
        actions = [d.action for d in admin.decisions(request_id=request.id)]
        assert DecisionAction.REQUEUED in actions
        group = admin.placement_group(request.id)
        assert group.wait(WAIT_S)
        assert set(binding.bundle_nodes(group)) == {node_ids(admin)["a100-0"]}
    finally:
        if extra.name in {node.name for node in local_cluster.record.nodes}:
            local_cluster.remove_node(extra.name)
        admin.uncordon("a100-0")


def test_quota_is_never_exceeded_under_concurrent_submits(admin: Admin):
    submitted: list[str] = []
    lock = threading.Lock()

    def submit_five():
        for _ in range(5):
            status = admin.submit({"team": "interns", "gang": gang("small", [{"resources": {"CPU": 0.5, "GPU": 1}}])})
            with lock:
                submitted.append(status.id)

    threads = [threading.Thread(target=submit_five) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_S)
    assert len(submitted) == 30
    placed = [s for s in admin.queue() if s.id in submitted and s.state is RequestState.PLACED]
    assert len(placed) == 4  # interns: gpu quota 4
    # Replay the decision log: at no point did the team hold more than its quota.
    held, most = 0, 0
    for decision in admin.decisions(limit=0):
        if decision.request_id in submitted and decision.nodes:
            held += 1 if decision.action is DecisionAction.PLACED else -1
            most = max(most, held)
    assert most == 4
    admin.cancel(placed[0].id)
    wait_for(
        lambda: sum(s.state is RequestState.PLACED for s in admin.queue() if s.id in submitted) == 4, what="backfill"
    )
    usage = {u.team: u for u in admin.usage()}["interns"]
    assert usage.used["gpu"] == 4


def test_bad_input_gets_a_clear_error_and_changes_nothing(admin: Admin):
    running = admin.submit({"team": "research", "gang": gang("held", [{"resources": {"CPU": 1, "GPU": 4}}])})
    admin.wait(running.id)
    before = (admin.queue(), admin.usage(), admin.nodes())
    attempts = [
        (
            lambda: admin.submit({"team": "nobody", "gang": gang("x", [{"resources": {"CPU": 1}}])}),
            "unknown team 'nobody'",
        ),
        (
            lambda: admin.submit(
                {
                    "team": "research",
                    "gang": gang("x", [{"resources": {"CPU": 1}, "label_selector": {"llmos.io/pool": "v100"}}]),
                }
            ),
            "unknown pool 'v100'",
        ),
        (lambda: admin.submit({"team": "research", "gang": gang("x", [])}), "gang.bundles"),
        (
            lambda: admin.submit({"team": "research", "gang": gang("x", [{"resources": {"GPUs": 1}}])}),
            "resource 'GPUs'",
        ),
        (
            lambda: admin.submit(
                {"team": "research", "priority": "urgent", "gang": gang("x", [{"resources": {"CPU": 1}}])}
            ),
            "unknown priority class",
        ),
        (lambda: admin.cancel("research-99999"), "no request 'research-99999'"),
        (lambda: admin.preempt("research-99999"), "no request 'research-99999'"),
        (lambda: admin.decisions(request_id="research-99999"), "no request 'research-99999'"),
        (lambda: admin.decisions(limit=-1), "limit: -1 is negative"),
        (lambda: admin.cordon("gpu-node-7"), "unknown node 'gpu-node-7'"),
        (lambda: admin.drain("head-0"), "head node"),
        (lambda: admin.set_quota("research", gpu=2), "uses 4 gpu now, more than the new quota 2"),
        (lambda: admin.set_quota("research", gpus=20), "quota key 'gpus' is not a resource"),
        (lambda: controller.start(admin_spec(), "/tmp/unused"), "already running"),
    ]
    for attempt, message in attempts:
        with pytest.raises((UserError, SpecError)) as caught:
            attempt()
        assert message in str(caught.value)
    after = (admin.queue(), admin.usage(), admin.nodes())
    assert after == before


def admin_spec():
    return LocalCluster.attach().spec


def test_preemption_frees_the_victims_placement_group(admin: Admin):
    on_h100 = {"llmos.io/pool": "h100"}
    victim = admin.submit(
        {"team": "research", "gang": gang("low", [{"resources": {"CPU": 1, "GPU": 8}, "label_selector": on_h100}])}
    )
    admin.wait(victim.id)
    assert admin.placement_group(victim.id).wait(WAIT_S)
    urgent = admin.submit(
        {"team": "prod", "gang": gang("high", [{"resources": {"CPU": 1, "GPU": 8}, "label_selector": on_h100}])}
    )
    assert admin.wait(urgent.id).state is RequestState.PLACED
    assert admin.status(victim.id).state is RequestState.PREEMPTED
    assert binding.find(f"llmos-{victim.id}") is None
    assert admin.placement_group(urgent.id).wait(WAIT_S)


def test_a_placement_group_ray_refuses_leaves_the_rest_of_the_call_to_be_done_within_a_refresh(admin: Admin):
    on_h100 = {"llmos.io/pool": "h100"}
    whole_h100 = [{"resources": {"CPU": 1, "GPU": 8}, "label_selector": on_h100}]
    victim = admin.submit({"team": "research", "gang": gang("low", whole_h100)})
    admin.wait(victim.id)
    assert admin.placement_group(victim.id).wait(WAIT_S)
    # The name of the next request's group is taken (unique in the namespace), so Ray refuses to make it;
    # the preemption and the group after it in the same call still have to happen.
    refused, urgent = (f"prod-{victim.submitted_seq + offset:05d}" for offset in (1, 2))
    decoy = placement_group([{"CPU": 0.01}], name=f"llmos-{refused}")
    try:
        with pytest.raises(UserError, match="the change is saved, but Ray refused a placement group change"):
            admin.submit_many(
                [
                    {"team": "prod", "gang": gang("refused", [{"resources": {"CPU": 1}}])},
                    {"team": "prod", "gang": gang("high", whole_h100)},
                ]
            )
        assert admin.status(urgent).state is RequestState.PLACED
        assert admin.status(victim.id).state is RequestState.PREEMPTED
        wait_for(
            lambda: binding.find(f"llmos-{victim.id}") is None and binding.find(f"llmos-{urgent}") is not None,
            WAIT_S,
            "the victim's group removed and the urgent request's made",
        )
        assert admin.placement_group(urgent).wait(WAIT_S)
    finally:
        remove_placement_group(decoy)


def test_a_controller_that_does_not_answer_in_time_is_a_clear_error(admin: Admin):
    with pytest.raises(UserError, match=r"did not answer whoami within 1e-06 s; it may still carry it out"):
        admin._call("whoami", timeout_s=1e-6)  # no actor call returns within a microsecond
    assert admin.whoami() == "admin"


def test_cli_queue_json_and_errors_without_traceback(admin: Admin, local_cluster: LocalCluster, tmp_path: Path):
    held = admin.submit({"team": "research", "gang": gang("cli", [{"resources": {"CPU": 1}}])})

    queue = llmos_cli(local_cluster, "queue", "--json")
    assert queue.returncode == 0, queue.stderr
    assert held.id in [status["id"] for status in json.loads(queue.stdout)]
    refused = llmos_cli(local_cluster, "drain", "head-0")
    assert refused.returncode == 2
    assert "head node" in refused.stderr and "Traceback" not in refused.stderr
    quotas = llmos_cli(local_cluster, "quota", "--json")  # `quota` alone shows them
    assert quotas.returncode == 0, quotas.stderr
    assert {usage["team"] for usage in json.loads(quotas.stdout)} == {"research", "prod", "interns"}
    # Several request files in one submit: one call, all or none.
    files = []
    for name, pool in (("one", "cpu"), ("two", "cpu"), ("bad", "v100")):
        files.append(tmp_path / f"{name}.yaml")
        files[-1].write_text(
            f"team: research\ngang:\n  name: {name}\n  bundles:\n"
            f"    - {{resources: {{CPU: 1}}, label_selector: {{llmos.io/pool: {pool}}}}}\n"
        )
    before = admin.queue()
    refused = llmos_cli(local_cluster, "submit", str(files[0]), str(files[2]))
    assert refused.returncode == 2 and "requests[1]" in refused.stderr and "unknown pool 'v100'" in refused.stderr
    assert admin.queue() == before
    submitted = llmos_cli(local_cluster, "submit", str(files[0]), str(files[1]), "--json")
    assert submitted.returncode == 0, submitted.stderr
    statuses = json.loads(submitted.stdout)
    assert [status["request"]["gang"]["name"] for status in statuses] == ["one", "two"]
    assert all(status["state"] == "placed" for status in statuses)
    # --wait: every request shown as it stands at the deadline, exit 1 while one still waits, and it stays queued.
    whole_node = tmp_path / "whole-node.yaml"
    whole_node.write_text(
        "team: research\ngang:\n  name: whole-node\n  bundles:\n"
        "    - {resources: {CPU: 8}, label_selector: {llmos.io/pool: cpu}}\n"  # a whole CPU node: some is held
    )
    timed_out = llmos_cli(local_cluster, "submit", str(files[0]), str(whole_node), "--wait", "1.5", "--json")
    assert timed_out.returncode == 1, timed_out.stderr
    placed, waiting = json.loads(timed_out.stdout)
    assert (placed["state"], waiting["state"]) == ("placed", "queued")
    assert f"still waiting after 1.5s: {waiting['id']} (queued still" in timed_out.stderr
    assert admin.status(waiting["id"]).state is RequestState.QUEUED
    admin.cancel(waiting["id"])


def test_teams_see_and_change_only_their_own_requests_and_admin_actions_need_the_admin(admin: Admin):
    credentials = Path(admin.ping()["state_dir"]) / "credentials"
    tokens = {path.name: path.read_text().strip() for path in credentials.iterdir()}
    assert set(tokens) == {"admin", "research", "prod", "interns"}
    assert all(oct(path.stat().st_mode)[-3:] == "600" for path in credentials.iterdir())
    research, interns = Admin(credential=tokens["research"]), Admin(credential=tokens["interns"])
    assert (research.whoami(), interns.whoami(), admin.whoami()) == ("research", "interns", "admin")
    mine = research.submit({"team": "research", "gang": gang("mine", [{"resources": {"CPU": 1}}])})
    before = (admin.queue(), admin.usage(), admin.nodes())
    refusals = [
        (
            lambda: research.submit({"team": "prod", "gang": gang("x", [{"resources": {"CPU": 1}}])}),
            "cannot submit requests of team prod",
        ),
        (  # one forbidden request refuses the whole batch
            lambda: research.acquire_many(
                [
                    {"team": "research", "gang": gang("ok", [{"resources": {"CPU": 1}}])},
                    {"team": "prod", "gang": gang("x", [{"resources": {"CPU": 1}}])},
                ]
            ),
            "cannot submit requests of team prod",
        ),
        (lambda: interns.cancel(mine.id), "team interns cannot cancel requests of team research"),
        (lambda: interns.status(mine.id), "team interns cannot read requests of team research"),
        (lambda: interns.queue(team="research"), "team interns cannot read requests of team research"),
        (lambda: research.cordon("cpu-0"), "cordon needs the admin credential"),
        (lambda: research.drain("cpu-0"), "drain needs the admin credential"),
        (lambda: research.set_quota("research", gpu=100), "set_quota needs the admin credential"),
        (lambda: research.preempt(mine.id), "preempt needs the admin credential"),
        (lambda: research.audit_log(), "needs the admin credential"),
        (lambda: research.stop_controller(), "needs the admin credential"),
        (lambda: Admin(credential="guessed-token").queue(), "credential is missing or unknown"),
        # Named before the lookup: a wrong credential learns nothing of which request ids exist.
        (lambda: Admin(credential="guessed-token").status("research-99999"), "credential is missing or unknown"),
    ]
    for attempt, message in refusals:
        with pytest.raises(UserError) as caught:
            attempt()
        assert message in str(caught.value)
        assert not any(token in str(caught.value) for token in tokens.values())
    assert (admin.queue(), admin.usage(), admin.nodes()) == before
    assert [s.id for s in research.queue()] == [mine.id] and interns.queue() == []
    assert [s.id for s in research.queue(team="research", states=["placed"])] == [mine.id]
    assert [u.team for u in interns.usage()] == ["interns"]
    # Every team sees every node's capacity and allocation, but only its own requests on them.
    assert mine.id in {request for node in research.nodes() for request in node.requests}
    assert mine.id not in {request for node in interns.nodes() for request in node.requests}
    assert mine.id in {request for node in admin.nodes() for request in node.requests}
    research.reporter(mine.id).mark_running({"step": 0})  # a state change: audited, as a report is not
    research.cancel(mine.id)
    audit = admin.audit_log(limit=500)
    assert any(e["principal"] == "research" and e["action"] == "cordon" and e["outcome"] == "refused" for e in audit)
    assert any(e["principal"] == "research" and e["action"] == "cancel" and e["outcome"] == "ok" for e in audit)
    running = {"principal": "research", "action": "report", "target": mine.id, "outcome": "ok"}
    assert any(e == {**e, **running} for e in audit)
    assert any(e["principal"] == "unknown" and e["outcome"] == "refused" for e in audit)
    assert {"principal": "research", "action": "read_audit", "outcome": "refused"}.items() <= next(
        e for e in audit if e["action"] == "read_audit"
    ).items()
    state_dir = Path(admin.ping()["state_dir"])
    for private in [state_dir, *state_dir.glob("journal-*.jsonl"), state_dir / "audit.jsonl"]:
        assert oct(private.stat().st_mode)[-3:] in ("700", "600"), private
    assert not any(token in json.dumps(audit) for token in tokens.values())


def test_acquire_many_is_all_or_nothing_per_request_within_quota_and_durable_before_it_returns(admin: Admin):
    pair = {"team": "interns", "gang": gang("pair", [{"resources": {"CPU": 0.5, "GPU": 1}}] * 2)}
    cpus = {"team": "research", "gang": gang("cpus", [{"resources": {"CPU": 1}}] * 4)}
    unknown_pool = {
        "team": "interns",
        "gang": gang("x", [{"resources": {"CPU": 1}, "label_selector": {"llmos.io/pool": "v100"}}]),
    }
    before = admin.queue()
    with pytest.raises(UserError, match=r"requests\[1\]: .*unknown pool 'v100'.*nothing was submitted"):
        admin.acquire_many([pair, unknown_pool])
    with pytest.raises(SpecError, match=r"requests\[0\]"):
        admin.acquire_many([{"team": "interns", "gang": gang("x", [])}, pair])
    assert admin.queue() == before
    # Three 2-GPU gangs for a team with 4 GPUs of quota and a CPU gang, then enough small gangs that
    # the batch is journaled and bound in several steps (controller.BIND_EVERY), in one call.
    small = {"team": "research", "gang": gang("small", [{"resources": {"CPU": 0.1}}])}
    acquired = admin.acquire_many([pair, pair, pair, cpus] + [small] * 2 * controller.BIND_EVERY)
    states = [status.state for status, _ in acquired]
    assert states[:4] == [RequestState.PLACED, RequestState.PLACED, RequestState.QUEUED, RequestState.PLACED]
    assert states[4:] == [RequestState.PLACED] * 2 * controller.BIND_EVERY
    ids = node_ids(admin)
    for status, group in acquired:
        if status.state is RequestState.PLACED:
            assert group.wait(WAIT_S)
            ordered = sorted(status.bundles, key=lambda bundle: bundle.bundle_index)
            assert binding.bundle_nodes(group) == [ids[bundle.node] for bundle in ordered]
        else:  # a gang that does not fit now holds nothing: whole or not at all
            assert group is None and status.bundles == [] and status.reason.startswith("over quota")
    assert {u.team: u for u in admin.usage()}["interns"].used["gpu"] == 4
    # Acknowledged means journaled: a controller killed right after the call restores every request
    # as it was, keeps the groups it made (same ids) and binds none of them twice.
    expected = {status.id: (status.state, status.nodes, status.placement_group) for status, _ in acquired}
    groups_before = live_llmos_groups()
    assert {f"llmos-{status.id}" for status, group in acquired if group} <= set(groups_before)
    old_pid = admin.ping()["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: admin.ping()["pid"] != old_pid, what="the controller to restart")
    restored = {status.id: (status.state, status.nodes, status.placement_group) for status in admin.queue()}
    assert {request_id: restored[request_id] for request_id in expected} == expected
    assert live_llmos_groups() == groups_before


def test_a_retried_call_returns_the_first_submission_even_after_a_restart(admin: Admin):
    # What Admin._call does when the controller dies mid-call: the same call again, with the same keys.
    request = {"team": "research", "gang": gang("retried", [{"resources": {"CPU": 0.1}}])}
    first, twin, other = admin._call("submit_many", [request] * 3, ["retry-a", "retry-a", "retry-b"])
    assert first.id == twin.id != other.id
    old_pid = admin.ping()["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: admin.ping()["pid"] != old_pid, what="the controller to restart")
    (again,) = admin._call("submit_many", [request], ["retry-a"])
    assert again.id == first.id
    assert [s.id for s in admin.queue() if s.request.gang.name == "retried"] == [first.id, other.id]
    for status in (first, other):
        admin.cancel(status.id)


def test_a_preemption_retried_after_the_controller_died_answering_it_is_not_applied_twice(admin: Admin):
    request = admin.submit({"team": "research", "gang": gang("retried", [{"resources": {"CPU": 1, "GPU": 8}}])})
    admin.wait(request.id)
    # What `Admin.preempt` sends, and sends again after an ActorDiedError: here the controller died after
    # journaling the preemption, as if before its answer reached the caller.
    key = "preempt-once"
    assert admin._call("preempt", request.id, key).preemptions == 1  # and placed again in the same call
    old_pid = admin.ping()["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: admin.ping()["pid"] != old_pid, what="the controller to restart")
    placed_again = admin.wait(request.id)
    assert placed_again.state is RequestState.PLACED and placed_again.preemptions == 1
    retried = admin._call("preempt", request.id, key)
    assert retried.state is RequestState.PLACED and retried.preemptions == 1 and retried.nodes == placed_again.nodes
    assert binding.find(f"llmos-{request.id}") is not None
    assert admin.preempt(request.id).preemptions == 2  # a new call is applied


def test_a_controller_stopped_and_started_again_is_found_by_the_admins_and_reporters_made_before(admin: Admin):
    request = admin.submit({"team": "research", "gang": gang("outlives", [{"resources": {"CPU": 0.1}}])})
    reporter = admin.reporter(request.id)  # as a Serve reconciler or a training worker holds it
    state_dir = admin.ping()["state_dir"]
    old_pid = admin.ping()["pid"]
    admin.stop_controller()
    Admin(state_dir=state_dir, policy="bestfit")  # as `llmos controller start`, or any call, starts one
    assert reporter.status().state is RequestState.PLACED
    assert reporter.mark_running({"step": 1}).state is RequestState.RUNNING
    assert admin.status(request.id).details["step"] == 1 and admin.ping()["pid"] != old_pid
