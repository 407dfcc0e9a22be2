"""Training metrics a script can read (JSONL, one record per report) and a person can look at (PNG).

Restarts append to the same file, so the curve of a run that was interrupted and resumed is one
curve; steps replayed after a restart appear twice and the plot keeps the later value.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def append_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as file:
        file.write(json.dumps(record, default=str) + "\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics file; a last line cut off by a crash is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _latest_per_step(records: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    values: dict[int, float] = {}
    for record in records:
        if record.get(key) is not None:
            values[record["step"]] = record[key]
    steps = sorted(values)
    return steps, [values[step] for step in steps]


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str = "") -> Path:
    """Training and held-out loss against step, with a dashed line where each restart resumed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics_path)
    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    steps, losses = _latest_per_step(records, "loss")
    axes.plot(steps, losses, label="training loss", linewidth=1.2)
    steps, heldout = _latest_per_step(records, "heldout_loss")
    if steps:
        axes.plot(steps, heldout, "o-", label="held-out loss", linewidth=1.2, markersize=3)
    resumed_at = sorted({r["resumed_from_step"] for r in records if r.get("resumed_from_step")})
    for index, step in enumerate(resumed_at):
        axes.axvline(step, color="grey", linestyle="--", linewidth=0.8, label="resumed" if index == 0 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per byte)")
    axes.set_title(title or metrics_path.parent.name)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path)
    plt.close(figure)
    return png_path
