"""Binding: the only code that turns the engine's decisions into Ray placement groups.

Each placed request becomes one detached placement group named `llmos-<request id>` in the `llmos`
namespace, each bundle pinned to the node the engine chose through Ray's `ray.io/node-id` label.
Detached, because the controller that creates it may be restarted and the group must outlive it.
A group whose bundles all sit on one node is asked for as STRICT_PACK, which says the same thing to
Ray and lets it reserve the bundles together instead of one by one.
"""

from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from cluster.requests import BundleBinding
from cluster.scheduler import PLACEMENT_GROUP_PREFIX

NODE_ID_LABEL = "ray.io/node-id"
NAMESPACE = "llmos"


def ray_bundle(binding: BundleBinding) -> dict[str, float]:
    """Ray refuses zero amounts in a bundle; memory is whole bytes."""
    bundle = {key: amount for key, amount in binding.resources.items() if amount > 0}
    if "memory" in bundle:
        bundle["memory"] = float(int(bundle["memory"]))
    return bundle


def bind(name: str, bundles: list[BundleBinding], node_ids: dict[str, str]) -> PlacementGroup:
    """Create the placement group for one placement; `node_ids` maps llmos node names to Ray node ids."""
    ordered = sorted(bundles, key=lambda binding: binding.bundle_index)
    one_node = len({binding.node for binding in ordered}) == 1
    return placement_group(
        [ray_bundle(binding) for binding in ordered],
        strategy="STRICT_PACK" if one_node else "PACK",
        name=name,
        lifetime="detached",
        bundle_label_selector=[{NODE_ID_LABEL: node_ids[binding.node]} for binding in ordered],
    )


def find(name: str) -> PlacementGroup | None:
    try:
        return ray.util.get_placement_group(name)
    except ValueError:
        return None


def unbind(name: str) -> bool:
    """Remove the placement group if it exists; True if one was removed."""
    group = find(name)
    if group is None:
        return False
    remove_placement_group(group)
    return True


def live_groups() -> dict[str, dict]:
    """Every llmos placement group Ray holds (any state but removed), by name: Ray's table entry of each."""
    return {
        entry["name"]: entry
        for entry in ray.util.placement_group_table().values()
        if entry.get("name", "").startswith(PLACEMENT_GROUP_PREFIX) and entry.get("state") != "REMOVED"
    }


def bundle_nodes(group: PlacementGroup) -> list[str]:
    """Ray node id of each bundle as Ray placed it (empty strings while pending)."""
    table = ray.util.placement_group_table(group)
    placed = table.get("bundles_to_node_id", {})
    return [placed.get(index, "") for index in range(len(table.get("bundles", {})))]


def is_ready(group: PlacementGroup) -> bool:
    return ray.util.placement_group_table(group).get("state") == "CREATED"
