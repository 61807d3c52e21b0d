"""The writer of the GCS tasks table: each task's spec and state, batched per shard.

The table holds the spec of every task whose returns some process may still ask for
(lineage: what to re-run if every copy of a return is lost) and its state, which
`hpcray.util.state.list_tasks()` shows. The owner (the node the task was submitted
on) writes the spec when the task is submitted and FINISHED or FAILED when its returns
arrive; the node that runs it writes RUNNING; the owner writes DELETED once it has
freed every return, since nothing can ask for them any more.

Writes wait in `pending` and leave every FLUSH_SECONDS (or FLUSH_EVENTS), one message
per shard, so a task costs a few tuple appends on its hot path; the table lags by that
much, as Ray's (which takes a second), and a query flushes the asking node's first.
Flushing every event-loop pass cost 100k no-ops from a 4-rank driver ~8%: a busy node
passes once per task, and each pass sent rank 0 a message. One node writes its own
shard the same way. Normal tasks only: actor calls are not re-run from lineage, and
the actors table follows actors.
"""

from __future__ import annotations

import time

from hpcray import ids
from hpcray.gcs.tables import (TASK_DELETED, TASK_FAILED, TASK_FINISHED, TASK_PENDING,
                               TASK_RUNNING)


FLUSH_SECONDS = 0.1
FLUSH_EVENTS = 10_000


class TaskEvents:
    def __init__(self, rank: int, gcs) -> None:
        self.rank = rank
        self.gcs = gcs  # a GcsClient
        self.pending: list[tuple] = []
        self.next_flush = 0.0
        self.live_returns: dict[bytes, int] = {}  # task id -> its returns not yet freed

    def submitted(self, spec) -> None:
        self.pending.append((spec.task_id, TASK_PENDING, spec, None, None))
        if spec.return_ids:
            self.live_returns[spec.task_id] = len(spec.return_ids)

    def running(self, spec) -> None:
        # The name too: the owner's spec may reach the GCS after this event.
        self.pending.append((spec.task_id, TASK_RUNNING, None, self.rank, spec.name))

    def ended(self, task_id: bytes, failed: bool = False) -> None:
        state = TASK_FAILED if failed else TASK_FINISHED
        if task_id not in self.live_returns:  # no returns: its lineage is of no use
            self._deleted(task_id)
        else:
            self.pending.append((task_id, state, None, None, None))

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
        self._deleted(task_id)

    def _deleted(self, task_id: bytes) -> None:
        self.pending.append((task_id, TASK_DELETED, None, None, None))

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
        """answer([(task_id, name, state, owner rank, rank that ran it)]) of every task
        in the table, across shards."""
        self.flush()
        self.gcs.fan_out("list_tasks", None, merge=lambda lists: [t for ts in lists for t in ts],
                         callback=answer)
