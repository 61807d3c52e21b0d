"""The node's answers to Ray's state API (`hpcray.util.state`): where each table comes from.

    tasks    the GCS tasks table, every shard (task_events.py writes it), and the actor
             calls every node keeps (StateQuery / StateRows, merged by task id: the
             owner says what was called and how it ended, the node that ran it where)
    actors   the GCS actors table, every shard (actors.py keeps it up to date)
    nodes    the GCS nodes table (each node registers itself at the start handshake)
    objects  every node's own references, asked of each node (StateQuery / StateRows):
             one row per process that holds an object (the driver, a worker), and one
             for the references no process holds (pending tasks' arguments, refs inside
             other values), as Ray lists each reference; object ids only, actor handles
             are list_actors'.
    status   what each node says of itself for the status line (status.py)
    workers  every node's worker processes, live and ended, and the driver (rank 0), with
             how each ended (job_logs.py reads the fork server's reports)
    timeline every node's Recorder (recorder.py): what it ran, submitted and pulled,
             when; hpcray.timeline() and the report page read it
    store    every node's object store: its counters (store.stats()) and what it spilled
             and restored (spilling.py), asked of each node; one (rank, counters) row each

Any node can ask (a worker asks its node); the answer comes through a callback once
every shard or node has replied. Not for: turning rows into Ray's records (util/state/
does, with the node ids), or anything on the hot path: a query walks its tables.
"""

from __future__ import annotations

import itertools
import os

from hpcray import ids
from hpcray.gcs.tables import TASK_PENDING, TASK_RUNNING
from hpcray.runtime import messages
from hpcray.runtime.messages import wire
from hpcray.runtime.object_table import PENDING
from hpcray.runtime.status import node_status

_PUT_INDEX = bytes(ids.OBJECT_ID_SIZE - ids.TASK_ID_SIZE)  # the return index of a put
# What a workers row holds, in this order.
WORKER_ROW_FIELDS = ("worker_id", "rank", "pid", "is_alive", "worker_type", "exit_type",
                     "exit_detail", "launch_ms", "start_ms", "end_ms")
# What an objects row holds, in this order.
OBJECT_ROW_FIELDS = ("object_id", "object_size", "task_status", "owner", "rank", "pid",
                     "type", "reference_type", "call_site")


