"""The controller's durable store: journal lines, torn writes, compaction, and restoring the books from it."""

from __future__ import annotations

import errno
import json
import re

import pytest

from cluster import store
from cluster.console import UserError
from cluster.requests import RequestState, SubmitRequest
from cluster.scheduler import Scheduler
from cluster.spec import ClusterSpec
from cluster.store import SNAPSHOT, Journal, JournalDamaged, JournalWriteFailed
from tests.test_scheduler import NODES, POLICY, SPEC, gang


def lines(*entries: dict) -> list[str]:
    return [json.dumps(entry) for entry in entries]


def test_flushed_lines_survive_and_a_torn_last_line_is_skipped(tmp_path):
    journal = Journal(tmp_path)
    for line in lines({"a": 1}, {"b": 2}):
        journal.append(line)
    journal.flush()
    journal.close()
    with open(tmp_path / "journal-0.jsonl", "a", encoding="utf-8") as out:
        out.write('{"c": ')  # a write cut off by a kill: never acknowledged
    assert Journal(tmp_path).load() == [{"a": 1}, {"b": 2}]


def test_a_flush_torn_anywhere_is_skipped_whole(tmp_path):
    journal = Journal(tmp_path)
    journal.append(json.dumps({"a": 1}))
    journal.flush()
    # One flush, one change: a preemption places one request and takes another off the same devices.
    journal.append(json.dumps({"request": {"id": "prod-2", "state": "placed"}}))
    journal.append(json.dumps({"request": {"id": "research-1", "state": "preempted"}}))
    journal.flush()
    journal.close()
    path = tmp_path / "journal-0.jsonl"
    whole = path.read_bytes()
    for cut in range(len(whole) - 1, len(b'{"a": 1}\n'), -7):  # killed at any point of the second write
        path.write_bytes(whole[:cut])
        assert Journal(tmp_path).load() == [{"a": 1}], cut
    path.write_bytes(whole)
    assert len(Journal(tmp_path).load()) == 3


def test_an_entry_flushed_after_a_torn_line_is_kept(tmp_path):
    journal = Journal(tmp_path)
    journal.append(json.dumps({"a": 1}))
    journal.close()
    with open(tmp_path / "journal-0.jsonl", "a", encoding="utf-8") as out:
        out.write('{"b": ')  # cut off by a kill
    reopened = Journal(tmp_path)
    reopened.append(json.dumps({"cordon": "gpu-1"}))  # acknowledged once flushed
    reopened.flush()
    reopened.close()
    assert Journal(tmp_path).load() == [{"a": 1}, {"cordon": "gpu-1"}]


def test_compaction_starts_a_generation_that_holds_the_whole_state(tmp_path):
    journal = Journal(tmp_path, compact_every=3)
    for line in lines({"a": 1}, {"b": 2}, {"c": 3}):
        journal.append(line)
    journal.flush()
    assert journal.needs_compaction
    journal.compact(lines({"state": "abc"}))
    assert not journal.needs_compaction and journal.generation == 1
    journal.append(json.dumps({"d": 4}))
    journal.flush()
    assert journal.load() == [{"state": "abc"}, {"d": 4}]
    journal.close()
    assert not (tmp_path / "journal-0.jsonl").exists()
    reopened = Journal(tmp_path)
    assert reopened.generation == 1 and reopened.load() == [{"state": "abc"}, {"d": 4}]


def test_a_crash_after_the_snapshot_is_renamed_reads_only_the_new_generation(tmp_path):
    journal = Journal(tmp_path)
    journal.append(json.dumps({"old": 1}))
    journal.close()
    # Killed between writing the next snapshot and removing the old journal: the old lines are in the snapshot.
    (tmp_path / SNAPSHOT).write_text(json.dumps({"generation": 1, "entries": [{"old": 1}]}), encoding="utf-8")
    assert Journal(tmp_path).load() == [{"old": 1}]


def test_books_restored_from_a_compacted_journal_match(tmp_path):
    journal = Journal(tmp_path, compact_every=1)
    books = Scheduler(SPEC, POLICY, journal=journal.append)
    books.set_nodes(NODES)
    for team, gpus in [("research", 4), ("prod", 8), ("small", 2)]:
        books.submit(SubmitRequest(team=team, gang=gang(f"{team}-job", 1, gpus)))
    books.schedule()
    books.cancel("small-00003")
    books.set_quota("research", {"cpu": 32})
    books.cordon("cpu-0")
    books.write_journal()
    journal.flush()
    journal.compact(books.checkpoint())
    journal.close()
    restored = Scheduler(SPEC, POLICY)
    restored.restore(Journal(tmp_path).load())
    restored.set_nodes(NODES)
    assert restored.requests == books.requests
    assert restored.usage == books.usage and restored.quotas == books.quotas
    assert restored.controls == books.controls
    assert list(restored.decisions) == list(books.decisions)


