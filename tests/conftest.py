"""One real local Ray cluster (head + a node per pool of examples/cluster.yaml) shared by the session.

Ray is heavy on 2 cores, so every test that needs a cluster shares this one; it is started on the
first request, on free ports so it never collides with a developer's `llmos up`, and stopped (by the
pids that started it) at the end of the session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.launcher import LocalCluster, free_port
from cluster.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_SPEC = REPO / "examples" / "cluster.yaml"


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory) -> LocalCluster:
    import ray

    from cluster.inventory import connect

    home = tmp_path_factory.mktemp("llmos-home")
    previous_home = os.environ.get("LLMOS_HOME")
    os.environ["LLMOS_HOME"] = str(home)
    cluster = LocalCluster.up(
        load_spec(EXAMPLE_SPEC),
        home=home,
        gcs_port=free_port("127.0.0.2"),
        dashboard_port=free_port(),
        on_progress=lambda message: print(f"[local_cluster] {message}", flush=True),
    )
    try:
        connect()
        yield cluster
    finally:
        ray.shutdown()
        cluster.down()
        if previous_home is None:
            os.environ.pop("LLMOS_HOME", None)
        else:
            os.environ["LLMOS_HOME"] = previous_home


@pytest.fixture(scope="module")
def tiny_lm_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a small untrained model, as jobs/ writes it, for serving tests."""
    from benchmarks.faults import random_weight_checkpoint

    return random_weight_checkpoint(tmp_path_factory.mktemp("serve-checkpoints"), layers=2, context_length=128)
