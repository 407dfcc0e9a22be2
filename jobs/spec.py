"""The TrainingJob: one language-model training run, described once in YAML.

The same model is read by `python -m jobs.train`, by the bare-process baseline and, later, by the
controller's admission. It says what to train and how much of the cluster to ask for; it does not
say where: placement is the controller's decision. Checks that need the ClusterSpec (does the pool
exist, does a worker fit on one of its nodes) live in `cluster.spec.workload_problems`.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from cluster.spec import (
    KubeRayName,
    MinMaxBounds,
    Name,
    PositiveMemoryBytes,
    StrictModel,
    load_yaml,
    parse_memory,
    parse_model,
)


class Precision(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class ModelSize(StrictModel):
    """Shape of the decoder-only transformer (jobs.model.TransformerLM)."""

    layers: PositiveInt = Field(4, description="Transformer blocks.")
    d_model: PositiveInt = Field(128, description="Width of the residual stream.")
    heads: PositiveInt = Field(4, description="Attention heads; d_model / heads must be an even integer.")
    context_length: PositiveInt = Field(128, description="Tokens (bytes) the model sees at once.")
    mlp_ratio: PositiveInt = Field(4, description="Hidden width of each MLP as a multiple of d_model.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSize:
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        if (self.d_model // self.heads) % 2:
            raise ValueError(
                f"head width d_model / heads = {self.d_model // self.heads} must be even (rotary "
                "positions rotate pairs of features); change d_model or heads"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


class DataSource(StrictModel):
    """Where the text comes from and how it is split into training and held-out files."""

    source: Literal["stdlib"] = Field(
        "stdlib",
        description="stdlib: the .py sources of this Python's standard library, present on every machine.",
    )
    heldout_fraction: float = Field(
        0.02, gt=0, lt=0.5, description="Fraction of files kept out of training, chosen by path hash."
    )
    seed: NonNegativeInt = Field(0, description="Seeds the model initialisation and the data order.")


class LearningRateSchedule(StrictModel):
    """Linear warmup to `peak_lr`, then cosine decay to `min_lr` at the last step."""

    peak_lr: PositiveFloat = Field(3e-3, description="Learning rate at the end of warmup.")
    warmup_steps: NonNegativeInt = Field(30, description="Steps of linear warmup from 0.")
    min_lr: NonNegativeFloat = Field(3e-4, description="Learning rate at the last step.")

    @model_validator(mode="after")
    def _min_not_above_peak(self) -> LearningRateSchedule:
        if self.min_lr > self.peak_lr:
            raise ValueError(f"min_lr ({self.min_lr}) is above peak_lr ({self.peak_lr}); lower min_lr")
        return self


class Optimizer(StrictModel):
    """AdamW over fp32 master weights."""

    weight_decay: NonNegativeFloat = Field(0.1, description="Decoupled weight decay on weight matrices.")
    grad_clip: PositiveFloat = Field(1.0, description="Largest global gradient norm; larger is scaled down.")


class WorkerCount(MinMaxBounds):
    """Data-parallel workers: the run starts with up to `max` and keeps going down to `min`."""

    min: PositiveInt = Field(1, description="Fewest workers the run continues with after a loss.")
    max: PositiveInt = Field(..., description="Workers wanted; the run grows back to this when it can.")


class WorkerResources(StrictModel):
    """What one worker reserves: a Ray bundle."""

    cpus: PositiveFloat = Field(1, description="Logical CPUs per worker.")
    gpus: NonNegativeFloat = Field(0, description="GPUs per worker; fractions share a GPU (e.g. 0.5).")
    memory: PositiveMemoryBytes = Field(parse_memory("2Gi"), description="Memory per worker: bytes or a quantity.")


class CheckpointPolicy(StrictModel):
    """When and where checkpoints are written, and how many are kept."""

    every_steps: PositiveInt = Field(50, description="Write a checkpoint every this many steps, and at the end.")
    keep_last: PositiveInt = Field(3, description="Complete checkpoints kept; older ones are deleted.")
    directory: str | None = Field(
        None, description="Where checkpoints go; defaults to <storage_path>/<name>/checkpoints."
    )


class RestartBudget(StrictModel):
    """Restarts from the last checkpoint allowed before the run fails, counted separately."""

    failures: NonNegativeInt = Field(3, description="Restarts after a worker failure or a booked node leaving.")
    preemptions: NonNegativeInt = Field(10, description="Restarts after a preemption (a higher priority, a drain).")


class Evaluation(StrictModel):
    """How often and on how much held-out text the loss is measured."""

    every_steps: PositiveInt = Field(50, description="Measure held-out loss every this many steps, and at the end.")
    batches: PositiveInt = Field(4, description="Held-out batches (of batch_size_per_worker) per measurement.")


class TrainingJob(StrictModel):
    """One training run of a byte-level language model on the Python standard library's sources."""

    name: KubeRayName = Field(..., description="Job name, unique per team; names its storage directory and its RayJob.")
    team: Name = Field(..., description="Team whose quota the job counts against.")
    priority: Name | None = Field(None, description="Priority class name; defaults to the team's own.")
    model: ModelSize = Field(default_factory=ModelSize)
    data: DataSource = Field(default_factory=DataSource)
    batch_size_per_worker: PositiveInt = Field(16, description="Sequences per worker per step.")
    steps: PositiveInt = Field(..., description="Optimizer steps in the whole run.")
    schedule: LearningRateSchedule = Field(default_factory=LearningRateSchedule)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    precision: Precision = Field(
        Precision.FP32, description="fp32, bf16 (autocast on CPU or CUDA) or fp16 (CUDA only, loss-scaled)."
    )
    workers: WorkerCount
    resources: WorkerResources = Field(default_factory=WorkerResources)
    pool: Name | None = Field(None, description="Pool the workers run in; or set accelerator_type.")
    accelerator_type: str | None = Field(
        None, description="Run on any pool of this accelerator type (H100, v5e, ...); or set pool."
    )
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    restart_budget: RestartBudget = Field(default_factory=RestartBudget)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    log_every_steps: PositiveInt = Field(10, description="Report step, loss and tokens/s every this many steps.")
    storage_path: str = Field(
        "~/llmos/jobs",
        description="Directory, shared by all nodes, for checkpoints and metrics; this job's go in <name>/.",
    )
    metrics_path: str | None = Field(
        None,
        description="JSONL metrics file; defaults to <storage_path>/<name>/metrics.jsonl (PNG beside it).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainingJob:
        if self.pool and self.accelerator_type:
            raise ValueError("set pool or accelerator_type, not both (a pool already has one accelerator type)")
        if self.precision == Precision.FP16 and not self.resources.gpus:
            # Found here, not in a worker: there every attempt would fail and be retried first.
            raise ValueError(
                "precision: fp16 needs a CUDA GPU (loss-scaled autocast) and resources.gpus is 0; use precision: "
                "bf16 (or fp32) on CPU, or give the workers gpus"
            )
        for field_name, path in (
            ("storage_path", self.storage_path),
            ("checkpoint.directory", self.checkpoint.directory),
            ("metrics_path", self.metrics_path),
        ):
            if path is not None and not Path(path).expanduser().is_absolute():
                # Ray Train refuses a relative storage path, and the driver and each worker would read it
                # from their own working directories.
                raise ValueError(
                    f"{field_name}: {path} is relative; give an absolute path (or one under ~) that every node mounts"
                )
        if self.schedule.warmup_steps >= self.steps:
            raise ValueError(
                f"schedule.warmup_steps: {self.schedule.warmup_steps} is not below steps ({self.steps}); "
                "lower warmup_steps or raise steps"
            )
        return self

    @property
    def run_directory(self) -> Path:
        return Path(self.storage_path).expanduser() / self.name

    @property
    def checkpoint_directory(self) -> Path:
        if self.checkpoint.directory:
            return Path(self.checkpoint.directory).expanduser()
        return self.run_directory / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return Path(self.metrics_path).expanduser() if self.metrics_path else self.run_directory / "metrics.jsonl"

    @property
    def loss_curve_file(self) -> Path:
        return self.metrics_file.with_suffix(".png")

    @property
    def tokens_per_worker_step(self) -> int:
        return self.batch_size_per_worker * self.model.context_length


def load_training_job(path: str | Path) -> TrainingJob:
    """Read and validate a TrainingJob YAML file; raises SpecError with one line per problem."""
    return parse_model(TrainingJob, load_yaml(path), str(path))
