"""The controller freezes what survives Python's full collections (`freeze_survivors_of_full_collections`)."""

from __future__ import annotations

import gc
import weakref

import pytest

from cluster.controller import _freeze_survivors, freeze_survivors_of_full_collections


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def freezing():
    freeze_survivors_of_full_collections()
    yield
    gc.callbacks.remove(_freeze_survivors)
    gc.unfreeze()


def _tracked(obj: object) -> bool:
    return any(tracked is obj for tracked in gc.get_objects())


def test_what_survives_a_full_collection_is_frozen_and_later_collections_skip_it(freezing):
    books = {f"research-{index:05d}": Node() for index in range(1000)}
    assert _tracked(books)
    gc.collect()
    assert gc.get_freeze_count() >= len(books)
    assert not _tracked(books)  # out of every generation the collector scans
    forgotten = weakref.ref(books.pop("research-00000"))
    assert forgotten() is None  # a frozen object still goes when its last reference does


def test_garbage_cycles_present_at_the_collection_are_still_freed(freezing):
    first, second = Node(), Node()
    first.other, second.other = second, first
    gone = weakref.ref(first)
    del first, second
    gc.collect()
    assert gone() is None


def test_a_cycle_dropped_after_it_was_frozen_waits_for_an_unfreeze(freezing):
    first, second = Node(), Node()
    first.other, second.other = second, first
    gc.collect()  # both reachable: frozen
    gone = weakref.ref(first)
    del first, second
    gc.collect()
    assert gone() is not None  # a frozen cycle is not collected...
    gc.unfreeze()  # ...until it is unfrozen
    gc.collect()
    assert gone() is None


def test_registering_twice_freezes_once():
    freeze_survivors_of_full_collections()
    freeze_survivors_of_full_collections()
    try:
        assert gc.callbacks.count(_freeze_survivors) == 1
    finally:
        gc.callbacks.remove(_freeze_survivors)
        gc.unfreeze()
