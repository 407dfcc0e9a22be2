"""The ClusterSpec: pools of hardware and the teams that share them, described once.

One pydantic model per concept, `extra="forbid"` so a typo fails loudly. The same models load YAML,
back the admin API and feed the CLI; `cluster.ray_mapping` turns a pool into what Ray sees and
`manifests` into what KubeRay sees.
"""

from __future__ import annotations

import difflib
import json
import math
import posixpath
import re
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from cluster.auth import RESERVED_PRINCIPALS

_QUANTITY_SUFFIXES = {
    "": 1,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}
MAX_MEMORY_BYTES = 2**63
_QUANTITY = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(Ki|Mi|Gi|Ti|k|M|G|T|)\s*")


def parse_memory(value: Any) -> int:
    """Bytes from an int or a Kubernetes-style quantity such as `32Gi`, `512Mi` or `4G`."""
    if isinstance(value, bool):
        raise ValueError("memory must be a number of bytes or a quantity like 32Gi")
    if isinstance(value, int | float):
        if value != value:  # NaN
            raise ValueError("memory must be a number of bytes or a quantity like 32Gi, not NaN")
        if value < 0:
            raise ValueError("memory cannot be negative")
        num_bytes = value
    elif isinstance(value, str) and (match := _QUANTITY.fullmatch(value)):
        num_bytes = float(match.group(1)) * _QUANTITY_SUFFIXES[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a memory size; write bytes or a quantity like 32Gi, 512Mi or 4G")
    # Kubernetes and Ray hold memory as a signed 64-bit count of bytes.
    if not num_bytes < MAX_MEMORY_BYTES:
        raise ValueError(
            f"{value!r} is more memory than Kubernetes or Ray can count; the most is {MAX_MEMORY_BYTES - 1}"
        )
    return int(num_bytes)


def format_memory(num_bytes: int) -> str:
    """The shortest exact binary quantity (`32Gi`), falling back to plain bytes."""
    for suffix in ("Ti", "Gi", "Mi", "Ki"):
        unit = _QUANTITY_SUFFIXES[suffix]
        if num_bytes and num_bytes % unit == 0:
            return f"{num_bytes // unit}{suffix}"
    return str(num_bytes)


MemoryBytes = Annotated[int, BeforeValidator(parse_memory)]


def _memory_positive(num_bytes: int) -> int:
    if num_bytes <= 0:
        raise ValueError("must be more than 0 bytes; write a quantity like 16Gi")
    return num_bytes


PositiveMemoryBytes = Annotated[MemoryBytes, AfterValidator(_memory_positive)]


class StrictModel(BaseModel):
    """Base of every spec model: unknown fields are errors, and specs are immutable values. A number is
    finite: `.inf` or `.nan` in YAML would pass every bound a field has (NaN compares false) and mean
    no limit, or nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


class AcceleratorKind(StrEnum):
    CPU = "cpu"
    GPU = "gpu"
    TPU = "tpu"


# GPU types as Ray names them (ray.util.accelerators); tests check this table against Ray itself.
KNOWN_GPU_TYPES = (
    "H100",
    "H200",
    "B200",
    "A100",
    "A100-40G",
    "A100-80G",
    "A10G",
    "L4",
    "L40S",
    "T4",
    "V100",
    "P100",
    "P4",
    "K80",
)
# TPU generations llmos knows how to name for Ray and GKE, and the dimensions of a slice's topology in
# each as GKE takes it (cloud.google.com/gke-tpu-topology): v4 and v5p chips are wired in 3 dimensions
# (AxBxC), v5e and v6e chips in 2 (AxB).
TPU_TOPOLOGY_DIMENSIONS = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}
KNOWN_TPU_GENERATIONS = tuple(TPU_TOPOLOGY_DIMENSIONS)
# Chips on one host (VM) of each generation, by GKE's machine types: v4 and v5p hosts have 4
# (ct4p-hightpu-4t, ct5p-hightpu-4t); v5e and v6e hosts 1, 4 or 8 (ct5lp-hightpu-1t/4t/8t, ct6e-standard-1t/4t/8t).
TPU_CHIPS_PER_HOST = {"v4": (4,), "v5e": (1, 4, 8), "v5p": (4,), "v6e": (1, 4, 8)}
# Matched with fullmatch: `$` also matches before a final newline, which let "cpu\n" through as a name.
_ACCELERATOR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?")
_NAME_HINT = "use lowercase letters, digits and '-', at most 40 characters (it becomes a Kubernetes name)"
# The head node's pool, in its llmos.io/pool label and its node's name; KubeRay's group name for it too.
HEAD_POOL = "head"


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid name; {_NAME_HINT}")
    return value


Name = Annotated[str, AfterValidator(_check_name)]


def _starts_with_a_letter(value: str) -> str:
    if not "a" <= value[0] <= "z":
        raise ValueError(
            f"{value!r} must start with a letter: it names a KubeRay object (RayCluster, RayJob or RayService), "
            "whose name KubeRay takes only as a DNS-1035 label"
        )
    return value


KubeRayName = Annotated[Name, AfterValidator(_starts_with_a_letter)]

# Kubernetes' own syntax (k8s.io/apimachinery/pkg/util/validation) for the strings a spec hands to it, so
# that `llmos spec validate` refuses what the API server or KubeRay would refuse only at deploy time.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_TEXT = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_TEXT_RULE = "at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
INT32_MAX = 2**31 - 1


def _check_namespace(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a Kubernetes namespace name (a DNS-1123 label); use at most 63 lowercase "
            "letters, digits and '-', starting and ending with a letter or digit"
        )
    return value


def _check_resource_name(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a Kubernetes object name (a DNS-1123 subdomain); use at most 253 lowercase "
            "letters, digits, '-' and '.', starting and ending with a letter or digit"
        )
    return value


def label_key_problem(key: str) -> str | None:
    """Why `key` is not a Kubernetes label key, or None."""
    prefix, slash, name = key.rpartition("/")
    if len(name) > 63 or not _LABEL_TEXT.fullmatch(name) or (slash and not _valid_label_prefix(prefix)):
        return (
            f"{key!r} is not a Kubernetes label key; write [prefix/]name, the name {_LABEL_TEXT_RULE}, "
            "the prefix a DNS subdomain such as example.com"
        )
    return None


def label_value_problem(value: str) -> str | None:
    """Why `value` is not a Kubernetes label value, or None."""
    if len(value) > 63 or (value and not _LABEL_TEXT.fullmatch(value)):
        return f"{value!r} is not a Kubernetes label value; use {_LABEL_TEXT_RULE}, or nothing"
    return None


def _valid_label_prefix(prefix: str) -> bool:
    return len(prefix) <= 253 and _DNS_SUBDOMAIN.fullmatch(prefix) is not None


def _label_value_is_text(value: Any) -> Any:
    """YAML reads `rack: 42` or `gpu: true` as a number or a boolean, never the text a label holds."""
    if value is None or isinstance(value, bool | int | float):
        kind = "null" if value is None else "a boolean" if isinstance(value, bool) else "a number"
        written = json.dumps(value)
        raise ValueError(f'{written} is read as {kind}, and a label value is text; quote it: "{written}"')
    return value


def _refused_if(problem_of: Callable[[str], str | None]) -> AfterValidator:
    """A validator that refuses a value with what `problem_of` says is wrong with it, if anything."""

    def check(value: str) -> str:
        if problem := problem_of(value):
            raise ValueError(problem)
        return value

    return AfterValidator(check)


def _fits_int32(value: int) -> int:
    if value > INT32_MAX:
        raise ValueError(f"{value} is more than Kubernetes takes here; give at most {INT32_MAX} (a 32-bit integer)")
    return value


NamespaceName = Annotated[str, AfterValidator(_check_namespace)]
ResourceName = Annotated[str, AfterValidator(_check_resource_name)]
LabelKey = Annotated[str, _refused_if(label_key_problem)]
LabelValue = Annotated[str, BeforeValidator(_label_value_is_text), _refused_if(label_value_problem)]
Int32 = AfterValidator(_fits_int32)  # for a count KubeRay keeps in an int32 field (replicas), or a user id


class MinMaxBounds(StrictModel):
    """Base of every `min`/`max` pair (node, slice, worker and replica counts): min may not pass max."""

    @model_validator(mode="after")
    def _min_not_above_max(self) -> MinMaxBounds:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max}); raise max or lower min")
        return self


class Replicas(MinMaxBounds):
    """How many nodes (CPU and GPU pools) or slices (TPU pools) a pool may have."""

    min: Annotated[NonNegativeInt, Int32] = Field(0, description="Fewest replicas; the autoscaler never goes below.")
    max: Annotated[PositiveInt, Int32] = Field(..., description="Most replicas the pool may grow to.")


class NodeShape(StrictModel):
    """What one node (one VM, one Kubernetes pod, one TPU host) of a pool offers."""

    cpus: PositiveInt = Field(..., description="Logical CPUs per node.")
    memory: PositiveMemoryBytes = Field(..., description="Memory per node: bytes or a quantity like 64Gi.")
    gpus: NonNegativeInt = Field(0, description="GPUs per node (GPU pools only).")


class TpuSlice(StrictModel):
    """The shape of one TPU slice: hosts of `chips_per_host` chips wired in `topology`."""

    topology: str = Field(..., description="Chip topology of one slice, e.g. 2x4, 4x4 or 2x2x4.")
    chips_per_host: PositiveInt = Field(4, description="TPU chips on each host (VM).")
    hosts_per_slice: Annotated[PositiveInt, Int32] = Field(
        ..., description="Hosts in one slice; 1 is a single-host slice."
    )

    @field_validator("topology")
    @classmethod
    def _topology_form(cls, value: str) -> str:
        if not re.fullmatch(r"[1-9][0-9]*(x[1-9][0-9]*){1,2}", value):
            raise ValueError(f"{value!r} is not a TPU topology; write dimensions like 2x4, 4x4 or 2x2x4")
        return value

    @property
    def chips(self) -> int:
        return math.prod(int(d) for d in self.topology.split("x"))

    @model_validator(mode="after")
    def _chips_add_up(self) -> TpuSlice:
        if self.chips % self.chips_per_host:
            raise ValueError(
                f"topology {self.topology} has {self.chips} chips, which chips_per_host ({self.chips_per_host}) "
                "does not divide; chips_per_host must divide the chip count, as every host of a slice holds as "
                "many chips"
            )
        hosted = self.hosts_per_slice * self.chips_per_host
        if self.chips != hosted:
            raise ValueError(
                f"topology {self.topology} has {self.chips} chips but hosts_per_slice x chips_per_host "
                f"= {self.hosts_per_slice} x {self.chips_per_host} = {hosted}; set hosts_per_slice to "
                f"{self.chips // self.chips_per_host} or change the topology"
            )
        return self


class Pool(StrictModel):
    """A set of identical nodes: CPU machines, one GPU model, or slices of one TPU generation."""

    name: Name = Field(..., description="Pool name, unique in the cluster; becomes the llmos.io/pool label.")
    accelerator: AcceleratorKind = Field(..., description="cpu, gpu or tpu.")
    accelerator_type: str | None = Field(
        None, description="GPU model (H100, A100-80G, T4, ...) or TPU generation (v5e, v6e, ...)."
    )
    node: NodeShape = Field(..., description="Per-node shape: cpus, memory and, for GPU pools, gpus.")
    tpu: TpuSlice | None = Field(None, description="Slice shape, for TPU pools only.")
    nodes: Replicas | None = Field(None, description="Node count bounds (CPU and GPU pools).")
    slices: Replicas | None = Field(None, description="Slice count bounds (TPU pools).")
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, description="Labels of every node, in Kubernetes label syntax."
    )

    @field_validator("name")
    @classmethod
    def _not_the_head(cls, name: str) -> str:
        if name == HEAD_POOL:
            raise ValueError(
                f"{HEAD_POOL!r} is the head node's pool (and KubeRay's and Kueue's name for the head group); "
                "give this pool another name"
            )
        return name

    @field_validator("accelerator_type")
    @classmethod
    def _accelerator_type_form(cls, value: str | None) -> str | None:
        if value is not None and not _ACCELERATOR_TYPE.fullmatch(value):
            raise ValueError(f"{value!r} is not an accelerator type; use a name like H100 or v5e")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_not_reserved(cls, labels: dict[str, str]) -> dict[str, str]:
        for key in labels:
            if key.startswith(("ray.io/", "llmos.io/")):
                raise ValueError(f"label {key!r} uses a reserved prefix (ray.io/, llmos.io/); llmos sets those")
        return labels

    @model_validator(mode="after")
    def _consistent_with_accelerator(self) -> Pool:
        kind = self.accelerator
        if kind is AcceleratorKind.CPU:
            if self.accelerator_type:
                raise ValueError("a cpu pool has no accelerator_type; remove it or set accelerator: gpu/tpu")
            if self.node.gpus:
                raise ValueError("node.gpus is set on a cpu pool; set accelerator: gpu or remove gpus")
        if kind is AcceleratorKind.GPU:
            if self.node.gpus == 0:
                raise ValueError("a gpu pool needs node.gpus >= 1 (GPUs per node), e.g. gpus: 8")
            if not self.accelerator_type:
                raise ValueError("a gpu pool needs accelerator_type, the GPU model, e.g. H100 or A100-80G")
            _reject_miscased(self.accelerator_type, KNOWN_GPU_TYPES)
        if kind is AcceleratorKind.TPU:
            if self.tpu is None:
                raise ValueError("a tpu pool needs tpu: {topology, chips_per_host, hosts_per_slice}")
            if self.node.gpus:
                raise ValueError("node.gpus is set on a tpu pool; TPU chips go in tpu.chips_per_host")
            if not self.accelerator_type:
                raise ValueError("a tpu pool needs accelerator_type, the TPU generation, e.g. v5e or v6e")
            if self.accelerator_type not in KNOWN_TPU_GENERATIONS:
                raise ValueError(
                    f"accelerator_type {self.accelerator_type!r} is not a TPU generation llmos knows; "
                    f"use one of {', '.join(KNOWN_TPU_GENERATIONS)}"
                )
            dimensions = TPU_TOPOLOGY_DIMENSIONS[self.accelerator_type]
            if self.tpu.topology.count("x") + 1 != dimensions:
                shape, example = ("AxBxC", "2x2x4") if dimensions == 3 else ("AxB", "2x4")
                raise ValueError(
                    f"tpu.topology {self.tpu.topology} does not fit {self.accelerator_type}, whose slices have "
                    f"{dimensions}-dimensional topologies ({shape}, e.g. {example})"
                )
            host_sizes = TPU_CHIPS_PER_HOST[self.accelerator_type]
            if self.tpu.chips_per_host not in host_sizes:
                raise ValueError(
                    f"tpu.chips_per_host {self.tpu.chips_per_host} is not a {self.accelerator_type} host, which has "
                    f"{' or '.join(map(str, host_sizes))} chips; set chips_per_host to one of those (and "
                    "hosts_per_slice to match the topology)"
                )
            if self.nodes is not None:
                raise ValueError("a tpu pool is sized in whole slices; write slices: {min: 0, max: 2}")
            if self.slices is None:
                raise ValueError("a tpu pool needs slices: {min, max}, the number of whole slices")
        else:
            if self.tpu is not None:
                raise ValueError(f"tpu is set on a {kind.value} pool; set accelerator: tpu or remove tpu")
            if self.slices is not None:
                raise ValueError(f"a {kind.value} pool is sized in nodes; write nodes: {{min: 0, max: 4}}")
            if self.nodes is None:
                raise ValueError("the pool needs nodes: {min, max}, the node count bounds")
        return self

    @property
    def replicas(self) -> Replicas:
        """Node bounds for CPU/GPU pools, slice bounds for TPU pools (KubeRay's replicas)."""
        return self.slices if self.accelerator is AcceleratorKind.TPU else self.nodes  # type: ignore[return-value]

    @property
    def hosts_per_replica(self) -> int:
        return self.tpu.hosts_per_slice if self.tpu else 1

    @property
    def tpu_chips_per_host(self) -> int:
        return self.tpu.chips_per_host if self.tpu else 0


def _reject_miscased(value: str, known: tuple[str, ...]) -> None:
    """Accept new hardware names, but not a known name in the wrong case (`h100` for `H100`)."""
    for name in known:
        if value != name and value.lower() == name.lower():
            raise ValueError(f"accelerator_type {value!r} should be written {name!r}, as Ray names it")


class PriorityClass(StrictModel):
    """A named priority; higher values may preempt lower ones."""

    name: Name
    value: int = Field(..., ge=0, le=1_000_000_000, description="Higher preempts lower.")


DEFAULT_PRIORITY_CLASSES = (
    PriorityClass(name="low", value=100),
    PriorityClass(name="normal", value=500),
    PriorityClass(name="high", value=1000),
)

# Quota keys: a resource kind, or a kind narrowed to one accelerator type (`gpu:H100`).
QUOTA_RESOURCES = ("cpu", "memory", "gpu", "tpu")


def quota_amount_problem(key: str, amount: float) -> str | None:
    """Why `amount` cannot be a team's quota of `key`, or None. NaN or infinity would compare as no limit."""
    if not math.isfinite(amount):
        return f"quota {key} is {amount}; give a finite number, 0 or more"
    if amount < 0:
        return f"quota {key} is {amount:g}; a quota cannot be negative (0 forbids it)"
    return None


class Team(StrictModel):
    """A team sharing the cluster: what it may hold at once, and how urgently it asks."""

    name: Name
    quota: dict[str, float] = Field(
        default_factory=dict,
        description="Most the team may hold at once: cpu, memory (bytes), gpu, tpu (chips), or "
        "gpu:<type> / tpu:<generation> for one accelerator type. A missing key means no limit.",
    )
    priority: str = Field("normal", description="Default priority class of the team's requests.")
    namespace: NamespaceName | None = Field(None, description="Kubernetes namespace; defaults to the team name.")

    @field_validator("name")
    @classmethod
    def _not_a_reserved_principal(cls, name: str) -> str:
        if name in RESERVED_PRINCIPALS:
            raise ValueError(
                f"{name!r} is reserved: the admin API names its admin and unrecognized callers so; choose another"
            )
        return name

    @field_validator("quota", mode="before")
    @classmethod
    def _memory_quota_as_bytes(cls, quota: Any) -> Any:
        if isinstance(quota, dict) and "memory" in quota:
            quota = {**quota, "memory": parse_memory(quota["memory"])}
        return quota

    @field_validator("quota")
    @classmethod
    def _quota_amounts(cls, quota: dict[str, float]) -> dict[str, float]:
        for key, amount in quota.items():
            if problem := quota_amount_problem(key, amount):
                raise ValueError(problem)
        return quota

    @property
    def kubernetes_namespace(self) -> str:
        return self.namespace or self.name


class HeadNode(StrictModel):
    """The head node: runs Ray's control processes, the llmos controller and job drivers."""

    cpus: NonNegativeInt = Field(0, description="CPUs offered to user work on the head (0: none).")
    memory: PositiveMemoryBytes = Field(parse_memory("8Gi"), description="Memory of the head node.")


class Taint(StrictModel):
    """A taint on a pool's Kubernetes nodes: the pool's pods tolerate it, Kueue's flavor lists it."""

    key: LabelKey = Field(..., description="Taint key, e.g. nvidia.com/gpu.")
    value: LabelValue | None = Field(None, description="Taint value; pods tolerate any value of the key.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = Field("NoSchedule")


class PoolPlacement(StrictModel):
    """Where one pool's pods run on Kubernetes, replacing the GKE defaults (for other clouds)."""

    node_selector: dict[LabelKey, LabelValue] | None = Field(
        None,
        description="Node labels the pool's pods require, e.g. "
        "{nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}; replaces GKE's gke-accelerator or gke-tpu-* "
        "selector. {} selects any node.",
    )
    node_taints: list[Taint] | None = Field(
        None,
        description="Taints on the pool's nodes; defaults to nvidia.com/gpu (GPU pools) or google.com/tpu "
        "(TPU pools), as GKE sets them. [] for untainted nodes.",
    )


class GcsFaultTolerance(StrictModel):
    """Ray's GCS fault tolerance on KubeRay: the head's GCS keeps its tables in Redis, so a restarted
    head pod finds the cluster, its actors, placement groups and jobs where it left them."""

    redis_address: str = Field(
        ..., min_length=1, description="host:port of a highly available Redis, e.g. redis.llmos.svc:6379."
    )
    redis_password_secret: ResourceName | None = Field(
        None, description="Name of a Secret in the cluster's namespace whose key `password` holds Redis's password."
    )


class ControllerOptions(StrictModel):
    """How the llmos controller keeps its books."""

    finished_requests_kept: PositiveInt = Field(
        10_000,
        description="Finished, failed, cancelled and rejected requests kept for `status`, `queue --all` and "
        "idempotent retries; older ones are forgotten, so the books and the journal stay bounded.",
    )


class ControllerState(StrictModel):
    """A PersistentVolumeClaim on the shared RayCluster's head pod for the controller's journal, so a
    replaced head pod (GCS fault tolerance) finds the books of the placement groups Ray kept."""

    size: PositiveMemoryBytes = Field(
        parse_memory("1Gi"), description="Storage to claim: bytes or a quantity like 1Gi."
    )
    storage_class: ResourceName | None = Field(
        None, description="StorageClass of the claim; None uses the Kubernetes cluster's default."
    )


class PodSecurity(StrictModel):
    """The securityContext of every Ray pod llmos renders: Kubernetes' restricted Pod Security Standard
    (a non-root user, no privilege escalation, no capabilities, the runtime's default seccomp profile).
    Ray needs none of what it takes away; the defaults are the Ray image's user `ray` and group `users`."""

    run_as_user: Annotated[PositiveInt, Int32] = Field(
        1000, description="User id the Ray containers run as; the image's files must be readable by it."
    )
    run_as_group: Annotated[NonNegativeInt, Int32] = Field(
        100, description="Group id of the containers, and the group that owns the volumes they mount (fsGroup)."
    )


class SharedStorage(StrictModel):
    """A ReadWriteMany volume every Ray pod llmos renders mounts at one path: where training writes its
    checkpoints and metrics (a job's storage_path) and serving reads them. A pod's own disk is neither
    shared between pods nor kept when the pod goes, and a RayJob's whole cluster goes when the job ends."""

    mount_path: str = Field(
        "/mnt/llmos",
        description="Where every pod mounts the volume; jobs' storage_path and serving checkpoints must lie under it.",
    )
    claim: ResourceName | None = Field(
        None,
        description="An existing ReadWriteMany PersistentVolumeClaim, of this name in the cluster's namespace and "
        "in each team's (e.g. static PersistentVolumes on one NFS export, so every namespace sees the same "
        "files). None: llmos renders a claim in each of those namespaces.",
    )
    size: PositiveMemoryBytes | None = Field(
        None, description="Storage of each claim llmos renders: bytes or a quantity like 1Ti (default 1Ti)."
    )
    storage_class: ResourceName | None = Field(
        None,
        description="StorageClass of the claims llmos renders; it must provision ReadWriteMany volumes (GKE "
        "Filestore: standard-rwx). None uses the Kubernetes cluster's default.",
    )

    @field_validator("mount_path")
    @classmethod
    def _absolute_directory(cls, value: str) -> str:
        normal = posixpath.normpath(value)
        if not value.startswith("/") or normal == "/":
            raise ValueError(f"{value!r} is not an absolute directory below /; write e.g. /mnt/llmos")
        return normal

    @model_validator(mode="after")
    def _claim_or_rendered(self) -> SharedStorage:
        if self.claim is not None and (self.size is not None or self.storage_class is not None):
            raise ValueError(
                "claim names an existing claim, while size and storage_class shape the claims llmos renders; "
                "set one or the other"
            )
        return self


LLMOS_IMAGE = "llmos:0.1.0"  # what `make image` tags: the Dockerfile's Ray image with this version of llmos


# The first Ray whose clusters KubeRay can put under token auth.
MIN_TOKEN_AUTH_RAY = (2, 52, 0)


def ray_version_parts(text: Any) -> tuple[int, ...] | None:
    """(major, minor, patch) of a Ray version such as 2.60.0 (or 2.60); None for text that is none."""
    match = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", str(text or ""))
    return tuple(int(part or 0) for part in match.groups()) if match else None


class KubernetesOptions(StrictModel):
    """How `llmos manifests render` writes this cluster for KubeRay and Kueue."""

    namespace: Name = Field("llmos", description="Namespace of the RayCluster.")
    image: str = Field(
        LLMOS_IMAGE,
        min_length=1,
        description="Image of every Ray pod: Ray with llmos installed, as the repository's Dockerfile builds it "
        "(`make image`); push it to a registry the cluster pulls from and name it here.",
    )
    ray_version: str = Field("2.60.0", description="Ray version in the image (KubeRay's rayVersion).")
    head_pod_cpus: PositiveInt = Field(
        4, description="CPUs of the head pod for Ray's own processes (head.cpus are offered to user work)."
    )
    token_auth: bool = Field(
        True,
        description="Ray token auth (KubeRay authOptions mode: token); turn off only on a trusted network.",
    )
    network_policy: bool = Field(
        True, description="A NetworkPolicy per namespace admitting only the cluster's own pods and KubeRay."
    )
    operator_namespace: NamespaceName = Field(
        "default",
        description="Namespace the KubeRay operator runs in (where `helm install` put it): the NetworkPolicy admits "
        "the operator's pods from there only, on the dashboard port.",
    )
    idle_timeout_seconds: Annotated[NonNegativeInt, Int32] = Field(
        60, description="Seconds an idle worker waits before the autoscaler removes it."
    )
    pools: dict[str, PoolPlacement] = Field(
        default_factory=dict, description="Per-pool node selectors and taints, keyed by pool name."
    )
    gcs_fault_tolerance: GcsFaultTolerance | None = Field(
        None, description="Keep the GCS in Redis (KubeRay gcsFaultToleranceOptions); None keeps it in memory."
    )
    controller_state: ControllerState | None = Field(
        default_factory=ControllerState,
        description="Where the controller journals on the head pod: a PersistentVolumeClaim (the default), or "
        "None for the pod's own disk, lost when the pod is replaced.",
    )
    pod_security: PodSecurity | None = Field(
        default_factory=PodSecurity,
        description="The pods' securityContext; None leaves them as the image runs them (for an image that must "
        "run as root, or a TPU node pool older than GKE 1.28, which needs privileged containers).",
    )
    shared_storage: SharedStorage | None = Field(
        None,
        description="A ReadWriteMany volume for checkpoints and metrics, mounted by every Ray pod; RayJobs and "
        "RayServices need it. None: pods have only their own disks.",
    )

    @field_validator("ray_version")
    @classmethod
    def _a_version(cls, version: str) -> str:
        if ray_version_parts(version) is None:
            raise ValueError(f"{version!r} is not a Ray version like 2.60.0; give the Ray version of kubernetes.image")
        return version


class ClusterSpec(StrictModel):
    """Pools, teams and priorities of one llmos cluster."""

    name: KubeRayName = Field("llmos", description="Cluster name; becomes the RayCluster name.")
    head: HeadNode = Field(default_factory=HeadNode)
    pools: list[Pool] = Field(..., min_length=1, description="Hardware pools; at least one.")
    teams: list[Team] = Field(default_factory=list, description="Teams and their quotas.")
    priority_classes: list[PriorityClass] = Field(
        default_factory=lambda: list(DEFAULT_PRIORITY_CLASSES),
        description="Named priorities; defaults to low (100), normal (500), high (1000).",
    )
    controller: ControllerOptions = Field(default_factory=ControllerOptions, description="The controller's books.")
    kubernetes: KubernetesOptions = Field(
        default_factory=KubernetesOptions, description="KubeRay and Kueue rendering (llmos manifests)."
    )

    @model_validator(mode="after")
    def _token_auth_needs_a_recent_ray(self) -> ClusterSpec:
        options = self.kubernetes
        if options.token_auth and ray_version_parts(options.ray_version) < MIN_TOKEN_AUTH_RAY:
            oldest = ".".join(map(str, MIN_TOKEN_AUTH_RAY))
            raise ValueError(
                f"kubernetes.ray_version: {options.ray_version} is older than {oldest}, the first Ray KubeRay runs "
                f"with token auth; give the image a Ray of {oldest} or later, or set kubernetes.token_auth: false on a "
                "trusted network"
            )
        return self

    @model_validator(mode="after")
    def _kubernetes_pools_exist(self) -> ClusterSpec:
        names = [pool.name for pool in self.pools]
        for name in self.kubernetes.pools:
            if name not in names:
                raise ValueError(
                    f"kubernetes.pools: {name!r} is not a pool{did_you_mean(name, names)}; pools: {', '.join(names)}"
                )
        return self

    @model_validator(mode="after")
    def _cross_references(self) -> ClusterSpec:
        _reject_duplicates("pools", [p.name for p in self.pools])
        _reject_duplicates("teams", [t.name for t in self.teams])
        _reject_duplicates("priority_classes", [c.name for c in self.priority_classes])
        classes = {c.name for c in self.priority_classes}
        valid_keys = self.quota_keys()
        for index, team in enumerate(self.teams):
            if team.priority not in classes:
                raise ValueError(
                    f"teams[{index}].priority: {team.priority!r} is not a priority class; "
                    f"use one of {', '.join(sorted(classes))} or add it to priority_classes"
                )
            for key in team.quota:
                if key not in valid_keys:
                    raise ValueError(
                        f"teams[{index}].quota: {key!r} is not a resource of this cluster"
                        f"{did_you_mean(key, valid_keys)}; valid keys: {', '.join(valid_keys)}"
                    )
        return self

    def quota_keys(self) -> list[str]:
        typed = sorted({f"{p.accelerator.value}:{p.accelerator_type}" for p in self.pools if p.accelerator_type})
        return [*QUOTA_RESOURCES, *typed]

    def pool(self, name: str) -> Pool:
        for pool in self.pools:
            if pool.name == name:
                return pool
        names = [p.name for p in self.pools]
        raise KeyError(f"no pool named {name!r}{did_you_mean(name, names)}; pools: {', '.join(names)}")

    def team(self, name: str) -> Team:
        for team in self.teams:
            if team.name == name:
                return team
        names = [t.name for t in self.teams]
        raise KeyError(f"no team named {name!r}{did_you_mean(name, names)}; teams: {', '.join(names) or 'none'}")

    def priority_value(self, class_name: str) -> int:
        for priority_class in self.priority_classes:
            if priority_class.name == class_name:
                return priority_class.value
        raise KeyError(f"no priority class {class_name!r}")


class ResourcesLike(Protocol):
    """What one worker or replica reserves."""

    @property
    def cpus(self) -> float: ...
    @property
    def gpus(self) -> float: ...
    @property
    def memory(self) -> int: ...


class WorkloadLike(Protocol):
    """What a training job (`jobs.spec.TrainingJob`) or a served model (`serving.spec.ServeJob`) asks of
    the cluster: who, where, and how big one worker or replica is."""

    @property
    def name(self) -> str: ...
    @property
    def team(self) -> str: ...
    @property
    def priority(self) -> str | None: ...
    @property
    def pool(self) -> str | None: ...
    @property
    def accelerator_type(self) -> str | None: ...
    @property
    def resources(self) -> ResourcesLike: ...


def workload_problems(job: WorkloadLike, cluster: ClusterSpec, unit: str = "worker") -> list[str]:
    """What keeps `job` from ever running on `cluster`, one line per problem naming the field; `unit`
    names what one set of `resources` runs (a worker, a replica). A TPU host is a node like any other
    here: its CPUs and memory take workers and replicas (it has no GPUs)."""
    problems = []
    team_names = [team.name for team in cluster.teams]
    if job.team not in team_names:
        problems.append(
            f"team: {job.team!r} is not a team of this cluster{did_you_mean(job.team, team_names)}; "
            f"teams: {', '.join(team_names) or 'none'}"
        )
    class_names = [c.name for c in cluster.priority_classes]
    if job.priority is not None and job.priority not in class_names:
        problems.append(
            f"priority: {job.priority!r} is not a priority class{did_you_mean(job.priority, class_names)}; "
            f"use one of {', '.join(class_names)}"
        )
    if job.pool is not None:
        pool_names = [pool.name for pool in cluster.pools]
        if job.pool not in pool_names:
            problems.append(
                f"pool: {job.pool!r} is not a pool of this cluster{did_you_mean(job.pool, pool_names)}; "
                f"pools: {', '.join(pool_names)}"
            )
            return problems
        candidates = [cluster.pool(job.pool)]
    elif job.accelerator_type is not None:
        candidates = [pool for pool in cluster.pools if pool.accelerator_type == job.accelerator_type]
        if not candidates:
            known = sorted({p.accelerator_type for p in cluster.pools if p.accelerator_type})
            problems.append(
                f"accelerator_type: no pool has {job.accelerator_type!r}; this cluster has {', '.join(known) or 'none'}"
            )
            return problems
    else:
        candidates = list(cluster.pools)
    wanted = job.resources
    fits = [
        pool
        for pool in candidates
        if wanted.cpus <= pool.node.cpus and wanted.memory <= pool.node.memory and wanted.gpus <= pool.node.gpus
    ]
    if not fits:
        where = ", ".join(pool.name for pool in candidates)
        problems.append(
            f"resources: a {unit} ({wanted.cpus:g} cpus, {wanted.gpus:g} gpus, "
            f"{format_memory(wanted.memory)}) fits on no node of {where}; ask for less or pick another pool"
        )
    return problems


def _reject_duplicates(field: str, names: list[str]) -> None:
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{field}[{index}].name: {name!r} is used twice; names must be unique")
        seen.add(name)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the choice closest to a misspelt `word`, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


YAML_FILE = "YAML file"  # what a file that cannot be read or parsed is not


class SpecError(ValueError):
    """A spec that does not validate; `problems` holds one line per problem, each naming its field."""

    def __init__(self, source: str, problems: list[str], kind: str = "spec"):
        self.source = source
        self.problems = problems
        self.kind = kind  # what the file should have been: ClusterSpec, TrainingJob, ...
        super().__init__(f"{source}: " + "; ".join(problems))

    def __reduce__(self):
        # Raised in a Ray worker, it reaches the driver pickled; the default rebuilds it from its message alone.
        return type(self), (self.source, self.problems, self.kind)

    def __str__(self) -> str:
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        return f"{self.source} is not a valid {self.kind}:\n{lines}"


def describe_validation_error(error: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per pydantic error: the field path, what is wrong, and the fix where we know it."""
    problems = []
    errors = error.errors()
    failed_within = {item["loc"][:depth] for item in errors for depth in range(len(item["loc"]))}
    for item in errors:
        if item["type"] == "too_short" and item["loc"] in failed_within:
            continue  # pydantic counts only the items that validated: the items' own errors say it all
        loc = item["loc"]
        if item["type"] != "extra_forbidden" and loc[-1:] == ("[key]",):
            loc = loc[:-1]  # pydantic's mark of an error in a mapping's key rather than its value: the message says so
        location = _format_location(loc)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            known = _fields_at(model, item["loc"][:-1])
            field = str(item["loc"][-1])
            message = f"unknown field{did_you_mean(field, known)}; known fields here: {', '.join(known)}"
        elif item["type"] == "missing":
            message = "required field is missing"
        elif item["type"] in ("enum", "literal_error"):
            expected = item["ctx"]["expected"]
            choices = re.findall(r"'([^']*)'", expected)
            message = f"{item['input']!r} is not a choice{did_you_mean(str(item['input']), choices)}; use {expected}"
        elif item["type"] == "too_short":
            wanted = item["ctx"]["min_length"]
            message = f"needs at least {wanted} item{'s' if wanted > 1 else ''}, got {item['ctx']['actual_length']}"
        problems.append(f"{location}: {message}" if location else message)
    return problems


_PLAIN_KEY = re.compile(r"[A-Za-z_][\w\-:/.]*")


def _format_location(loc: tuple[Any, ...]) -> str:
    """`pools[1].node.gpus`; keys that are not plain names are quoted as YAML and JSON do, quotes in
    them escaped: `teams[0].quota["my key"]`."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and part.startswith(("function-after", "function-before")):
            continue
        elif _PLAIN_KEY.fullmatch(str(part)):
            text += f".{part}" if text else str(part)
        else:
            text += f"[{json.dumps(str(part), ensure_ascii=False)}]"
    return text


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the nested model that `loc` points into (for 'did you mean' hints)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return []
        current = _nested_model(current.model_fields[part].annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _nested_model(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as `list[Pool]` or `TpuSlice | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        found = _nested_model(argument)
        if found is not None:
            return found
    return None


M = TypeVar("M", bound=BaseModel)


def parse_model(model: type[M], data: Any, source: str) -> M:
    """Validate plain data as `model`, raising SpecError with one readable line per problem."""
    if not isinstance(data, dict):
        problem = f"expected a mapping of fields at the top level, got {type(data).__name__}"
        raise SpecError(source, [problem], model.__name__)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise SpecError(source, describe_validation_error(error, model), model.__name__) from None


def read_yaml_text(path: str | Path) -> str:
    """The text of a YAML file; a SpecError saying why, if it cannot be read."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        problem = "file not found; check the path"
    except IsADirectoryError:
        problem = "is a directory; give the path of a YAML file"
    except UnicodeDecodeError:
        problem = "is not a text file (not UTF-8); give the path of a YAML file"
    except OSError as error:
        problem = f"cannot be read: {error.strerror}"
    raise SpecError(str(path), [problem], YAML_FILE)


def load_yaml(path: str | Path) -> Any:
    """The data of a YAML file, as `yaml.safe_load` reads it, except that a key written twice in one
    mapping is refused: YAML keeps the last silently, so `quota: {gpu: 4, gpu: 100}` would grant 100."""
    loader = yaml.SafeLoader(read_yaml_text(path))
    try:
        root = loader.get_single_node()
        return None if root is None else _construct_checked(loader, root, path)
    except yaml.YAMLError as error:
        raise SpecError(str(path), [_yaml_problem(error)], YAML_FILE) from None
    finally:
        loader.dispose()


def load_yaml_documents(path: str | Path) -> list[Any]:
    """Every document of a multi-document YAML file (a manifest), empty ones left out, each read as
    `load_yaml` reads its one."""
    loader = yaml.SafeLoader(read_yaml_text(path))
    documents = []
    try:
        while loader.check_node():
            document = _construct_checked(loader, loader.get_node(), path)
            if document is not None:
                documents.append(document)
    except yaml.YAMLError as error:
        raise SpecError(str(path), [_yaml_problem(error)], YAML_FILE) from None
    finally:
        loader.dispose()
    return documents


def _construct_checked(loader: yaml.SafeLoader, root: yaml.Node, path: str | Path) -> Any:
    if problems := _duplicate_key_problems(loader, root):
        raise SpecError(str(path), problems, YAML_FILE)
    return loader.construct_document(root)


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return f"{where}not valid YAML ({getattr(error, 'problem', error)})"


_YAML_MERGE_TAG = "tag:yaml.org,2002:merge"


def _duplicate_key_problems(loader: yaml.SafeLoader, root: yaml.Node) -> list[str]:
    """`teams[0].quota: key 'gpu' appears twice (lines 7 and 8); keep one`, for each key written twice in
    a mapping of the composed document, in the order of the file. Keys compare as YAML reads them (`yes`
    and `true` are one key). Each node is visited once, so aliases cost nothing more and cannot loop."""
    found: list[tuple[int, str]] = []
    pending: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())]
    visited: set[int] = set()
    while pending:
        node, location = pending.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            pending.extend((item, (*location, index)) for index, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            marks: dict[Any, yaml.Mark] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _YAML_MERGE_TAG:
                    pending.append((value_node, location))  # its keys become this mapping's
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # a list or mapping as a key is refused when the document is read
                key = loader.construct_object(key_node)
                mark = key_node.start_mark
                if key in marks:
                    first = marks[key]
                    where = (
                        f"lines {first.line + 1} and {mark.line + 1}"
                        if first.line != mark.line
                        else f"line {mark.line + 1}, columns {first.column + 1} and {mark.column + 1}"
                    )
                    problem = f"key {key!r} appears twice ({where}); keep one"
                    field = _format_location(location)
                    found.append((mark.index, f"{field}: {problem}" if field else problem))
                marks[key] = mark
                pending.append((value_node, (*location, key)))
    return [problem for _, problem in sorted(found)]


def load_spec(path: str | Path) -> ClusterSpec:
    return parse_model(ClusterSpec, load_yaml(path), str(path))
