"""`python -m jobs.train JOB.yaml`: a TrainingJob on Ray Train (V2), the entrypoint `ray job submit` runs.

The driver asks the llmos controller for admission (`jobs.admission.admit`): the controller books a
gang of one bundle per worker against the team's quota and priority, and the workers are pinned to
the booked nodes (`WorkerPlacement`), so Ray Train's own placement group lands exactly there. The
request is marked running when fit() starts and released (finished or failed) when it ends.

The worker function is a thin wrapper around `jobs.training_loop.train`: it takes rank, world size
and device from Ray Train, resumes from `ray.train.get_checkpoint()` (or, when Ray has none, from
the newest complete checkpoint in the job's directory), forwards every report to `ray.train.report`,
attaching the checkpoint rank 0 wrote at that step, and on rank 0 sends the progress (step, loss,
tokens/s, workers, restarts) to the controller, where `llmos request ID` shows it.

`--without-controller` skips admission: the workers go to any node of the job's pool
(`placement_from_spec`), for a Ray cluster that runs no llmos controller.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    CheckpointUploadMode,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.admin import Admin, ProgressReporter
from cluster.console import UserError
from cluster.ray_mapping import POOL_LABEL, RAY_ACCELERATOR_TYPE_LABEL
from cluster.spec import SpecError
from jobs.admission import WorkerPlacement, admit
from jobs.checkpoint import latest_checkpoint
from jobs.metrics import plot_loss_curve
from jobs.spec import TrainingJob, load_training_job
from jobs.training_loop import StepReport, format_report, report_to_files, train

# Each ray.train.report waits for a controller poll, every 2 s by default; 0.2 s keeps reporting
# every few steps cheap (measured: 20 steps took 55 s instead of 16 s at the default).
HEALTH_CHECK_INTERVAL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}

# gloo runs on CPU and also carries CUDA tensors, so it is right on real GPUs and on the local
# cluster, where CPU compute stands in for the GPUs of a GPU pool. nccl is faster on real GPUs;
# choosing it needs to know the GPUs are real, which the controller will (see WorkerPlacement).
PROCESS_GROUP_BACKEND = "gloo"


def placement_from_spec(job: TrainingJob) -> WorkerPlacement:
    """The placement the job asks for, with no admission: any node of its pool or accelerator type.

    Used with `--without-controller`; with the controller, `jobs.admission.admit` returns the
    WorkerPlacement of the nodes it booked instead.
    """
    if job.pool is not None:
        selector = {POOL_LABEL: job.pool}
    elif job.accelerator_type is not None:
        selector = {RAY_ACCELERATOR_TYPE_LABEL: job.accelerator_type}
    else:
        selector = {}
    return WorkerPlacement(job.workers.min, job.workers.max, selector)


def scaling_config(job: TrainingJob, placement: WorkerPlacement) -> ScalingConfig:
    """Ray Train's ScalingConfig: elastic (min, max) when they differ, one bundle per worker."""
    resources: dict[str, float] = {"CPU": job.resources.cpus, "memory": job.resources.memory}
    if job.resources.gpus:
        resources["GPU"] = job.resources.gpus
    if placement.min_workers == placement.max_workers:
        num_workers: int | tuple[int, int] = placement.max_workers
    else:
        num_workers = (placement.min_workers, placement.max_workers)
    return ScalingConfig(
        num_workers=num_workers,
        use_gpu=job.resources.gpus > 0,
        resources_per_worker=resources,
        label_selector=placement.label_selector or None,
    )


def run_config(job: TrainingJob) -> RunConfig:
    """Storage under <storage_path>/<name>; separate budgets for failures and preemptions.

    Checkpoint retention is the job's own (jobs.checkpoint keeps the last K), so Ray keeps every
    checkpoint it was told about rather than deleting the same directories a second time.
    """
    return RunConfig(
        name=job.name,
        storage_path=str(job.run_directory.parent),
        failure_config=FailureConfig(
            max_failures=job.restart_budget.failures,
            max_preemption_failures=job.restart_budget.preemptions,
        ),
        checkpoint_config=CheckpointConfig(num_to_keep=None),
    )


def checkpoint_upload_mode(job: TrainingJob) -> CheckpointUploadMode:
    """Checkpoints inside the run directory are registered where they lie; others are copied there."""
    if job.checkpoint_directory.resolve().is_relative_to(job.run_directory.resolve()):
        return CheckpointUploadMode.NO_UPLOAD
    return CheckpointUploadMode.SYNC


