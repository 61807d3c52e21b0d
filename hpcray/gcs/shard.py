"""One shard of the global control store: a state machine with no networking inside.

The GCS is key-sharded over ranks 0..k-1; shard i lives in rank i's node manager. A
shard takes a request and returns the messages to send, as dask's scheduler does, so a
unit test drives it with a fake network and `validate()` after every event. Not for: MPI,
threads, timers, deciding what to do about a dead node (the node manager decides; the
shard only records).

    out = shard.handle(source_rank, request)      # -> [(dest_rank, message), ...]

Wire format (every element pickles):

    request       (op, request_id, key, *args)          request_id None: send no reply
    reply         ("gcs_reply", request_id, result)     to the source rank
    notification  ("gcs_notify", channel, key, payload)
    peer message  (op, None, key, *args)                shard to shard, never replied to

Ops. `key` is the routing key (shard_of(key, k) picks the shard); an unknown key makes a
read or a delete return None; records in results are copies (tables.py).

| op                 | key         | args                                   | result               |
| ------------------ | ----------- | -------------------------------------- | -------------------- |
| add_location       | object_id   | rank, size, owner, producer_task,      | bool: not deleted    |
|                    |             | inline=None                       (1)  |                      |
| remove_location    | object_id   | rank                                   | ObjectInfo or None   |
| get_object         | object_id   |                                        | ObjectInfo or None   |
| subscribe_object   | object_id   | (2)                                    | ObjectInfo or None   |
| unsubscribe_object | object_id   |                                        | bool: was subscribed |
| delete_object      | object_id   | (3)                                    | ObjectInfo or None   |
| rebuild_object     | object_id   | (9)                                    | ObjectInfo or None   |
| put_task           | task_id     | spec_bytes, state="PENDING" (replaces) | True                 |
| set_task_state     | task_id     | state                                  | TaskInfo or None     |
| get_task           | task_id     |                                        | TaskInfo or None     |
| delete_task        | task_id     |                                        | TaskInfo or None     |
| task_events        | shard index | [(task_id, state, spec|None, rank|None, name|None,     |
|                    |             | time|None, detail)]               (8)  | None                 |
| list_tasks         | None        | (all shards; the client merges)   (8)  | list of rows         |
| claim_actor_name   | name        | actor_id                          (4)  | True or NameTaken    |
| register_actor     | actor_id    | ActorInfo                         (4)  | True, False if known |
| update_actor       | actor_id    | fields: dict (state, node, restarts,   | ActorInfo or None    |
|                    |             | info)                             (5)  |                      |
| release_actor_name | name        | actor_id   (peer message, see 5)       | bool: released       |
| get_actor          | actor_id    |                                        | ActorInfo or None    |
| list_actors        | None        | (all shards; the client merges)        | [(id, ActorInfo)]    |
| lookup_actor_name  | name        |                                        | actor_id or None     |
| subscribe_actor    | actor_id    | (5)                                    | ActorInfo or None    |
| unsubscribe_actor  | actor_id    |                                        | bool: was subscribed |
| put_function       | function_id | pickled bytes (first one stays)        | bool: newly stored   |
| get_function       | function_id |                                        | bytes or None        |
| register_node      | rank        | resources: dict                   (6)  | True                 |
| heartbeat          | rank        | available: dict, load: int        (6)  | NodeInfo or None     |
| get_nodes          | None        | (all shards; the client merges)        | list[NodeInfo]       |
| mark_node_dead     | rank        | (7)                                    | dict, see (7)        |

(1) Creates the entry if needed; rank None records an inline value only. Every
    subscriber of the object gets ("gcs_notify", "object_location", object_id, ObjectInfo).
    A copy reported after delete_object (a late pull) is turned away: False, and the
    reporting rank gets "object_deleted" so it drops the copy.
(2) Subscribes the source rank (an unknown object too: it may appear later) until
    unsubscribe_object, delete_object or mark_node_dead of that rank; returns the info now.
(3) The owner frees the object: ("gcs_notify", "object_deleted", object_id, None) goes to
    every location (they drop their copies) and every subscriber; subscriptions end.
(4) A named actor is registered in two steps, name first: claim_actor_name on the name's
    shard (NameTaken(name, holder) if a live actor holds it), then register_actor on the
    actor's shard. GcsClient.register_actor does both. Dead actors hold no name.
(5) Subscribers of the actor get ("gcs_notify", "actor", actor_id, ActorInfo) whenever an
    update changes a field. DEAD is terminal: the shard releases the name (locally, or by
    the peer message ("release_actor_name", None, name, actor_id) to the name's shard),
    and a dead actor cannot change state again (ValueError).
(6) register_node (re)registers the rank alive with available = resources; a heartbeat
    stamps last_heartbeat with the shard's clock; a dead node stays dead.
(7) Sent to every shard (GcsClient.mark_node_dead merges): each drops the rank from its
    object locations and subscriptions, the rank's own shard sets alive False. Result:
    {"lost_objects": ids left with no location and no inline value (lineage replays
    them), "actors": ids of non-dead actors placed on that rank (to restart)}.
(8) The tasks table's writes, batched per shard (runtime/task_events.py): the first
    event of a task creates its entry, a state moves it forward only, the spec fills in
    whenever it comes (the node that runs a task may report RUNNING before its owner's
    spec arrives: they travel from different ranks) and so does the rank that ran it
    (its RUNNING may come after the owner's FINISHED); FINISHED and FAILED are final.
    DELETED ends its lineage: the spec goes and the rest moves to `task_history` (the
    last TASK_HISTORY), which a late event (a RUNNING after DELETED) only fills in. A
    RUNNING carries the task's name, so a task shown before its spec arrives is named.
    Events carry their time (seconds since the epoch; rows say ms) and a detail: a
    PENDING its parent task id, a RUNNING the worker's pid, a FAILED Ray's error type.
    list_tasks returns a tables.TASK_ROW_FIELDS tuple per task, live or in the history.
(9) The owner makes the object again from lineage (runtime/lineage.py): the shard
    forgets that it was deleted (if it was: a value freed, then needed again to rebuild
    a lost one downstream), so the copies its re-run reports are recorded and not
    turned away as late; returns what get_object returns (live copies serve instead).

Subscriptions are per rank: two parties on one rank share one; the node manager counts.
"""

