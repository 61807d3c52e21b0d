"""`hpcray.timeline()`, as `ray.timeline()`: the job's tasks as a Chrome trace.

The trace is a JSON list of Chrome Trace Event Format events (chrome://tracing and
https://ui.perfetto.dev load it): a process per node (pid = its rank), a thread per
worker process (tid = the worker's pid; tid 0 holds the node's object transfers), and

    X  one complete event per attempt of a task, actor creation or actor call:
       name, cat (task, actor_creation, actor_call), ts and dur in microseconds,
       args: task_id, node, worker_pid, failed
    s/f  a flow arrow from a task, when it submitted a child, to the child's start
    X  on tid 0 of the receiving node, one per object pulled from another node
       (cat "transfer", args: object_id, from, to, bytes)
    M  process and thread names; i: a note if a node dropped its oldest records

Times are rank 0's clock: each node's records come shifted by its clock's offset,
measured at the job's start (runtime/clock.py); a node whose clock was off says by how
much in its process name.

Every node records this as it runs (runtime/recorder.py: on by default, bounded by
HPCRAY_TIMELINE_EVENTS per node, 0 switching it off); this gathers it from every node when called.
"""

from __future__ import annotations

import json

from hpcray import context
from hpcray.runtime.recorder import KINDS

_US = 1e6
TRANSFER_TID = 0


def timeline(filename: str | None = None):
    """The job's timeline: a list of trace events, or, given `filename`, written there
    as JSON (then None), as Ray's."""
    client = context.get_client()
    events = chrome_trace(client.list_state("timeline"))
    if filename is None:
        return events
    with open(filename, "w") as out:
        json.dump(events, out)
    return None


def chrome_trace(parts: list[dict]) -> list[dict]:
    """Trace events from every node's Recorder.rows()."""
    events: list[dict] = []
    last_start: dict[bytes, tuple] = {}  # task id -> (rank, pid, start) of its last attempt
    where: dict[bytes, list] = {}        # task id -> [(rank, pid, start, end)] attempts
    for part in sorted(parts, key=lambda p: p["rank"]):
        rank = part["rank"]
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"name": f"node {rank} ({part['host']}{_clock(part)})",
                                "clock_offset": part.get("clock_offset", 0.0),
                                "clock_bound": part.get("clock_bound", 0.0)}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"sort_index": rank}})
        pids = set()
        for task_id, name, kind, pid, start, end, failed in part["spans"]:
            pids.add(pid)
            events.append({
                "name": name, "cat": KINDS.get(kind, "task"), "ph": "X", "pid": rank,
                "tid": pid, "ts": start * _US, "dur": max(0.0, end - start) * _US,
                "cname": "terrible" if failed else "generic_work",
                "args": {"task_id": task_id.hex(), "node": rank, "worker_pid": pid,
                         "failed": failed}})
            attempt = last_start.get(task_id)
            if attempt is None or attempt[2] <= start:
                last_start[task_id] = (rank, pid, start)
            where.setdefault(task_id, []).append((rank, pid, start, end))
        for pid in sorted(pids):
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": pid,
                           "args": {"name": f"worker {pid}"}})
        if part["transfers"]:
            events.append({"name": "thread_name", "ph": "M", "pid": rank,
                           "tid": TRANSFER_TID, "args": {"name": "object transfers"}})
        for object_id, source, dest, size, start, end in part["transfers"]:
            events.append({
                "name": f"pull {size} B from node {source}", "cat": "transfer", "ph": "X",
                "pid": dest, "tid": TRANSFER_TID, "ts": start * _US,
                "dur": max(0.0, end - start) * _US,
                "args": {"object_id": object_id.hex(), "from": source, "to": dest,
                         "bytes": size}})
        dropped = {k: v for k, v in part["dropped"].items() if v}
        if dropped:
            events.append({"name": f"node {rank} dropped its oldest records: {dropped} "
                           "(HPCRAY_TIMELINE_EVENTS)", "ph": "i", "s": "p", "pid": rank,
                           "tid": 0, "ts": part["now"] * _US})
    events.extend(_flows(parts, where, last_start))
    return events


def _clock(part: dict) -> str:
    """How far this node's clock was from rank 0's (its times are shifted by that)."""
    offset = part.get("clock_offset")
    if not offset:
        return ""
    return f", clock {offset:+.6f} s \u00b1 {part['clock_bound'] * 1e3:.3f} ms, aligned"


def _flows(parts, where, last_start) -> list[dict]:
    """A flow arrow per submission whose parent ran at that moment and whose child ran."""
    flows = []
    flow_id = 0
    for part in parts:
        for parent_id, child_id, at in part["submits"]:
            child = last_start.get(child_id)
            parent = next((a for a in where.get(parent_id, ())
                           if a[0] == part["rank"] and a[2] <= at <= a[3]), None)
            if child is None or parent is None:
                continue
            flow_id += 1
            flows.append({"name": "submit", "cat": "submit", "ph": "s", "id": flow_id,
                          "pid": parent[0], "tid": parent[1], "ts": at * _US})
            flows.append({"name": "submit", "cat": "submit", "ph": "f", "bp": "e",
                          "id": flow_id, "pid": child[0], "tid": child[1],
                          "ts": child[2] * _US})
    return flows