def progress_details(report: StepReport, restarts: int) -> dict[str, Any]:
    """What the controller shows for a training request at a reporting step."""
    details = {
        "step": report.step,
        "steps": report.steps,
        "loss": round(report.loss, 4),
        "tokens_per_s": round(report.tokens_per_s, 1),
        "world_size": report.world_size,
        "resumed_from_step": report.resumed_from_step,
        "restarts": restarts,
        "reported_at": time.time(),
    }
    if report.heldout_loss is not None:
        details["heldout_loss"] = round(report.heldout_loss, 4)
    return details


def _start_attempt(reporter: ProgressReporter | None, world_size: int) -> int:
    """On rank 0: count this attempt in the controller's record; returns the restarts so far."""
    if reporter is None:
        return 0
    attempts = int(reporter.status().details.get("attempts", 0)) + 1
    reporter.report({"attempts": attempts, "restarts": attempts - 1, "world_size": world_size})
    return attempts - 1


def worker_device() -> torch.device:
    """The GPU Ray Train assigned to this worker, or the CPU where torch sees no CUDA.

    On the local cluster a GPU pool's nodes are simulated: Ray hands the worker a GPU id, but the
    compute is the CPU's.
    """
    return ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")


def train_worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    job = TrainingJob.model_validate(config["job"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(job.resources.cpus)))
    to_files = report_to_files(job, rank)
    upload_mode = checkpoint_upload_mode(job)
    reporter: ProgressReporter | None = config.get("reporter") if rank == 0 else None
    restarts = _start_attempt(reporter, world_size)

    def report(step_report: StepReport) -> None:
        to_files(step_report)
        if reporter is not None:
            reporter.report(progress_details(step_report, restarts))  # no round trip: one actor call
        # Every rank calls report at the same steps (it is a barrier); only rank 0 has a checkpoint.
        checkpoint = Checkpoint.from_directory(step_report.checkpoint) if step_report.checkpoint else None
        ray.train.report(step_report.as_dict(), checkpoint=checkpoint, checkpoint_upload_mode=upload_mode)

    ray_checkpoint = ray.train.get_checkpoint()
    if ray_checkpoint is None:
        # A fresh Ray run of a job that already has checkpoints (say, resubmitted) continues them.
        train(
            job,
            rank=rank,
            world_size=world_size,
            device=worker_device(),
            resume_from=latest_checkpoint(job.checkpoint_directory),
            on_report=report,
        )
    else:
        with ray_checkpoint.as_directory() as directory:
            train(
                job,
                rank=rank,
                world_size=world_size,
                device=worker_device(),
                resume_from=Path(directory),
                on_report=report,
            )
    if rank == 0:
        plot_loss_curve(job.metrics_file, job.loss_curve_file, title=job.name)


def build_trainer(
    job: TrainingJob, placement: WorkerPlacement, reporter: ProgressReporter | None = None
) -> TorchTrainer:
    for name, value in HEALTH_CHECK_INTERVAL_ENV.items():
        # Ray Train passes these from the driver to its controller and workers.
        os.environ.setdefault(name, value)
    return TorchTrainer(
        train_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "reporter": reporter},
        torch_config=TorchConfig(backend=PROCESS_GROUP_BACKEND),
        scaling_config=scaling_config(job, placement),
        run_config=run_config(job),
    )


def describe(placement: WorkerPlacement) -> str:
    if isinstance(placement.label_selector, list):
        return ", ".join(next(iter(selector.values()), "?") for selector in placement.label_selector)
    return str(placement.label_selector or "any node")


def fit(job: TrainingJob, placement: WorkerPlacement, reporter: ProgressReporter | None = None) -> StepReport:
    """Run the trainer to the end; returns the last report. Raises TrainingFailedError."""
    result = build_trainer(job, placement, reporter).fit()
    reported = {item.name for item in dataclasses.fields(StepReport)}
    return StepReport(**{key: value for key, value in result.metrics.items() if key in reported})


