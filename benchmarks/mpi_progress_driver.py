"""What drives an MPI transfer fastest from a second thread (mpi4py alone, no hpcray).

    MPIR_CVAR_CH4_CMA_ENABLE=0 mpiexec -n 2 python benchmarks/mpi_progress_driver.py
    ... mpi_progress_driver.py --sizes 8Mi,64Mi --repeat 30

hpcray's event loop never blocks in MPI; a progress thread keeps a large transfer moving
(runtime/transport.py, `_Progress`). This measures, for one Send/Recv of each size
between the two ranks (rank 0 sends, rank 1 receives; both sides do the same), how long
the receive takes when each side's transfer is driven by:

- `raw`: the main thread's own blocking Send/Recv;
- `request`: a second thread in MPI_Wait on the transfer's request;
- `request+poke`: a second thread in MPI_Waitsome on the request and on a receive from
  itself (what `_Progress` waits on for a rank without CMA);
- `self`: a second thread waiting on a receive from itself alone, while the main thread
  sleeps until the bytes are in (the last byte checked without calling MPI);
- `self+tests`: the same while the main thread tests the request every 200 us (what
  `_Progress` did before, and still does for a CMA peer);
- `request+probes`: a second thread waiting on the request while the main thread probes
  another communicator every 200 us (an event loop polling for messages).

Each figure is the median of `--repeat` (after 4 warm-up runs), timed on the receiver
from a barrier to the end. The thread is started for each transfer (~50 µs, in every
row but `raw`).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np
from mpi4py import MPI

from transfer_bandwidth import parse_size

MODES = ("raw", "request", "request+poke", "self", "self+tests", "request+probes")
_POLL = 200e-6
_TAG = 3


def one_transfer(comm, self_comm, probe_comm, mode: str, src, dst) -> float:
    """Seconds for one transfer (the receiver's figure) driven the way `mode` says."""
    comm.Barrier()
    start = time.perf_counter()
    sending = comm.rank == 0
    if mode == "raw":
        if sending:
            comm.Send([src, MPI.BYTE], 1, _TAG)
        else:
            comm.Recv([dst, MPI.BYTE], 0, _TAG)
        return time.perf_counter() - start
    request = comm.Isend([src, MPI.BYTE], 1, _TAG) if sending else \
        comm.Irecv([dst, MPI.BYTE], 0, _TAG)
    if mode in ("request", "request+probes"):
        done = threading.Event()
        thread = threading.Thread(target=lambda: (request.Wait(), done.set()))
        thread.start()
        while mode == "request+probes" and not done.is_set():
            probe_comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)
            time.sleep(_POLL)
        thread.join()
        return time.perf_counter() - start
    poke = self_comm.Irecv([bytearray(0), MPI.BYTE], 0, 0)
    if mode == "request+poke":
        thread = threading.Thread(target=MPI.Request.Waitsome, args=([poke, request],))
        thread.start()
        thread.join()
        elapsed = time.perf_counter() - start
    else:
        thread = threading.Thread(target=poke.Wait)
        thread.start()
        if mode == "self+tests":
            while not request.Test():
                time.sleep(_POLL)
        elif not sending:
            while dst[-1] != 7:  # the last byte in: no MPI call from this thread
                time.sleep(20e-6)
        else:
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
    self_comm.Send([b"", MPI.BYTE], 0, 0)
    thread.join()
    poke.Wait()
    request.Wait()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="8Mi,64Mi")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    if comm.size != 2:
        raise SystemExit("run with: mpiexec -n 2 python benchmarks/mpi_progress_driver.py")
    self_comm, probe_comm = MPI.COMM_SELF.Dup(), comm.Dup()
    rows = []
    for nbytes in (parse_size(s) for s in args.sizes.split(",")):
        src = np.full(nbytes, 7, np.uint8)
        dst = np.zeros(nbytes, np.uint8)
        for mode in MODES:
            times = []
            for i in range(4 + args.repeat):
                dst[-1] = 0
                elapsed = one_transfer(comm, self_comm, probe_comm, mode, src, dst)
                if i >= 4:
                    times.append(elapsed)
            rows.append((nbytes, mode, statistics.median(times)))
    if comm.rank == 1:
        print(f"# {MPI.Get_library_version().splitlines()[0]}; median of {args.repeat}")
        print("| size | driven by | receive |")
        print("|---|---|---|")
        for nbytes, mode, seconds in rows:
            print(f"| {nbytes / 2**20:g} MiB | {mode} | {seconds * 1e3:.2f} ms |")
    self_comm.Free()
    probe_comm.Free()


if __name__ == "__main__":
    main()
