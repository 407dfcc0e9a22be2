"""Who may do what through the admin API: one credential per team and one for the admin.

Teams submit, list, watch and cancel their own requests; cordon, drain, quota changes and preemption
need the admin credential. Credentials are random tokens kept in files readable by their owner only
(`<state dir>/credentials/<principal>`), compared in constant time, and never printed, logged or put
in an error message; the audit log records principals, never tokens.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cluster.console import UserError
from cluster.store import open_to_append, write_all

ADMIN = "admin"
UNKNOWN = "unknown"  # the principal the audit log names for a caller whose credential was not recognized
RESERVED_PRINCIPALS = (ADMIN, UNKNOWN)  # never a team's name: a team so named would share their records

logger = logging.getLogger("llmos.audit")


class Action(StrEnum):
    READ_OWN = "read"  # status, queue, decisions, usage of one's own requests
    READ_AUDIT = "read_audit"
    SUBMIT = "submit"
    CANCEL = "cancel"
    REPORT = "report"  # a workload's progress, running and completion
    CORDON = "cordon"
    DRAIN = "drain"
    SET_QUOTA = "set_quota"
    PREEMPT = "preempt"
    SHUTDOWN = "shutdown"


ADMIN_ONLY = {Action.CORDON, Action.DRAIN, Action.SET_QUOTA, Action.PREEMPT, Action.SHUTDOWN, Action.READ_AUDIT}


def authorize(principal: str, action: Action, team: str | None = None) -> None:
    """Raise UserError unless `principal` may take `action` (on a request or resource of `team`)."""
    if principal == ADMIN:
        return
    if action in ADMIN_ONLY:
        raise UserError(f"forbidden: {action.value} needs the admin credential; team {principal} cannot do it")
    if team is not None and team != principal:
        raise UserError(f"forbidden: team {principal} cannot {action.value} requests of team {team}")


class Credentials:
    """Tokens per principal, created on first use and kept in owner-only files."""

    def __init__(self, directory: Path, principals: list[str]):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self._tokens: dict[str, str] = {}
        for principal in [ADMIN, *principals]:
            path = directory / principal
            if not path.exists():
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "w") as out:
                    out.write(secrets.token_urlsafe(32))
            elif path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
                logger.warning(
                    "the credential file %s was readable by others; it is owner-only now. Whoever read it holds %s's "
                    "credential: delete the file and restart the controller to make a new one",
                    path,
                    principal,
                )
            self._tokens[principal] = path.read_text().strip()

    def principal(self, credential: Any) -> str:
        if credential and isinstance(credential, str):
            for principal, token in self._tokens.items():
                if hmac.compare_digest(credential.encode(), token.encode()):
                    return principal
        raise UserError(
            "the credential is missing or unknown; pass your team's credential (Admin(credential=...), "
            "LLMOS_CREDENTIAL or --credential-file)"
        )


AUDIT_ROTATE_BYTES = 16 * 2**20
AUDIT_FILES_KEPT = 4
AUDIT_UNSUCCESSFUL_PER_MINUTE = 60  # refused or failed calls recorded one by one, per principal
SUPPRESSED = "suppressed"  # the outcome of a record that counts the unsuccessful calls not recorded one by one


@dataclass
class _Flood:
    """One principal's unsuccessful calls in the current minute, and those beyond the limit, by action."""

    window_start: float
    recorded: int = 0
    suppressed: Counter[str] = field(default_factory=Counter)
    first_suppressed: float = 0.0
    last_suppressed: float = 0.0


