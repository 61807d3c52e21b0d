"""Timestamps along the path of a remote get, for finding where its time goes.

With HPCRAY_TRACE_HOPS=FOLDER every process of the runtime records
(time.perf_counter_ns(), what) at the points of a pull: the driver's get, the puller's
Pull and buffers, the holder's serving of it, the transfer's end on each side, the
objects made ready; and around them the MPI progress thread's waits (`thread.wait`,
`thread.woke`). CLOCK_MONOTONIC is one clock for every process of a host, so the
stamps of two ranks on one host line up. Each process writes hops-<rank>-<pid>.txt to
FOLDER when its node shuts down. Off (the default), each point costs one test of a
module constant.
"""

from __future__ import annotations

import os
import time

FOLDER = os.environ.get("HPCRAY_TRACE_HOPS", "")
ENABLED = bool(FOLDER)
_stamps: list = []


def stamp(what: str) -> None:
    _stamps.append((time.perf_counter_ns(), what))


def dump(rank: int) -> None:
    """Write this process's stamps to FOLDER (and forget them)."""
    global _stamps
    if not ENABLED or not _stamps:
        return
    stamps, _stamps = _stamps, []
    path = os.path.join(FOLDER, f"hops-{rank}-{os.getpid()}.txt")
    with open(path, "a") as out:
        out.writelines(f"{ns} {rank} {what}\n" for ns, what in stamps)
