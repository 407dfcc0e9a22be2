"""The training core on CPU: precision, checkpoints that resume the loss curve, bare processes."""

from __future__ import annotations

import errno
import itertools
import json
import math
import os

import pytest
import torch

from jobs import checkpoint as checkpoints
from jobs.metrics import read_records
from jobs.spec import LearningRateSchedule, TrainingJob
from jobs.training_loop import finished_report, learning_rate, run_bare, train
from jobs.training_loop import main as training_loop_main

torch.set_num_threads(1)

INITIAL_LOSS = math.log(258)  # an untrained model is close to uniform over the vocabulary


def tiny_job(tmp_path, **changes) -> TrainingJob:
    data = {
        "name": "tiny",
        "team": "research",
        "steps": 60,
        "workers": {"min": 1, "max": 2},
        "model": {"layers": 2, "d_model": 64, "heads": 4, "context_length": 64},
        "batch_size_per_worker": 8,
        "schedule": {"peak_lr": 3e-3, "warmup_steps": 5, "min_lr": 3e-4},
        "checkpoint": {"every_steps": 20, "keep_last": 2},
        "evaluation": {"every_steps": 20, "batches": 4},
        "log_every_steps": 5,
        "storage_path": str(tmp_path),
    }
    data.update(changes)
    return TrainingJob.model_validate(data)


def test_learning_rate_warms_up_then_decays_to_min():
    schedule = LearningRateSchedule(peak_lr=1.0, warmup_steps=10, min_lr=0.1)
    rates = [learning_rate(step, schedule, 100) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))


def test_bf16_reaches_the_same_heldout_loss_as_fp32(tmp_path):
    results = {
        precision: train(tiny_job(tmp_path / precision, precision=precision, steps=60))
        for precision in ("fp32", "bf16")
    }
    fp32, bf16 = results["fp32"].heldout_loss, results["bf16"].heldout_loss
    assert fp32 < INITIAL_LOSS - 2 and bf16 < INITIAL_LOSS - 2, "both learn"
    assert abs(fp32 - bf16) < 0.1


def test_resume_continues_the_loss_curve_exactly(tmp_path):
    job = tiny_job(tmp_path / "interrupted")
    before = []
    first = train(job, on_report=before.append, stop_at_step=40)
    assert first.step == 40
    latest = checkpoints.latest_checkpoint(job.checkpoint_directory)
    assert latest is not None and checkpoints.checkpoint_step(latest) == 40
    state = checkpoints.load_checkpoint(latest)
    assert state["step"] == 40 and state["data"]["position"] == 40 * 8
    assert {"model", "optimizer", "scaler", "lr_schedule", "rng"} <= state.keys()

    after = []
    second = train(job, resume_from=latest, on_report=after.append)
    assert after[0].step == 45 and after[0].resumed_from_step == 40
    assert after[-1].step == second.step == 60
    assert after[-1].tokens_seen == 60 * 8 * 64, "the data position continued"
    assert abs(after[0].loss - before[-1].loss) < 0.5, "picks up where it stopped"
    assert after[0].loss < INITIAL_LOSS - 2, "not back at the initial loss"

    # The same 60 steps without the interruption give the same curve.
    uninterrupted = []
    train(tiny_job(tmp_path / "straight"), on_report=uninterrupted.append)
    resumed_curve = [(r.step, r.loss) for r in before + after]
    straight_curve = [(r.step, r.loss) for r in uninterrupted]
    assert [s for s, _ in resumed_curve] == [s for s, _ in straight_curve]
    for (_, resumed_loss), (_, straight_loss) in zip(resumed_curve, straight_curve, strict=True):
        assert resumed_loss == pytest.approx(straight_loss, abs=1e-4)


