"""`python -m jobs.train JOB.yaml`: a TrainingJob on Ray Train (V2), the entrypoint `ray job submit` runs.

The driver asks the llmos controller for admission (`jobs.admission.admit`): the controller books a
gang of one bundle per worker against the team's quota and priority, and the workers are pinned to
the booked nodes (`WorkerPlacement`), so Ray Train's own placement group lands exactly there. Each
attempt is one Ray Train fit() with no retries of its own; `jobs.elastic` decides what follows a
lost node, a dead worker, a preemption or room to grow, and releases the bookings at the end.

The worker function is a thin wrapper around `jobs.training_loop.train`: it takes rank, world size
and device from Ray Train, resumes from `ray.train.get_checkpoint()` (or, when Ray has none, from
the newest complete checkpoint in the job's directory), forwards each checkpoint step's report to
`ray.train.report` with the checkpoint rank 0 wrote, and on rank 0 sends the progress (step, loss,
tokens/s, workers, restarts) to the controller, where `llmos request ID` shows it, and reads the
driver's stop directive at every reporting step (`stop_check`).

`--without-controller` skips admission: the workers go to any node of the job's pool
(`placement_from_spec`), for a Ray cluster that runs no llmos controller.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.exceptions import RayError
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
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.admin import Admin, ProgressReporter
from cluster.console import UserError, print_hint
from cluster.ray_mapping import POOL_LABEL, RAY_ACCELERATOR_TYPE_LABEL
from cluster.spec import SpecError
from jobs.admission import WorkerPlacement
from jobs.checkpoint import latest_checkpoint
from jobs.elastic import ElasticRun, RestartBudgetExhausted, TrainingAttemptFailed, one_line, wants_stop
from jobs.metrics import plot_loss_curve
from jobs.spec import TrainingJob, load_training_job
from jobs.training_loop import (
    StepReport,
    StopCheck,
    already_trained,
    check_data,
    check_resumable,
    finished_report,
    format_report,
    progress_details,
    report_to_files,
    set_aside_earlier_metrics,
    train,
)

RAY_TRAIN_ENV = {
    # Each ray.train.report waits for a controller poll, every 2 s by default; 0.2 s keeps a report at
    # every checkpoint cheap (measured, reporting every step: 20 steps took 55 s instead of 16 s).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # A worker group that cannot start (a booked node died and Ray has not noticed yet) fails the
    # attempt after this long instead of 60 s, and llmos admits the job again.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30",
}
# Under the controller, llmos restarts (jobs.elastic): Ray Train ends an attempt at its first failure,
# including a worker group that cannot start, which Ray would otherwise retry without end.
ATTEMPT_ENDS_AT_FIRST_FAILURE = FailureConfig(max_failures=0, max_preemption_failures=0, controller_failure_limit=0)

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


def run_config(job: TrainingJob, *, retries_by_ray: bool) -> RunConfig:
    """Storage under <storage_path>/<name>, and who restarts a failed attempt.

    Under the controller, llmos restarts (`jobs.elastic`), so Ray Train ends an attempt at its first
    failure; without it (`--without-controller`) Ray Train retries within the job's budgets.
    Checkpoint retention is the job's own (jobs.checkpoint keeps the last K): Ray keeps every checkpoint
    registered where it lies rather than deleting the same directories a second time, and of the copies
    it makes of checkpoints kept elsewhere (`checkpoint.directory` outside the run directory), the same K.
    """
    budget = job.restart_budget
    failures = FailureConfig(max_failures=budget.failures, max_preemption_failures=budget.preemptions)
    copied = checkpoint_upload_mode(job) is CheckpointUploadMode.SYNC
    return RunConfig(
        name=job.name,
        storage_path=str(job.run_directory.parent),
        failure_config=failures if retries_by_ray else ATTEMPT_ENDS_AT_FIRST_FAILURE,
        checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoint.keep_last if copied else None),
    )


def checkpoint_upload_mode(job: TrainingJob) -> CheckpointUploadMode:
    """Checkpoints inside the run directory are registered where they lie; others are copied there."""
    if job.checkpoint_directory.resolve().is_relative_to(job.run_directory.resolve()):
        return CheckpointUploadMode.NO_UPLOAD
    return CheckpointUploadMode.SYNC


class LatestDetails:
    """A request's details as last read from the controller, asked for again at every read, never waited on.

    A read returns the answer to the previous read's question if it has come, else what it knew
    before: a busy controller, or one being restarted with the head node, never stalls training, and
    a stop directive reaches the workers one reporting step later than a blocking read would. A
    question unanswered for `UNANSWERED_S` (a call lost in a restart) is asked again.
    """

    UNANSWERED_S = 5.0

    def __init__(self, reporter: ProgressReporter):
        self._reporter = reporter
        self._asked = None
        self._asked_at = 0.0
        self._details: dict[str, Any] = {}

    def __call__(self) -> dict[str, Any]:
        if self._asked is not None:
            answered, _ = ray.wait([self._asked], timeout=0)
            if answered:
                with contextlib.suppress(RayError):  # the controller is restarting: ask again
                    self._details = ray.get(self._asked).details
            elif time.monotonic() - self._asked_at < self.UNANSWERED_S:
                return self._details
        self._asked, self._asked_at = self._reporter.status_later(), time.monotonic()
        return self._details


def stop_check(reporter: ProgressReporter | None, attempt: int, world_size: int) -> StopCheck:
    """Rank 0 reads the driver's stop directive from the controller; every rank gets its answer."""
    latest_details = LatestDetails(reporter) if reporter is not None else None

    def should_stop(step: int, checkpoint_step: bool) -> bool:
        wanted = latest_details is not None and wants_stop(latest_details(), attempt, checkpoint_step)
        if world_size == 1:
            return wanted
        flag = torch.tensor([int(wanted)])
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    return should_stop


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
    attempt: dict[str, Any] = config.get("attempt") or {}
    should_stop = stop_check(reporter, attempt["attempt"], world_size) if "attempt" in attempt else None

    def report(step_report: StepReport) -> None:
        to_files(step_report)
        if reporter is not None:
            reporter.report(progress_details(step_report, attempt))  # no round trip: one actor call
        # Ray Train's report is a barrier across the workers that also waits for its controller's next
        # poll, so it is called only where a checkpoint is registered (metrics go to the files and the
        # controller above). Every rank calls it at the same steps; only rank 0 has a checkpoint.
        if not step_report.checkpointed:
            return
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
            should_stop=should_stop,
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
                should_stop=should_stop,
            )
    if rank == 0:
        plot_loss_curve(job.metrics_file, job.loss_curve_file, title=job.name)


