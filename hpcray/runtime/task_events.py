"""What list_tasks shows, written as tasks move: the GCS tasks table, and actor calls.

The GCS tasks table holds the spec of every task whose returns some process may still
ask for, or that a lost value downstream may need re-run (lineage: lineage.py decides,
`LineagePins`), and its state. The owner (the node the task was submitted on) writes
the spec when the task is submitted and FINISHED or FAILED when its returns arrive; the
node that runs it writes RUNNING; the owner writes DELETED once its lineage is released
(the shard then keeps what list_tasks shows of it, without the spec, in a bounded
history). Actor creations go there too.

Actor calls do not: nothing re-runs them from lineage, and four GCS events per call
halved the 1:1 actor calls rows of the microbench (its shard work runs on rank 0, ~2 us
an event). Each node keeps its own instead, at the cost of a few appends per call: the
owner its calls not ended yet (`calls`) and the last CALL_HISTORY that ended
(`calls_ended`), the node that ran one when and in which worker (`calls_run`).
state_queries.py asks every node for them and merges them by task id.

FAILED is Ray's: the task raised, was cancelled, or the system failed it (its worker or
actor died, no node could run it), and the event names Ray's error type. The owner
reads it from the error value in the task's returns (`error_type`), without unpickling:
a node never runs user code to list a task.

GCS writes wait in `pending` and leave every FLUSH_SECONDS (or FLUSH_EVENTS), one
message per shard, so a task costs a few tuple appends on its hot path; the table lags
by that much, as Ray's (which takes a second), and a query flushes the asking node's
first. Flushing every event-loop pass cost 100k no-ops from a 4-rank driver ~8%: a
busy node passes once per task, and each pass sent rank 0 a message. One node writes
its own shard the same way.
"""

from __future__ import annotations

import collections
import logging
import time

from hpcray import ids
from hpcray.gcs.tables import (TASK_DELETED, TASK_FAILED, TASK_FINISHED, TASK_PENDING,
                               TASK_RUNNING, TASK_TYPES)
from hpcray.runtime.specs import ACTOR_CALL


log = logging.getLogger("hpcray.tasks")

FLUSH_SECONDS = 0.1
FLUSH_EVENTS = 10_000
CALL_HISTORY = 10_000  # ended actor calls a node still lists (as the GCS, tasks)


class TaskEvents:
    def __init__(self, rank: int, gcs) -> None:
        self.rank = rank
        self.gcs = gcs  # a GcsClient
        self.pending: list[tuple] = []
        self.next_flush = 0.0
        # owner: call id -> (name, actor id, demand or None, created, parent) of the calls
        # not ended yet: plain values, not the spec, so the cyclic GC soon stops tracking
        # them (keeping the spec here cost 1:1 async actor calls ~25%, measured)
        self.calls: dict[bytes, tuple] = {}
        # owner: the calls that ended, the last CALL_HISTORY, as (call id, name, actor id,
        # demand, created, parent, state, ended, error type): plain values, no spec kept
        # alive and nothing the cyclic GC walks
        self.calls_ended: collections.deque = collections.deque(maxlen=CALL_HISTORY)
        # where they ran: (call id, worker pid, started)
        self.calls_run: collections.deque = collections.deque(maxlen=CALL_HISTORY)

    def submitted(self, spec, parent_id: bytes | None = None) -> None:
        """`spec` was submitted on this node (its owner), by task `parent_id` if any."""
        if spec.kind == ACTOR_CALL:
            self.calls[spec.task_id] = (spec.name, spec.actor_id, spec.demand or None,
                                        _now(), parent_id)
            return
        self.pending.append((spec.task_id, TASK_PENDING, spec, None, None, _now(),
                             parent_id))

    def calls_running(self, call_ids: list, worker_pid: int) -> None:
        """The actor calls `call_ids` were sent to the actor's worker `worker_pid`, in one
        pass of the node (one clock read for them all)."""
        now = _now()
        self.calls_run.extend([(call_id, worker_pid, now) for call_id in call_ids])

    def running(self, spec, worker_pid: int | None = None) -> None:
        """A task (not an actor call: calls_running) was sent to worker `worker_pid`."""
        # The name too: the owner's spec may reach the GCS after this event.
        self.pending.append((spec.task_id, TASK_RUNNING, None, self.rank, spec.name,
                             _now(), worker_pid))

    def ended(self, task_id: bytes, results=(), failed: bool = False,
              cancelled: bool = False, name: str = "") -> None:
        """The owner has the task's `results` ([(id, inline or None, contained, size)]):
        FAILED if they hold an error (or it was cancelled, or the system `failed` it),
        else FINISHED. A failure is logged (the node's log, job_logs.py) with `name`."""
        kind = None
        if cancelled:
            kind = "TASK_CANCELLED"
        elif results:
            inline = results[0][1]
            if type(inline) is bytes and inline[11:13] == ERROR_START:
                kind = error_type(inline)
        if kind is None and failed:
            kind = "TASK_EXECUTION_EXCEPTION"
        state = TASK_FINISHED if kind is None else TASK_FAILED
        if kind is not None:
            log.info("task %r (task id %s) failed: %s", name, task_id.hex(), kind)
        call = self.calls.pop(task_id, None)
        if call is not None:
            name, actor_id, demand, created, parent = call
            self.calls_ended.append((task_id, name, actor_id, demand or {}, created,
                                     parent, state, _now(), kind))
            return
        self.pending.append((task_id, state, None, None, None, _now(), kind))
        if not results:  # no returns: its lineage is of no use
            self.deleted(task_id)

    def actor_created(self, spec, error: str | None = None) -> None:
        """The constructor of the actor of creation task `spec` ran (or, `error` being
        Ray's error type, it raised or the actor died first)."""
        self.pending.append((spec.task_id, TASK_FINISHED if error is None else TASK_FAILED,
                             None, None, None, _now(), error))
        self.deleted(spec.task_id)

    def call_rows(self) -> tuple[list, list]:
        """(the actor calls this node owns, as tables.TASK_ROW_FIELDS tuples with no
        node; (task id, rank, worker pid, start ms) of the calls this node ran)."""
        rows = [_call_row(task_id, name, actor_id, demand or {}, created, parent,
                          TASK_PENDING, None, None)
                for task_id, (name, actor_id, demand, created, parent) in self.calls.items()]
        rows += [_call_row(*ended) for ended in self.calls_ended]
        return rows, [(task_id, self.rank, pid, _ms(started))
                      for task_id, pid, started in self.calls_run]

    def deleted(self, task_id: bytes) -> None:
        """The task's lineage ends: the GCS drops its spec (lineage.py says when)."""
        self.pending.append((task_id, TASK_DELETED, None, None, None, None, None))

    def flush_due(self) -> None:
        """Flush if FLUSH_SECONDS passed since the last one or FLUSH_EVENTS wait."""
        if self.pending and (len(self.pending) >= FLUSH_EVENTS
                             or time.monotonic() >= self.next_flush):
            self.flush()

    def flush(self) -> None:
        """Send what is pending, one message per shard."""
        if not self.pending:
            return
        self.next_flush = time.monotonic() + FLUSH_SECONDS
        events, self.pending = self.pending, []
        if self.gcs.num_shards == 1:
            self.gcs.request("task_events", 0, events)
            return
        by_shard: dict[int, list] = {}
        for event in events:
            by_shard.setdefault(self.gcs.shard_rank(event[0]), []).append(event)
        for shard, batch in by_shard.items():
            self.gcs.request("task_events", shard, batch)

    def list_tasks(self, answer) -> None:
        """answer([a tables.TASK_ROW_FIELDS tuple per task]) of every task in the table,
        across shards."""
        self.flush()
        self.gcs.fan_out("list_tasks", None, merge=lambda lists: [t for ts in lists for t in ts],
                         callback=answer)


