"""`HPCRAY_STATUS_INTERVAL=N`: one line on stderr every N seconds while a job runs.

    hpcray status +12.0s: tasks 1520 done, 8 running, 230 queued | CPU 7/8 | store 120 MiB
      of 1.6 GiB | moved 1.2 GiB, 2 pulls | node 0: 4/4 CPU, 3 queued, store 100 MiB | ...

What each node says of itself (`node_status`, the "status" state table, asked of every
node like list_objects): tasks and actor calls that ran there (the Recorder's counters),
pool workers busy, tasks queued for a worker, CPUs in use, its store's bytes, pulls in
flight and bytes moved.
A thread of the driver asks every N seconds, and sleeps in between: nothing runs, and
no thread exists, when the variable is unset. Jobs of more than 8 nodes show the
totals and the busiest and idlest node rather than every node.

Not for: progress of particular refs (hpcray.util.progress).
"""

from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger("hpcray.status")

# What a status row holds, in this order.
STATUS_ROW_FIELDS = ("rank", "tasks_done", "running", "queued", "cpu_used", "cpu_total",
                     "store_used", "store_capacity", "pulls", "bytes_pulled", "bytes_sent")
_NODES_SHOWN = 8


def node_status(node) -> tuple:
    """This node's STATUS_ROW_FIELDS tuple."""
    scheduler = node.scheduler
    stats = node.store.stats()
    counters = node.recorder.counts()  # recorder.py
    cpu_total = scheduler.total.get("CPU", 0.0)
    return (node.rank, counters["tasks_run"], len(scheduler.busy_workers),
            scheduler.num_waiting, cpu_total - scheduler.available.get("CPU", 0.0), cpu_total,
            stats["used_bytes"], stats["capacity"], len(node.link.pulls),
            counters["bytes_pulled"], counters["bytes_sent"])


def format_status(rows: list, elapsed: float) -> str:
    """One line from every node's status row."""
    rows = sorted(rows)
    total = [sum(row[i] for row in rows) for i in range(len(STATUS_ROW_FIELDS))]
    _, done, running, queued, cpu_used, cpu_total, used, capacity, pulls, pulled, _ = total
    parts = [f"hpcray status +{elapsed:.1f}s: tasks {done} done, {running} running, "
             f"{queued} queued", f"CPU {cpu_used:g}/{cpu_total:g}",
             f"store {size_text(used)} of {size_text(capacity)}",
             f"moved {size_text(pulled)}, {pulls} pulls"]
    if len(rows) > 1:
        shown = rows
        if len(rows) > _NODES_SHOWN:
            by_load = sorted(rows, key=lambda row: (row[4] / (row[5] or 1), row[3]))
            shown = [by_load[-1], by_load[0]]
        parts += [f"node {row[0]}: {row[4]:g}/{row[5]:g} CPU, {row[3]} queued, store "
                  f"{size_text(row[6])}" for row in shown]
    return " | ".join(parts)


def size_text(size: float) -> str:
    """Bytes for a person: 0 B, 12.0 KiB, 3.4 MiB, 1.20 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{size:.0f} B"


class StatusLine:
    """The driver's thread that prints the status line every `interval` seconds, until
    `stop()`. `query()` returns every node's status rows."""

    def __init__(self, interval: float, query, stream=None) -> None:
        self.interval = interval
        self.query = query
        self.stream = stream
        self.started = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpcray-status", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                line = format_status(self.query(), time.monotonic() - self.started)
            except Exception:  # noqa: BLE001 - the job is ending, or a node is gone
                if not self._stopped.is_set():
                    log.debug("status query failed", exc_info=True)
                return
            stream = self.stream or sys.stderr
            try:
                stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError):
                return

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
