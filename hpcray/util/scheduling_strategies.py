"""Ray's scheduling strategy objects; `scheduling_strategy="SPREAD"`/"DEFAULT" are strings."""

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
