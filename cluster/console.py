"""Output helpers shared by every CLI command: tables for people, JSON for scripts, clean errors."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# What we print holds user text (names, paths, YAML values, reasons), so rich's markup and emoji codes
# are off unless a call turns them on for its own styling, escaping any user text it adds: with markup
# on, `[/]` in a name crashes the print and `[bold]cpu` prints as `cpu`.
# Piped output (CI logs, `| less`) would otherwise be squeezed into 80 columns.
stdout = Console(highlight=False, markup=False, emoji=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True, highlight=False, markup=False, emoji=False, soft_wrap=True)


def output_file(text: str) -> Path:
    """An argparse type: a file to write, checked before any work, so that a long run is not lost to a bad path
    at its end. Missing folders are made when it is written."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give the name of a file in it")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{folder} is a file, so {text} cannot be written; give another path")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{folder} is not writable; give a path you can write")
    return path


def at_least(minimum: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse type: a whole number (or with `kind=float`, any number) no smaller than `minimum`."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            number = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {number}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is too small; give {minimum:g} or more")
        return value

    return parse


def port_number(text: str) -> int:
    """An argparse type: a TCP port."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; give 1 to 65535")
    return port


class UserError(Exception):
    """A problem the user can fix; the CLI prints the message (which names the fix), no traceback."""


def print_error(error: Exception) -> None:
    stderr.print(f"[bold red]error:[/] {escape(str(error))}", markup=True)


def print_hint(hint: str) -> None:
    if hint:
        stderr.print(f"[bold]hint:[/] {escape(hint)}", markup=True)


def progress(message: str) -> None:
    """Progress on long work goes to stderr, so `--json` output on stdout stays parseable."""
    stderr.print(f"[dim]{escape(message)}[/]", markup=True)


def to_plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [to_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    return value


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(to_plain(value), indent=2, sort_keys=False) + "\n")


def human_bytes(num_bytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.1f} {unit}"
    return f"{num_bytes:.0f} B"


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]], empty: str = "none") -> None:
    """A table for people; with no rows, `empty` (under the title) instead of bare column headings."""
    rows = list(rows)
    if not rows:
        stdout.print(f"{title}: {empty}" if title else empty)
        return
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    stdout.print(table)
