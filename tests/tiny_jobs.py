"""A tiny TrainingJob for tests that train on the shared local cluster: seconds per run on 2 cores."""

from __future__ import annotations

from pathlib import Path

from benchmarks.train import bench_job
from jobs.spec import TrainingJob

# The training benchmark's job (team, pool, 2 workers of 1 CPU and 1 GPU), made small.
TINY = {
    "model": {"layers": 1, "d_model": 32, "heads": 2, "context_length": 32},
    "batch_size_per_worker": 4,
    "steps": 20,
    "schedule": {"warmup_steps": 2},
    "resources": {"cpus": 1, "gpus": 1, "memory": "256Mi"},
    "checkpoint": {"every_steps": 5, "keep_last": 2},
    "evaluation": {"every_steps": 10, "batches": 1},
    "log_every_steps": 5,
}


def tiny_job(tmp_path: Path, name: str, **overrides) -> TrainingJob:
    return bench_job(tmp_path / "jobs", name, **{**TINY, **overrides})