def format_progress(details: dict[str, Any]) -> str:
    """A driver progress line from what rank 0 reported to the controller."""
    parts = [
        f"step {details['step']}/{details.get('steps', '?')}",
        f"loss {details['loss']:.3f}" if "loss" in details else "",
        f"held-out {details['heldout_loss']:.3f}" if "heldout_loss" in details else "",
        f"{details.get('tokens_per_s', 0):,.0f} tok/s",
        f"{details.get('world_size', '?')} workers",
        f"resumed from step {details['resumed_from_step']}" if details.get("resumed_from_step") else "",
        f"restarts {details['restarts']}" if details.get("restarts") else "",
    ]
    return "  ".join(part for part in parts if part)


class ProgressPrinter(threading.Thread):
    """Prints, on the driver, each new step the rank-0 worker reported to the controller.

    Worker output is not forwarded to the driver (llmos connects with log_to_driver off), and the
    controller's record is what `llmos request ID` shows, so the driver prints that.
    """

    def __init__(self, reporter: ProgressReporter, on_progress: Callable[[str], None], interval_s: float = 1.0):
        super().__init__(daemon=True, name="llmos-train-progress")
        self.reporter, self.on_progress, self.interval_s = reporter, on_progress, interval_s
        self.stopping = threading.Event()
        self.last_step: tuple[int, int] | None = None

    def poll(self) -> None:
        details = self.reporter.status().details
        if "step" in details:
            seen = (int(details.get("restarts", 0)), int(details["step"]))
            if seen != self.last_step:
                self.last_step = seen
                self.on_progress(format_progress(details))

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # progress output is best effort; the run goes on
                continue

    def stop(self) -> None:
        """Stop polling, then print the last step if it was not printed yet."""
        self.stopping.set()
        self.join(self.interval_s + 30)
        with contextlib.suppress(Exception):
            self.poll()


def run_admitted(
    job: TrainingJob,
    admin: Admin,
    *,
    on_progress: Callable[[str], None] = print,
    wait_timeout_s: float | None = None,
) -> tuple[str, StepReport]:
    """Admit the job through the controller, train on the booked nodes, release them; returns (request id, last report).

    The request ends finished, or failed with the reason when training fails or is interrupted.
    """
    admission = admit(job, admin, on_progress=on_progress, wait_timeout_s=wait_timeout_s)
    request_id, placement = admission.request_id, admission.placement
    on_progress(
        f"training {job.name}: request {request_id} placed {placement.max_workers} worker"
        f"{'s' if placement.max_workers > 1 else ''} on {describe(placement)}; "
        f"checkpoints in {job.checkpoint_directory}"
    )
    try:
        admin.mark_running(request_id, {"world_size": placement.max_workers, "nodes": admission.status.nodes})
        printer = ProgressPrinter(admin.reporter(request_id), on_progress)
        printer.start()
        try:
            final = fit(job, placement, admin.reporter(request_id))
        finally:
            printer.stop()
    except TrainingFailedError as error:
        admin.complete(request_id, failed=True, reason=f"training failed: {_first_line(error)}")
        raise
    except BaseException as error:
        admin.complete(request_id, failed=True, reason=f"driver stopped: {type(error).__name__} {_first_line(error)}")
        raise
    admin.complete(request_id)
    return request_id, final


def _first_line(error: BaseException) -> str:
    """One line for a log or a request's reason: the summary, and the innermost error when there is one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    summary = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return summary[:400]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description="Run a TrainingJob on Ray Train.")
    parser.add_argument("job", type=Path, help="TrainingJob YAML, e.g. examples/train.yaml")
    parser.add_argument(
        "--without-controller",
        action="store_true",
        help="skip llmos admission: place the workers on any node of the job's pool (no quota, no books)",
    )
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up (and cancel the request) if not placed within this time; default: wait",
    )
    args = parser.parse_args(argv)
    try:
        job = load_training_job(args.job)
    except SpecError as error:
        print(error, file=sys.stderr)
        return 2
    try:
        if args.without_controller:
            placement = placement_from_spec(job)
            print(f"training {job.name} without admission on {describe(placement)}", flush=True)
            final = fit(job, placement)
        else:
            _, final = run_admitted(
                job, Admin(), on_progress=lambda line: print(line, flush=True), wait_timeout_s=args.wait_timeout
            )
    except (UserError, SpecError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingFailedError as error:
        print(f"training {job.name} failed: {_first_line(error)}", file=sys.stderr)
        return 1
    print(f"done: {format_report(final)}")
    print(f"metrics {job.metrics_file}, loss curve {job.loss_curve_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
