"""A controller of a test module's own (own state directory), started on the shared cluster."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from cluster.admin import Admin


@contextlib.contextmanager
def own_controller(tmp_path_factory, name: str, policy: str) -> Iterator[Admin]:
    """Start it; afterwards cancel whatever the module left queued or placed, and stop it."""
    admin = Admin(state_dir=tmp_path_factory.mktemp(name), policy=policy)
    yield admin
    for status in admin.queue():
        admin.cancel(status.id)
    admin.stop_controller()