def build_trainer(
    job: TrainingJob,
    placement: WorkerPlacement,
    reporter: ProgressReporter | None = None,
    attempt: dict[str, Any] | None = None,
) -> TorchTrainer:
    """A TorchTrainer for one attempt; with `attempt` (under the controller) Ray Train does not retry."""
    for name, value in RAY_TRAIN_ENV.items():
        # Ray Train passes these from the driver to its controller and workers.
        os.environ.setdefault(name, value)
    # The job's checkpoint directory is the record (the worker resumes from its newest checkpoint);
    # Ray Train's snapshot of an earlier fit still names checkpoints that keep_last has deleted
    # since, and Ray refuses to start on it.
    (job.run_directory / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).unlink(missing_ok=True)
    return TorchTrainer(
        train_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "reporter": reporter, "attempt": attempt},
        torch_config=TorchConfig(backend=PROCESS_GROUP_BACKEND),
        scaling_config=scaling_config(job, placement),
        run_config=run_config(job, retries_by_ray=attempt is None),
    )


def describe(placement: WorkerPlacement) -> str:
    if isinstance(placement.label_selector, list):
        return ", ".join(next(iter(selector.values()), "?") for selector in placement.label_selector)
    return str(placement.label_selector or "any node")


def fit(
    job: TrainingJob,
    placement: WorkerPlacement,
    reporter: ProgressReporter | None = None,
    attempt: dict[str, Any] | None = None,
) -> StepReport:
    """Run the trainer until it ends; returns the last report. Raises TrainingFailedError.

    A job whose checkpoints already reached its last step (an elastic attempt that failed after the final
    checkpoint, say) starts no trainer: it would train no step and report nothing.
    """
    finished = finished_report(job)
    if finished is not None:
        return finished
    result = build_trainer(job, placement, reporter, attempt).fit()
    if result.metrics is None:
        raise TrainingAttemptFailed(f"Ray Train ended {job.name} without a report from any worker")
    reported = {item.name for item in dataclasses.fields(StepReport)}
    return StepReport(**{key: value for key, value in result.metrics.items() if key in reported})


