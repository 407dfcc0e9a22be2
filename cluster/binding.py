"""Binding: the only code that turns the engine's decisions into Ray placement groups.

Each placed request becomes one detached placement group named `llmos-<request id>` in the `llmos`
namespace, each bundle pinned to the node the engine chose through Ray's `ray.io/node-id` label:
one Ray bundle per bundle of the gang, or with `group_bundles: per_node` one per node holding the
gang's bundles there (`BundleBinding.group_bundle_index` says which).
Detached, because the controller that creates it may be restarted and the group must outlive it.
A group whose bundles all sit on one node is asked for as STRICT_PACK, which says the same thing to
Ray and lets it reserve the bundles together instead of one by one.
"""

from __future__ import annotations

import ray
from ray._raylet import PlacementGroupID
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from cluster.ray_mapping import RAY_NODE_ID_LABEL
from cluster.requests import BundleBinding
from cluster.scheduler import PLACEMENT_GROUP_PREFIX

NAMESPACE = "llmos"


def ray_bundles(bundles: list[BundleBinding]) -> tuple[list[dict[str, float]], list[str]]:
    """The Ray bundles of a placement, by `group_bundle_index`: each the sum of the bundles it holds
    (all on one node), and that node. Ray refuses zero amounts in a bundle; memory is whole bytes."""
    amounts: dict[int, dict[str, float]] = {}
    nodes: dict[int, str] = {}
    for binding in bundles:
        total = amounts.setdefault(binding.group_bundle_index, {})
        for key, amount in binding.resources.items():
            total[key] = total.get(key, 0.0) + amount
        nodes[binding.group_bundle_index] = binding.node
    ray_amounts = []
    for index in range(len(amounts)):
        bundle = {key: amount for key, amount in amounts[index].items() if amount > 0}
        if "memory" in bundle:
            bundle["memory"] = float(int(bundle["memory"]))
        ray_amounts.append(bundle)
    return ray_amounts, [nodes[index] for index in range(len(amounts))]


def bind(name: str, bundles: list[BundleBinding], node_ids: dict[str, str]) -> PlacementGroup:
    """Create the placement group for one placement; `node_ids` maps llmos node names to Ray node ids."""
    resources, nodes = ray_bundles(bundles)
    return placement_group(
        resources,
        strategy="STRICT_PACK" if len(set(nodes)) == 1 else "PACK",
        name=name,
        lifetime="detached",
        bundle_label_selector=[{RAY_NODE_ID_LABEL: node_ids[node]} for node in nodes],
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


def unbind_all() -> list[str]:
    """Remove every llmos placement group Ray holds, found in Ray's table whatever the caller's namespace;
    their names."""
    groups = live_groups()
    for entry in groups.values():
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(entry["placement_group_id"])))
    return sorted(groups)


def is_ready(group: PlacementGroup) -> bool:
    return ray.util.placement_group_table(group).get("state") == "CREATED"