class StateQueries:
    HANDLES = {messages.StateQuery: "on_state_query", messages.StateRows: "on_state_rows"}

    def __init__(self, rank: int, link, node, objects, gcs, task_events, recorder,
                 peers) -> None:
        self.rank = rank
        self.link = link
        self.node = node
        self.objects = objects
        self.gcs = gcs
        self.task_events = task_events
        self.recorder = recorder
        self.peers = peers
        self.waiting: dict[int, list] = {}  # request id -> [rows so far, ranks due, answer]
        self._request_ids = itertools.count(1)

    def query(self, table: str, answer) -> None:
        """answer(rows of `table`): tables.TASK_ROW_FIELDS tuples for "tasks",
        [(actor id, ActorInfo)] for "actors", [NodeInfo] for "nodes",
        OBJECT_ROW_FIELDS tuples for "objects", WORKER_ROW_FIELDS tuples for "workers",
        every node's Recorder.rows() for "timeline" (recorder.py)."""
        if table == "tasks":
            self.task_events.list_tasks(lambda rows: self._ask_every_node(
                "calls", lambda parts: answer(rows + merge_calls(parts))))
        elif table == "actors":
            self.gcs.fan_out("list_actors", None, callback=answer,
                             merge=lambda lists: [row for rows in lists for row in rows])
        elif table == "nodes":
            self.gcs.get_nodes(answer)
        elif table in ("objects", "workers", "status", "timeline", "store"):
            self._ask_every_node(table, answer)
        else:
            raise ValueError(f"no state table {table!r}")

    def _ask_every_node(self, table: str, answer) -> None:
        """Every live node's rows (ULFM: a dead one is not asked, nor waited for)."""
        rows = self.local_rows(table)
        others = {rank for rank in self.link.transport.live_ranks() if rank != self.rank}
        if not others:
            answer(rows)
            return
        request_id = next(self._request_ids)
        self.waiting[request_id] = [rows, others, answer]
        self.peers.broadcast(wire(messages.StateQuery, request_id, table))

    def node_died(self, rank: int) -> None:
        """Rank `rank` is gone (node_failures.py): what waits for its rows waits no more."""
        for request_id, waiting in list(self.waiting.items()):
            if rank in waiting[1]:
                self._answered(request_id, waiting, rank)

    def on_state_query(self, source: int, request_id: int, table: str) -> None:
        self.peers.send(source, wire(messages.StateRows, request_id, self.local_rows(table)))

    def on_state_rows(self, source: int, request_id: int, rows: list) -> None:
        waiting = self.waiting.get(request_id)
        if waiting is None:
            return
        waiting[0].extend(rows)
        self._answered(request_id, waiting, source)

    def _answered(self, request_id: int, waiting: list, rank: int) -> None:
        waiting[1].discard(rank)
        if not waiting[1]:
            del self.waiting[request_id]
            waiting[2](waiting[0])

    def local_rows(self, table: str) -> list:
        if table == "calls":
            return [self.task_events.call_rows()]
        if table == "objects":
            return self.object_rows()
        if table == "workers":
            return self.worker_rows()
        if table == "status":
            return [node_status(self.node)]
        if table == "timeline":
            if self.recorder.sampler is not None:
                self.node.sample()  # a reading up to now, for the report's last stretch
            stats = self.node.store.stats()
            stats.update(self.node.spiller.totals())  # the report's "spills"
            return [self.recorder.rows(stats)]
        if table == "store":
            counters = self.node.store.stats()
            counters.update(self.node.spiller.counters())
            counters.update(self.node.pins.counters())
            return [(self.rank, counters)]
        raise ValueError(f"no per-node state table {table!r}")

    def object_rows(self) -> list[tuple]:
        """This node's references to objects, as OBJECT_ROW_FIELDS tuples."""
        entries = self.objects.entries
        holders = []  # (pid, type, ids it holds)
        driver_holds = set(self.node.driver_refs.counts)  # empty where no driver runs
        if driver_holds:
            holders.append((os.getpid(), "DRIVER", driver_holds))
        for worker in list(self.node.workers.values()):
            if worker.holds:
                holders.append((worker.pid, "WORKER", set(worker.holds)))
        rows = []
        held_by_processes: dict[bytes, int] = {}
        for pid, kind, holds in holders:
            for key in holds:
                entry = entries.get(key)
                if entry is None or len(key) != ids.OBJECT_ID_SIZE:
                    continue
                held_by_processes[key] = held_by_processes.get(key, 0) + 1
                rows.append(self._row(key, entry, pid, kind, "LOCAL_REFERENCE"))
        captured = {key for entry in entries.values() for key in entry.contained}
        for key, entry in entries.items():
            if entry.refs > held_by_processes.get(key, 0):
                # Held on this node by no process: a value holds it, or a task's arguments.
                kind = "CAPTURED_IN_OBJECT" if key in captured else "USED_BY_PENDING_TASK"
                rows.append(self._row(key, entry, None, None, kind))
        return rows

    def worker_rows(self) -> list[tuple]:
        """This node's workers (and the driver, on rank 0), as WORKER_ROW_FIELDS tuples."""
        rows = []
        if self.rank == 0:
            rows.append((_worker_id(self.rank, 0), self.rank, os.getpid(), True, "DRIVER",
                         None, None, None, None, None))
        exits = self.node.job_logs.exits
        for key, worker in list(self.node.workers.items()):
            end_ms, exit_type, detail = exits.get(worker.pid, (None, None, None))
            rows.append((_worker_id(self.rank, key), self.rank, worker.pid, worker.alive,
                         "WORKER", None if worker.alive else exit_type, detail,
                         worker.launched_ms, worker.ready_ms, end_ms))
        return rows

    def _row(self, key: bytes, entry, pid, kind, reference_type) -> tuple:
        if key[ids.TASK_ID_SIZE:] == _PUT_INDEX:  # a put: no task made it
            size, status = entry.size, "NIL"
        elif entry.state == PENDING:
            size, status = None, "PENDING"
        else:
            size, status = entry.size, "FINISHED"
        return (key, size, status, entry.owner, self.rank, pid, kind, reference_type,
                self.node.call_sites.get(key))


def _worker_id(rank: int, key: int) -> str:
    """A worker's id: its node's rank and its key there (0: the driver), as hex."""
    return f"{rank:08x}{key:016x}"


def merge_calls(parts: list) -> list[tuple]:
    """Actor-call rows from every node's (owned rows, runs): each owner's row, with where,
    by which worker and since when it ran; RUNNING once it started and has not ended."""
    runs = {}
    for _owned, ran in parts:
        for task_id, rank, pid, started in ran:
            runs[task_id] = (rank, pid, started)
    rows = []
    for owned, _ran in parts:
        for row in owned:
            ran = runs.get(row[0])
            if ran is not None:
                rank, pid, started = ran
                state = TASK_RUNNING if row[2] == TASK_PENDING else row[2]
                row = (*row[:2], state, row[3], rank, *row[5:10], started, row[11], pid,
                       row[13])
            rows.append(row)
    return rows
