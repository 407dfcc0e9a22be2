"""A controller started without the books of the placement groups Ray holds (a head node restarted
without a persistent state dir, or another --state-dir) changes nothing: it must not remove them as
orphans. One started with books kept for a Ray cluster since stopped ends their requests. On the
shared local cluster, with controllers of this module's own."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from controllers import live_llmos_groups, llmos_cli, stop_any_controller
from waiting import WAIT_S, wait_for

from cluster import binding, controller, store
from cluster.admin import Admin
from cluster.console import UserError
from cluster.inventory import ray_cluster_id
from cluster.launcher import LocalCluster
from cluster.requests import RequestState, RequestStatus


def place_one_gang(admin: Admin) -> tuple[RequestStatus, dict[str, str]]:
    """A 1-bundle gang placed and its group ready; the llmos groups Ray then holds (only its own)."""
    gang = {"name": "kept", "bundles": [{"resources": {"CPU": 1}}]}
    status, group = admin.acquire({"team": "research", "gang": gang})
    assert group.wait(WAIT_S)
    held = live_llmos_groups()
    assert held == {status.placement_group: group.id.hex()}
    return status, held


def stopped(admin: Admin) -> None:
    assert admin.stop_controller()
    wait_for(lambda: controller.get() is None, WAIT_S, "the controller to stop")


def test_a_controller_without_the_books_of_ray_groups_changes_nothing_until_told_to_remove_them(
    local_cluster: LocalCluster, tmp_path: Path
):
    books, elsewhere = tmp_path / "books", tmp_path / "elsewhere"
    admin = Admin(state_dir=books, policy="bestfit")
    try:
        status, held = place_one_gang(admin)
        stopped(admin)

        with pytest.raises(UserError, match="state was lost") as refusal:
            Admin(state_dir=elsewhere, policy="bestfit")
        assert status.placement_group in str(refusal.value) and str(elsewhere) in str(refusal.value)
        assert live_llmos_groups() == held  # not removed as an orphan
        assert controller.get() is None  # the refused controller is gone: a retry may start at once

        # The CLI says the same in one line, and how to go on.
        cli = llmos_cli(local_cluster, "controller", "start", "--state-dir", str(elsewhere))
        assert cli.returncode == 2 and "Traceback" not in cli.stderr
        assert "state was lost" in cli.stderr and "--remove-unknown-groups" in cli.stderr
        assert live_llmos_groups() == held

        # With its own books it picks the request and its group up again: nothing bound twice.
        admin = Admin(state_dir=books, policy="bestfit")
        assert admin.status(status.id).state is RequestState.PLACED
        assert live_llmos_groups() == held
        stopped(admin)

        # Told to give them up, it removes them and starts with empty books.
        admin = Admin(state_dir=elsewhere, policy="bestfit", remove_unknown_groups=True)
        assert admin.ping()["state_lost"] is None
        assert admin.queue(include_finished=True) == []
        wait_for(lambda: not live_llmos_groups(), WAIT_S, "the unknown groups to be removed")
    finally:
        stop_any_controller()
        binding.unbind_all()  # a group left behind would make every later controller refuse to start


def test_a_controller_restarted_by_ray_without_its_books_refuses_every_call_but_shutdown(
    local_cluster: LocalCluster, tmp_path: Path
):
    """What a head restart on KubeRay without a persistent state dir looks like: Ray restarts the
    controller actor itself, no `start` is there to refuse it, so its calls say why they cannot go on."""
    books = tmp_path / "books"
    admin = Admin(state_dir=books, policy="bestfit")
    try:
        status, held = place_one_gang(admin)
        old_pid = admin.ping()["pid"]
        for entry in books.iterdir():  # the journal gone, as on a fresh pod's disk (credentials stay)
            if entry.name.startswith(("journal-", "snapshot")):
                entry.unlink()
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: admin.ping()["pid"] != old_pid, WAIT_S, "Ray to restart the controller")
        assert "state was lost" in admin.ping()["state_lost"]
        with pytest.raises(UserError, match="state was lost"):
            admin.queue()
        with pytest.raises(UserError, match="state was lost"):
            admin.status(status.id)
        assert live_llmos_groups() == held
        shown = llmos_cli(local_cluster, "controller", "status")
        assert shown.returncode == 0 and "refusing every call: the controller's state was lost" in shown.stdout
        stopped(admin)  # shutdown still works, so the operator can start it right
    finally:
        stop_any_controller()
        binding.unbind_all()


def test_a_controller_started_away_from_a_local_cluster_keeps_its_state_where_the_head_node_says(
    local_cluster: LocalCluster, tmp_path: Path
):
    """As on KubeRay (`ray job submit ... -- python -m cluster.cli controller start --spec FILE`): the
    caller has no local-cluster record, and the controller's default state dir is under the head node's
    LLMOS_HOME (the head pod's claim there), not under the caller's."""
    caller_home = tmp_path / "caller"
    spec_file = Path(__file__).resolve().parents[1] / "examples" / "cluster.yaml"
    try:
        started = llmos_cli(local_cluster, "controller", "start", "--spec", str(spec_file), "--json", home=caller_home)
        assert started.returncode == 0, started.stderr
        # The head node was started with the session's LLMOS_HOME (tests/conftest.py).
        assert Path(json.loads(started.stdout)["state_dir"]) == local_cluster.home / "controller" / "llmos-demo"
        assert not caller_home.exists()
    finally:
        stop_any_controller()
        shutil.rmtree(local_cluster.home / "controller" / "llmos-demo", ignore_errors=True)


def test_books_kept_for_a_ray_cluster_since_stopped_end_and_free_what_they_held(tmp_path: Path):
    books = tmp_path / "books"
    admin = Admin(state_dir=books, policy="bestfit")
    try:
        placed, _ = place_one_gang(admin)
        whole_h100 = {"team": "research", "gang": {"name": "h100", "bundles": [{"resources": {"CPU": 1, "GPU": 8}}]}}
        holding, waiting = admin.submit(whole_h100), admin.submit(whole_h100)  # the second is over quota
        assert (holding.state, waiting.state) == (RequestState.PLACED, RequestState.QUEUED)
        admin.cordon("cpu-0")
        stopped(admin)
        this_cluster = store.read_ray_cluster(books)
        assert this_cluster == ray_cluster_id()
        # As if the books had been kept for a cluster since stopped: `llmos down`, then `llmos up`.
        store.write_ray_cluster(books, "0" * len(this_cluster))

        admin = Admin(state_dir=books, policy="bestfit")
        for request_id in (placed.id, holding.id, waiting.id):
            status = admin.status(request_id)
            assert status.state is RequestState.FAILED, status
            assert status.reason == (
                "the Ray cluster it was booked in (000000000000) stopped, and what ran in it went with it"
            )
        assert {usage.team: usage.used for usage in admin.usage()}["research"] == {}
        assert not any(node.cordoned for node in admin.nodes())
        assert live_llmos_groups() == {}  # nothing of the old books is bound in this cluster
        assert store.read_ray_cluster(books) == this_cluster
        again = admin.submit(whole_h100)
        assert again.state is RequestState.PLACED

        stopped(admin)  # started again in the same cluster, the books are kept
        admin = Admin(state_dir=books, policy="bestfit")
        assert admin.status(again.id).state is RequestState.PLACED
        admin.cancel(again.id)
        assert live_llmos_groups() == {}
    finally:
        stop_any_controller()
        binding.unbind_all()  # a group left behind would be one the next module's controller has no books of


def test_a_change_a_full_disk_cannot_save_is_refused_saying_so_and_the_controller_goes_on(
    local_cluster: LocalCluster, tmp_path: Path
):
    """The head node's disk fills up: a change the journal cannot hold is not made (not acknowledged, not
    bound), the caller is told why, and once there is room again the controller carries on."""
    books = tmp_path / "books"
    books.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(books)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        admin = Admin(state_dir=books, policy="bestfit")
        placed, held = place_one_gang(admin)
        filler = books / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)

        # A batch, so its journal line outgrows what is left of the journal's last page on the tmpfs.
        small = {"team": "research", "gang": {"name": "unsaved", "bundles": [{"resources": {"CPU": 0.1}}]}}
        with pytest.raises(UserError, match=r"the change was not saved, so it was not made: .*No space left on device"):
            admin.submit_many([small] * 20)
        assert [status.id for status in admin.queue()] == [placed.id]
        assert live_llmos_groups() == held  # nothing was bound for them
        assert admin.status(placed.id).state is RequestState.PLACED

        filler.unlink()
        saved = admin.submit(small)
        assert saved.state is RequestState.PLACED
        stopped(admin)  # what the books say now is what a restart reads
        admin = Admin(state_dir=books, policy="bestfit")
        assert {status.id: status.state for status in admin.queue()} == {
            placed.id: RequestState.PLACED,
            saved.id: RequestState.PLACED,
        }
        # Read whole, though records were refused on the full disk (the controller's log has those).
        submits = [(entry["target"], entry["outcome"]) for entry in admin.audit_log() if entry["action"] == "submit"]
        assert submits[-1] == ("unsaved", "ok")
    finally:
        stop_any_controller()
        binding.unbind_all()
        # Lazily: the stopped controller's process may hold its journal open a moment longer.
        subprocess.run(["umount", "--lazy", str(books)], capture_output=True)
