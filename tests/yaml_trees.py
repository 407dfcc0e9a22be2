"""The plain data a YAML file loads to, walked: every path into it, and the container a path ends in."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def paths(tree: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path into `tree`, the empty one (the tree itself) first; each a tuple of keys and indexes."""
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from paths(value, (*prefix, index))


def parent_of(tree: Any, path: tuple) -> Any:
    """The dict or list that holds the value at `path` (not empty), under the key `path[-1]`."""
    for key in path[:-1]:
        tree = tree[key]
    return tree
