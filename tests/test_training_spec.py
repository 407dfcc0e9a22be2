"""TrainingJob: the example loads and fits the example cluster; bad jobs fail naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.spec import SpecError, load_spec, parse_model, workload_problems
from jobs import precision
from jobs.spec import Precision, TrainingJob, load_training_job
from jobs.training_loop import run_bare, train

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def job_data(**changes) -> dict:
    data = {"name": "tiny", "team": "research", "steps": 100, "workers": {"min": 1, "max": 2}}
    data.update(changes)
    return data


def problems_of(data: dict) -> list[str]:
    with pytest.raises(SpecError) as raised:
        parse_model(TrainingJob, data, "job.yaml")
    return raised.value.problems


def test_example_loads_and_fits_the_example_cluster():
    job = load_training_job(EXAMPLES / "train.yaml")
    assert job.workers.min == 1 and job.workers.max == 2
    assert job.pool == "h100" and job.team == "research"
    assert job.checkpoint_directory == job.run_directory / "checkpoints"
    assert job.loss_curve_file.suffix == ".png"
    assert workload_problems(job, load_spec(EXAMPLES / "cluster.yaml")) == []


def test_unknown_field_is_named_with_a_suggestion():
    [problem] = problems_of(job_data(stepz=10))
    assert problem.startswith("stepz: unknown field (did you mean 'steps'?)")


def test_unknown_nested_field_is_named_with_its_path():
    [problem] = problems_of(job_data(model={"layerz": 2}))
    assert problem.startswith("model.layerz: unknown field (did you mean 'layers'?)")


def test_negative_steps_rejected():
    [problem] = problems_of(job_data(steps=-5))
    assert problem.startswith("steps:") and "greater than 0" in problem


def test_min_workers_above_max_rejected():
    [problem] = problems_of(job_data(workers={"min": 3, "max": 2}))
    assert problem.startswith("workers:") and "min (3) is above max (2)" in problem


def test_heads_must_divide_width():
    [problem] = problems_of(job_data(model={"d_model": 100, "heads": 3}))
    assert problem.startswith("model:") and "multiple of heads" in problem


def test_pool_and_accelerator_type_are_exclusive():
    [problem] = problems_of(job_data(pool="h100", accelerator_type="H100"))
    assert "set pool or accelerator_type, not both" in problem


def test_memory_takes_quantities_and_fractional_gpus():
    job = parse_model(TrainingJob, job_data(resources={"cpus": 2, "gpus": 0.5, "memory": "512Mi"}), "job.yaml")
    assert job.resources.memory == 512 * 1024**2 and job.resources.gpus == 0.5


def test_fp16_without_gpus_is_refused_at_load_and_on_a_cpu_worker_when_run(tmp_path):
    (problem,) = problems_of(job_data(precision="fp16"))
    assert "precision: fp16 needs a CUDA GPU" in problem and "resources.gpus is 0" in problem
    # With GPUs asked for, a worker that got none (the local cluster's simulated GPU pools) still refuses it.
    fields = job_data(precision="fp16", resources={"gpus": 1}, storage_path=str(tmp_path))
    job = parse_model(TrainingJob, fields, "job.yaml")
    assert job.precision is Precision.FP16
    with pytest.raises(SpecError) as raised:
        precision.check_supported(job.precision, torch.device("cpu"))
    [problem] = raised.value.problems
    assert problem.startswith("precision: fp16 needs a CUDA GPU") and "use precision: bf16" in problem
    with pytest.raises(SpecError, match="precision: fp16"):
        train(job, device=torch.device("cpu"))
    assert not job.run_directory.exists(), "refused before doing any work"


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs where CUDA is")
def test_fp16_in_bare_worker_processes_on_a_cpu_machine_is_refused_before_they_start(tmp_path):
    fields = job_data(precision="fp16", resources={"gpus": 1}, storage_path=str(tmp_path))
    job = parse_model(TrainingJob, fields, "job.yaml")
    with pytest.raises(SpecError, match="precision: fp16 needs a CUDA GPU"):
        run_bare(job, workers=2)
    assert not job.run_directory.exists(), "refused before doing any work"


def test_workload_problems_name_the_field_and_the_closest_name():
    cluster = load_spec(EXAMPLES / "cluster.yaml")
    unknown_pool = parse_model(TrainingJob, job_data(pool="h200"), "job.yaml")
    assert workload_problems(unknown_pool, cluster)[0].startswith("pool: 'h200' is not a pool")
    too_big = parse_model(TrainingJob, job_data(pool="a100", resources={"gpus": 8}), "job.yaml")
    assert workload_problems(too_big, cluster)[0].startswith("resources: a worker")
    unknown_team = parse_model(TrainingJob, job_data(team="nobody"), "job.yaml")
    assert workload_problems(unknown_team, cluster)[0].startswith("team: 'nobody'")
    misspelt = parse_model(TrainingJob, job_data(priority="hihg"), "job.yaml")
    assert workload_problems(misspelt, cluster) == [
        "priority: 'hihg' is not a priority class (did you mean 'high'?); use one of low, normal, high"
    ]


def test_warmup_not_below_steps_names_the_field():
    [problem] = problems_of(job_data(steps=1, schedule={"warmup_steps": 30}))
    assert problem.startswith("schedule.warmup_steps: 30 is not below steps (1)"), problem


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"storage_path": "rel/jobs"}, "storage_path: rel/jobs"),
        ({"checkpoint": {"directory": "ckpt"}}, "checkpoint.directory: ckpt"),
        ({"metrics_path": "./metrics.jsonl"}, "metrics_path: ./metrics.jsonl"),
    ],
)
def test_a_relative_storage_path_is_refused_naming_the_field(change, named):
    [problem] = problems_of(job_data(**change))
    assert problem.startswith(f"{named} is relative; give an absolute path"), problem


def test_storage_paths_may_be_absolute_or_under_home():
    job = parse_model(TrainingJob, job_data(storage_path="~/llmos/jobs", metrics_path="/tmp/m.jsonl"), "job.yaml")
    assert job.run_directory == Path.home() / "llmos" / "jobs" / "tiny"


def test_a_worker_fits_on_a_tpu_host_by_its_cpus_and_memory():
    cluster = load_spec(EXAMPLES / "cluster.yaml")  # tpu-v5p hosts: 208 CPUs, 448Gi, no GPUs
    on_tpu = parse_model(TrainingJob, job_data(pool="tpu-v5p", resources={"cpus": 1, "memory": "2Gi"}), "job.yaml")
    assert workload_problems(on_tpu, cluster) == []
    with_gpus = parse_model(TrainingJob, job_data(pool="tpu-v5p", resources={"gpus": 1}), "job.yaml")
    assert workload_problems(with_gpus, cluster) == [
        "resources: a worker (1 cpus, 1 gpus, 2Gi) fits on no node of tpu-v5p; ask for less or pick another pool"
    ]
