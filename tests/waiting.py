"""Bounded polling for tests on a live cluster (`cluster.waiting`), with the tests' default timeout."""

from __future__ import annotations

from cluster.waiting import wait_for

WAIT_S = 60.0

__all__ = ["WAIT_S", "wait_for"]
