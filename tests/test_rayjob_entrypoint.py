"""The entrypoint `llmos manifests render --job` writes into a RayJob, run as KubeRay would run it: in a
Ray cluster with no llmos controller and no local-cluster record (Kueue admitted the job whole; the
cluster is the job's own). Real Ray Train on the shared local cluster, the driver in a subprocess."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from tiny_jobs import tiny_job

from cluster import controller
from cluster.launcher import LocalCluster
from cluster.spec import ClusterSpec
from manifests.workloads import JOB_DIRECTORY, JOB_FILE, ray_job

REPO = Path(__file__).resolve().parents[1]


def test_the_rendered_rayjob_entrypoint_trains_where_no_controller_runs(local_cluster: LocalCluster, tmp_path: Path):
    job = tiny_job(
        tmp_path, "rayjob-entrypoint", steps=6, workers={"min": 1, "max": 1}, pool="cpu", resources={"cpus": 1}
    )
    job_file = tmp_path / JOB_FILE
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    # One machine: tmp_path is the volume every pod of the job's cluster would mount.
    spec = local_cluster.spec.model_dump(mode="json")
    spec["kubernetes"]["shared_storage"] = {"mount_path": str(tmp_path)}
    _, rayjob = ray_job(ClusterSpec.model_validate(spec), job, job_file.read_text())
    command = [
        sys.executable if word == "python" else str(job_file) if word == f"{JOB_DIRECTORY}/{JOB_FILE}" else word
        for word in shlex.split(rayjob["spec"]["entrypoint"])
    ]
    assert controller.get() is None  # as in the job's own cluster
    env = {**os.environ, **local_cluster.client_env(), "LLMOS_HOME": str(tmp_path / "no-local-cluster")}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "without admission" in run.stdout and "done: step 6/6" in run.stdout
    assert job.metrics_file.exists()
    assert sorted(path.name for path in job.checkpoint_directory.iterdir())[-1] == "step-000000006"
