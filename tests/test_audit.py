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
