"""The ServeJob: a trained checkpoint served over an OpenAI-style HTTP API, described once in YAML.

Read by `llmos serve deploy`, by `llmos serve config` (Ray's own `serve deploy` file, which also
goes into a RayService manifest) and by `llmos manifests render --serve`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, field_validator, model_validator

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


class ReplicaCount(MinMaxBounds):
    min: PositiveInt = Field(1, description="Fewest replicas; preemption never takes the deployment below this.")
    max: PositiveInt = Field(1, description="Replicas wanted when the cluster has room.")


class ReplicaResources(StrictModel):
    cpus: PositiveFloat = Field(1, description="Logical CPUs per replica.")
    gpus: NonNegativeFloat = Field(0, description="GPUs per replica; fractions share a GPU (e.g. 0.25).")
    memory: PositiveMemoryBytes = Field(parse_memory("1Gi"), description="Memory per replica: bytes or a quantity.")


class Batching(StrictModel):
    """Dynamic batching: concurrent requests share forward passes (`serve.batch`)."""

    max_batch_size: PositiveInt = Field(16, description="Most requests decoded together; 1 turns batching off.")
    wait_timeout_s: NonNegativeFloat = Field(0.005, description="How long a batch waits to fill before it runs.")


class Limits(StrictModel):
    """Refused before they reach the model, with an OpenAI-style 4xx."""

    max_tokens: PositiveInt = Field(64, description="Most tokens one request may ask for.")
    max_prompt_bytes: PositiveInt = Field(4096, description="Longest prompt (the model reads bytes).")
    max_body_bytes: PositiveInt = Field(65536, description="Largest request body.")


class ServeJob(StrictModel):
    name: KubeRayName = Field(
        ..., description="Deployment and application name; the model id in /v1/models; names its RayService."
    )
    team: Name = Field(..., description="Team whose quota the replicas count against.")
    priority: Name | None = Field(None, description="Priority class; defaults to the team's.")
    checkpoint: str = Field(
        ..., description="A checkpoint folder written by jobs (step-NNNNNNNNN), or a folder of them (the newest)."
    )
    replicas: ReplicaCount = Field(default_factory=ReplicaCount)
    resources: ReplicaResources = Field(default_factory=ReplicaResources)
    pool: Name | None = Field(None, description="Pool the replicas run in; or set accelerator_type.")
    accelerator_type: str | None = Field(None, description="GPU model the replicas need, e.g. A100-80G.")
    batching: Batching = Field(default_factory=Batching)
    limits: Limits = Field(default_factory=Limits)
    route_prefix: str = Field("/", description="HTTP route prefix of the application, e.g. / or /v1/stdlib-lm.")

    @field_validator("route_prefix")
    @classmethod
    def _serve_takes_the_route_prefix(cls, value: str) -> str:
        # Ray Serve's own rules (ray.serve._private.utils.validate_route_prefix), checked before deploying.
        if not value.startswith("/"):
            raise ValueError(f"{value!r} must start with '/', e.g. /v1")
        if value != "/" and value.endswith("/"):
            raise ValueError(f"{value!r} may not end with '/' (only / itself does); write {value.rstrip('/') or '/'}")
        if "{" in value or "}" in value:
            raise ValueError(f"{value!r} may not hold '{{' or '}}': Ray Serve routes take no wildcards")
        return value

    @model_validator(mode="after")
    def _one_way_to_choose_nodes(self) -> ServeJob:
        if self.pool and self.accelerator_type:
            raise ValueError("set pool or accelerator_type, not both (a pool already has one accelerator type)")
        if self.accelerator_type and not self.resources.gpus:
            raise ValueError("accelerator_type is set but resources.gpus is 0; ask for GPUs or drop accelerator_type")
        return self


def load_serve_job(path: str | Path) -> ServeJob:
    return parse_model(ServeJob, load_yaml(path), str(path))
