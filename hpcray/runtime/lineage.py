"""Lineage reconstruction: a value whose every copy was lost is made again by re-running
the task that returned it.

Called by the owner (node_failures.py) when a node died with the only copy it knew of a
value it owns: the entry goes back to PENDING (its waiters stay), the task's spec comes
from the GCS tasks table (kept there until the owner frees every return: task_events.py)
and the task is submitted again with the same ids. Its arguments are resolved as for any
task, so an argument lost too (reset the same way, before any task is re-run) is rebuilt
first: the recursion follows the arguments, however deep the chain. A copy another live
node holds (the GCS objects table knows it) serves instead of a re-run. Not rebuilt, as Ray:
values made by `put` (no task made them) and actor call results (an actor's state moved
on); their readers get ObjectLostError. Each task is re-run at most `max_retries` times
in all (-1: without limit).
"""

from __future__ import annotations

import logging
import pickle

from hpcray import exceptions, ids
from hpcray.runtime.object_table import IN_STORE, PENDING, REMOTE
from hpcray.runtime.specs import ACTOR_CALL, NORMAL_TASK, TaskRecord
from hpcray.serialization import error_bytes

log = logging.getLogger("hpcray.lineage")
_PUT_INDEX = b"\0\0\0\0"   # ids.new_put_id: a put's id ends with index 0


class Lineage:
    def __init__(self, rank: int, node, objects, gcs) -> None:
        self.rank = rank
        self.node = node
        self.objects = objects
        self.gcs = gcs
        self.attempts: dict[bytes, int] = {}      # task id -> times it was re-run
        self.asked: dict[bytes, list] = {}        # task id -> lost returns, spec asked for

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
            self.gcs.request("get_object", object_id,
                             callback=lambda info, o=object_id: self._copy_or_replay(o, info))

    def _copy_or_replay(self, object_id: bytes, info) -> None:
        """A copy on another live node (a reader pulled one) serves; else re-run."""
        entry = self.objects.entries.get(object_id)
        if entry is None or entry.state != PENDING:
            return
        dead = self.node.link.dead_nodes
        copies = sorted(r for r in (info.locations if info is not None else ())
                        if r not in dead and r != self.rank)
        if copies:
            self.objects.object_ready(object_id, IN_STORE, entry.contained, entry.size,
                                      copies[0])
            return
        self._replay_task_of(object_id)

    def _replay_task_of(self, object_id: bytes) -> None:
        task_id = ids.task_id_of(object_id)
        if object_id[ids.TASK_ID_SIZE:] == _PUT_INDEX:
            self._fail(object_id, "it was made by put, which lineage cannot make again")
            return
        if task_id in self.node.tasks:
            return  # running again already: its result comes
        waiting = self.asked.get(task_id)
        if waiting is not None:
            waiting.append(object_id)
            return
        self.asked[task_id] = [object_id]
        self.gcs.request("get_task", task_id,
                         callback=lambda info, t=task_id: self._replay(t, info))


    def _replay(self, task_id: bytes, info) -> None:
        lost = self.asked.pop(task_id, [])
        spec = info.spec if info is not None else None
        if isinstance(spec, bytes):
            spec = pickle.loads(spec)
        why = None
        if spec is None:
            why = ("the GCS tasks table has no spec for it (an actor call's result, never "
                   "made again, or a task whose lineage was released)")
        elif spec.kind == ACTOR_CALL:
            why = "actor call results are not made again (the actor's state moved on)"
        elif spec.kind != NORMAL_TASK:
            why = "only a task's returns are made again"
        else:
            done = self.attempts.get(task_id, 0)
            if 0 <= spec.max_retries <= done:
                why = (f"its task {spec.name} was already re-run {done} times "
                       f"(max_retries={spec.max_retries})")
        if why is not None:
            for object_id in lost:
                self._fail(object_id, why)
            return
        self.attempts[task_id] = self.attempts.get(task_id, 0) + 1
        log.info("rank %d: re-running %s to rebuild %d lost values", self.rank, spec.name,
                 len(lost))
        record = TaskRecord(spec, 0)
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
        error = exceptions.ObjectLostError(
            f"Object {object_id.hex()} was lost with its node and cannot be rebuilt: {why}.")
        self.objects.object_ready(object_id, error_bytes(error), (), 0)
