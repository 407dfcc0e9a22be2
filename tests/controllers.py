"""Controllers on the shared cluster in tests: a module's own controller, its placement groups in Ray,
and the `llmos` CLI run against the cluster."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import ray
from waiting import WAIT_S, wait_for

from cluster import binding, controller
from cluster.admin import Admin
from cluster.launcher import LocalCluster


@contextlib.contextmanager
def own_controller(tmp_path_factory, name: str, policy: str) -> Iterator[Admin]:
    """Start it; afterwards cancel whatever the module left queued or placed, and stop it."""
    admin = Admin(state_dir=tmp_path_factory.mktemp(name), policy=policy)
    yield admin
    for status in admin.queue():
        admin.cancel(status.id)
    admin.stop_controller()


def live_llmos_groups() -> dict[str, str]:
    """Every llmos placement group Ray holds: its name -> its id."""
    return {name: entry["placement_group_id"] for name, entry in binding.live_groups().items()}


def llmos_cli(local_cluster: LocalCluster, *args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    """`llmos ARGS` in a subprocess, with `LLMOS_HOME` the cluster's (it finds the cluster) or `home`."""
    env = {**os.environ, "LLMOS_HOME": str(home or local_cluster.home)}
    if home is not None:  # no local-cluster record there: reach the cluster by its address
        env.update(local_cluster.client_env())
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def stop_any_controller() -> None:
    """Kill whatever controller runs (a test's own, stopped or not), and wait until its name is free."""
    handle = controller.get()
    if handle is not None:
        ray.kill(handle, no_restart=True)
        wait_for(lambda: controller.get() is None, WAIT_S, "the controller to stop")
