"""`make demo`: the main job end to end on an embedded local cluster from examples/cluster.yaml.

It uses its own state directory and free ports, so it never touches a cluster you started with
`llmos up`, and it stops everything it started, even when a step fails.
"""

from __future__ import annotations

import os
import shutil
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
        show_scheduling()
    finally:
        disconnect()
        step("llmos down: stop exactly what up started")
        cluster.down(on_progress=lambda message: stdout.print(f"  {message}"))


def gang(name: str, workers: int, resources: dict, pool: str | None = None, constraint: str = "same_pool") -> dict:
    bundle = {"resources": resources, **({"label_selector": {"llmos.io/pool": pool}} if pool else {})}
    return {"name": name, "bundles": [bundle] * workers, "constraint": constraint}


def show_scheduling() -> None:
    from cluster.admin import Admin

    step("the controller: a detached Ray actor that owns queue, quotas and placements")
    admin = Admin()
    info = admin.ping()
    stdout.print(f"  policy {info['policy']}, journal in {info['state_dir']}")

    step("teams submit gangs: each is placed all-or-nothing and bound to a pinned Ray placement group")
    submissions = [
        {"team": "research", "kind": "training", "gang": gang("pretrain", 2, {"CPU": 2, "GPU": 4}, "h100")},
        {"team": "research", "kind": "serving", "gang": gang("chat-replica", 1, {"CPU": 1, "GPU": 0.5})},
        {"team": "interns", "kind": "batch", "gang": gang("eval", 1, {"CPU": 1, "GPU": 1})},
        {"team": "interns", "kind": "batch", "gang": gang("eval-big", 1, {"CPU": 1, "GPU": 4})},
        {"team": "prod", "kind": "training", "gang": gang("tpu-job", 2, {"CPU": 8, "TPU": 4}, None, "same_tpu_slice")},
        {"team": "interns", "kind": "batch", "gang": gang("too-big", 1, {"CPU": 1, "GPU": 16})},
    ]
    for request in submissions:
        status = admin.submit(request)
        stdout.print(
            f"  {request['team']:>8} {request['gang']['name']:<13} -> {status.id}: {status.state.value}"
            + (f" ({status.reason})" if status.reason else "")
        )
    step("llmos queue")
    llmos(["queue"])
    step("llmos nodes: where everything landed")
    llmos(["nodes"])

    step("prod (priority high) needs the whole H100 node: the controller preempts the cheapest lower-priority work")
    urgent = admin.submit({"team": "prod", "kind": "training", "gang": gang("urgent", 1, {"CPU": 4, "GPU": 8}, "h100")})
    stdout.print(f"  prod urgent -> {urgent.id}: {urgent.state.value}")
    llmos(["decisions", "--limit", "6"])
    llmos(["queue"])


def main() -> int:
    home = REPO / ".llmos" / "demo"
    os.environ["LLMOS_HOME"] = str(home)
    stale = LocalCluster.find(home)
    if stale is not None:
        stale.down()
    # Each demo tells its story from an empty queue.
    shutil.rmtree(home / "controller", ignore_errors=True)
    run_demo(home)
    stdout.print("\n[bold green]demo finished[/]", markup=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
