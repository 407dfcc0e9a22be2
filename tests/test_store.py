"""The controller's durable store: journal lines, torn writes, compaction, and restoring the books from it."""

from __future__ import annotations

import json

from cluster.requests import SubmitRequest
from cluster.scheduler import Scheduler
from cluster.store import SNAPSHOT, Journal
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
