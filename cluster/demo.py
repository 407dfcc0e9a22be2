"""`make demo`: the main job end to end on an embedded local cluster from examples/cluster.yaml.

It uses its own state directory and free ports, so it never touches a cluster you started with
`llmos up`, and it stops everything it started, even when a step fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml
from rich.markup import escape

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
        admin = show_scheduling()
        checkpoints = show_training(cluster, admin, home)
        show_serving(admin, checkpoints)
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
    return admin


def show_training(cluster: LocalCluster, admin, home: Path) -> Path:
    """The example training job through `ray job submit`; a worker is killed mid-run and it resumes."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    from jobs.spec import load_training_job

    for status in admin.queue():  # the scheduling story's gangs make way
        admin.cancel(status.id)
    example = load_training_job(REPO / "examples" / "train.yaml")
    job = example.model_copy(
        update={
            "steps": 80,
            "storage_path": str(home / "jobs"),
            "checkpoint": example.checkpoint.model_copy(update={"every_steps": 20}),
            "evaluation": example.evaluation.model_copy(update={"every_steps": 40}),
        }
    )
    job_file = home / "train.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    step("ray job submit: the example job (80 steps here) on Ray Train, admitted and placed by the controller")
    stdout.print(
        f"  ray job submit --address {cluster.dashboard_url} --working-dir . -- python -m jobs.train {job_file}"
    )
    client = JobSubmissionClient(cluster.dashboard_url)
    submission = cluster.submit_job(f"python -m jobs.train {job_file}", REPO)
    shown, killed = 0, False
    deadline = time.monotonic() + 900
    while not client.get_job_status(submission).is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(submission)
            raise RuntimeError("the demo training job did not finish within 15 minutes")
        lines = client.get_job_logs(submission).splitlines()
        for line in lines[shown:]:
            stdout.print(f"  | {line}", markup=False, highlight=False)  # job logs may hold [brackets]
        shown = len(lines)
        mine = [s for s in admin.queue() if s.request.gang.name == job.name]
        if not killed and mine and mine[0].details.get("step", 0) >= 30:
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True)
            if len(workers) >= 2:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed = True
                stdout.print(
                    f"  [bold yellow]>> killed a training worker (pid {workers[-1].pid}) at step "
                    f"{mine[0].details['step']}; llmos restarts the attempt from the last checkpoint[/]",
                    markup=True,
                )
        time.sleep(1)
    for line in client.get_job_logs(submission).splitlines()[shown:]:
        stdout.print(f"  | {line}", markup=False, highlight=False)
    final = [s for s in admin.queue(include_finished=True) if s.request.gang.name == job.name][-1]
    stdout.print(
        f"  job {client.get_job_status(submission).value}; request {final.id} {final.state.value}: "
        f"step {final.details.get('step')}, restarts {final.details.get('restarts')}"
    )
    return job.checkpoint_directory


def show_serving(admin, checkpoints: Path) -> None:
    """Serve the checkpoint the training wrote and complete a Python snippet over HTTP."""
    import requests

    from serving.deploy import delete, deploy
    from serving.spec import load_serve_job

    step("llmos serve deploy: the checkpoint behind an OpenAI-style API, replicas booked by the controller")
    job = load_serve_job(REPO / "examples" / "serve.yaml").model_copy(update={"checkpoint": str(checkpoints)})
    deployment = deploy(job, admin, port=free_port(), on_progress=lambda message: stdout.print(f"  {message}"))
    prompt = "def main():\n    "
    stdout.print(f"  POST {deployment.url}  prompt={prompt!r}")
    response = requests.post(
        deployment.url,
        json={"model": job.name, "prompt": prompt, "max_tokens": 64, "temperature": 0.8, "seed": 0},
        timeout=60,
    )
    completion = response.json()["choices"][0]["text"]
    stdout.print(f"  [bold]{escape(prompt)}[/]{escape(completion)}", markup=True)  # the model writes any text
    delete(job.name, admin)


def main() -> int:
    home = REPO / ".llmos" / "demo"
    os.environ["LLMOS_HOME"] = str(home)
    stale = LocalCluster.find(home)
    if stale is not None:
        stale.down()
    # Each demo tells its story from an empty queue and trains from scratch.
    for leftover in ("controller", "jobs"):
        shutil.rmtree(home / leftover, ignore_errors=True)
    run_demo(home)
    stdout.print("\n[bold green]demo finished[/]", markup=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
