"""What `python -m jobs.train` hands to Ray Train, checked without a cluster (no ray.init)."""

from __future__ import annotations

from pathlib import Path

from ray.train import CheckpointUploadMode

from jobs.spec import TrainingJob, load_training_job
from jobs.train import (
    WorkerPlacement,
    checkpoint_upload_mode,
    placement_from_spec,
    run_config,
    scaling_config,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train.yaml"


def test_example_job_becomes_an_elastic_gpu_pool_run():
    job = load_training_job(EXAMPLE)
    placement = placement_from_spec(job)
    assert placement == WorkerPlacement(1, 2, {"llmos.io/pool": "h100"})
    scaling = scaling_config(job, placement)
    assert scaling.num_workers == (1, 2) and scaling.elasticity_enabled
    assert scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 1, "GPU": 1, "memory": 2 * 1024**3}
    assert scaling.label_selector == {"llmos.io/pool": "h100"}


def test_run_config_uses_the_job_directory_and_separate_budgets():
    job = load_training_job(EXAMPLE)
    config = run_config(job, retries_by_ray=True)
    assert Path(config.storage_path) / config.name == job.run_directory
    assert config.failure_config.max_failures == 3
    assert config.failure_config.max_preemption_failures == 10
    # Checkpoints in the run directory are registered with Ray where they are, not copied.
    assert checkpoint_upload_mode(job) is CheckpointUploadMode.NO_UPLOAD
    assert config.checkpoint_config.num_to_keep is None  # the job prunes them itself


def test_fixed_size_cpu_job_on_an_accelerator_type(tmp_path):
    job = TrainingJob.model_validate(
        {
            "name": "fixed",
            "team": "research",
            "steps": 100,
            "workers": {"min": 2, "max": 2},
            "accelerator_type": "A100-80G",
            "checkpoint": {"directory": str(tmp_path / "elsewhere")},
            "storage_path": str(tmp_path / "runs"),
        }
    )
    placement = placement_from_spec(job)
    scaling = scaling_config(job, placement)
    assert scaling.num_workers == 2 and not scaling.use_gpu
    assert scaling.label_selector == {"ray.io/accelerator-type": "A100-80G"}
    assert checkpoint_upload_mode(job) is CheckpointUploadMode.SYNC
    # Ray's copies in the run directory are kept as the job keeps its own, not all of them.
    assert run_config(job, retries_by_ray=False).checkpoint_config.num_to_keep == job.checkpoint.keep_last


def test_a_controller_placement_can_pin_each_worker():
    job = load_training_job(EXAMPLE)
    pinned = WorkerPlacement(1, 2, [{"llmos.io/node": "h100-0"}, {"llmos.io/node": "h100-1"}])
    assert scaling_config(job, pinned).label_selector == pinned.label_selector
