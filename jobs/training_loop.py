"""The per-worker training core: plain PyTorch, no Ray.

`train(job, rank=..., world_size=...)` builds the model, optimizer, loss scaler, LR schedule and
this rank's data stream, restores them from a checkpoint if given one, steps, measures held-out
loss, writes checkpoints (rank 0) and hands a `StepReport` to a callback at every reporting step.
Every rank reports at the same steps, so a callback may be a collective such as `ray.train.report`.

Two callers wrap it: the Ray Train worker (`jobs.train`) and `run_bare`, which runs it in plain
processes (gloo between them) as the baseline for Ray Train's overhead, and for runs without a
cluster: `python -m jobs.training_loop examples/train.yaml --workers 2`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import queue
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from cluster.console import at_least
from cluster.launcher import free_port
from cluster.spec import SpecError
from jobs import checkpoint as checkpoints
from jobs import precision
from jobs.data import VOCAB_SIZE, TrainingBatches, data_problems, heldout_batches
from jobs.metrics import append_record, plot_loss_curve, read_records
from jobs.model import TransformerLM
from jobs.spec import LearningRateSchedule, TrainingJob, load_training_job


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What one reporting step says about the job; the same on every rank except `checkpoint`."""

    step: int
    steps: int
    loss: float  # mean training loss over the steps since the previous report, all ranks
    learning_rate: float
    tokens_per_s: float  # job-wide, training steps only (evaluation and checkpointing excluded)
    tokens_seen: int  # job-wide, since the start of the run (not of this attempt)
    world_size: int
    elapsed_s: float  # since this attempt started
    heldout_loss: float | None = None  # set at evaluation steps
    checkpoint: str | None = None  # the checkpoint written at this step, on rank 0
    checkpointed: bool = False  # whether rank 0 wrote a checkpoint at this step; the same on every rank
    resumed_from_step: int | None = None  # the step this attempt resumed from, if it resumed

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def progress_details(report: StepReport, attempt: dict[str, Any]) -> dict[str, Any]:
    """What the controller shows for a training request at a reporting step."""
    details = {
        "step": report.step,
        "steps": report.steps,
        "loss": round(report.loss, 4),
        "tokens_per_s": round(report.tokens_per_s, 1),
        "world_size": report.world_size,
        "resumed_from_step": report.resumed_from_step,
        "attempt": attempt.get("attempt"),
        "restarts": attempt.get("restarts", 0),
        "reported_at": time.time(),
    }
    if report.heldout_loss is not None:
        details["heldout_loss"] = round(report.heldout_loss, 4)
    return details


@dataclasses.dataclass(frozen=True)
class TrainingResult:
    """How an attempt ended: at the last step of the job, or at `stop_at_step`."""

    step: int
    loss: float
    heldout_loss: float | None
    tokens_per_s: float  # mean over this attempt's training steps, job-wide
    world_size: int
    elapsed_s: float
    checkpoint: str | None  # the last checkpoint this attempt wrote (rank 0)


ReportCallback = Callable[[StepReport], None]
# Asked at every reporting step with (step, whether it is a checkpoint step); True ends the attempt
# there, with a checkpoint. Every rank calls it at the same steps and must get the same answer.
StopCheck = Callable[[int, bool], bool]


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def learning_rate(step: int, schedule: LearningRateSchedule, total_steps: int) -> float:
    """Linear warmup to peak over `warmup_steps`, then cosine decay reaching `min_lr` at the last step."""
    if step < schedule.warmup_steps:
        return schedule.peak_lr * (step + 1) / schedule.warmup_steps
    decay_steps = max(1, total_steps - 1 - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / decay_steps)
    return schedule.min_lr + 0.5 * (schedule.peak_lr - schedule.min_lr) * (1 + math.cos(math.pi * progress))


def build_model(job: TrainingJob) -> TransformerLM:
    """The job's model, initialised from `data.seed` (identically on every rank)."""
    torch.manual_seed(job.data.seed)
    return TransformerLM(job.model, VOCAB_SIZE)


def _build_optimizer(model: torch.nn.Module, job: TrainingJob, fused: bool) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": matrices, "weight_decay": job.optimizer.weight_decay},
        {"params": others, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=job.schedule.peak_lr, betas=(0.9, 0.95), fused=fused)


