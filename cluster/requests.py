"""What users ask the controller for, and what it tells them back.

These pydantic models are the admin API's vocabulary: YAML request files, `Admin.submit`, the CLI's
`--json` output and the controller's durable journal all use them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator

from cluster.placement.request import GangRequest
from cluster.ray_mapping import NODE_LABEL, RAY_NODE_ID_LABEL


class WorkloadKind(StrEnum):
    TRAINING = "training"
    SERVING = "serving"
    BATCH = "batch"


class GroupBundles(StrEnum):
    """How a placement's bundles become the bundles of its Ray placement group."""

    PER_BUNDLE = "per_bundle"  # one Ray bundle per gang bundle, in order
    PER_NODE = "per_node"  # one Ray bundle per node, holding the gang's bundles there


class RequestState(StrEnum):
    QUEUED = "queued"  # waiting for room or quota
    PREEMPTED = "preempted"  # taken off its nodes; waiting to be placed again
    PLACED = "placed"  # bound to a Ray placement group
    RUNNING = "running"  # the workload reported it started
    FINISHED = "finished"
    FAILED = "failed"
    REJECTED = "rejected"  # can never be admitted as asked
    CANCELLED = "cancelled"

    @property
    def waiting(self) -> bool:
        return self in (RequestState.QUEUED, RequestState.PREEMPTED)

    @property
    def holding(self) -> bool:
        """Whether the request holds resources on nodes."""
        return self in (RequestState.PLACED, RequestState.RUNNING)

    @property
    def final(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.FAILED, RequestState.REJECTED, RequestState.CANCELLED)


class SubmitRequest(BaseModel):
    """A gang to place for a team (`llmos submit REQUEST.yaml`, `Admin.submit`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    team: str = Field(..., description="Team the request is charged to.")
    gang: GangRequest = Field(..., description="Bundles placed all-or-nothing, and how they sit together.")
    kind: WorkloadKind = Field(WorkloadKind.BATCH, description="training, serving or batch.")
    priority: str | None = Field(None, description="Priority class; defaults to the team's.")
    preemptible: bool = Field(True, description="Whether higher-priority work may take its nodes.")
    group: str | None = Field(
        None, description="Requests that belong together (a deployment's replicas, an elastic job's workers)."
    )
    group_min: NonNegativeInt = Field(0, description="Preemption never leaves a group with fewer placed requests.")
    bind_placement_group: bool = Field(
        True,
        description="True: the controller reserves the placement in Ray as a pinned placement group. False: the "
        "controller only books it, and the workload reserves the same nodes itself (Ray Train creates its own "
        "placement group; pin each worker with its bundle's `pin`, a selector on Ray's `ray.io/node-id`).",
    )
    group_bundles: GroupBundles = Field(
        GroupBundles.PER_BUNDLE,
        description="per_bundle: the placement group has one Ray bundle per gang bundle, bundle i as Ray bundle i "
        "(what Ray libraries that start one worker per bundle expect). per_node: one Ray bundle per node, "
        "holding the sum of the gang's bundles there; Ray reserves a group more slowly the more bundles it has "
        "(ray-project/ray#20243), so a dense gang is bound several times faster. Schedule each worker into "
        "its bundle's `group_bundle_index`. Bundles with a fractional GPU keep a Ray bundle each.",
    )


class BundleBinding(BaseModel):
    """Where one bundle of a placed request sits."""

    model_config = ConfigDict(extra="forbid")

    bundle_index: int
    node: str
    pool: str
    resources: dict[str, float]
    gpu_devices: list[int] = Field(default_factory=list)
    gpu_share: float = 0.0
    group_bundle_index: int = Field(..., description="The bundle of the Ray placement group that holds this one.")
    node_id: str = Field("", description="Ray's id of the node (its `ray.io/node-id` label).")

    @property
    def pin(self) -> dict[str, str]:
        """The label selector that puts a worker on this bundle's node: Ray's node id, which every node has
        (KubeRay's pods carry no llmos.io/node label); llmos's node name for books without the id."""
        return {RAY_NODE_ID_LABEL: self.node_id} if self.node_id else {NODE_LABEL: self.node}

    @model_validator(mode="before")
    @classmethod
    def _bound_one_to_one_before(cls, data: Any) -> Any:
        # Journals written before `group_bundles` existed bound every bundle as its own Ray bundle.
        if isinstance(data, dict) and "group_bundle_index" not in data and "bundle_index" in data:
            return {**data, "group_bundle_index": data["bundle_index"]}
        return data


def pin_any(bundles: list[BundleBinding]) -> dict[str, str]:
    """One label selector for the nodes of all these bundles (replicas that may each run on any of them),
    by Ray's node id as `BundleBinding.pin`, or by llmos's node name if some bundle's books lack the id."""
    if all(bundle.node_id for bundle in bundles):
        key, values = RAY_NODE_ID_LABEL, {bundle.node_id for bundle in bundles}
    else:
        key, values = NODE_LABEL, {bundle.node for bundle in bundles}
    return {key: f"in({','.join(sorted(values))})"}


class RequestStatus(BaseModel):
    """The controller's record of one request."""

    # NaN and infinity (a diverged loss in `details`) are written to the journal as JSON's usual extension.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    id: str
    request: SubmitRequest
    priority_value: int
    state: RequestState
    reason: str = ""
    bundles: list[BundleBinding] = Field(default_factory=list)
    placement_group: str | None = Field(None, description="Name of the Ray placement group (namespace llmos).")
    submitted_seq: int
    submitted_at: float
    placed_at: float | None = None
    finished_at: float | None = Field(None, description="When it became final (finished, failed, rejected, cancelled).")
    finished_seq: int | None = Field(None, description="Order in which final requests ended; the first are forgotten.")
    preemptions: int = 0
    failures: int = 0
    details: dict = Field(default_factory=dict, description="Progress the workload reports (step, workers, ...).")
    idempotency_key: str | None = Field(None, description="The client's key; a retried submit returns this request.")
    operation_keys: list[str] = Field(
        default_factory=list,
        description="The keys of the last cancel and preempt calls that changed it; such a call retried is not "
        "applied again.",
    )

    @property
    def team(self) -> str:
        return self.request.team

    @property
    def nodes(self) -> list[str]:
        return [bundle.node for bundle in self.bundles]


class DecisionAction(StrEnum):
    ADMITTED = "admitted"
    PLACED = "placed"
    WAITING = "waiting"
    REJECTED = "rejected"
    PREEMPTED = "preempted"
    REQUEUED = "requeued"
    RELEASED = "released"
    CANCELLED = "cancelled"


class DecisionRecord(BaseModel):
    """One entry of the decision log: what the controller did to a request, and why."""

    model_config = ConfigDict(extra="forbid")

    seq: int
    time: float
    request_id: str
    action: DecisionAction
    policy: str = ""
    reason: str = ""
    nodes: list[str] = Field(default_factory=list)


class TeamUsage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    team: str
    quota: dict[str, float]
    used: dict[str, float]


class NodeControl(BaseModel):
    """Operator marks on a node: cordoned nodes take no new work; draining also moves work off."""

    model_config = ConfigDict(extra="forbid")

    node: str
    cordoned: bool = False
    drained: bool = False