def test_a_resume_with_a_new_peak_learning_rate_follows_the_new_schedule(tmp_path):
    train(tiny_job(tmp_path, steps=30), stop_at_step=20)
    lowered = tiny_job(tmp_path, steps=30, schedule={"peak_lr": 1e-3, "warmup_steps": 5, "min_lr": 3e-4})
    after = []
    train(lowered, resume_from=checkpoints.latest_checkpoint(lowered.checkpoint_directory), on_report=after.append)
    # The first report after the resume is at step 25: the rate of its last optimizer step, step 24.
    assert after[0].step == 25 and after[0].resumed_from_step == 20
    assert after[0].learning_rate == pytest.approx(learning_rate(24, lowered.schedule, lowered.steps))
    assert after[-1].learning_rate == pytest.approx(learning_rate(29, lowered.schedule, lowered.steps))


def test_a_resume_with_a_new_weight_decay_decays_by_it(tmp_path):
    train(tiny_job(tmp_path, steps=30), stop_at_step=20)
    no_decay = tiny_job(tmp_path, steps=30, optimizer={"weight_decay": 0.0})
    train(no_decay, resume_from=checkpoints.latest_checkpoint(no_decay.checkpoint_directory))
    state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(no_decay.checkpoint_directory))
    assert state["step"] == 30
    assert [group["weight_decay"] for group in state["optimizer"]["param_groups"]] == [0.0, 0.0]


def errors_of_both_entrypoints(job: TrainingJob, change: dict, tmp_path, capsys) -> list[str]:
    """`job` with one section changed (`{section: {field: value}}`), run by `python -m jobs.train` and by
    `python -m jobs.training_loop`: what each printed on stderr, once each has exited 2."""
    import yaml

    from jobs import train as ray_train_entrypoint

    ((section, fields),) = change.items()
    changed = job.model_copy(update={section: getattr(job, section).model_copy(update=fields)})
    job_file = tmp_path / "changed.yaml"
    job_file.write_text(yaml.safe_dump(changed.model_dump(mode="json")))
    errors = []
    for main in (ray_train_entrypoint.main, training_loop_main):
        assert main([str(job_file)]) == 2
        errors.append(capsys.readouterr().err)
    return errors


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model": {"d_model": 128}}, "model: the checkpoint"),
        ({"data": {"seed": 1}}, "data.seed: the checkpoint"),
        ({"data": {"heldout_fraction": 0.05}}, "data.heldout_fraction: the checkpoint"),
    ],
)
def test_a_job_that_changes_what_its_checkpoint_was_trained_on_is_refused_before_it_starts(
    tmp_path, capsys, change, named
):
    job = tiny_job(tmp_path, steps=10, checkpoint={"every_steps": 5, "keep_last": 2})
    run_bare(job, stop_at_step=5, echo=False)
    # Before admission and before any worker: no controller, no Ray, no attempt to retry.
    for error in errors_of_both_entrypoints(job, change, tmp_path, capsys):
        assert named in error and "step-000000005" in error and "resume with" in error, error
    assert finished_report(job) is None and read_records(job.metrics_file)[-1]["step"] == 5


@pytest.mark.parametrize(
    ("change", "fix"),
    [
        ({"data": {"heldout_fraction": 1e-6}}, "raise data.heldout_fraction"),
        ({"model": {"context_length": 600_000}}, "raise data.heldout_fraction or lower model.context_length"),
    ],
)
def test_data_settings_this_machine_has_too_little_text_for_are_refused_before_it_starts(tmp_path, capsys, change, fix):
    job = tiny_job(tmp_path, steps=10)
    for error in errors_of_both_entrypoints(job, change, tmp_path, capsys):
        assert "held-out tokens on this machine" in error and fix in error, error
    assert not job.metrics_file.exists()


