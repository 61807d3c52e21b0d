"""The writer of the GCS tasks table: each task's spec and state, batched per shard.

The table holds the spec of every task whose returns some process may still ask for
(lineage: what to re-run if every copy of a return is lost) and its state, which
`hpcray.util.state.list_tasks()` shows. The owner (the node the task was submitted
on) writes the spec when the task is submitted and FINISHED or FAILED when its returns
arrive; the node that runs it writes RUNNING; the owner writes DELETED once it has
freed every return, since nothing can ask for them any more.

Writes wait in `pending` and leave once per event-loop pass, one message per shard, so
a task costs a few tuple appends on its hot path; a query flushes them first. With no
GCS (one node, no MPI) they go straight into a local shard. Normal tasks only: actor
calls are not re-run from lineage, and the actors table follows actors.
"""

from __future__ import annotations

from hpcray import ids
from hpcray.gcs.shard import GcsShard
from hpcray.gcs.tables import (TASK_DELETED, TASK_FAILED, TASK_FINISHED, TASK_PENDING,
                               TASK_RUNNING)


class TaskEvents:
    def __init__(self, rank: int, gcs=None) -> None:
        self.rank = rank
        self.gcs = gcs  # a GcsClient, or None on one node
        self.local_shard = GcsShard(0, 1) if gcs is None else None
        self.pending: list[tuple] = []
        self.live_returns: dict[bytes, int] = {}  # task id -> its returns not yet freed

    def submitted(self, spec) -> None:
        self._add((spec.task_id, TASK_PENDING, spec, None))
        if spec.return_ids:
            self.live_returns[spec.task_id] = len(spec.return_ids)

    def running(self, task_id: bytes) -> None:
        self._add((task_id, TASK_RUNNING, None, self.rank))

    def ended(self, task_id: bytes, failed: bool = False) -> None:
        self._add((task_id, TASK_FAILED if failed else TASK_FINISHED, None, None))
        if task_id not in self.live_returns:  # no returns: its lineage is of no use
            self._add((task_id, TASK_DELETED, None, None))

    def freed(self, object_id: bytes) -> None:
        """The owner freed `object_id`: the last freed return ends its task's entry."""
        task_id = ids.task_id_of(object_id)
        left = self.live_returns.get(task_id)
        if left is None:
            return
        if left > 1:
            self.live_returns[task_id] = left - 1
            return
        del self.live_returns[task_id]
        self._add((task_id, TASK_DELETED, None, None))

    def _add(self, event: tuple) -> None:
        if self.local_shard is not None:
            self.local_shard.apply_task_events((event,))
        else:
            self.pending.append(event)

    def flush(self) -> None:
        """Send what is pending, one message per shard."""
        if not self.pending:
            return
        events, self.pending = self.pending, []
        shards = self.gcs.num_shards
        if shards == 1:
            self.gcs.request("task_events", 0, events)
            return
        by_shard: dict[int, list] = {}
        for event in events:
            by_shard.setdefault(self.gcs.shard_rank(event[0]), []).append(event)
        for shard, batch in by_shard.items():
            self.gcs.request("task_events", shard, batch)

    def list_tasks(self, answer) -> None:
        """answer([(task_id, name, state, owner rank, rank that ran it)]) of every task
        in the table, across shards."""
        if self.local_shard is not None:
            answer(self.local_shard.list_tasks())
            return
        self.flush()
        self.gcs.fan_out("list_tasks", None, merge=lambda lists: [t for ts in lists for t in ts],
                         callback=answer)
