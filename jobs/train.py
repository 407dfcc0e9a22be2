"""`python -m jobs.train JOB.yaml`: a TrainingJob on Ray Train (V2), the entrypoint `ray job submit` runs.

The worker function is a thin wrapper around `jobs.training_loop.train`: it takes rank, world size
and device from Ray Train, resumes from `ray.train.get_checkpoint()` (or, when Ray has none, from
the newest complete checkpoint in the job's directory), and forwards every report to
`ray.train.report`, attaching the checkpoint rank 0 wrote at that step.

Where the workers run is a `WorkerPlacement`. Today `placement_from_spec` derives it from the job
alone and Ray places the workers on any node of the job's pool. The llmos controller's admission
will return the same type (admitted worker counts, per-worker label selectors pinning nodes), and
`build_trainer(job, placement)` stays as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
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

from cluster.ray_mapping import POOL_LABEL, RAY_ACCELERATOR_TYPE_LABEL
from cluster.spec import SpecError
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


@dataclass(frozen=True)
class WorkerPlacement:
    """How many workers a run may have and which nodes each may run on."""

    min_workers: int
    max_workers: int
    # One selector for every worker, or one per worker (max_workers of them) to pin workers to nodes.
    label_selector: dict[str, str] | list[dict[str, str]] = field(default_factory=dict)


def placement_from_spec(job: TrainingJob) -> WorkerPlacement:
    """The placement the job asks for, with no admission: any node of its pool or accelerator type.

    This is the seam for the llmos controller: its admission will check quota and priority and
    return a WorkerPlacement for the nodes it reserved; nothing else here changes.
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


def train_worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    job = TrainingJob.model_validate(config["job"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(job.resources.cpus)))
    to_files = report_to_files(job, rank)
    upload_mode = checkpoint_upload_mode(job)

    def report(step_report: StepReport) -> None:
        to_files(step_report)
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
            device=ray.train.torch.get_device(),
            resume_from=latest_checkpoint(job.checkpoint_directory),
            on_report=report,
        )
    else:
        with ray_checkpoint.as_directory() as directory:
            train(
                job,
                rank=rank,
                world_size=world_size,
                device=ray.train.torch.get_device(),
                resume_from=Path(directory),
                on_report=report,
            )
    if rank == 0:
        plot_loss_curve(job.metrics_file, job.loss_curve_file, title=job.name)


def build_trainer(job: TrainingJob, placement: WorkerPlacement) -> TorchTrainer:
    for name, value in HEALTH_CHECK_INTERVAL_ENV.items():
        # Ray Train passes these from the driver to its controller and workers.
        os.environ.setdefault(name, value)
    return TorchTrainer(
        train_worker,
        train_loop_config={"job": job.model_dump(mode="json")},
        torch_config=TorchConfig(backend=PROCESS_GROUP_BACKEND),
        scaling_config=scaling_config(job, placement),
        run_config=run_config(job),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description="Run a TrainingJob on Ray Train.")
    parser.add_argument("job", type=Path, help="TrainingJob YAML, e.g. examples/train.yaml")
    args = parser.parse_args(argv)
    try:
        job = load_training_job(args.job)
    except SpecError as error:
        print(error, file=sys.stderr)
        return 2
    placement = placement_from_spec(job)
    print(
        f"training {job.name}: {placement.min_workers}-{placement.max_workers} workers on "
        f"{placement.label_selector or 'any node'}; checkpoints in {job.checkpoint_directory}",
        flush=True,
    )
    try:
        result = build_trainer(job, placement).fit()
    except TrainingFailedError as error:
        print(f"training {job.name} failed: {error}", file=sys.stderr)
        return 1
    reported = {field.name for field in dataclasses.fields(StepReport)}
    final = StepReport(**{key: value for key, value in result.metrics.items() if key in reported})
    print(f"done: {format_report(final)}")
    print(f"metrics {job.metrics_file}, loss curve {job.loss_curve_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
