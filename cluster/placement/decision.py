"""What the engine answers: a placement of every bundle, or a rejection with its reason."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RejectionReason(StrEnum):
    # Not even the empty cluster could hold it: the request or the cluster must change.
    NEVER_FITS = "never_fits"
    # The empty cluster could hold it: queue it and retry after releases or scale-up.
    NO_ROOM_NOW = "no_room_now"


@dataclass(frozen=True)
class BundlePlacement:
    """Where one bundle goes, and exactly what it reserves there (so it can be released)."""

    bundle_index: int
    node: str
    resources: dict[str, float]
    gpu_devices: tuple[int, ...] = ()
    gpu_share: float = 0.0  # of each device in gpu_devices: 1.0 for whole devices


@dataclass(frozen=True)
class Placement:
    request: str
    policy: str
    bundles: tuple[BundlePlacement, ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        """Node of each bundle, in bundle order."""
        return tuple(bundle.node for bundle in self.bundles)


@dataclass(frozen=True)
class Rejection:
    request: str
    policy: str
    reason: RejectionReason
    message: str


Decision = Placement | Rejection