def test_ids_of_requests_forgotten_before_a_compaction_are_not_given_again_after_a_restart(tmp_path):
    keep_one = SPEC.model_copy(update={"controller": SPEC.controller.model_copy(update={"finished_requests_kept": 1})})
    journal = Journal(tmp_path)
    books = Scheduler(keep_one, POLICY, journal=journal.append)
    books.set_nodes(NODES)
    older = books.submit(SubmitRequest(team="small", gang=gang("older", 1, 1)))
    newest = books.submit(SubmitRequest(team="small", gang=gang("newest", 1, 1)))
    books.schedule()
    books.cancel(newest.id)
    books.complete(older.id)  # ends last, so the newest request is the one forgotten
    books.write_journal()
    journal.flush()
    journal.compact(books.checkpoint())
    journal.close()
    assert newest.id not in books.requests
    restored = Scheduler(keep_one, POLICY)
    restored.restore(Journal(tmp_path).load())
    restored.set_nodes(NODES)
    following = restored.submit(SubmitRequest(team="small", gang=gang("following", 1, 1)))
    assert following.id not in {older.id, newest.id}
    assert following.submitted_seq == newest.submitted_seq + 1


def restarted(spec: ClusterSpec, entries: list[dict]) -> Scheduler:
    books = Scheduler(spec, POLICY)
    books.restore(entries)
    return books


def test_a_quota_raised_in_the_cluster_spec_holds_after_a_restart_and_one_set_by_an_admin_too_compacted_or_not():
    entries: list[dict] = []
    books = Scheduler(SPEC, POLICY, journal=lambda line: entries.append(json.loads(line)))
    books.set_nodes(NODES)
    books.submit(SubmitRequest(team="research", gang=gang("job", 1, 4)))
    books.schedule()
    books.set_quota("small", {"gpu": 3})  # `llmos quota set`: holds over the ClusterSpec's
    books.write_journal()
    raised = SPEC.model_copy(
        update={"teams": [team.model_copy(update={"quota": {**team.quota, "gpu": 32}}) for team in SPEC.teams]}
    )
    compacted = [json.loads(line) for line in books.checkpoint()]
    for journaled in (entries, compacted):
        quotas = restarted(raised, journaled).quotas
        assert quotas["research"] == {"gpu": 32, "cpu": 64} and quotas["prod"]["gpu"] == 32
        assert quotas["small"] == {"gpu": 3}
    # Compacted again after the restart, the admin's quota is still the one kept.
    again = [json.loads(line) for line in restarted(raised, compacted).checkpoint()]
    assert restarted(raised, again).quotas == restarted(raised, entries).quotas


def test_a_request_not_yet_tried_before_a_restart_is_still_rejected_on_its_first_try_if_it_can_never_fit():
    entries: list[dict] = []
    books = Scheduler(SPEC, POLICY, journal=lambda line: entries.append(json.loads(line)))
    books.set_nodes([])  # no worker node up yet: nothing is tried
    never = books.submit(SubmitRequest(team="prod", gang=gang("huge", 1, 0, cpus=1000)))
    books.schedule()
    books.write_journal()
    restored = restarted(SPEC, entries)
    restored.set_nodes(NODES)
    restored.schedule()
    assert restored.get(never.id).state is RequestState.REJECTED
    assert restored.get(never.id).reason.startswith("can never fit this cluster: bundles[0]: asks for 1000 CPUs")


def test_a_request_tried_before_a_restart_waits_after_it_even_if_the_nodes_left_can_never_hold_it():
    entries: list[dict] = []
    books = Scheduler(SPEC, POLICY, journal=lambda line: entries.append(json.loads(line)))
    books.set_nodes(NODES)
    books.submit(SubmitRequest(team="research", gang=gang("first", 2, 8)))
    waiting = books.submit(SubmitRequest(team="research", gang=gang("second", 2, 8)))  # fits once room is freed
    books.schedule()
    books.write_journal()
    assert books.get(waiting.id).state is RequestState.QUEUED
    restored = restarted(SPEC, entries)
    restored.set_nodes([node for node in NODES if node.pool != "h100"])  # the H100 nodes left meanwhile
    restored.schedule()
    assert restored.get(waiting.id).state is RequestState.QUEUED  # accepted once, never dropped for nodes leaving


@pytest.mark.parametrize("amount", ["8", True, [8]])
def test_a_quota_amount_that_is_not_a_number_is_refused_naming_the_key_and_nothing_is_journaled(amount):
    entries: list[str] = []
    books = Scheduler(SPEC, POLICY, journal=entries.append)
    with pytest.raises(UserError, match=rf"^quota gpu is {re.escape(repr(amount))}; give a finite number, 0 or more$"):
        books.set_quota("small", {"gpu": amount})
    assert books.quotas["small"] == {"gpu": 2} and entries == []


