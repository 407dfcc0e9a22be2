"""Durable state for the controller: an append-only JSON-lines journal plus a compacted snapshot.

Entries, JSON objects, are buffered by `append` and made durable by `flush` (write + fsync), which
the controller calls before it acknowledges a change, so an acknowledged request survives a killed
controller. A flush writes one line, `{"batch": [...]}` for several entries: a change is its whole
batch (a preemption both places one request and takes another off the same GPUs), and a line torn
by a kill or a power loss belonged to an unacknowledged change, so it is skipped whole, and cut off
when the journal is opened again, before anything is appended after it.

Compaction writes the whole state as snapshot generation g+1 (temporary file, fsync, rename) and
starts `journal-<g+1>.jsonl`; loading reads the snapshot and only the journal of its generation, so
a crash at any point of a compaction leaves one consistent state. The directory is fsynced after
each file it gains and each rename, so a power loss cannot keep a later step and lose an earlier one.

A flush that fails (a full disk, an I/O error) leaves the journal as it was before it and raises
`JournalWriteFailed`: the change it held is in the caller's memory only, so the caller must not
acknowledge it or act on it (the controller reloads its books from the journal).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

SNAPSHOT = "snapshot.json"
RAY_CLUSTER = "ray-cluster"  # the id of the Ray cluster the books' placements were made in


class JournalWriteFailed(RuntimeError):
    """A flush did not become durable; the journal holds what it held before the flush."""


class JournalDamaged(RuntimeError):
    """A journal line before the last is not an entry: reading on would restore books with changes missing."""


class Journal:
    def __init__(self, directory: str | Path, compact_every: int = 20_000):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True)
            fsync_path(self.directory.parent)
        # Every team's requests, and the credentials, are in here: the controller's user alone reads them.
        with contextlib.suppress(PermissionError):  # a directory of someone else's, such as a volume's root
            os.chmod(self.directory, 0o700)
        self.compact_every = compact_every
        self._compact_at = compact_every
        self._pending: list[str] = []
        self._lines_since_compaction = 0
        self.generation, entries = self._read_snapshot()
        # The snapshot's entries as read at start, for the first `load`; None after it or after a
        # compaction (read from disk then), so the controller does not hold a second copy of its books.
        self._snapshot_entries: list[dict] | None = entries
        self._remove_journals_before(self.generation)
        _cut_torn_tail(self._journal_path(self.generation))
        self._fd: int | None = self._open_journal(self.generation)

    def _journal_path(self, generation: int) -> Path:
        return self.directory / f"journal-{generation}.jsonl"

    def _open_journal(self, generation: int) -> int:
        """The journal's file, opened to append (`open_to_append`)."""
        path = self._journal_path(generation)
        existed = path.exists()
        fd = open_to_append(path)
        if not existed:
            fsync_path(self.directory)
        return fd

    def _remove_journals_before(self, generation: int) -> None:
        """Journals a crash left between a compaction's rename and its removal of the old journal: the
        snapshot holds their entries, and loading never reads them."""
        for path in self.directory.glob("journal-*.jsonl"):
            number = path.stem.removeprefix("journal-")
            if number.isdigit() and int(number) < generation:
                path.unlink(missing_ok=True)

    def _read_snapshot(self) -> tuple[int, list[dict]]:
        path = self.directory / SNAPSHOT
        if not path.exists():
            return 0, []
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["generation"], data["entries"]

    def append(self, line: str) -> None:
        """Buffer one entry, a JSON object on one line, until `flush`."""
        self._pending.append(line)

    def flush(self) -> None:
        if not self._pending:
            return
        batch = self._pending[0] if len(self._pending) == 1 else f'{{"batch":[{",".join(self._pending)}]}}'
        entries = len(self._pending)
        self._pending.clear()
        end = None
        try:
            if self._fd is None:  # a compaction could not start its journal
                self._fd = self._open_journal(self.generation)
            end = os.lseek(self._fd, 0, os.SEEK_END)
            write_all(self._fd, (batch + "\n").encode("utf-8"))
            os.fsync(self._fd)
        except OSError as error:
            # Cut back what reached the file: read at the next start, it would carry out a change that was
            # never acknowledged. After a failed fsync the kernel may have dropped the pages, so trying the
            # fsync again proves nothing.
            if end is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, end)
                    os.fsync(self._fd)
            journal = self._journal_path(self.generation)
            raise JournalWriteFailed(f"writing the journal {journal} failed: {error}") from error
        self._lines_since_compaction += entries

    @property
    def needs_compaction(self) -> bool:
        return self._lines_since_compaction >= self._compact_at

    def load(self) -> list[dict]:
        entries = self._snapshot_entries if self._snapshot_entries is not None else self._read_snapshot()[1]
        self._snapshot_entries = None
        journal = self._journal_path(self.generation)
        if not journal.exists():
            return entries
        # Lines end at "\n" only: JSON leaves U+2028 and its kin unescaped inside strings, and
        # `str.splitlines` would break a line there.
        lines = journal.read_bytes().split(b"\n")
        read = 0
        for number, line in enumerate(lines, 1):
            if not line:
                continue
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                if number == len(lines):
                    break  # a last line torn by a kill: it was never acknowledged
                raise JournalDamaged(
                    f"{journal} line {number} is not a journal entry ({error}); it ends in a newline, so it is no "
                    "write cut off by a kill: the file was damaged. Restore it from a backup, or move it aside to "
                    "start from the snapshot alone, losing the changes it holds"
                ) from error
            batch = entry["batch"] if entry.keys() == {"batch"} else [entry]
            entries.extend(batch)
            read += len(batch)
        self._lines_since_compaction = read  # a controller restarted often still compacts
        return entries

    def compact(self, entries: list[str]) -> None:
        """Replace snapshot and journal by `entries`, the whole state as JSON objects (one string
        each, as `append` takes them), as the next generation."""
        self.flush()
        generation = self.generation + 1
        snapshot = f'{{"generation":{generation},"entries":[{",".join(entries)}]}}'
        try:
            _replace_durably(self.directory / SNAPSHOT, snapshot)
        except OSError:
            # Nothing changed: the journal still holds every change. Try again after a tenth of a
            # compaction's lines, not at each flush, since the whole state is written each time.
            self._compact_at = self._lines_since_compaction + max(1, self.compact_every // 10)
            raise
        # The snapshot holds the whole state now, durably: the old journal is done with, and a new one that
        # cannot be started here is started by the next flush.
        old = self._journal_path(self.generation)
        self._close_file()
        self.generation, self._snapshot_entries = generation, None
        self._lines_since_compaction, self._compact_at = 0, self.compact_every
        try:
            self._fd = self._open_journal(generation)
        finally:
            old.unlink(missing_ok=True)

    def close(self) -> None:
        self.flush()
        self._close_file()

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _cut_torn_tail(journal: Path) -> None:
    """Cut a journal after its last whole line: a line torn by a kill would otherwise run into the
    next one appended, and both would be skipped when read."""
    with contextlib.suppress(FileNotFoundError), open(journal, "rb+") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return
        file.seek(size - 1)
        if file.read(1) == b"\n":
            return  # whole: the usual case reads one byte, not the journal that `load` reads again
        file.seek(0)
        file.truncate(file.read().rfind(b"\n") + 1)
        file.flush()
        os.fsync(file.fileno())


def open_to_append(path: Path) -> int:
    """A file descriptor appending to `path`, created if missing; owner-only, made so if an earlier version left
    it readable by everyone. Unbuffered: a failed write leaves no bytes behind to be written later."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def write_all(fd: int, data: bytes) -> None:
    """`os.write` until all of `data` is written: a write may take part of it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_path(path: Path) -> None:
    """Make a file's contents, or a directory's entries, durable: of a directory, a file created or renamed there
    then survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_ray_cluster(directory: str | Path) -> str | None:
    """The id of the Ray cluster the books in `directory` were kept for; None if not recorded."""
    with contextlib.suppress(FileNotFoundError):
        return (Path(directory) / RAY_CLUSTER).read_text(encoding="utf-8").strip() or None
    return None


def write_ray_cluster(directory: str | Path, cluster_id: str) -> None:
    """Record durably that the books in `directory` are `cluster_id`'s."""
    _replace_durably(Path(directory) / RAY_CLUSTER, cluster_id + "\n")


def _replace_durably(path: Path, text: str) -> None:
    """`path` holds `text` whole or keeps what it held: a temporary file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a partial copy of the whole state, on a disk likely short of room
        raise
    fsync_path(path.parent)