def _mean_across_ranks(total: torch.Tensor, count: torch.Tensor, world_size: int) -> float:
    if world_size > 1:
        both = torch.stack([total, count]).float()
        dist.all_reduce(both)
        total, count = both[0], both[1]
    return float(total / count.clamp(min=1))


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    job: TrainingJob,
    device,
    world_size,
) -> float:
    """Mean loss per token over this rank's share of the fixed held-out set, averaged over all ranks."""
    model.eval()
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with precision.autocast(job.precision, device):
            logits = model(inputs)
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        count += targets.numel()
    model.train()
    return _mean_across_ranks(total, count, world_size)


def train(
    job: TrainingJob,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    resume_from: Path | None = None,
    on_report: ReportCallback | None = None,
    stop_at_step: int | None = None,
    should_stop: StopCheck | None = None,
) -> TrainingResult:
    """Train `job` on this rank until its last step, `stop_at_step`, or a step where `should_stop`
    says so; the attempt checkpoints where it stops.

    With `world_size` > 1 the caller has set up the torch.distributed process group (Ray Train does;
    `run_bare` does for its processes). `resume_from` is a checkpoint directory to continue from;
    the data position in it is job-wide, so the world size may differ from the one that wrote it.
    """
    device = device or default_device()
    precision.check_supported(job.precision, device, source=f"training job {job.name!r}")
    if world_size > 1 and not (dist.is_initialized() and dist.get_world_size() == world_size):
        raise RuntimeError(f"world_size {world_size} needs an initialised torch.distributed process group")
    started = time.perf_counter()

    model = build_model(job).to(device)
    optimizer = _build_optimizer(model, job, fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, job.schedule, job.steps) / job.schedule.peak_lr
    )
    scaler = precision.grad_scaler(job.precision, device)
    batches = TrainingBatches(
        job.model.context_length,
        job.batch_size_per_worker,
        job.data.seed,
        job.data.heldout_fraction,
        rank=rank,
        world_size=world_size,
    )
    step = 0
    resumed_from_step = None
    if resume_from is not None:
        step = _restore(resume_from, job, model, optimizer, schedule, scaler, batches)
        resumed_from_step = step
    heldout = heldout_batches(
        job.model.context_length,
        job.batch_size_per_worker,
        job.evaluation.batches,
        job.data.heldout_fraction,
        rank=rank,
        world_size=world_size,
    )
    trained = model
    if world_size > 1:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    last_step = min(job.steps, stop_at_step) if stop_at_step is not None else job.steps

    tokens_per_step = world_size * job.tokens_per_worker_step
    loss_sum = torch.zeros((), device=device)
    losses_since_report = 0
    window_started = time.perf_counter()
    training_seconds = 0.0
    steps_this_attempt = 0
    last_loss, last_heldout, last_checkpoint = math.nan, None, None
    model.train()
    while step < last_step:
        inputs, targets = batches.next_batch()
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with precision.autocast(job.precision, device):
            logits = trained(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.optimizer.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        current_lr = schedule.get_last_lr()[0]
        schedule.step()
        step += 1
        steps_this_attempt += 1
        loss_sum += loss.detach()
        losses_since_report += 1

        evaluate = step % job.evaluation.every_steps == 0 or step == job.steps
        save = step % job.checkpoint.every_steps == 0 or step == last_step
        if not (evaluate or save or step % job.log_every_steps == 0):
            continue
        if step < last_step and should_stop is not None and should_stop(step, save):
            last_step, save = step, True
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        window_seconds = time.perf_counter() - window_started
        training_seconds += window_seconds
        last_loss = _mean_across_ranks(loss_sum, torch.tensor(losses_since_report, device=device), world_size)
        report = StepReport(
            step=step,
            steps=job.steps,
            loss=last_loss,
            learning_rate=current_lr,
            tokens_per_s=losses_since_report * tokens_per_step / window_seconds,
            tokens_seen=batches.position * job.model.context_length,
            world_size=world_size,
            elapsed_s=time.perf_counter() - started,
            resumed_from_step=resumed_from_step,
            checkpointed=save,
        )
        if evaluate:
            last_heldout = heldout_loss(model, heldout, job, device, world_size)
            report = dataclasses.replace(report, heldout_loss=last_heldout)
        if save and rank == 0:
            path = _save(job, step, model, optimizer, schedule, scaler, batches, world_size)
            last_checkpoint = str(path)
            report = dataclasses.replace(report, checkpoint=last_checkpoint)
        if on_report is not None:
            on_report(report)
        loss_sum.zero_()
        losses_since_report = 0
        window_started = time.perf_counter()

    return TrainingResult(
        step=step,
        loss=last_loss,
        heldout_loss=last_heldout,
        tokens_per_s=steps_this_attempt * tokens_per_step / training_seconds if training_seconds else 0.0,
        world_size=world_size,
        elapsed_s=time.perf_counter() - started,
        checkpoint=last_checkpoint,
    )


def _save(job, step, model, optimizer, schedule, scaler, batches, world_size) -> Path:
    state = {
        "job": job.model_dump(mode="json"),
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_schedule": schedule.state_dict(),
        "scaler": scaler.state_dict(),
        "data": batches.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }
    meta = {
        "job": job.name,
        "model": job.model.model_dump(mode="json"),
        "data": job.data.model_dump(mode="json"),
        "world_size": world_size,
        "precision": job.precision.value,
        "data_position": batches.position,
        "written_at": time.time(),
    }
    return checkpoints.save_checkpoint(job.checkpoint_directory, step, state, meta, keep_last=job.checkpoint.keep_last)


def _restore(path: Path, job, model, optimizer, schedule, scaler, batches) -> int:
    """Load a checkpoint into freshly built training objects; returns the step it was taken at."""
    state = checkpoints.load_checkpoint(path)
    if conflict := _resume_conflict(job, path, state["job"]):
        raise conflict
    model.load_state_dict(state["model"])
    # The saved groups carry the decay they were built with; a resume follows the job's, as for the rate.
    decays = [group["weight_decay"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, decay in zip(optimizer.param_groups, decays, strict=True):
        group["weight_decay"] = decay
    schedule.load_state_dict(state["lr_schedule"])
    # The saved state keeps the peak it was built with as its base; a resume follows this job's schedule
    # (a lower peak after a loss spike, say): rebase, and take the restored step's rate again.
    schedule.base_lrs = [job.schedule.peak_lr] * len(optimizer.param_groups)
    schedule.last_epoch -= 1
    schedule.step()
    # A run may switch precision on resume; only an fp16 run after an fp16 run has a scale to keep.
    if scaler.is_enabled() and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    batches.load_state_dict(state["data"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def _resume_conflict(job: TrainingJob, path: Path, saved: dict) -> SpecError | None:
    """What a resume from the checkpoint at `path` cannot change, changed by this job: the model's size, and
    the data (its seed and split fix which windows come, in what order). `saved` is the job the checkpoint
    names (its meta, or the job saved in its state); a field it lacks (older checkpoints) is not compared."""
    problems = []
    if "model" in saved and saved["model"] != job.model.model_dump(mode="json"):
        problems.append(f"model: the checkpoint {path} holds a model of size {saved['model']}; resume with that size")
    data = job.data.model_dump(mode="json")
    for key, value in data.items():
        if key in saved.get("data", {}) and saved["data"][key] != value:
            problems.append(
                f"data.{key}: the checkpoint {path} was trained with {saved['data'][key]!r}, not {value!r}; resume "
                "with that, or train afresh under a new checkpoint.directory"
            )
    return SpecError(f"training job {job.name!r}", problems) if problems else None


def check_data(job: TrainingJob) -> None:
    """Refuse data settings this machine's stdlib holds too little text for, before any worker starts: in a
    worker, every attempt would fail on them and be retried first."""
    if problems := data_problems(job.data.heldout_fraction, job.model.context_length):
        raise SpecError(f"training job {job.name!r}", problems)


def check_resumable(job: TrainingJob) -> None:
    """Refuse a job that changes what its newest checkpoint cannot be resumed without, before any worker
    starts: in a worker, every attempt would fail on it and be retried first. Checkpoints whose meta does
    not name their model or data (written before it did) are checked when a worker loads them."""
    newest = checkpoints.latest_checkpoint(job.checkpoint_directory)
    if newest is not None and (conflict := _resume_conflict(job, newest, checkpoints.load_meta(newest))):
        raise conflict


def format_report(report: StepReport) -> str:
    parts = [
        f"step {report.step}/{report.steps}",
        f"loss {report.loss:.3f}",
        f"held-out {report.heldout_loss:.3f}" if report.heldout_loss is not None else "",
        f"lr {report.learning_rate:.1e}",
        f"{report.tokens_per_s:,.0f} tok/s",
        f"{report.world_size} worker{'s' if report.world_size > 1 else ''}",
        f"checkpoint {Path(report.checkpoint).name}" if report.checkpoint else "",
    ]
    return "  ".join(part for part in parts if part)


def finished_report(job: TrainingJob) -> StepReport | None:
    """The report of the job's last step if its newest checkpoint has reached `steps`, else None.

    Such a job has nothing left to train: resumed, it would run no step and report nothing.
    """
    newest = checkpoints.latest_checkpoint(job.checkpoint_directory)
    if newest is None or (step := checkpoints.checkpoint_step(newest)) < job.steps:
        return None
    fields = {field.name for field in dataclasses.fields(StepReport)}
    for record in reversed(read_records(job.metrics_file) if job.metrics_file.is_file() else []):
        if record.get("step") == step:
            return dataclasses.replace(
                StepReport(**{key: value for key, value in record.items() if key in fields}), checkpoint=str(newest)
            )
    # Its metrics file is gone or elsewhere: the checkpoint alone says how far it got.
    meta = checkpoints.load_meta(newest)
    return StepReport(
        step=step,
        steps=job.steps,
        loss=math.nan,
        learning_rate=learning_rate(step, job.schedule, job.steps),
        tokens_per_s=0.0,
        tokens_seen=meta["data_position"] * job.model.context_length,
        world_size=meta["world_size"],
        elapsed_s=0.0,
        checkpoint=str(newest),
        checkpointed=True,
    )


def set_aside_earlier_metrics(job: TrainingJob, on_progress: Callable[[str], None]) -> Path | None:
    """Move an earlier run's metrics aside when this one starts at step 0 (no checkpoint to resume): a new
    checkpoint.directory, or deleted checkpoints, under the same metrics file would otherwise draw one curve
    from two runs. Returns where they went, None when there were none."""
    metrics = job.metrics_file
    if checkpoints.latest_checkpoint(job.checkpoint_directory) is not None or not metrics.is_file():
        return None
    if not read_records(metrics):
        return None
    aside = metrics.with_name(f"{metrics.stem}-before-{time.strftime('%Y%m%dT%H%M%S')}{metrics.suffix}")
    metrics.rename(aside)
    on_progress(f"{job.name} starts at step 0: the metrics already in {metrics} are moved to {aside}")
    return aside


def already_trained(job: TrainingJob, report: StepReport) -> str:
    return (
        f"{job.name} is already trained: its newest checkpoint {report.checkpoint} is at step {report.step} of "
        f"{job.steps} ({format_report(report)}); to train on, raise steps, or give it a new checkpoint.directory"
    )


def report_to_files(job: TrainingJob, rank: int, echo: bool = True) -> ReportCallback:
    """On rank 0: append each report to the job's metrics JSONL and print a progress line."""

    def write(report: StepReport) -> None:
        if rank != 0:
            return
        append_record(job.metrics_file, {"time": time.time(), **report.as_dict()})
        if echo:
            print(format_report(report), flush=True)

    return write


def run_bare(
    job: TrainingJob,
    workers: int = 1,
    *,
    resume: bool = True,
    stop_at_step: int | None = None,
    echo: bool = True,
    on_report: ReportCallback | None = None,
) -> TrainingResult:
    """Run the training core in plain processes: one in this process, or `workers` with gloo.

    The baseline for Ray Train's overhead (same core, same worker count) and a way to train without
    a cluster. Resumes from the newest complete checkpoint of the job unless `resume` is False.
    Writes the metrics JSONL and the loss-curve PNG. `on_report` (single worker only) sees every
    report as well.
    """
    resume_from = checkpoints.latest_checkpoint(job.checkpoint_directory) if resume else None
    if workers == 1:
        to_files = report_to_files(job, rank=0, echo=echo)

        def both(report: StepReport) -> None:
            to_files(report)
            if on_report is not None:
                on_report(report)

        result = train(job, resume_from=resume_from, on_report=both, stop_at_step=stop_at_step)
    else:
        if on_report is not None:
            raise ValueError("on_report runs in this process; with several workers read the metrics file")
        # The workers run on this machine: refused here, the job gets the field and the fix, not their exit codes.
        precision.check_supported(job.precision, default_device(), source=f"training job {job.name!r}")
        result = _run_processes(job, workers, resume_from, stop_at_step, echo)
    plot_loss_curve(job.metrics_file, job.loss_curve_file, title=job.name)
    return result


def _run_processes(
    job: TrainingJob, workers: int, resume_from: Path | None, stop_at_step: int | None, echo: bool
) -> TrainingResult:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    address = f"tcp://127.0.0.1:{free_port()}"
    processes = [
        context.Process(
            target=_bare_worker,
            args=(
                job.model_dump(mode="json"),
                rank,
                workers,
                address,
                resume_from,
                stop_at_step,
                echo,
                results,
            ),
            name=f"{job.name}-rank{rank}",
        )
        for rank in range(workers)
    ]
    for process in processes:
        process.start()
    result = None
    try:
        while result is None and not any(process.exitcode for process in processes):
            if not any(process.is_alive() for process in processes):
                break
            try:
                result = results.get(timeout=1.0)
            except queue.Empty:
                continue
    finally:
        # One rank failing leaves the others blocked in a collective: end them rather than wait.
        if result is None:
            for process in processes:
                if process.is_alive():
                    process.terminate()
        for process in processes:
            process.join()
    failed = [f"rank {rank} exited with {p.exitcode}" for rank, p in enumerate(processes) if p.exitcode != 0]
    if failed or result is None:
        raise RuntimeError(f"bare training of {job.name!r} failed: {'; '.join(failed) or 'no result from rank 0'}")
    return TrainingResult(**result)


def _bare_worker(job_data, rank, world_size, address, resume_from, stop_at_step, echo, results) -> None:
    job = TrainingJob.model_validate(job_data)
    torch.set_num_threads(max(1, int(job.resources.cpus)))
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world_size)
    try:
        result = train(
            job,
            rank=rank,
            world_size=world_size,
            resume_from=resume_from,
            on_report=report_to_files(job, rank, echo=echo),
            stop_at_step=stop_at_step,
        )
    finally:
        dist.destroy_process_group()
    if rank == 0:
        results.put(dataclasses.asdict(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.training_loop",
        description="Train a TrainingJob in plain processes, without Ray.",
    )
    parser.add_argument("job", type=Path, help="TrainingJob YAML, e.g. examples/train.yaml")
    parser.add_argument("--workers", type=at_least(1), default=1, help="data-parallel processes (gloo); default 1")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start at step 0")
    args = parser.parse_args(argv)
    try:
        job = load_training_job(args.job)
        check_data(job)
        if args.fresh:
            if (kept := checkpoints.latest_checkpoint(job.checkpoint_directory)) is not None:
                # Step 0's checkpoints would sort below the kept ones and be pruned as soon as they are written.
                print(
                    f"error: --fresh: checkpoint.directory {job.checkpoint_directory} holds checkpoints up to "
                    f"{kept.name}; move or delete them, or set checkpoint.directory to an empty folder",
                    file=sys.stderr,
                )
                return 2
        else:
            if (finished := finished_report(job)) is not None:
                print(already_trained(job, finished) + " (or run with --fresh)")
                return 0
            check_resumable(job)
        set_aside_earlier_metrics(job, on_progress=lambda line: print(line, flush=True))
        if args.workers == 1:
            torch.set_num_threads(max(1, int(job.resources.cpus)))
        result = run_bare(job, args.workers, resume=not args.fresh)
    except SpecError as error:
        print(error, file=sys.stderr)
        return 2
    print(
        f"done: step {result.step}, loss {result.loss:.3f}, held-out {result.heldout_loss}, "
        f"{result.tokens_per_s:,.0f} tok/s, {result.elapsed_s:.1f} s; metrics {job.metrics_file}, "
        f"loss curve {job.loss_curve_file}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
