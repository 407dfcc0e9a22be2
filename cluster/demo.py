"""`make demo`: the main job end to end on an embedded local cluster from examples/cluster.yaml.

It uses its own state directory and free ports, so it never touches a cluster you started with
`llmos up`, and it stops everything it started, even when a step fails.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from cluster.cli import main as llmos
from cluster.console import stdout
from cluster.inventory import disconnect
from cluster.launcher import LocalCluster, free_port
from cluster.spec import load_spec

REPO = Path(__file__).resolve().parents[1]


def step(title: str) -> None:
    stdout.print(f"\n[bold cyan]== {title}[/]", markup=True)


def run_demo(home: Path) -> None:
    spec_path = REPO / "examples" / "cluster.yaml"
    step(f"llmos spec validate {spec_path.relative_to(REPO)}")
    llmos(["spec", "validate", str(spec_path)])

    step("llmos up: a real multi-node Ray cluster on loopback, one simulated node per pool")
    started = time.monotonic()
    cluster = LocalCluster.up(
        load_spec(spec_path),
        home=home,
        gcs_port=free_port("127.0.0.2"),
        dashboard_port=free_port(),
        on_progress=lambda message: stdout.print(f"  {message}"),
    )
    stdout.print(f"  up in {time.monotonic() - started:.0f}s; dashboard {cluster.dashboard_url}")
    try:
        step("llmos status: pools and nodes as Ray sees them")
        llmos(["status"])
    finally:
        disconnect()
        step("llmos down: stop exactly what up started")
        cluster.down(on_progress=lambda message: stdout.print(f"  {message}"))


def main() -> int:
    home = REPO / ".llmos" / "demo"
    os.environ["LLMOS_HOME"] = str(home)
    stale = LocalCluster.find(home)
    if stale is not None:
        stale.down()
    run_demo(home)
    stdout.print("\n[bold green]demo finished[/]", markup=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
