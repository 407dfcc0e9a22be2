"""The audit log (rotated by size, so it stays bounded, and read from its newest end) and the credentials."""

from __future__ import annotations

import errno
import os

import pytest

from cluster.auth import AuditLog, Credentials
from cluster.console import UserError


def test_the_log_rotates_by_size_keeps_its_newest_files_and_reads_across_them(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, rotate_bytes=1000, files_kept=2)
    for index in range(60):
        log.record("research", "submit", f"job-{index}", "ok")
    log.close()

    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
    kept = [entry["target"] for entry in AuditLog(path, rotate_bytes=1000, files_kept=2).entries()]
    assert kept == [f"job-{index}" for index in range(60 - len(kept), 60)]  # the newest, in order
    assert len(kept) < 60  # the oldest file went

    reopened = AuditLog(path, rotate_bytes=1000, files_kept=2)
    assert [entry["target"] for entry in reopened.entries(limit=3)] == ["job-57", "job-58", "job-59"]
    newest = path.read_text().count("\n")
    spanning = reopened.entries(limit=newest + 2)  # reaches into the rotated file
    assert [entry["target"] for entry in spanning] == kept[-(newest + 2) :]
    reopened.record("admin", "cordon", "cpu-0", "refused", "needs the admin credential")
    (last,) = reopened.entries(limit=1)
    assert {key: last[key] for key in ("principal", "action", "target", "outcome", "reason")} == {
        "principal": "admin",
        "action": "cordon",
        "target": "cpu-0",
        "outcome": "refused",
        "reason": "needs the admin credential",
    }
    with pytest.raises(UserError, match="limit: -1 is negative"):
        reopened.entries(limit=-1)


def test_a_record_the_disk_refuses_is_logged_not_raised_and_leaves_no_torn_line(tmp_path, monkeypatch, caplog):
    from cluster import auth

    log = AuditLog(tmp_path / "audit.jsonl")
    log.record("research", "submit", "before", "ok")

    def half_then_full(fd, data):
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(auth, "write_all", half_then_full)
    log.record("research", "submit", "lost", "ok")  # the submit was done: recording it must not fail it
    monkeypatch.undo()
    assert "could not record" in caplog.text and '"target": "lost"' in caplog.text
    log.record("research", "submit", "after", "ok")
    assert [entry["target"] for entry in log.entries()] == ["before", "after"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_of_refused_calls_is_counted_not_recorded_one_by_one_so_history_is_not_rotated_away(tmp_path):
    clock = FakeClock()
    log = AuditLog(tmp_path / "audit.jsonl", rotate_bytes=20_000, files_kept=1, unsuccessful_per_minute=5, clock=clock)
    log.record("admin", "set_quota", "research", "ok")
    for index in range(3000):  # a team looping on calls it may not make: ~500 KB of records one by one
        clock.now += 0.01
        log.record("research", "cordon" if index % 3 else "drain", "cpu-0", "refused", "needs the admin credential")
        if index == 1000:
            log.record("prod", "submit", "lm", "ok")  # others' work goes on being recorded
            log.record("prod", "cancel", "nope", "failed", "no request nope")
    entries = log.entries()
    assert entries[0]["action"] == "set_quota"  # the history before the flood is still there
    assert ("prod", "submit", "ok") in [(e["principal"], e["action"], e["outcome"]) for e in entries]
    assert ("prod", "cancel", "failed") in [(e["principal"], e["action"], e["outcome"]) for e in entries]
    research = [e for e in entries if e["principal"] == "research"]
    one_by_one = [e for e in research if e["outcome"] == "refused"]
    counted = [e for e in research if e["outcome"] == "suppressed"]
    # 30 s of calls: one minute, so its first 5 are recorded and the rest counted, shown to the reader as pending.
    assert len(one_by_one) == 5 and len(counted) == 1 and counted[0]["pending"] is True
    assert counted[0]["count"] == 2995 and counted[0]["action"] == "cordon,drain"
    assert "2995 more refused or failed calls between" in counted[0]["reason"]
    assert "beyond 5 a minute" in counted[0]["reason"] and "(cordon 1997, drain 998)" in counted[0]["reason"]
    written = (tmp_path / "audit.jsonl").read_text()
    log.entries()
    assert (tmp_path / "audit.jsonl").read_text() == written  # reading writes nothing

    clock.now += 5  # the same minute: counted with the rest
    for _ in range(4):
        log.record("research", "drain", "cpu-0", "refused", "needs the admin credential")
    clock.now += 60
    log.flush_ended()  # the controller's tick, with no call since: the minute is over, its count written
    (count,) = [e for e in log.entries() if e["outcome"] == "suppressed"]
    assert count["count"] == 2999 and "pending" not in count
    assert (tmp_path / "audit.jsonl").read_text().count('"suppressed"') == 1
    log.record("research", "drain", "cpu-0", "refused", "needs the admin credential")  # a new minute
    assert log.entries(limit=1)[0]["outcome"] == "refused"
    assert [entry["time"] for entry in log.entries()] == sorted(entry["time"] for entry in log.entries())
    log.close()


def test_a_credential_that_is_no_string_is_refused_as_unknown_not_a_crash(tmp_path):
    credentials = Credentials(tmp_path / "credentials", ["research"])
    for credential in (12345, b"bytes", ["list"], None, ""):
        with pytest.raises(UserError, match="the credential is missing or unknown"):
            credentials.principal(credential)


def test_a_credential_file_readable_by_others_is_made_owner_only_and_said_so(tmp_path, caplog):
    Credentials(tmp_path / "credentials", ["research"])
    loose = tmp_path / "credentials" / "research"
    loose.chmod(0o644)
    token = loose.read_text().strip()
    credentials = Credentials(tmp_path / "credentials", ["research"])
    assert oct(loose.stat().st_mode)[-3:] == "600"
    assert "was readable by others" in caplog.text and token not in caplog.text
    assert credentials.principal(token) == "research"
