"""Lineage: which task specs are kept (`LineagePins`), and how a value whose every copy was
lost is made again by re-running the task that returned it (`Lineage`).

Pinning (Ray's lineage reference counting). The spec of every task lives in the GCS tasks
table (task_events.py writes it at submission). The owner keeps it there while one of
the task's returns is alive here, or while a task whose spec is kept for the same reason
took one of those returns as an argument (a "use"): re-running that task would need
the argument made again. So in a chain x_i = f.remote(x_{i-1}) where the program holds
only x_100, every x_i was freed once the next task ended, but all 100 specs stay, and
losing x_100 re-runs the whole chain. Dropping x_100 releases f's 100th spec, whose
use of x_99 ends, which releases the 99th, and so on (DELETED goes to the GCS, which
drops the spec). Uses are taken only by tasks that can be re-run (a normal task with
`max_retries` != 0, not a generator), and only on returns this node owns (as Ray,
lineage does not cross owners). What is kept per task here is a few counters; the
specs are in the GCS.

Rebuilding. Called by the owner (node_failures.py) when a node died with the only copy
it knew of a value it owns, or when a pull of it found the copy gone (evicted: the
mover's `copy_missing`): the entry goes back to PENDING (its waiters stay), the GCS is
asked for a live copy elsewhere (a reader pulled one, which this node then pulls) and
else for the task's spec, and the task is submitted again with the same ids. Its
arguments are resolved as for any task: one lost too (reset the same way, before any
task is re-run) is rebuilt first, and one freed since (its entry gone) is made PENDING
again here ("revived") and rebuilt the same way, from its own pinned spec: the
recursion follows the arguments, however deep the chain. Not rebuilt, as Ray: values
made by `put` (no task made them), a task's arguments stored as an object (`put` by the
submitter), actor call results (an actor's state moved on) and generator items; their
readers get ObjectLostError. Each task is re-run at most `max_retries` times in all
(-1: without limit).
"""

from __future__ import annotations

import collections
import logging
import pickle

from hpcray import exceptions, ids
from hpcray.runtime.object_table import IN_STORE, PENDING, REMOTE
from hpcray.runtime.specs import ACTOR_CALL, NORMAL_TASK, TaskRecord
from hpcray.serialization import error_bytes

log = logging.getLogger("hpcray.lineage")
# The 4-byte index ending an object id that no task returned: a put's (ids.new_put_id),
# and a task's arguments stored as an object (client.encode_args).
_NOT_RETURNED = (b"\0\0\0\0", b"\xff\xff\xff\xff")


class _Pin:
    """What the owner knows of one task whose spec the GCS keeps."""

    __slots__ = ("returns", "alive", "uses", "used", "rebuildable", "attempts")

    def __init__(self, returns: int, used: tuple, rebuildable: bool) -> None:
        self.returns = returns          # its returns are indexes 1..returns
        self.alive = returns            # of them, entries not freed here
        self.uses = 0                   # kept tasks that took one of them as an argument
        self.used = used                # the tasks whose returns this one took (a use each)
        self.rebuildable = rebuildable  # may be re-run (a normal task with retries)
        self.attempts = 0               # times it was re-run to rebuild a return


