"""Identifiers of jobs, tasks, objects and actors.

Every process draws a random 8-byte prefix once and counts from there, so ids are unique
across processes without coordination and cost a counter increment to make. An object
id is the id of the task that makes it plus a 4-byte return index (0 for `put`).
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
_prefix = os.urandom(8)
_counter = itertools.count(1)


def reseed() -> None:
    """Draw a new prefix: called in a child process after fork."""
    global _prefix, _counter
    _prefix = os.urandom(8)
    _counter = itertools.count(1)


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