class AuditLog:
    """Append-only JSON lines: who did what to which target, and whether it was allowed.

    Rotated by size so a controller that runs for months keeps a bounded log: past `rotate_bytes`
    the file becomes `audit.jsonl.1`, the older ones shift up, and the oldest beyond `files_kept` goes.
    A principal's refused and failed calls beyond `unsuccessful_per_minute` in a minute are counted, not
    recorded one by one, so a caller that loops on a refused call cannot rotate the history away: one
    `suppressed` record per principal and minute says how many there were, of which actions, when; a read
    shows the counts of minutes not yet over without writing them.
    """

    def __init__(
        self,
        path: Path,
        rotate_bytes: int = AUDIT_ROTATE_BYTES,
        files_kept: int = AUDIT_FILES_KEPT,
        unsuccessful_per_minute: int = AUDIT_UNSUCCESSFUL_PER_MINUTE,
        clock: Callable[[], float] = time.time,
    ):
        self.path = path
        self.rotate_bytes = rotate_bytes
        self.files_kept = files_kept
        self.unsuccessful_per_minute = unsuccessful_per_minute
        self._clock = clock
        self._floods: dict[str, _Flood] = {}
        self._open()
        self._write_lock = threading.Lock()  # the controller records from several threads at once

    def _open(self) -> None:
        # Open for the controller's life: a record costs one write, not an open and a close.
        self._fd: int | None = open_to_append(self.path)
        self._size = os.fstat(self._fd).st_size

    def _older(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = None
        self._older(self.files_kept).unlink(missing_ok=True)
        for index in range(self.files_kept - 1, 0, -1):
            if self._older(index).exists():
                self._older(index).rename(self._older(index + 1))
        self.path.rename(self._older(1))
        self._open()

    def record(self, principal: str, action: str, target: str, outcome: str, reason: str = "") -> None:
        now = self._clock()
        entry = {"time": now, "principal": principal, "action": action, "target": target, "outcome": outcome}
        if reason:
            entry["reason"] = reason
        with self._write_lock:
            self._flush_suppressed(now, ended_only=True)
            if outcome != "ok" and not self._within_limit(principal, action, now):
                return
            self._write(entry)

    def _within_limit(self, principal: str, action: str, now: float) -> bool:
        """Whether this unsuccessful call of `principal` is recorded one by one; counts it if not."""
        flood = self._floods.get(principal)
        if flood is None or now - flood.window_start >= 60:
            flood = self._floods[principal] = _Flood(window_start=now)
        if flood.recorded < self.unsuccessful_per_minute:
            flood.recorded += 1
            return True
        if not flood.suppressed:
            flood.first_suppressed = now
        flood.suppressed[action] += 1
        flood.last_suppressed = now
        return False

    def flush_ended(self) -> None:
        """Write the `suppressed` record of every minute that is over (the controller calls this every tick)."""
        with self._write_lock:
            self._flush_suppressed(self._clock(), ended_only=True)

    def _flush_suppressed(self, now: float, *, ended_only: bool = False) -> None:
        """A `suppressed` record for each principal with calls counted, in minutes that ended or in all."""
        for principal, flood in self._floods.items():
            if flood.suppressed and (not ended_only or now - flood.window_start >= 60):
                self._write(self._suppressed_entry(principal, flood, now))
                flood.suppressed.clear()

    def _suppressed_entry(self, principal: str, flood: _Flood, now: float) -> dict:
        count = sum(flood.suppressed.values())
        by_action = ", ".join(f"{action} {n}" for action, n in flood.suppressed.most_common())
        return {
            "time": now,  # the file stays in time order; the reason says when the calls came
            "principal": principal,
            "action": ",".join(sorted(flood.suppressed)),
            "target": "",
            "outcome": SUPPRESSED,
            "count": count,
            "reason": f"{count} more refused or failed calls between {_utc(flood.first_suppressed)} and "
            f"{_utc(flood.last_suppressed)}, beyond {self.unsuccessful_per_minute} a minute, not recorded one "
            f"by one ({by_action})",
        }

    def _write(self, entry: dict) -> None:
        line = json.dumps(entry) + "\n"  # ASCII (json's default), so its length is its size in bytes
        try:
            if self._fd is None:  # a rotation failed part way
                self._open()
            if self._size and self._size + len(line) > self.rotate_bytes:
                self._rotate()
            write_all(self._fd, line.encode("ascii"))
            self._size += len(line)
        except OSError:
            # What was done stays done, and what was refused stays refused, recorded or not: a full disk
            # must not turn either into an error for the caller. The controller's log says what was missed.
            logger.exception("the audit log %s could not record: %s", self.path, line.strip())
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)  # no torn line for `entries` to choke on

    def close(self) -> None:
        with self._write_lock:
            self._flush_suppressed(self._clock())
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def entries(self, limit: int = 0) -> list[dict]:
        """The newest `limit` entries (0: every one kept), oldest first; only the lines returned are parsed."""
        if limit < 0:
            raise UserError(f"limit: {limit} is negative; ask for 1 or more entries, or 0 for all")
        with self._write_lock:
            now = self._clock()
            self._flush_suppressed(now, ended_only=True)
            # The counts of minutes not yet over are shown, not written: a reader polling during a flood must not
            # add a record a read.
            pending = [
                {**self._suppressed_entry(principal, flood, now), "pending": True}
                for principal, flood in self._floods.items()
                if flood.suppressed
            ]
        lines: list[str] = []
        for path in [self.path, *(self._older(index) for index in range(1, self.files_kept + 1))]:
            if limit and len(lines) >= limit:
                break
            if path.exists():
                lines = [line for line in path.read_text().splitlines() if line.strip()] + lines
        entries = [json.loads(line) for line in lines[-limit:]] + pending
        return entries[-limit:]


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
