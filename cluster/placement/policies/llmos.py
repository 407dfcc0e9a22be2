"""llmos: placeholder while the benchmark harness is validated."""

from __future__ import annotations

from cluster.placement.policies.fgd import Fgd


class Llmos(Fgd):
    name = "llmos"