from __future__ import annotations

import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from hpcray.gcs.tables import (
    ACTOR_MUTABLE_FIELDS,
    ACTOR_STATES,
    DEAD,
    TASK_DELETED,
    TASK_FAILED,
    TASK_FINISHED,
    TASK_PENDING,
    TASK_RUNNING,
    ActorInfo,
    NameTaken,
    NodeInfo,
    ObjectInfo,
    TaskInfo,
    record_row,
)
from hpcray.ids import owner_rank

Message = tuple
Outgoing = list[tuple[int, Message]]

GCS_REPLY = "gcs_reply"
GCS_NOTIFY = "gcs_notify"

# Notification channels.
OBJECT_LOCATION = "object_location"
OBJECT_DELETED = "object_deleted"
ACTOR_CHANNEL = "actor"

# How many (time, source, op, key) entries a shard keeps for debugging.
LOG_LENGTH = 1000
# How many deleted object ids a shard remembers, to turn away a copy reported late.
DELETED_OBJECTS_REMEMBERED = 100_000
# How many tasks whose returns were all freed a shard still lists (Ray keeps finished
# tasks up to a limit too); their specs are dropped, so each costs a few hundred bytes.
TASK_HISTORY = 10_000


def shard_of(key: bytes | str | int, num_shards: int) -> int:
    """The shard (= the rank) that holds `key`: the same answer in every process.
    bytes and str: crc32 of the bytes (utf-8) mod num_shards; int (node ranks): mod."""
    if num_shards == 1:
        return 0
    if isinstance(key, (bytes, bytearray, memoryview)):
        data = bytes(key)
    elif isinstance(key, str):
        data = key.encode("utf-8")
    elif isinstance(key, int):
        # Ranks are dense small ints: modulo spreads them evenly, a hash of "0".."3"
        # happens to put all four on one of two shards.
        return key % num_shards
    else:
        raise TypeError(f"GCS keys are bytes, str or int, not {type(key).__name__}")
    return zlib.crc32(data) % num_shards