def test_a_run_that_starts_at_step_0_sets_an_earlier_runs_metrics_aside(tmp_path, capsys):
    import yaml

    job = tiny_job(tmp_path, steps=10, checkpoint={"every_steps": 5, "keep_last": 1})
    run_bare(job, stop_at_step=10, echo=False)
    earlier = read_records(job.metrics_file)
    # Trained again under a new checkpoint directory, as `already trained` advises, with the same metrics file.
    again = job.model_copy(
        update={"checkpoint": job.checkpoint.model_copy(update={"directory": str(tmp_path / "new")})}
    )
    job_file = tmp_path / "again.yaml"
    job_file.write_text(yaml.safe_dump(again.model_dump(mode="json")))
    assert training_loop_main([str(job_file)]) == 0
    (aside,) = tmp_path.glob("tiny/metrics-before-*.jsonl")
    assert f"moved to {aside}" in capsys.readouterr().out
    assert read_records(aside) == earlier
    again_records = read_records(job.metrics_file)
    assert [record["step"] for record in again_records] == [record["step"] for record in earlier]
    assert min(record["time"] for record in again_records) > max(record["time"] for record in earlier)


@pytest.mark.parametrize(
    ("code", "problem", "fix"),
    [
        (errno.ENOSPC, "no space left on the device", "Free space there"),
        (errno.EROFS, "the directory is not writable", "mount it read-write"),
        (errno.EACCES, "the directory is not writable", "Let the job's user write there"),
    ],
)
def test_a_checkpoint_that_cannot_be_written_says_why_and_the_fix_for_that(tmp_path, monkeypatch, code, problem, fix):
    def refuse(state, path):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoints.torch, "save", refuse)
    with pytest.raises(checkpoints.CheckpointError) as raised:
        checkpoints.save_checkpoint(tmp_path, 5, {"step": 5}, {})
    assert raised.value.errno == code
    assert problem in str(raised.value) and fix in str(raised.value), raised.value
    assert not list(tmp_path.iterdir()), "a failed write cleans up after itself"


