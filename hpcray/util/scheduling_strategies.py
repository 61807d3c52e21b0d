"""Ray's scheduling strategy objects; `scheduling_strategy="SPREAD"`/"DEFAULT" are strings.

The schedulers take them as options.strategy_of turns them (NodeAffinity, InGroup)."""

from __future__ import annotations


class NodeAffinitySchedulingStrategy:
    """Run on the node `node_id` (hex); `soft=True` allows another node if it cannot."""

    def __init__(self, node_id: str, soft: bool, _spill_on_unavailable: bool = False,
                 _fail_on_unavailable: bool = False):
        self.node_id = node_id
        self.soft = soft
        self._spill_on_unavailable = _spill_on_unavailable
        self._fail_on_unavailable = _fail_on_unavailable

    def __repr__(self) -> str:
        return f"NodeAffinitySchedulingStrategy(node_id={self.node_id!r}, soft={self.soft})"


class PlacementGroupSchedulingStrategy:
    """Run in a placement group: in bundle `placement_group_bundle_index` (-1: any of
    them); `placement_group_capture_child_tasks`: the tasks and actors it creates go into
    the group too unless they say otherwise. `placement_group=None` opts a child out."""

    def __init__(self, placement_group, placement_group_bundle_index: int = -1,
                 placement_group_capture_child_tasks: bool | None = None):
        self.placement_group = placement_group
        self.placement_group_bundle_index = placement_group_bundle_index
        self.placement_group_capture_child_tasks = placement_group_capture_child_tasks

    def __repr__(self) -> str:
        return (f"PlacementGroupSchedulingStrategy(placement_group={self.placement_group!r}, "
                f"placement_group_bundle_index={self.placement_group_bundle_index}, "
                "placement_group_capture_child_tasks="
                f"{self.placement_group_capture_child_tasks})")