_now = time.time  # events carry seconds; rows say milliseconds, as Ray


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


def _call_row(task_id: bytes, name, actor_id, demand, created, parent, state, ended,
              error) -> tuple:
    return (task_id, name, state, ids.owner_rank(task_id), None, TASK_TYPES[ACTOR_CALL],
            actor_id, parent, demand, _ms(created), None, _ms(ended), None, error)


# The classes of hpcray.exceptions a failed task's returns may hold, by Ray's ErrorType.
_ERROR_TYPES = {
    "RayTaskError": "TASK_EXECUTION_EXCEPTION",
    "TaskCancelledError": "TASK_CANCELLED",
    "WorkerCrashedError": "WORKER_DIED",
    "RayActorError": "ACTOR_DIED",
    "ActorDiedError": "ACTOR_DIED",
    "ActorUnschedulableError": "ACTOR_UNSCHEDULABLE_ERROR",
    "TaskUnschedulableError": "TASK_UNSCHEDULABLE_ERROR",
    "ResourceInfeasibleError": "TASK_UNSCHEDULABLE_ERROR",
    "ObjectLostError": "OBJECT_LOST",
    "OwnerDiedError": "OWNER_DIED",
    "ObjectFreedError": "OBJECT_FREED",
    "OutOfMemoryError": "OUT_OF_MEMORY",
}
# How serialization.error_bytes begins (cloudpickle, protocol 5, after the frame
# header): ErrorValue's class, then the error's module and class as two short strings.
_ERROR_HEAD = b"\x8c\x14hpcray.serialization\x94\x8c\x0aErrorValue\x94\x93\x94"
# Its first two bytes, where error_bytes puts them (after the PROTO and FRAME opcodes):
# the check before calling error_type. Most plain values have other bytes there (b"ok"
# and None do), and one that has them is only read further.
ERROR_START = _ERROR_HEAD[:2]


def error_type(inline) -> str | None:
    """Ray's error type of the value in `inline` (a result's inline bytes) if it is an
    error value (serialization.error_bytes), None if it is a value. Read from the first
    opcodes of the pickle, without unpickling it; an error of a class this does not know
    is a TASK_EXECUTION_EXCEPTION."""
    if type(inline) is not bytes:
        return None
    at = inline.find(_ERROR_HEAD, 0, 16 + len(_ERROR_HEAD))
    if at < 0:
        return None
    pos = at + len(_ERROR_HEAD)
    names = []
    for _ in range(2):  # \x8c <length> <module> \x94, then the same for the class name
        if pos + 2 > len(inline) or inline[pos] != 0x8C:
            break
        length = inline[pos + 1]
        names.append(inline[pos + 2:pos + 2 + length])
        pos += 2 + length + 1
    if len(names) == 2 and names[0] == b"hpcray.exceptions":
        return _ERROR_TYPES.get(names[1].decode("ascii", "replace"),
                                "TASK_EXECUTION_EXCEPTION")
    return "TASK_EXECUTION_EXCEPTION"