def test_only_a_directory_named_exactly_like_a_checkpoint_is_one(tmp_path):
    for name in ("step-000000010", "step-000000020\n", "step-000000030.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / checkpoints.STATE_FILE).write_bytes(b"")
    assert [path.name for path in checkpoints.list_checkpoints(tmp_path)] == ["step-000000010"]


def test_checkpoints_keep_the_last_k(tmp_path):
    job = tiny_job(tmp_path, steps=60, evaluation={"every_steps": 1000, "batches": 1})
    train(job)
    names = [path.name for path in checkpoints.list_checkpoints(job.checkpoint_directory)]
    assert names == ["step-000000040", "step-000000060"]
    meta = json.loads((job.checkpoint_directory / "step-000000060" / "meta.json").read_text())
    assert meta["step"] == 60 and meta["data_position"] == 480


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_usable(tmp_path, monkeypatch):
    job = tiny_job(tmp_path)
    train(job, stop_at_step=20)
    directory = job.checkpoint_directory
    good = checkpoints.latest_checkpoint(directory)

    def crash_half_way(state, path):
        with open(path, "wb") as file:
            file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.torch, "save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        train(job, resume_from=good, stop_at_step=40)
    monkeypatch.undo()
    assert checkpoints.latest_checkpoint(directory) == good
    assert not list(directory.glob(".incomplete-*")), "a failed write cleans up after itself"

    # A process killed mid-write leaves its staging directory; it is never taken for a checkpoint.
    killed = directory / ".incomplete-step-000000040-x1y2"
    killed.mkdir()
    (killed / checkpoints.STATE_FILE).write_bytes(b"half")
    assert checkpoints.latest_checkpoint(directory) == good

    result = train(job, resume_from=checkpoints.latest_checkpoint(directory), stop_at_step=40)
    assert result.step == 40 and result.loss < INITIAL_LOSS - 2
    assert not killed.exists(), "leftovers are removed after the next complete checkpoint"


def test_bare_run_in_two_processes_then_resumes_on_one(tmp_path):
    job = tiny_job(tmp_path, steps=40, batch_size_per_worker=4, evaluation={"every_steps": 20, "batches": 2})
    two = run_bare(job, workers=2, stop_at_step=20, echo=False)
    assert two.step == 20 and two.world_size == 2
    # One worker after a shrink continues from the job-wide data position the two reached.
    one = run_bare(job, workers=1, echo=False)
    assert one.step == 40 and one.world_size == 1
    records = read_records(job.metrics_file)
    assert [r["world_size"] for r in records if r["step"] in (20, 40)] == [2, 1]
    assert records[-1]["tokens_seen"] == (20 * 2 * 4 + 20 * 4) * 64
    assert records[-1]["resumed_from_step"] == 20
    assert job.loss_curve_file.stat().st_size > 10_000


def test_a_stop_request_ends_the_attempt_with_a_checkpoint_where_it_stops(tmp_path):
    job = tiny_job(tmp_path / "stopped", steps=60)
    asked: list[tuple[int, bool]] = []

    def at_the_checkpoint_after_step_20(step: int, checkpoint_step: bool) -> bool:
        asked.append((step, checkpoint_step))
        return step > 20 and checkpoint_step

    stopped = train(job, should_stop=at_the_checkpoint_after_step_20)
    assert (
        stopped.step == 40
        and checkpoints.checkpoint_step(checkpoints.latest_checkpoint(job.checkpoint_directory)) == 40
    )
    assert asked == [(step, step % 20 == 0) for step in range(5, 41, 5)], "asked at every reporting step"

    now = tiny_job(tmp_path / "now", steps=60)
    reports = []
    result = train(now, on_report=reports.append, should_stop=lambda step, checkpoint_step: step == 15)
    # Step 15 is no checkpoint step of the job; stopping there writes one, so nothing is lost.
    assert result.step == 15 and result.checkpoint is not None
    # Ray Train hears only of checkpoint steps (jobs.train), so the stop step must say it is one.
    assert [(report.step, report.checkpointed) for report in reports] == [(5, False), (10, False), (15, True)]
    assert checkpoints.checkpoint_step(checkpoints.latest_checkpoint(now.checkpoint_directory)) == 15


def test_a_job_trained_to_its_last_step_is_not_trained_again(tmp_path, capsys):
    import yaml

    from jobs import train as ray_train_entrypoint

    job = tiny_job(tmp_path, steps=10, checkpoint={"every_steps": 5, "keep_last": 2})
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    assert finished_report(job) is None
    run_bare(job, stop_at_step=5, echo=False)
    assert finished_report(job) is None, "a job stopped at step 5 of 10 has training left"
    run_bare(job, echo=False)
    final = read_records(job.metrics_file)[-1]
    finished = finished_report(job)
    assert (finished.step, finished.loss, finished.tokens_seen) == (10, final["loss"], final["tokens_seen"])
    assert finished.checkpoint == str(job.checkpoint_directory / "step-000000010")
    # Resumed, the job would run no step and report nothing: Ray Train's result would have no metrics.
    # An elastic attempt returns the final report without starting a trainer; the entrypoints say so.
    placement = ray_train_entrypoint.placement_from_spec(job)
    assert ray_train_entrypoint.fit(job, placement) == finished
    assert ray_train_entrypoint.main([str(job_file), "--without-controller"]) == 0
    assert "tiny is already trained: its newest checkpoint" in capsys.readouterr().out
    assert training_loop_main([str(job_file)]) == 0
    assert "at step 10 of 10" in capsys.readouterr().out
    assert training_loop_main([str(job_file), "--fresh"]) == 2
    assert "--fresh: checkpoint.directory" in capsys.readouterr().err
    assert checkpoints.latest_checkpoint(job.checkpoint_directory).name == "step-000000010"
    job.metrics_file.unlink()  # the checkpoint alone still says how far it got
    without_metrics = finished_report(job)
    assert (without_metrics.step, without_metrics.tokens_seen) == (10, final["tokens_seen"])
    assert math.isnan(without_metrics.loss) and without_metrics.world_size == 1
