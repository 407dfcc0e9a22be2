"""Ray's own `serve deploy` runs the config `llmos serve config` renders: the file a RayService carries.

Its own module, so that Serve is not running when it starts: the `served` fixture of
tests/test_serving.py holds Serve for that whole module, and a running Serve keeps the HTTP options it
was started with, whatever a config deployed later says.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ray
import requests
import yaml
from ray import serve
from ray.util.state import list_actors
from waiting import wait_for

from cluster.launcher import LocalCluster, free_port
from cluster.ray_mapping import POOL_LABEL

TIMEOUT_S = 90


def run(command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def replica_actors() -> list:
    return list_actors(
        filters=[("class_name", "=", "ServeReplica:plain-serve:CompletionServer"), ("state", "=", "ALIVE")]
    )


def test_rays_own_serve_deploy_runs_the_rendered_config(
    local_cluster: LocalCluster, tiny_lm_checkpoint: Path, tmp_path
):
    job_file = tmp_path / "serve.yaml"
    job_file.write_text(
        yaml.safe_dump(
            {
                "name": "plain-serve",
                "team": "research",
                "checkpoint": str(tiny_lm_checkpoint),
                "replicas": {"min": 1, "max": 1},
                "resources": {"cpus": 1},
                "pool": "cpu",
            }
        )
    )
    config_file, port = tmp_path / "serve-config.yaml", free_port()
    env = {**os.environ, **local_cluster.client_env()}
    bin_dir = Path(sys.executable).parent
    run([str(bin_dir / "llmos"), "serve", "config", str(job_file), "--host", "127.0.0.1", "--port", str(port),
         "-o", str(config_file)], env)  # fmt: skip
    run([str(bin_dir / "serve"), "deploy", str(config_file), "--address", local_cluster.dashboard_url], env)
    try:
        wait_for(
            lambda: (app := serve.status().applications.get("plain-serve")) is not None and app.status == "RUNNING",
            TIMEOUT_S,
            "the application deployed by `serve deploy` to be RUNNING",
        )
        response = requests.post(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps({"model": "plain-serve", "prompt": "def f(x):", "max_tokens": 4, "temperature": 0}),
            headers={"content-type": "application/json"},
            timeout=TIMEOUT_S,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "plain-serve" and body["usage"]["completion_tokens"] >= 1
        # The replica went where the config's selector says: a node of the job's pool.
        replicas = replica_actors()
        pools = {node["NodeID"]: node["Labels"].get(POOL_LABEL) for node in ray.nodes()}
        assert [pools[replica.node_id] for replica in replicas] == ["cpu"]
    finally:
        serve.shutdown()  # this driver's Serve client, so the next module starts Serve afresh
        wait_for(lambda: not replica_actors(), TIMEOUT_S, "the replica to be gone")
