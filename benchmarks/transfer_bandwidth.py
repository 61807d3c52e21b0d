"""Bandwidth of an object transfer between two ranks: hpcray's MpiTransport against raw MPI.

    /work/main/.venv/bin/mpiexec -n 2 python benchmarks/transfer_bandwidth.py
    ... transfer_bandwidth.py --sizes 1M,100M,1G --repeat 5 [--chunk 8Mi --window 4]
    ... transfer_bandwidth.py --loop wait      # the idle-friendly loop instead of busy poll

What it measures: for each size, rank 0 sends the bytes of one numpy buffer to rank 1,
first with one raw mpi4py `Send`/`Recv`, then with `MpiTransport.start_send` /
`start_receive` and a loop (`poll()` until done, or `wait_for_activity` between polls
with `--loop wait`). Each figure is timed on the receiver, from a barrier to the moment
the last byte is in its buffer; GB/s = 10⁹ bytes per second, the median of `--repeat`
runs after `--warmup` runs of each (default 5). With one warm-up the 1 MB row read
0.70-0.76 of raw as the median of 9 runs and 0.82-0.83 as the median of 41: both sides
were still warming up. Both buffers are touched before timing, so page
faults are not counted. It is not for: latency of small messages, or more than 2 ranks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from mpi4py import MPI

from hpcray.runtime.transport import DEFAULT_CHUNK_BYTES, DEFAULT_WINDOW, MpiTransport

from _common import parse_size  # noqa: E402


def fmt_size(nbytes: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def time_raw(comm, src, dst) -> float:
    comm.Barrier()
    start = time.perf_counter()
    if comm.rank == 0:
        comm.Send([src, MPI.BYTE], 1, 99)
    else:
        comm.Recv([dst, MPI.BYTE], 0, 99)
    return time.perf_counter() - start


def time_transport(comm, transport: MpiTransport, src, dst, loop: str) -> float:
    tag = 1
    comm.Barrier()
    start = time.perf_counter()
    if comm.rank == 0:
        transfer = transport.start_send(1, tag, src)
    else:
        transfer = transport.start_receive(0, tag, dst)
    while not transfer.done:
        transport.poll()
        if loop == "wait" and not transfer.done:
            transport.wait_for_activity(0.02)
    elapsed = time.perf_counter() - start
    while transport.busy:
        transport.poll()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1M,100M,1G")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--chunk", default=str(DEFAULT_CHUNK_BYTES))
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    parser.add_argument("--loop", choices=("poll", "wait"), default="poll")
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    if comm.size != 2:
        raise SystemExit("run with: mpiexec -n 2 python benchmarks/transfer_bandwidth.py")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    chunk = parse_size(args.chunk)
    transport = MpiTransport(chunk_bytes=chunk, window=args.window)
    load_before = os.getloadavg()

    rows = []
    for nbytes in sizes:
        src = np.full(nbytes, 7, np.uint8) if comm.rank == 0 else None
        dst = np.ones(nbytes, np.uint8) if comm.rank == 1 else None
        raw, ours = [], []
        for i in range(args.warmup + args.repeat):
            r = time_raw(comm, src, dst)
            t = time_transport(comm, transport, src, dst, args.loop)
            if i >= args.warmup:
                raw.append(r)
                ours.append(t)
        if comm.rank == 1 and not (dst == 7).all():
            raise SystemExit(f"{nbytes} B arrived corrupted")
        raw_gbs = nbytes / statistics.median(raw) / 1e9
        ours_gbs = nbytes / statistics.median(ours) / 1e9
        rows.append((nbytes, raw_gbs, ours_gbs))
        del src, dst

    rows = comm.bcast(rows, root=1)
    load_after = os.getloadavg()
    transport.close()
    if comm.rank == 0:
        print(f"# MpiTransport chunk {chunk} B, window {args.window}, loop {args.loop}; "
              f"median of {args.repeat} after {args.warmup} warm-up runs; "
              f"{MPI.Get_library_version().splitlines()[0]}")
        print(f"# load average (1, 5, 15 min) before {load_before[0]:.2f} {load_before[1]:.2f} "
              f"{load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} "
              f"{load_after[2]:.2f}; {os.cpu_count()} CPUs")
        print(f"| {'size':>8} | {'raw GB/s':>8} | {'hpcray GB/s':>11} | {'ratio':>5} |")
        print(f"| {'-' * 8} | {'-' * 8} | {'-' * 11} | {'-' * 5} |")
        for nbytes, raw_gbs, ours_gbs in rows:
            print(f"| {fmt_size(nbytes):>8} | {raw_gbs:8.2f} | {ours_gbs:11.2f} | "
                  f"{ours_gbs / raw_gbs:5.2f} |")


if __name__ == "__main__":
    main()