def test_a_line_separator_inside_a_reported_value_does_not_split_the_entry_on_restart(tmp_path):
    journal = Journal(tmp_path)
    books = Scheduler(SPEC, POLICY, journal=journal.append)
    books.set_nodes(NODES)
    job = books.submit(SubmitRequest(team="research", gang=gang("job", 1, 1)))
    books.schedule()
    books.report(job.id, {"log": "step 10\u2028loss 0.1\u0085done\u2029"})  # JSON leaves these unescaped
    books.complete(job.id)
    books.write_journal()
    journal.close()
    restored = restarted(SPEC, Journal(tmp_path).load())
    assert restored.get(job.id).state is RequestState.FINISHED
    assert restored.get(job.id).details["log"] == "step 10\u2028loss 0.1\u0085done\u2029"
    assert restored.usage["research"] == books.usage["research"]


def test_a_damaged_line_before_the_last_is_an_error_naming_the_line_not_a_silent_loss(tmp_path):
    journal = Journal(tmp_path)
    for line in lines({"a": 1}, {"b": 2}, {"c": 3}):
        journal.append(line)
        journal.flush()
    journal.close()
    path = tmp_path / "journal-0.jsonl"
    path.write_bytes(path.read_bytes().replace(b'{"b": 2}', b'{"b": \x00'))
    with pytest.raises(JournalDamaged, match=r"journal-0\.jsonl line 2 is not a journal entry"):
        Journal(tmp_path).load()


def test_a_failed_flush_raises_and_leaves_the_journal_as_it_was(tmp_path, monkeypatch):
    journal = Journal(tmp_path)
    journal.append(json.dumps({"a": 1}))
    journal.flush()
    journal.append(json.dumps({"never": "acknowledged"}))

    def disk_error(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store.os, "fsync", disk_error)
    with pytest.raises(JournalWriteFailed, match="Input/output error"):
        journal.flush()
    monkeypatch.undo()
    assert (tmp_path / "journal-0.jsonl").read_bytes() == b'{"a": 1}\n'
    journal.flush()  # nothing is left buffered to be written later
    journal.close()
    assert Journal(tmp_path).load() == [{"a": 1}]


def test_a_failed_compaction_keeps_every_change_leaves_no_partial_snapshot_and_waits_before_trying_again(
    tmp_path, monkeypatch
):
    journal = Journal(tmp_path, compact_every=20)
    for index in range(20):
        journal.append(json.dumps({"n": index}))
    journal.flush()
    assert journal.needs_compaction

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        journal.compact(lines({"state": "all"}))
    monkeypatch.undo()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["journal-0.jsonl"]
    assert not journal.needs_compaction and journal.generation == 0
    journal.append(json.dumps({"n": 20}))
    journal.flush()
    assert not journal.needs_compaction
    journal.append(json.dumps({"n": 21}))
    journal.flush()
    assert journal.needs_compaction  # a tenth of compact_every later
    journal.close()
    assert Journal(tmp_path).load() == [{"n": index} for index in range(22)]


def test_a_controller_restarted_more_often_than_it_compacts_still_compacts(tmp_path):
    for _ in range(3):
        journal = Journal(tmp_path, compact_every=5)
        journal.load()
        journal.append(json.dumps({"n": 1}))
        journal.append(json.dumps({"n": 2}))
        journal.flush()
        journal.close()
    assert journal.needs_compaction


def test_compaction_makes_the_snapshot_and_the_new_journal_durable_before_removing_the_old_journal(
    tmp_path, monkeypatch
):
    journal = Journal(tmp_path, compact_every=1)
    journal.append(json.dumps({"a": 1}))
    journal.flush()
    synced: list[list[str]] = []
    fsync_path = store.fsync_path
    monkeypatch.setattr(
        store,
        "fsync_path",
        lambda path: (synced.append(sorted(p.name for p in path.iterdir())), fsync_path(path)),
    )
    journal.compact(lines({"state": "a"}))
    journal.close()
    assert ["journal-0.jsonl", "journal-1.jsonl", SNAPSHOT] in synced  # both durable while the old one is there
    assert not (tmp_path / "journal-0.jsonl").exists()


def test_a_journal_left_by_a_crash_before_the_old_one_was_removed_is_removed_on_open(tmp_path):
    journal = Journal(tmp_path, compact_every=1)
    journal.append(json.dumps({"a": 1}))
    journal.compact(lines({"state": "a"}))
    journal.close()
    (tmp_path / "journal-0.jsonl").write_text('{"a": 1}\n', encoding="utf-8")  # the crash came before its unlink
    reopened = Journal(tmp_path)
    assert not (tmp_path / "journal-0.jsonl").exists()
    assert reopened.load() == [{"state": "a"}]
