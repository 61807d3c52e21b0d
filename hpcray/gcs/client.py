"""The node manager's side of the global control store: route, correlate, dispatch.

A GcsClient turns `request(op, key, *args, callback=...)` into a message to the shard
that holds `key` (shard i lives on rank i) and calls the callback when the reply comes
back through `on_message`. It also hands notifications to the handlers subscribed to
their channel, and offers the few operations that take more than one shard (get_nodes,
mark_node_dead fan out; register_actor claims the name first). Event-driven, no
blocking call, no MPI: the caller injects `send(dest_rank, message)` and feeds every
"gcs_reply" / "gcs_notify" message it receives to `on_message`. Ops and message shapes
are documented in `shard.py`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from hpcray.gcs.shard import GCS_NOTIFY, GCS_REPLY, shard_of
from hpcray.gcs.tables import ActorInfo, NameTaken, NodeInfo

Callback = Callable[[Any], None]
NotificationHandler = Callable[[Any, Any], None]  # (key, payload)


class GcsClient:
    def __init__(self, my_rank: int, num_shards: int,
                 send: Callable[[int, tuple], None]) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards={num_shards}")
        self.my_rank = my_rank
        self.num_shards = num_shards
        self.send = send
        self.pending_requests: dict[int, Callback] = {}
        self.notification_handlers: dict[str, list[NotificationHandler]] = {}
        self.stray_replies = 0  # replies to no pending request: a bug to look into
        self._request_ids = itertools.count(1)

    def shard_rank(self, key) -> int:
        return shard_of(key, self.num_shards)

    def request(self, op: str, key, *args, callback: Callback | None = None) -> int | None:
        """Send `op` to the shard holding `key`; `callback(result)` on the reply. Without
        a callback the shard sends no reply (heartbeats). Returns the request id."""
        return self._send_to(self.shard_rank(key), op, key, args, callback)

    def _send_to(self, rank: int, op: str, key, args: tuple,
                 callback: Callback | None) -> int | None:
        request_id = None
        if callback is not None:
            request_id = next(self._request_ids)
            self.pending_requests[request_id] = callback
        self.send(rank, (op, request_id, key, *args))
        return request_id

    def fan_out(self, op: str, key, *args, merge: Callable[[list], Any],
                callback: Callback) -> None:
        """Send `op` to every shard; `callback(merge(results))` once all have replied
        (results in shard order)."""
        results: list = [None] * self.num_shards
        waiting = set(range(self.num_shards))

        def collect(shard: int, result) -> None:
            results[shard] = result
            waiting.discard(shard)
            if not waiting:
                callback(merge(results))

        for shard in range(self.num_shards):
            self._send_to(shard, op, key, args,
                          lambda result, shard=shard: collect(shard, result))

    def subscribe_handler(self, channel: str, fn: NotificationHandler) -> None:
        """Call `fn(key, payload)` for every notification on `channel` ("object_location",
        "object_deleted", "actor")."""
        self.notification_handlers.setdefault(channel, []).append(fn)

    def on_message(self, source: int, message: tuple) -> bool:
        """Take a message from the network; False if it is not the client's to handle."""
        kind = message[0]
        if kind == GCS_REPLY:
            _, request_id, result = message
            callback = self.pending_requests.pop(request_id, None)
            if callback is None:
                self.stray_replies += 1
            else:
                callback(result)
            return True
        if kind == GCS_NOTIFY:
            _, channel, key, payload = message
            for fn in list(self.notification_handlers.get(channel, ())):
                fn(key, payload)
            return True
        return False

    # -- operations that take more than one shard ---------------------------------------

    def get_nodes(self, callback: Callable[[list[NodeInfo]], None]) -> None:
        """Every registered node, from every shard, sorted by rank, in one callback."""
        self.fan_out("get_nodes", None, merge=_merge_nodes, callback=callback)

    def mark_node_dead(self, rank: int, callback: Callback | None = None) -> None:
        """Record `rank` as dead on every shard; callback({"lost_objects", "actors"})."""
        self.fan_out("mark_node_dead", rank, merge=_merge_lists,
                     callback=callback if callback is not None else _ignore)

    def register_actor(self, actor_id: bytes, info: ActorInfo,
                       callback: Callback | None = None) -> None:
        """Register an actor; a named one claims its name first. callback(True) when
        registered, NameTaken(name, holder) if a live actor holds the name, False if the
        actor id is registered already."""
        done = callback if callback is not None else _ignore
        if info.name is None:
            self.request("register_actor", actor_id, info, callback=done)
            return

        def claimed(result) -> None:
            if isinstance(result, NameTaken):
                done(result)
            else:
                self.request("register_actor", actor_id, info, callback=done)

        self.request("claim_actor_name", info.name, actor_id, callback=claimed)


def _merge_nodes(results: list[list[NodeInfo]]) -> list[NodeInfo]:
    return sorted((node for nodes in results for node in nodes), key=lambda node: node.rank)


def _merge_lists(results: list[dict]) -> dict:
    merged: dict[str, list] = {}
    for result in results:
        for name, items in result.items():
            merged.setdefault(name, []).extend(items)
    return merged


def _ignore(result) -> None:
    pass