class LineagePins:
    """The tasks this node owns whose specs the GCS keeps, and why (module docstring).
    No I/O but the DELETED event it writes through `task_events`."""

    def __init__(self, task_events) -> None:
        self.task_events = task_events
        self.tasks: dict[bytes, _Pin] = {}
        self.released = 0  # specs released so far (counters: object_store_stats)

    def submitted(self, spec) -> None:
        """A task submitted on this node (its owner): kept while its returns are alive."""
        kind = spec.kind
        if kind == ACTOR_CALL or not spec.return_ids:
            return
        rebuildable = (kind == NORMAL_TASK and spec.max_retries != 0
                       and not (spec.options and spec.options.get("generator")))
        used = ()
        if rebuildable and spec.contained:
            used = self._use_producers(spec)
        self.tasks[spec.task_id] = _Pin(len(spec.return_ids), used, rebuildable)

    def _use_producers(self, spec) -> tuple:
        """A use of each kept, rebuildable task of this node that returned one of the
        task's arguments (once each); -> those tasks."""
        tasks = self.tasks
        found = None
        for key in spec.contained:
            producer = key[:ids.TASK_ID_SIZE]
            pin = tasks.get(producer)
            if pin is None or not pin.rebuildable or not _is_return(key, pin) \
                    or producer == spec.task_id or (found and producer in found):
                continue
            pin.uses += 1
            if found is None:
                found = [producer]
            else:
                found.append(producer)
        return tuple(found) if found else ()

    def freed(self, object_id: bytes) -> None:
        """The owner freed `object_id`: its task's spec goes once nothing needs it."""
        task_id = object_id[:ids.TASK_ID_SIZE]
        pin = self.tasks.get(task_id)
        if pin is None or not _is_return(object_id, pin):
            return
        pin.alive -= 1
        if pin.alive <= 0 and pin.uses <= 0:
            self._release(task_id)

    def revived(self, object_id: bytes) -> _Pin | None:
        """A freed return is made PENDING again to be rebuilt: alive until freed again.
        -> its task's pin, or None if its spec was released (or it is no return)."""
        pin = self.tasks.get(object_id[:ids.TASK_ID_SIZE])
        if pin is None or not _is_return(object_id, pin):
            return None
        pin.alive += 1
        return pin

    def _release(self, task_id: bytes) -> None:
        """The task's spec goes, and its uses of its arguments' tasks, which may go too
        (a loop, not a recursion: chains are thousands deep)."""
        tasks = self.tasks
        todo = [task_id]
        while todo:
            task_id = todo.pop()
            pin = tasks.pop(task_id)
            self.released += 1
            self.task_events.deleted(task_id)
            for producer in pin.used:
                used = tasks.get(producer)
                if used is None:
                    continue
                used.uses -= 1
                if used.uses <= 0 and used.alive <= 0:
                    todo.append(producer)

    def counters(self) -> dict:
        """lineage_tasks: specs kept; lineage_only: of them, those kept only because a
        kept task downstream took one of their (freed) returns; lineage_released."""
        only = sum(1 for pin in self.tasks.values() if pin.alive <= 0)
        return {"lineage_tasks": len(self.tasks), "lineage_only": only,
                "lineage_released": self.released}


_FIRST_RETURN = b"\0\0\0\1"


def _is_return(object_id: bytes, pin: _Pin) -> bool:
    index = object_id[ids.TASK_ID_SIZE:]
    if index == _FIRST_RETURN:  # (most tasks have one return: no int made)
        return True
    return 1 <= int.from_bytes(index, "big") <= pin.returns


