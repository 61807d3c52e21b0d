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
# forward (a late RUNNING never undoes FINISHED), and FINISHED and FAILED are final:
# FINISHED means it ended with a value, FAILED that its returns hold an error (it raised,
# was cancelled, its worker or actor died, it could not be scheduled), as Ray shows them.
TASK_PENDING = "PENDING"
TASK_RUNNING = "RUNNING"
TASK_FINISHED = "FINISHED"
TASK_FAILED = "FAILED"
TASK_DELETED = "DELETED"  # an event only: the owner freed every return, drop the entry

# Ray's TaskType names, by the runtime's spec kinds (runtime/specs.py).
TASK_TYPES = ("NORMAL_TASK", "ACTOR_CREATION_TASK", "ACTOR_TASK")

# What list_tasks returns per task, in this order (hpcray.util.state names them as Ray).
TASK_ROW_FIELDS = ("task_id", "name", "state", "owner", "node", "type", "actor_id",
                   "parent_task_id", "required_resources", "creation_time_ms",
                   "start_time_ms", "end_time_ms", "worker_pid", "error_type")


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
    its state, the rank that ran it last, and what list_tasks shows: its name (from the
    spec, or as the rank that ran it reported it), its kind, actor and parent, and the
    times, worker pid and error type its events carried."""

    spec: Any
    state: str = TASK_PENDING
    node: int | None = None
    name: str | None = None
    kind: int = 0
    actor_id: bytes | None = None
    parent: bytes | None = None
    demand: dict | None = None
    created: float | None = None  # seconds since the epoch, as events carry them
    started: float | None = None
    ended: float | None = None
    worker_pid: int | None = None
    error_type: str | None = None

    def copy(self) -> TaskInfo:
        return TaskInfo(self.spec, self.state, self.node, self.name, self.kind, self.actor_id,
                        self.parent, self.demand, self.created, self.started, self.ended,
                        self.worker_pid, self.error_type)

    def take_spec(self, spec) -> None:
        """Copy what list_tasks shows out of `spec`, so the entry can outlive it."""
        self.spec = spec
        try:
            name, kind, actor_id, demand = spec.name, spec.kind, spec.actor_id, spec.demand
        except AttributeError:  # pickled: nothing to read without unpickling it
            return
        self.name = name or self.name
        self.kind = kind or 0
        self.actor_id = actor_id
        self.demand = demand

    def ended_record(self) -> tuple:
        """What a shard keeps of a task whose lineage ended: every field but the spec, as
        they are (made for each task, so cheap; rows are made when they are asked for)."""
        return (None, self.state, self.node, self.name, self.kind, self.actor_id, self.parent,
                self.demand, self.created, self.started, self.ended, self.worker_pid,
                self.error_type)

    def row(self, task_id: bytes, owner: int) -> tuple:
        """The TASK_ROW_FIELDS of this task."""
        return record_row(task_id, owner, self.ended_record())


def record_row(task_id: bytes, owner: int, record: tuple) -> tuple:
    """The TASK_ROW_FIELDS of a task from its TaskInfo.ended_record()."""
    (_spec, state, node, name, kind, actor_id, parent, demand, created, started, ended, pid,
     error_type) = record
    kind = kind if 0 <= kind < len(TASK_TYPES) else 0
    return (task_id, name, state, owner, node, TASK_TYPES[kind], actor_id, parent, demand,
            _ms(created), _ms(started), _ms(ended), pid, error_type)


@dataclass(slots=True)
class ActorInfo:
    """actors: actor_id (16 B) -> lifecycle, placement and restart count."""

    state: str = PENDING_CREATION
    node: int | None = None  # rank hosting the actor's worker, None while unplaced
    restarts: int = 0
    name: str | None = None
    class_name: str = ""
    info: dict = field(default_factory=dict)  # free-form: options, creation task id, ...
    pid: int | None = None  # its worker process, once it runs
    death_cause: str | None = None  # why it is DEAD

    def copy(self) -> ActorInfo:
        return ActorInfo(self.state, self.node, self.restarts, self.name, self.class_name,
                         dict(self.info), self.pid, self.death_cause)


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


# update_actor may change these; name and class_name are fixed at registration.
ACTOR_MUTABLE_FIELDS = frozenset({"state", "node", "restarts", "info", "pid", "death_cause"})


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
