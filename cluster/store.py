"""Durable state for the controller: an append-only JSON-lines journal plus a compacted snapshot.

Entries, JSON objects, are buffered by `append` and made durable by `flush` (write + fsync), which
the controller calls before it acknowledges a change, so an acknowledged request survives a killed
controller. A flush writes one line, `{"batch": [...]}` for several entries: a change is its whole
batch (a preemption both places one request and takes another off the same GPUs), and a line torn
by a kill or a power loss belonged to an unacknowledged change, so it is skipped whole, and cut off
when the journal is opened again, before anything is appended after it.

Compaction writes the whole state as snapshot generation g+1 (temporary file, fsync, rename) and
starts `journal-<g+1>.jsonl`; loading reads the snapshot and only the journal of its generation, so
a crash at any point of a compaction leaves one consistent state.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

SNAPSHOT = "snapshot.json"
RAY_CLUSTER = "ray-cluster"  # the id of the Ray cluster the books' placements were made in


class Journal:
    def __init__(self, directory: str | Path, compact_every: int = 20_000):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.compact_every = compact_every
        self._pending: list[str] = []
        self._lines_since_compaction = 0
        self.generation, entries = self._read_snapshot()
        # The snapshot's entries as read at start, for the first `load`; None after it or after a
        # compaction (read from disk then), so the controller does not hold a second copy of its books.
        self._snapshot_entries: list[dict] | None = entries
        _cut_torn_tail(self._journal_path(self.generation))
        self._file = open(self._journal_path(self.generation), "a", encoding="utf-8")  # noqa: SIM115

    def _journal_path(self, generation: int) -> Path:
        return self.directory / f"journal-{generation}.jsonl"

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
        self._file.write(batch + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._lines_since_compaction += len(self._pending)
        self._pending.clear()

    @property
    def needs_compaction(self) -> bool:
        return self._lines_since_compaction >= self.compact_every

    def load(self) -> list[dict]:
        entries = self._snapshot_entries if self._snapshot_entries is not None else self._read_snapshot()[1]
        self._snapshot_entries = None
        journal = self._journal_path(self.generation)
        if journal.exists():
            for line in journal.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    entry = json.loads(line)
                    entries.extend(entry["batch"] if entry.keys() == {"batch"} else [entry])
        return entries

    def compact(self, entries: list[str]) -> None:
        """Replace snapshot and journal by `entries`, the whole state as JSON objects (one string
        each, as `append` takes them), as the next generation."""
        self.flush()
        generation = self.generation + 1
        _replace_durably(self.directory / SNAPSHOT, f'{{"generation":{generation},"entries":[{",".join(entries)}]}}')
        self._file.close()
        old = self._journal_path(self.generation)
        self.generation, self._snapshot_entries = generation, None
        self._file = open(self._journal_path(generation), "a", encoding="utf-8")  # noqa: SIM115
        old.unlink(missing_ok=True)
        self._lines_since_compaction = 0

    def close(self) -> None:
        self.flush()
        self._file.close()


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
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