def run_attempt(
    job: TrainingJob, placement: WorkerPlacement, reporter: ProgressReporter, attempt: dict[str, Any]
) -> StepReport:
    """One attempt of an elastic run (`jobs.elastic`): Ray Train on the booked nodes, no retries of its own."""
    try:
        return fit(job, placement, reporter, attempt)
    except (TrainingFailedError, RayError) as error:
        if (refusal := worker_refusal(error)) is not None:
            raise refusal from error  # the same job fails the same way on every attempt: not retried
        raise TrainingAttemptFailed(one_line(error)) from error


def worker_refusal(error: BaseException) -> SpecError | None:
    """The SpecError a worker refused the job with (fp16 on a worker without CUDA, say), if that is why the
    attempt failed."""
    for failure in getattr(error, "worker_failures", {}).values():
        # Ray Train hands back a worker's exception wrapped with its traceback.
        cause = getattr(failure, "_base_exc", failure)
        if isinstance(cause, SpecError):
            return cause
    return None


@ray.remote(num_cpus=0, max_retries=0)
def _answer() -> None:
    """Runs on a node that is alive; on one that crashed it stays unscheduled until Ray declares the node dead."""


def probe_nodes(node_ids: list[str]) -> Callable[[], bool]:
    """Asks each node (by Ray id) to run a tiny task; the check is True once every one has (`jobs.elastic.NodeProbe`).

    A node that crashed answers nothing until Ray declares it dead, and then fails the task, so the check
    stays False: the controller reports that loss meanwhile.
    """
    pending = [
        _answer.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
        for node_id in node_ids
    ]
    failed = False

    def all_answered() -> bool:
        nonlocal pending, failed
        if pending and not failed:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            try:
                ray.get(ready)
            except RayError:  # a node Ray declared dead: the controller's books say so in a moment
                failed = True
                for ref in pending:
                    ray.cancel(ref)
                pending = []
        return not failed and not pending

    return all_answered


def run_admitted(
    job: TrainingJob,
    admin: Admin,
    *,
    on_progress: Callable[[str], None] = print,
    wait_timeout_s: float | None = None,
) -> tuple[str, StepReport]:
    """Admit the job through the controller and train it to the end, elastically; returns (request id, last report).

    The request ends finished, or failed with the reason when training fails or is interrupted.
    """
    return ElasticRun(
        job, admin, run_attempt, probe_nodes=probe_nodes, on_progress=on_progress, wait_timeout_s=wait_timeout_s
    ).run()


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


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
    if args.wait_timeout is not None and args.wait_timeout <= 0:
        parser.error(f"--wait-timeout {args.wait_timeout:g}: give the seconds to wait, more than 0, or leave it out")
    try:
        job = load_training_job(args.job)
    except SpecError as error:
        from cluster.commands import other_kind_hint

        print(error, file=sys.stderr)
        print_hint(other_kind_hint(error))
        return 2
    finished = finished_report(job)
    if finished is not None:
        print(already_trained(job, finished))
        return 0
    # `ray job stop` and a deleted RayJob end the driver with SIGTERM: exit through the code that gives its
    # bookings back, or they stay held for a driver that is gone.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        check_data(job)
        check_resumable(job)
        set_aside_earlier_metrics(job, on_progress=lambda line: print(line, flush=True))
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
    except (TrainingFailedError, TrainingAttemptFailed, RestartBudgetExhausted) as error:
        print(f"training {job.name} failed: {one_line(error)}", file=sys.stderr)
        return 1
    print(f"done: {format_report(final)}")
    print(f"metrics {job.metrics_file}, loss curve {job.loss_curve_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