class GcsShard:
    """Shard `index` of `num_shards`; it lives on rank `index`."""

    def __init__(self, index: int, num_shards: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 <= index < num_shards:
            raise ValueError(f"shard {index} of {num_shards}")
        self.index = index
        self.num_shards = num_shards
        self.clock = clock
        self.objects: dict[bytes, ObjectInfo] = {}
        self.tasks: dict[bytes, TaskInfo] = {}
        self.actors: dict[bytes, ActorInfo] = {}
        self.actor_names: dict[str, bytes] = {}
        self.functions: dict[bytes, bytes] = {}
        self.nodes: dict[int, NodeInfo] = {}
        self.object_subscribers: dict[bytes, set[int]] = {}
        self.actor_subscribers: dict[bytes, set[int]] = {}
        # Object ids are never reused, so a deleted id seen again is a late report.
        self.deleted_objects: OrderedDict[bytes, None] = OrderedDict()
        # Tasks whose lineage ended (the owner freed every return), newest last: what
        # list_tasks shows of them, without their specs.
        self.task_history: OrderedDict[bytes, tuple] = OrderedDict()  # id -> ended_record()
        self.deleted_tasks: OrderedDict[bytes, None] = OrderedDict()  # as deleted_objects
        self.log: deque[tuple[float, int, str, Any]] = deque(maxlen=LOG_LENGTH)
        self._ops: dict[str, Callable[..., Any]] = {
            op: getattr(self, "_op_" + op) for op in GCS_OPS
        }

    # -- the one entry point -------------------------------------------------------

    def handle(self, source: int, request: Message) -> Outgoing:
        """Apply one request from rank `source`; return the messages to send."""
        op, request_id, key, *args = request
        try:
            method = self._ops[op]
        except KeyError:
            raise ValueError(f"GCS shard {self.index}: unknown op {op!r} from {source}") \
                from None
        self.log.append((self.clock(), source, op, key))
        out: Outgoing = []
        result = method(out, source, key, *args)
        if request_id is not None:
            out.append((source, (GCS_REPLY, request_id, result)))
        return out

    def _owns(self, key) -> bool:
        return shard_of(key, self.num_shards) == self.index

    # -- objects ---------------------------------------------------------------------

    def _op_add_location(self, out: Outgoing, source: int, object_id: bytes, rank: int | None,
                         size: int, owner: int, producer_task: bytes | None,
                         inline: bytes | None = None) -> bool:
        if object_id in self.deleted_objects:
            if rank is not None:
                out.append((rank, (GCS_NOTIFY, OBJECT_DELETED, object_id, None)))
            return False
        info = self.objects.get(object_id)
        if info is None:
            info = self.objects[object_id] = ObjectInfo(size, owner, set(), producer_task,
                                                        inline)
        else:
            if producer_task is not None and info.producer_task is None:
                info.producer_task = producer_task
            if inline is not None:
                info.inline = inline
        if rank is not None:
            info.locations.add(rank)
        for subscriber in self.object_subscribers.get(object_id, ()):
            out.append((subscriber, (GCS_NOTIFY, OBJECT_LOCATION, object_id, info.copy())))
        return True

    def _op_remove_location(self, out: Outgoing, source: int, object_id: bytes,
                            rank: int) -> ObjectInfo | None:
        info = self.objects.get(object_id)
        if info is None:
            return None
        info.locations.discard(rank)
        return info.copy()

    def _op_get_object(self, out: Outgoing, source: int, object_id: bytes) -> ObjectInfo | None:
        info = self.objects.get(object_id)
        return None if info is None else info.copy()

    def _op_rebuild_object(self, out: Outgoing, source: int,
                           object_id: bytes) -> ObjectInfo | None:
        self.deleted_objects.pop(object_id, None)
        return self._op_get_object(out, source, object_id)

    def _op_subscribe_object(self, out: Outgoing, source: int,
                             object_id: bytes) -> ObjectInfo | None:
        self.object_subscribers.setdefault(object_id, set()).add(source)
        return self._op_get_object(out, source, object_id)

    def _op_unsubscribe_object(self, out: Outgoing, source: int, object_id: bytes) -> bool:
        return _discard(self.object_subscribers, object_id, source)

    def _op_delete_object(self, out: Outgoing, source: int,
                          object_id: bytes) -> ObjectInfo | None:
        info = self.objects.pop(object_id, None)
        subscribers = self.object_subscribers.pop(object_id, set())
        # Remembered even when unknown: a location added later (its message may come
        # after the owner's delete, from another rank or channel) is told to delete.
        self.deleted_objects[object_id] = None
        if len(self.deleted_objects) > DELETED_OBJECTS_REMEMBERED:
            self.deleted_objects.popitem(last=False)
        if info is None:
            return None
        for rank in sorted(info.locations | subscribers):
            out.append((rank, (GCS_NOTIFY, OBJECT_DELETED, object_id, None)))
        return info

    # -- tasks -----------------------------------------------------------------------

    def _op_put_task(self, out: Outgoing, source: int, task_id: bytes, spec: bytes,
                     state: str = TASK_PENDING) -> bool:
        self.tasks[task_id] = TaskInfo(spec, state)
        return True

    def _op_set_task_state(self, out: Outgoing, source: int, task_id: bytes,
                           state: str) -> TaskInfo | None:
        task = self.tasks.get(task_id)
        if task is None:
            return None
        task.state = state
        return task.copy()

    def _op_get_task(self, out: Outgoing, source: int, task_id: bytes) -> TaskInfo | None:
        task = self.tasks.get(task_id)
        return None if task is None else task.copy()

    def _op_delete_task(self, out: Outgoing, source: int, task_id: bytes) -> TaskInfo | None:
        return self.tasks.pop(task_id, None)

    def _op_task_events(self, out: Outgoing, source: int, _shard: int, events: list) -> None:
        self.apply_task_events(events)

    def apply_task_events(self, events: list) -> None:
        """(task_id, state, spec or None, rank or None, name or None, time or None,
        detail) in the order one node wrote them; detail: the parent task id of a
        PENDING, the worker pid of a RUNNING, the error type of a FAILED."""
        tasks, history, deleted = self.tasks, self.task_history, self.deleted_tasks
        for task_id, state, spec, node, name, at, detail in events:
            task = tasks.get(task_id)
            if task is None:
                if state == TASK_DELETED or task_id in deleted:
                    record = history.get(task_id)
                    if record is not None and state != TASK_DELETED:  # a late event fills in
                        task = TaskInfo(*record)
                        _apply_task_event(task, state, None, node, name, at, detail)
                        history[task_id] = task.ended_record()
                    continue
                # A state may come before the spec: they come from different nodes.
                task = tasks[task_id] = TaskInfo(None)
            elif state == TASK_DELETED:
                del tasks[task_id]
                deleted[task_id] = None
                if len(deleted) > DELETED_OBJECTS_REMEMBERED:
                    deleted.popitem(last=False)
                # Its lineage ends; what list_tasks shows of it stays a while, as Ray
                # keeps finished tasks up to a limit: a row of plain values (no spec,
                # nothing the cyclic GC walks: 10,000 objects kept alive and promoted
                # cost the driver's process full collections).
                history[task_id] = task.ended_record()
                if len(history) > TASK_HISTORY:
                    history.popitem(last=False)
                continue
            if state == TASK_PENDING and spec is not None and task.spec is None:
                task.take_spec(spec)  # (the common first event, without a call more)
                task.created = at
                if detail is not None:
                    task.parent = detail
            elif state == TASK_RUNNING and task.state == TASK_PENDING:  # (the next ones)
                task.state = TASK_RUNNING
                task.node = node
                if task.name is None:
                    task.name = name
                task.started = at
                task.worker_pid = detail
            elif state == TASK_FINISHED and task.ended is None:
                task.state = TASK_FINISHED
                task.ended = at
            else:
                _apply_task_event(task, state, spec, node, name, at, detail)

    def _op_list_tasks(self, out: Outgoing, source: int, _key: None) -> list[tuple]:
        return self.list_tasks()

    def list_tasks(self) -> list[tuple]:
        """Every task this shard knows, its lineage live or ended (the last TASK_HISTORY),
        as tables.TASK_ROW_FIELDS tuples."""
        rows = [task.row(task_id, owner_rank(task_id)) for task_id, task in self.tasks.items()]
        rows += [record_row(task_id, owner_rank(task_id), record)
                 for task_id, record in self.task_history.items()]
        return rows

    # -- actors ----------------------------------------------------------------------

    def _op_claim_actor_name(self, out: Outgoing, source: int, name: str,
                             actor_id: bytes) -> bool | NameTaken:
        holder = self.actor_names.get(name)
        if holder is not None and holder != actor_id:
            return NameTaken(name, holder)
        self.actor_names[name] = actor_id
        return True

    def _op_register_actor(self, out: Outgoing, source: int, actor_id: bytes,
                           info: ActorInfo) -> bool:
        if info.state not in ACTOR_STATES:
            raise ValueError(f"actor state {info.state!r}")
        if actor_id in self.actors:
            return False
        self.actors[actor_id] = info.copy()
        return True

    def _op_update_actor(self, out: Outgoing, source: int, actor_id: bytes,
                         fields: dict) -> ActorInfo | None:
        actor = self.actors.get(actor_id)
        if actor is None:
            return None
        unknown = set(fields) - ACTOR_MUTABLE_FIELDS
        if unknown:
            raise ValueError(f"update_actor cannot change {sorted(unknown)}")
        if "state" in fields and fields["state"] not in ACTOR_STATES:
            raise ValueError(f"actor state {fields['state']!r}")
        if actor.state == DEAD and fields.get("state", DEAD) != DEAD:
            raise ValueError(f"actor {actor_id!r} is dead; DEAD is terminal")
        changed = False
        for name, value in fields.items():
            if getattr(actor, name) != value:
                setattr(actor, name, dict(value) if name == "info" else value)
                changed = True
        if changed and actor.state == DEAD and actor.name is not None:
            self._release_name(out, source, actor.name, actor_id)
        if changed:
            for subscriber in self.actor_subscribers.get(actor_id, ()):
                out.append((subscriber, (GCS_NOTIFY, ACTOR_CHANNEL, actor_id, actor.copy())))
        return actor.copy()

    def _release_name(self, out: Outgoing, source: int, name: str, actor_id: bytes) -> None:
        owner = shard_of(name, self.num_shards)
        if owner == self.index:
            self._op_release_actor_name(out, source, name, actor_id)
        else:
            out.append((owner, ("release_actor_name", None, name, actor_id)))

    def _op_release_actor_name(self, out: Outgoing, source: int, name: str,
                               actor_id: bytes) -> bool:
        if self.actor_names.get(name) != actor_id:
            return False
        del self.actor_names[name]
        return True

    def _op_get_actor(self, out: Outgoing, source: int, actor_id: bytes) -> ActorInfo | None:
        actor = self.actors.get(actor_id)
        return None if actor is None else actor.copy()

    def _op_list_actors(self, out: Outgoing, source: int, _key: None) -> list[tuple]:
        return [(actor_id, actor.copy()) for actor_id, actor in self.actors.items()]

    def _op_lookup_actor_name(self, out: Outgoing, source: int, name: str) -> bytes | None:
        return self.actor_names.get(name)

    def _op_subscribe_actor(self, out: Outgoing, source: int,
                            actor_id: bytes) -> ActorInfo | None:
        self.actor_subscribers.setdefault(actor_id, set()).add(source)
        return self._op_get_actor(out, source, actor_id)

    def _op_unsubscribe_actor(self, out: Outgoing, source: int, actor_id: bytes) -> bool:
        return _discard(self.actor_subscribers, actor_id, source)

    # -- functions -------------------------------------------------------------------

    def _op_put_function(self, out: Outgoing, source: int, function_id: bytes,
                         pickled: bytes) -> bool:
        if function_id in self.functions:
            return False
        self.functions[function_id] = pickled
        return True

    def _op_get_function(self, out: Outgoing, source: int, function_id: bytes) -> bytes | None:
        return self.functions.get(function_id)

    # -- nodes -----------------------------------------------------------------------

    def _op_register_node(self, out: Outgoing, source: int, rank: int,
                          resources: dict) -> bool:
        self.nodes[rank] = NodeInfo(rank, dict(resources), dict(resources), 0, True,
                                    self.clock())
        return True

    def _op_heartbeat(self, out: Outgoing, source: int, rank: int, available: dict,
                      load: int) -> NodeInfo | None:
        node = self.nodes.get(rank)
        if node is None:
            return None
        node.available = dict(available)
        node.load = load
        node.last_heartbeat = self.clock()
        return node.copy()

    def _op_get_nodes(self, out: Outgoing, source: int, key: None) -> list[NodeInfo]:
        return [node.copy() for node in self.nodes.values()]

    def _op_mark_node_dead(self, out: Outgoing, source: int, rank: int) -> dict:
        node = self.nodes.get(rank)
        if node is not None:
            node.alive = False
        lost_objects = []
        for object_id, info in self.objects.items():
            if rank in info.locations:
                info.locations.discard(rank)
                if not info.locations and info.inline is None:
                    lost_objects.append(object_id)
        for subscriptions in (self.object_subscribers, self.actor_subscribers):
            for key in [key for key, ranks in subscriptions.items() if rank in ranks]:
                _discard(subscriptions, key, rank)
        actors = [actor_id for actor_id, actor in self.actors.items()
                  if actor.node == rank and actor.state != DEAD]
        return {"lost_objects": lost_objects, "actors": actors}

    # -- invariants ------------------------------------------------------------------

    def validate(self) -> None:
        """Check this shard's invariants; raise AssertionError naming the first broken."""
        tables = {"objects": self.objects, "tasks": self.tasks, "actors": self.actors,
                  "actor_names": self.actor_names, "functions": self.functions,
                  "nodes": self.nodes, "object_subscribers": self.object_subscribers,
                  "actor_subscribers": self.actor_subscribers,
                  "deleted_objects": self.deleted_objects}
        for table_name, table in tables.items():
            for key in table:
                assert self._owns(key), f"{table_name}[{key!r}] is not shard {self.index}'s"
        for object_id, info in self.objects.items():
            assert isinstance(object_id, bytes), object_id
            assert info.size >= 0, (object_id, info)
            assert all(isinstance(rank, int) for rank in info.locations), (object_id, info)
        for object_id in self.deleted_objects:
            assert object_id not in self.objects, f"deleted {object_id!r} is back"
        assert len(self.deleted_objects) <= DELETED_OBJECTS_REMEMBERED
        for table_name, subscriptions in (("object_subscribers", self.object_subscribers),
                                          ("actor_subscribers", self.actor_subscribers)):
            for key, ranks in subscriptions.items():
                assert ranks, f"{table_name}[{key!r}] is an empty set"
        for actor_id, actor in self.actors.items():
            assert actor.state in ACTOR_STATES, (actor_id, actor)
            assert actor.restarts >= 0, (actor_id, actor)
            if actor.name is not None and self._owns(actor.name):
                holder = self.actor_names.get(actor.name)
                if actor.state == DEAD:
                    assert holder != actor_id, f"dead actor {actor_id!r} holds {actor.name!r}"
                else:
                    assert holder == actor_id, \
                        f"live actor {actor_id!r} does not hold its name {actor.name!r}"
        for name, actor_id in self.actor_names.items():
            actor = self.actors.get(actor_id)
            # The actor may live on another shard, or not be registered yet (its name is
            # claimed first); where it is here, it must be the live actor of that name.
            if actor is not None:
                assert actor.name == name, f"actor_names[{name!r}] -> actor named {actor.name!r}"
                assert actor.state != DEAD, f"actor_names[{name!r}] -> dead actor"
        for rank, node in self.nodes.items():
            assert node.rank == rank, (rank, node)
            assert node.load >= 0, node
        assert len(self.log) <= LOG_LENGTH


def _apply_task_event(task: TaskInfo, state: str, spec, node, name, at, detail) -> None:
    """One tasks-table event (not DELETED) on `task`: a state only moves forward, and
    FINISHED and FAILED are final (the first end counts)."""
    if state == TASK_PENDING:
        if spec is not None and task.spec is None:
            task.take_spec(spec)
        task.created = at
        if detail is not None:
            task.parent = detail
    elif state == TASK_RUNNING:
        if task.state == TASK_PENDING:
            task.state = TASK_RUNNING
        task.node = node  # a RUNNING that comes after FINISHED still says where
        if task.name is None:
            task.name = name
        task.started = at
        task.worker_pid = detail
    elif task.ended is None:
        task.state = state
        task.ended = at
        if state == TASK_FAILED:
            task.error_type = detail


def validate_shards(shards: list[GcsShard]) -> None:
    """Invariants across shards, true once no message is in flight (tests call this when
    their fake network is empty): each name maps to the live actor of that name, and each
    registered live named actor holds its name."""
    for shard in shards:
        shard.validate()
    actors = {actor_id: actor for shard in shards for actor_id, actor in shard.actors.items()}
    names = {name: actor_id for shard in shards for name, actor_id in shard.actor_names.items()}
    for name, actor_id in names.items():
        actor = actors.get(actor_id)
        assert actor is not None, f"actor_names[{name!r}] -> unregistered {actor_id!r}"
        assert actor.name == name and actor.state != DEAD, (name, actor)
    for actor_id, actor in actors.items():
        if actor.name is not None and actor.state != DEAD:
            assert names.get(actor.name) == actor_id, (actor_id, actor)


def _discard(subscriptions: dict, key, rank: int) -> bool:
    ranks = subscriptions.get(key)
    if ranks is None or rank not in ranks:
        return False
    ranks.discard(rank)
    if not ranks:
        del subscriptions[key]
    return True


GCS_OPS = frozenset({
    "add_location", "remove_location", "get_object", "subscribe_object",
    "unsubscribe_object", "delete_object", "rebuild_object",
    "put_task", "set_task_state", "get_task", "delete_task", "task_events", "list_tasks",
    "claim_actor_name", "register_actor", "update_actor", "release_actor_name", "get_actor",
    "list_actors", "lookup_actor_name", "subscribe_actor", "unsubscribe_actor",
    "put_function", "get_function",
    "register_node", "heartbeat", "get_nodes", "mark_node_dead",
})


def is_gcs_request(message: Message) -> bool:
    """Whether a node manager should hand `message` to its GCS shard."""
    return bool(message) and message[0] in GCS_OPS
