"""Spilling's bandwidth: objects written to disk when the store is full, read back on get.

    python benchmarks/spill_bandwidth.py [--store 512Mi --object 64Mi --times 3 --cold]
    mpiexec -n 2 python -m hpcray benchmarks/spill_bandwidth.py --remote

What it measures, on one node: `--times` x the store's capacity put in objects of
`--object` bytes (numpy arrays), so that all but the last store-full are spilled, then
every object read back with get (each read restores it, spilling another). Figures:
  spill GB/s     the node's file writes alone (written_bytes / spill_seconds)
  restore GB/s   the node's restores alone: create, read the file, seal (restored_bytes /
                 restore_seconds)
  put GB/s       what the program sees for the puts past the store's capacity (each
                 copies its array into the store after a spill made room)
  get GB/s       what it sees for the gets of spilled objects (restore + one spill each)
and the same two for a store with room (no spill) to compare. `--cold` writes the spill
files back to disk and drops them from the page cache (fsync + POSIX_FADV_DONTNEED)
before the gets, so restores read the disk, not memory; without it they mostly read
the page cache, as a restore soon after a spill does.

`--remote` (2 ranks): objects made by a task on rank 1, more than its store holds, read
by the driver on rank 0: the pulls of spilled objects are served from rank 1's spill
files (mapped) instead of its store; the figure is the driver's get GB/s, against the
same pulls when nothing was spilled. It is not for: many nodes, or small objects (each
spill and restore is one file).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

import hpcray
from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from hpcray.util.state import object_store_stats

from _common import parse_size  # noqa: E402


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def drop_from_page_cache(folder: str) -> None:
    """Write the spill files back to disk and drop their pages, so that reads go to disk."""
    os.sync()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def local(args, folder: str) -> dict:
    count = int(args.times * args.store / args.object)
    fit = max(1, int(0.8 * args.store / args.object))
    arrays = [np.full(args.object // 8, i, dtype=np.int64) for i in range(2)]
    # A store with room: the same puts and gets, nothing spilled.
    refs = []
    started = time.perf_counter()
    for i in range(fit):
        refs.append(hpcray.put(arrays[i % 2]))
    put_room = gbps(fit * args.object, time.perf_counter() - started)
    started = time.perf_counter()
    for ref in refs:
        assert hpcray.get(ref)[0] in (0, 1)
    get_room = gbps(fit * args.object, time.perf_counter() - started)
    del refs, ref
    assert object_store_stats()["cluster"]["num_objects"] == 0  # applies the drops first
    # Past the store's capacity: every put spills one, every get restores one.
    refs = [hpcray.put(arrays[i % 2]) for i in range(fit)]
    before = object_store_stats()["cluster"]
    started = time.perf_counter()
    for i in range(fit, count):
        refs.append(hpcray.put(arrays[i % 2]))
    put_spilling = gbps((count - fit) * args.object, time.perf_counter() - started)
    after_puts = object_store_stats()["cluster"]
    if args.cold:
        drop_from_page_cache(folder)
    started = time.perf_counter()
    for i, ref in enumerate(refs[:count - fit]):  # the spilled ones, oldest first
        assert hpcray.get(ref)[-1] == i % 2
    get_spilled = gbps((count - fit) * args.object, time.perf_counter() - started)
    end = object_store_stats()["cluster"]
    written = end["written_bytes"] - before["written_bytes"]
    return {
        "objects": count, "object_bytes": args.object, "store_bytes": args.store,
        "spilled": end["spilled_objects"], "restored": end["restored_objects"],
        "spill_GB/s": gbps(written, end["spill_seconds"] - before["spill_seconds"]),
        "restore_GB/s": gbps(end["restored_bytes"] - after_puts["restored_bytes"],
                             end["restore_seconds"] - after_puts["restore_seconds"]),
        "put_GB/s_spilling": put_spilling, "get_GB/s_spilled": get_spilled,
        "put_GB/s_room": put_room, "get_GB/s_room": get_room,
    }


@hpcray.remote
def make(size: int, i: int):
    return np.full(size // 8, i, dtype=np.int64)


def remote(args) -> dict:
    """The driver (rank 0) reads objects whose primary copies are on rank 1."""
    on1 = NodeAffinitySchedulingStrategy(
        [n["NodeID"] for n in hpcray.nodes() if n["rank"] == 1][0], soft=False)
    fit = max(1, int(0.6 * args.store / args.object))
    count = int(args.times * args.store / args.object)

    def read_all(n: int) -> tuple[float, dict]:
        refs = [make.options(scheduling_strategy=on1).remote(args.object, i) for i in range(n)]
        hpcray.wait(refs, num_returns=n, fetch_local=False)
        before = object_store_stats()["nodes"][1]
        started = time.perf_counter()
        for i in range(n):
            value = hpcray.get(refs[i])
            assert value[0] == i
            refs[i] = value = None  # its copy here goes: rank 0 has room for the next
        rate = gbps(n * args.object, time.perf_counter() - started)
        after = object_store_stats()["nodes"][1]
        return rate, {k: after[k] - before[k] for k in ("served_from_disk", "restored_objects")}

    read_all(fit)  # warm-up: rank 0's store pages are touched once
    # As many objects read as below, in rounds that fit rank 1's store.
    in_store = statistics.mean(read_all(fit)[0] for _ in range(max(1, count // fit)))
    spilled, counts = read_all(count)
    return {"objects": count, "object_bytes": args.object, "store_bytes": args.store,
            "remote_get_GB/s_in_store": in_store, "remote_get_GB/s_spilled": spilled,
            **counts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="512Mi", help="each node's object store")
    parser.add_argument("--object", default="64Mi", help="bytes per object")
    parser.add_argument("--times", type=float, default=3.0, help="x the store, in all")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="restores read the disk")
    parser.add_argument("--remote", action="store_true", help="2 ranks: pulls of spilled")
    parser.add_argument("--dir", default=None, help="HPCRAY_SPILL_DIR (default: a temp dir)")
    args = parser.parse_args()
    args.store, args.object = parse_size(args.store), parse_size(args.object)
    base = args.dir or tempfile.mkdtemp(prefix="spill-bench-")
    rows = []
    for _ in range(args.repeat):
        hpcray.init(num_cpus=1, object_store_memory=args.store,
                    object_spilling_directory=base)
        try:
            rows.append(remote(args) if args.remote else local(args, base))
        finally:
            hpcray.shutdown()
    if not args.dir:
        os.rmdir(base)
    print(f"spill_bandwidth: {args.repeat} runs, store {args.store} B, objects "
          f"{args.object} B, {args.times:g}x the store, folder {base}"
          f"{' (cold: read from disk)' if args.cold else ''}")
    for key in rows[0]:
        values = [row[key] for row in rows]
        if isinstance(values[0], float):
            print(f"  {key:26} median {statistics.median(values):7.2f}   runs "
                  + " / ".join(f"{v:.2f}" for v in values))
        else:
            print(f"  {key:26} {' / '.join(str(v) for v in values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
