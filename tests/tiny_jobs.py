"""A tiny TrainingJob for tests that train on the shared local cluster: seconds per run on 2 cores."""

from __future__ import annotations

from pathlib import Path

from jobs.spec import TrainingJob


def tiny_job(tmp_path: Path, name: str, **overrides) -> TrainingJob:
    data = {
        "name": name,
        "team": "research",
        "model": {"layers": 1, "d_model": 32, "heads": 2, "context_length": 32},
        "batch_size_per_worker": 4,
        "steps": 20,
        "schedule": {"warmup_steps": 2},
        "workers": {"min": 2, "max": 2},
        "resources": {"cpus": 1, "gpus": 1, "memory": "256Mi"},
        "pool": "h100",
        "checkpoint": {"every_steps": 5, "keep_last": 2},
        "evaluation": {"every_steps": 10, "batches": 1},
        "log_every_steps": 5,
        "storage_path": str(tmp_path / "jobs"),
    }
    data.update(overrides)
    return TrainingJob.model_validate(data)
