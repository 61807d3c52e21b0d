"""Placement groups, as `ray.util.placement_group`: reserve bundles of resources on the
cluster's nodes, all or none, and schedule tasks and actors into them
(`PlacementGroupSchedulingStrategy`). How they are created and kept: runtime/placement_groups.py.
"""

from __future__ import annotations

from hpcray import context, ids
from hpcray.api import client_or_init, remote, wait
from hpcray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

VALID_PLACEMENT_GROUP_STRATEGIES = {"PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"}


class PlacementGroupID:
    """A placement group's id (Ray's PlacementGroupID): `hex()`, `binary()`."""

    __slots__ = ("_binary",)

    def __init__(self, binary: bytes):
        self._binary = binary

    def binary(self) -> bytes:
        return self._binary

    def hex(self) -> str:
        return self._binary.hex()

    def __eq__(self, other) -> bool:
        return isinstance(other, PlacementGroupID) and other._binary == self._binary

    def __hash__(self) -> int:
        return hash(self._binary)

    def __repr__(self) -> str:
        return f"PlacementGroupID({self.hex()})"


class PlacementGroup:
    """A handle to a placement group; it can be passed to tasks and actors."""

    def __init__(self, id: PlacementGroupID, bundle_cache: list | None = None):
        self.id = id
        self.bundle_cache = bundle_cache

    @staticmethod
    def empty() -> PlacementGroup:
        return PlacementGroup(PlacementGroupID(bytes(16)), [])

    @property
    def is_empty(self) -> bool:
        return self.id.binary() == bytes(16)

    def ready(self):
        """An ObjectRef that resolves (to this group) once every bundle is reserved; it
        never does for a group that cannot be created, as in Ray."""
        return _bundle_reservation_check.options(
            num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(self)).remote(self)

    def wait(self, timeout_seconds: float = 30) -> bool:
        """Whether the group was created within `timeout_seconds`."""
        ready, _ = wait([self.ready()], timeout=timeout_seconds)
        return bool(ready)

    @property
    def bundle_specs(self) -> list:
        if self.bundle_cache is None:  # a handle made from an id only
            row = placement_group_table(self)
            self.bundle_cache = [dict(b) for _, b in sorted(row.get("bundles", {}).items())]
        return self.bundle_cache

    @property
    def bundle_count(self) -> int:
        return len(self.bundle_specs)

    def __eq__(self, other) -> bool:
        return isinstance(other, PlacementGroup) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __reduce__(self):
        return (_rebuild, (self.id.binary(), self.bundle_cache))

    def __repr__(self) -> str:
        return f"PlacementGroup(id={self.id.hex()}, bundles={self.bundle_cache})"


def _rebuild(binary: bytes, bundles) -> PlacementGroup:
    return PlacementGroup(PlacementGroupID(binary), bundles)


@remote(num_cpus=0)
def _bundle_reservation_check(placement_group):
    return placement_group


def placement_group(bundles: list, strategy: str = "PACK", name: str = "",
                    lifetime: str | None = None, _max_cpu_fraction_per_node: float = 1.0,
                    _soft_target_node_id: str | None = None,
                    bundle_label_selector=None) -> PlacementGroup:
    """Reserve `bundles` ({resource: amount} each) by `strategy`; returns at once, the
    group is created when the resources are there (`ready()`, `wait()`)."""
    if not isinstance(bundles, list) or not bundles:
        raise ValueError("The placement group `bundles` argument must be a non-empty list "
                         f"of dictionaries, got {bundles!r}.")
    cleaned = []
    for bundle in bundles:
        if not isinstance(bundle, dict) or not any(
                isinstance(v, (int, float)) and v > 0 for v in bundle.values()):
            raise ValueError("Bundles cannot be an empty dictionary or resources with only 0 "
                             f"values. Bundles: {bundles}")
        for resource, amount in bundle.items():
            if not isinstance(amount, (int, float)) or amount < 0:
                raise ValueError(f"Bundle resource {resource!r} must be a non-negative "
                                 f"number, got {amount!r}.")
        cleaned.append({str(k): float(v) for k, v in bundle.items() if v > 0})
    if strategy not in VALID_PLACEMENT_GROUP_STRATEGIES:
        raise ValueError(f"Invalid placement group strategy {strategy}. Supported strategies "
                         f"are: {sorted(VALID_PLACEMENT_GROUP_STRATEGIES)}.")
    if lifetime not in (None, "detached"):
        raise ValueError("Placement group `lifetime` argument must be either `None` or "
                         f"'detached', got {lifetime!r}.")
    client = client_or_init()
    group_id = ids.new_task_id()
    client.create_group(group_id, cleaned, strategy, name or "", lifetime == "detached")
    return PlacementGroup(PlacementGroupID(group_id), [dict(b) for b in cleaned])


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Free its bundles: its actors are killed, its tasks fail, as in Ray."""
    client_or_init().remove_group(placement_group.id.binary())


def get_placement_group(placement_group_name: str) -> PlacementGroup:
    """The live placement group of this name (ValueError if none)."""
    if not placement_group_name:
        raise ValueError("Please supply a non-empty value to get_placement_group")
    rows = client_or_init().group_rows(None, placement_group_name)
    if not rows:
        raise ValueError(f"Failed to look up placement group with name: "
                         f"{placement_group_name}")
    row = rows[-1]
    return PlacementGroup(PlacementGroupID(bytes.fromhex(row["placement_group_id"])),
                          [dict(b) for _, b in sorted(row["bundles"].items())])


def placement_group_table(placement_group: PlacementGroup | None = None) -> dict:
    """One group's state (Ray's fields), or every group's, by id (hex)."""
    client = client_or_init()
    if placement_group is not None:
        rows = client.group_rows(placement_group.id.binary(), None)
        return rows[0] if rows else {}
    return {row["placement_group_id"]: row for row in client.group_rows(None, None)}


def get_current_placement_group() -> PlacementGroup | None:
    """The group the calling task or actor runs in; None in the driver or outside one."""
    group = context.group
    if group is None:
        return None
    return PlacementGroup(PlacementGroupID(group.group_id))

