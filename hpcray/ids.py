"""Identifiers of jobs, tasks, objects and actors.

Every process draws a prefix once (the 2-byte rank of its node, then 6 random bytes) and
counts from there, so ids are unique across processes without coordination, cost a
counter increment to make, and tell which node owns them. An object id is the id of the
task that makes it plus a 4-byte return index (0 for `put`).
"""

from __future__ import annotations

import itertools
import os
import struct

TASK_ID_SIZE = 16
OBJECT_ID_SIZE = 20  # what the C store keys its table by
ACTOR_ID_SIZE = 16

_pack_counter = struct.Struct(">Q").pack
_pack_index = struct.Struct(">I").pack
_prefix = bytes(2) + os.urandom(6)
_counter = itertools.count(1)


def reseed(rank: int = 0) -> None:
    """Draw a new prefix for a process of node `rank` (a worker after fork)."""
    global _prefix, _counter
    _prefix = rank.to_bytes(2, "big") + os.urandom(6)
    _counter = itertools.count(1)


def owner_rank(any_id: bytes) -> int:
    """The rank of the node whose process made this task, object or actor id."""
    return int.from_bytes(any_id[:2], "big")


def made_here(any_id: bytes) -> bool:
    """Whether this process (since its last reseed) made this task, object or actor id."""
    return any_id[:8] == _prefix


def new_task_id() -> bytes:
    return _prefix + _pack_counter(next(_counter))


def new_actor_id() -> bytes:
    return new_task_id()


def object_id_for(task_id: bytes, index: int) -> bytes:
    return task_id + _pack_index(index)


def new_put_id() -> bytes:
    return new_task_id() + b"\0\0\0\0"


def task_id_of(object_id: bytes) -> bytes:
    return object_id[:TASK_ID_SIZE]
