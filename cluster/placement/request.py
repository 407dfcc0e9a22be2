"""What a workload asks for: a gang of bundles, and how the bundles must sit together.

A bundle is what one worker needs on one node (CPU, memory, GPU, TPU), the same shape as a Ray
placement-group bundle. A gang is placed all-or-nothing. Amounts become fixed-point integers
(`Demand`) before the engine sees them, so that sums of fractional GPUs never drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Fixed-point resolution of every resource but memory, the same as Ray's FixedPoint (1e-4):
# 0.46 GPU is 4600 units, so 1/16 GPU is exact and three 1/3 GPUs still fit on one device.
UNITS = 10_000

RESOURCE_KEYS = ("CPU", "memory", "GPU", "TPU")


def to_units(amount: float) -> int:
    return round(amount * UNITS)


class Constraint(StrEnum):
    """How the bundles of one gang must sit relative to each other."""

    SAME_NODE = "same_node"
    SAME_POOL = "same_pool"
    SAME_TPU_SLICE = "same_tpu_slice"
    SPREAD = "spread"


@dataclass(frozen=True, slots=True)
class Demand:
    """One bundle in engine units: the key the engine caches node scores under."""

    cpu: int
    memory: int
    gpu_count: int
    gpu_share: int  # per device: UNITS for whole devices, less for one shared device, 0 for none
    tpu: int
    gpu_types: frozenset[str] | None = None
    label_selector: tuple[tuple[str, str], ...] = ()

    @property
    def gpu_total(self) -> int:
        return self.gpu_count * self.gpu_share

    @property
    def is_fractional_gpu(self) -> bool:
        return 0 < self.gpu_share < UNITS

    @property
    def wants_accelerator(self) -> bool:
        return self.gpu_count > 0 or self.tpu > 0


class Bundle(BaseModel):
    """What one worker needs on one node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resources: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        ...,
        description="CPU (cores), memory (bytes), GPU (a fraction below 1, or whole devices) and TPU (chips).",
    )
    label_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels the bundle needs: `value`, `!value`, `in(a,b)` or `!in(a,b)`, as in Ray.",
    )
    gpu_types: tuple[str, ...] | None = Field(
        None, description="GPU types the bundle may run on (e.g. H100, A100-80G); None means any."
    )

    @field_validator("resources")
    @classmethod
    def _known_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        for key in resources:
            if key not in RESOURCE_KEYS:
                raise ValueError(
                    f"resource {key!r} is not one llmos places; use {', '.join(RESOURCE_KEYS)} "
                    "(pick GPU models with gpu_types and node groups with label_selector)"
                )
        gpus = resources.get("GPU", 0.0)
        if gpus > 1 and not float(gpus).is_integer():
            raise ValueError(f"GPU is {gpus}; above 1 a bundle takes whole devices, e.g. 2, not 1.5")
        if 0 < gpus < 1 / UNITS:
            raise ValueError(f"GPU is {gpus}; the smallest share of a device is {1 / UNITS}, or 0 for none")
        # Placed in units of 1/UNITS core and whole bytes: a smaller amount would be placed as nothing,
        # and Ray refuses a placement group bundle that asks for nothing.
        cpus = resources.get("CPU", 0.0)
        if 0 < cpus < 1 / UNITS:
            raise ValueError(f"CPU is {cpus}; the smallest share of a core is {1 / UNITS}, or 0 for none")
        memory = resources.get("memory", 0.0)
        if 0 < memory < 1:
            raise ValueError(f"memory is {memory} bytes; the smallest amount is 1 byte, or 0 for none")
        tpus = resources.get("TPU", 0.0)
        if not float(tpus).is_integer():
            raise ValueError(f"TPU is {tpus}; TPU chips are whole, e.g. 4")
        if not any(amount > 0 for amount in resources.values()):
            raise ValueError("the bundle asks for nothing; give at least one of CPU, memory, GPU, TPU")
        return resources

    @field_validator("gpu_types")
    @classmethod
    def _some_gpu_type(cls, gpu_types: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if gpu_types is not None and not gpu_types:
            raise ValueError("gpu_types is empty, so no GPU could serve; leave it out to allow any type")
        return gpu_types

    @property
    def demand(self) -> Demand:
        # Not cached: `model_copy(update=...)` copies a cached value with the instance's dict, so a copy
        # with another label_selector or gpu_types would keep the original's demand.
        resources = self.resources
        gpus = resources.get("GPU", 0.0)
        if gpus >= 1:
            gpu_count, gpu_share = int(gpus), UNITS
        elif gpus > 0:
            gpu_count, gpu_share = 1, to_units(gpus)
        else:
            gpu_count, gpu_share = 0, 0
        return Demand(
            cpu=to_units(resources.get("CPU", 0.0)),
            memory=round(resources.get("memory", 0.0)),
            gpu_count=gpu_count,
            gpu_share=gpu_share,
            tpu=to_units(resources.get("TPU", 0.0)),
            gpu_types=frozenset(self.gpu_types) if self.gpu_types is not None else None,
            label_selector=tuple(sorted(self.label_selector.items())),
        )


class GangRequest(BaseModel):
    """Bundles placed together or not at all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., min_length=1, description="Names the request in decisions and logs.")
    bundles: tuple[Bundle, ...] = Field(..., min_length=1, description="One bundle per worker.")
    constraint: Constraint = Field(
        Constraint.SAME_POOL,
        description="same_node, same_pool (one GPU type and fabric), same_tpu_slice (whole hosts of one "
        "slice) or spread (every bundle on a different node).",
    )

    @model_validator(mode="after")
    def _tpu_gangs_ask_for_tpus(self) -> GangRequest:
        if self.constraint is Constraint.SAME_TPU_SLICE:
            for index, bundle in enumerate(self.bundles):
                if bundle.resources.get("TPU", 0) <= 0:
                    raise ValueError(
                        f"bundles[{index}] asks for no TPU, but same_tpu_slice gives each bundle a whole "
                        "TPU host; add TPU: <chips per host> or use another constraint"
                    )
        return self