class Lineage:
    def __init__(self, rank: int, node, objects, pins, gcs) -> None:
        self.rank = rank
        self.node = node
        self.objects = objects
        self.pins = pins
        self.gcs = gcs
        self.asked: dict[bytes, list] = {}        # task id -> lost returns, spec asked for
        self._to_ask: collections.deque = collections.deque()  # ids to ask the GCS about
        self._asking = False

    def lost_with(self, dead: int) -> list:
        """The values this node owns whose only known copy was on rank `dead`, and that
        no pull is bringing in (one through a live relay may still; one that fails is
        rebuilt then: NodeFailures.copy_lost)."""
        return [object_id for object_id, entry in self.objects.entries.items()
                if entry.owner == self.rank and entry.inline is IN_STORE
                and entry.state == REMOTE and entry.location == dead and not entry.pulling]

    def rebuild(self, object_ids: list) -> None:
        """Make these lost values again (all reset first, so that a task re-run waits for
        a lost argument rather than reading it where it no longer is)."""
        for object_id in object_ids:
            entry = self.objects.entries[object_id]
            entry.state = PENDING
            entry.location = None
            entry.pulling = False
        for object_id in object_ids:
            self._ask_gcs(object_id)

    def _ask_gcs(self, object_id: bytes) -> None:
        """Ask the GCS for a copy, then the spec. On rank 0 the GCS answers at once
        (its shard is in this process): asking for an argument while replaying a task
        would recurse once per link of a chain, so asks queue while one is out."""
        self._to_ask.append(object_id)
        if self._asking:
            return
        self._asking = True
        try:
            while self._to_ask:
                asked = self._to_ask.popleft()
                self.gcs.request("rebuild_object", asked,
                                 callback=lambda info, o=asked: self._copy_or_replay(o, info))
        finally:
            self._asking = False

    def _revive(self, object_id: bytes) -> None:
        """A return this node freed is an argument of a task re-run: PENDING here again,
        and rebuilt like a lost one (its spec is kept while that task's is)."""
        self.objects.entry(object_id)
        self.pins.revived(object_id)
        self.node.recorder.count("revived")
        self._ask_gcs(object_id)

    def _copy_or_replay(self, object_id: bytes, info) -> None:
        """A copy on another live node (a reader pulled one) serves; else re-run. Such a
        copy is pinned by nobody there (it may be evicted): this node pulls it to make it
        its own before it says where the value is."""
        entry = self.objects.entries.get(object_id)
        if entry is None or entry.state != PENDING or entry.pulling:
            return
        dead = self.node.link.dead_nodes | getattr(self.node.transport, "dead", set())
        copies = sorted(r for r in (info.locations if info is not None else ())
                        if r not in dead and r != self.rank)
        if copies:
            entry.location = copies[0]
            entry.size = info.size
            self.node.mover.start_pull(object_id, entry)
            return
        self._replay_task_of(object_id)

    def copy_missing(self, object_id: bytes, entry, holder: int) -> None:
        """A pull of a value this node owns found no copy at `holder` (evicted there, or
        its node died): forget that copy and make the value again (another copy, else
        its task re-run)."""
        entry.state = PENDING
        entry.location = None
        if holder not in self.node.link.dead_nodes:
            self.gcs.request("remove_location", object_id, holder)
        self._ask_gcs(object_id)

    def _replay_task_of(self, object_id: bytes) -> None:
        task_id = ids.task_id_of(object_id)
        if object_id[ids.TASK_ID_SIZE:] in _NOT_RETURNED:
            self._fail(object_id, "it was made by put (or holds a task's arguments), which "
                       "lineage cannot make again")
            return
        if task_id in self.node.tasks:
            return  # running again already: its result comes
        waiting = self.asked.get(task_id)
        if waiting is not None:
            waiting.append(object_id)
            return
        self.asked[task_id] = [object_id]
        self.node.task_events.flush()  # its spec, if it is still on its way to the GCS
        self.gcs.request("get_task", task_id,
                         callback=lambda info, t=task_id: self._replay(t, info))

    def _replay(self, task_id: bytes, info) -> None:
        lost = self.asked.pop(task_id, [])
        spec = info.spec if info is not None else None
        if isinstance(spec, bytes):
            spec = pickle.loads(spec)
        pin = self.pins.tasks.get(task_id)
        why = None
        if spec is None or pin is None:
            why = ("the GCS tasks table has no spec for it (an actor call's result, never "
                   "made again, or a task whose lineage was released)")
        elif spec.kind == ACTOR_CALL:
            why = "actor call results are not made again (the actor's state moved on)"
        elif spec.kind != NORMAL_TASK:
            why = "only a task's returns are made again"
        elif not pin.rebuildable:
            why = (f"its task {spec.name} cannot be re-run (max_retries=0, or a "
                   "generator)")
        elif 0 <= spec.max_retries <= pin.attempts:
            why = (f"its task {spec.name} was already re-run {pin.attempts} times "
                   f"(max_retries={spec.max_retries})")
        if why is not None:
            for object_id in lost:
                self._fail(object_id, why)
            return
        pin.attempts += 1
        log.info("rank %d: re-running %s to rebuild %d lost values", self.rank, spec.name,
                 len(lost))
        entries = self.objects.entries
        for object_id in spec.return_ids:  # freed ones come back, and are freed again
            if object_id not in entries:
                self.objects.entry(object_id)
                self.pins.revived(object_id)
        for key in dict.fromkeys(spec.contained):
            if key not in entries and len(key) == ids.OBJECT_ID_SIZE \
                    and ids.owner_rank(key) == self.rank:
                self._revive(key)  # an argument freed since: made again first
        # What is left of its retries, should its node die too (node_failures.py).
        record = TaskRecord(spec, -1 if spec.max_retries < 0
                            else max(0, spec.max_retries - pin.attempts))
        record.owner = self.rank
        for key in spec.contained:  # held until its done, as at its first submission
            self.objects.incref(key)
        self.node.tasks[task_id] = record
        self.node.recorder.count("reconstructions")
        self.node._resolve_deps(record, self.node._on_task_deps_ready)

    def _fail(self, object_id: bytes, why: str) -> None:
        entry = self.objects.entries.get(object_id)
        if entry is None or entry.state != PENDING:
            return
        error = exceptions.ObjectReconstructionFailedError(
            f"Object {object_id.hex()} was lost (its node died, or it was evicted) and "
            f"cannot be rebuilt: {why}.")
        self.objects.object_ready(object_id, error_bytes(error), (), 0)
