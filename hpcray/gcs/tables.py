"""The records the global control store keeps, one small class per table row.

These are plain data: no behaviour beyond `copy()`, which a shard uses so that a reply or
a notification never shares a mutable set or dict with the shard's own table (on rank 0
a message may be delivered without pickling). Every class pickles, since replies travel
over MPI. Not for: routing, subscriptions, invariants (see `shard.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Actor lifecycle, as Ray names it. DEAD is terminal: a dead actor's name is free again.
DEPENDENCIES_UNREADY = "DEPENDENCIES_UNREADY"
PENDING_CREATION = "PENDING_CREATION"
ALIVE = "ALIVE"
RESTARTING = "RESTARTING"
DEAD = "DEAD"
ACTOR_STATES = frozenset({DEPENDENCIES_UNREADY, PENDING_CREATION, ALIVE, RESTARTING, DEAD})

# Task states kept beside the spec, for lineage replay and list_tasks(). A task only moves
# forward (a late RUNNING never undoes FINISHED); FINISHED means it ended with a value or
# its own exception in its returns, FAILED that the system failed it (worker crashes past
# its retries, cancel, a failed dependency).
TASK_PENDING = "PENDING"
TASK_RUNNING = "RUNNING"
TASK_FINISHED = "FINISHED"
TASK_FAILED = "FAILED"
TASK_DELETED = "DELETED"  # an event only: the owner freed every return, drop the entry
TASK_STATE_ORDER = {TASK_PENDING: 0, TASK_RUNNING: 1, TASK_FINISHED: 2, TASK_FAILED: 2}


@dataclass(slots=True)
class ObjectInfo:
    """objects: object_id (20 B) -> where its copies are and who can remake it."""

    size: int
    owner: int  # rank of the owner (the node whose worker made the ref)
    locations: set[int] = field(default_factory=set)  # ranks holding a copy in their store
    producer_task: bytes | None = None  # task id to re-run if every copy is lost
    inline: bytes | None = None  # small values kept by value, no store copy needed

    def copy(self) -> ObjectInfo:
        return ObjectInfo(self.size, self.owner, set(self.locations), self.producer_task,
                          self.inline)


@dataclass(slots=True)
class TaskInfo:
    """tasks: task_id (16 B) -> the spec (a TaskSpec, or its pickle), for lineage replay,
    its state, the rank that ran it last, and its name as that rank reported it."""

    spec: Any
    state: str = TASK_PENDING
    node: int | None = None
    name: str | None = None

    def copy(self) -> TaskInfo:
        return TaskInfo(self.spec, self.state, self.node, self.name)


@dataclass(slots=True)
class ActorInfo:
    """actors: actor_id (16 B) -> lifecycle, placement and restart count."""

    state: str = PENDING_CREATION
    node: int | None = None  # rank hosting the actor's worker, None while unplaced
    restarts: int = 0
    name: str | None = None
    class_name: str = ""
    info: dict = field(default_factory=dict)  # free-form: options, creation task id, ...

    def copy(self) -> ActorInfo:
        return ActorInfo(self.state, self.node, self.restarts, self.name, self.class_name,
                         dict(self.info))


# update_actor may change these; name and class_name are fixed at registration.
ACTOR_MUTABLE_FIELDS = frozenset({"state", "node", "restarts", "info"})


@dataclass(slots=True)
class NodeInfo:
    """nodes: rank -> resources, what is free, queue length and liveness."""

    rank: int
    resources: dict
    available: dict
    load: int = 0  # tasks queued on the node
    alive: bool = True
    last_heartbeat: float = 0.0  # the GCS shard's clock when the heartbeat arrived

    def copy(self) -> NodeInfo:
        return NodeInfo(self.rank, dict(self.resources), dict(self.available), self.load,
                        self.alive, self.last_heartbeat)


@dataclass(slots=True)
class NameTaken:
    """The result of registering a named actor whose name a live actor already holds."""

    name: str
    actor_id: bytes  # the live actor that holds the name
