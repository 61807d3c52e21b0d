"""The floor of a remote get over MPI on this host: a pull protocol in bare mpi4py.

    mpiexec -n 2 python benchmarks/pull_floor.py --sizes 1Mi,8Mi --repeat 200
    MPIR_CVAR_CH4_CMA_ENABLE=0 mpiexec -n 2 python benchmarks/pull_floor.py ...

What it measures: rank 0 asks rank 1 for the bytes of a buffer in /dev/shm (as a get asks
the node holding an object) and times until they are in its own /dev/shm buffer, with the
rules the runtime lives by: no thread spins while it waits for a message (the holder
looks for requests every `--holder-sleep` seconds, MPI having no descriptor to sleep on;
the receiver looks for its bytes every `--receiver-sleep`), the timer slack at 1 µs (as
cluster.precise_sleeps). Rows:

- `raw`: one Send/Recv of the same bytes between the two buffers (both sides waiting in
  MPI: the bound no protocol reaches);
- `ping`: a 1-byte request and the bytes back, both sides blocked in MPI (what a
  request costs when nobody sleeps);
- `pull, waiting in MPI`: rank 0's thread sends the request and waits inside MPI for
  the bytes (spinning there), rank 1's loop sleeps between Improbes;
- `pull, one thread`: rank 0's timing thread sends the request, posts the receive and
  polls it; rank 1's loop sleeps between Improbes. What any polling protocol pays;
- `pull, woken thread`: the same, but rank 0's receive is polled by a second thread
  (the node's event loop), which wakes the asking thread through a Condition when the
  bytes are in (the runtime's shape: a driver thread and a loop thread).

It is not the runtime: no store, no object table, no pickled messages beyond the request,
no decode. The difference between its rows and `remote_get.py`'s get is what the
runtime's own work costs.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import queue
import statistics
import threading
import time

from mpi4py import MPI

from _common import parse_size  # noqa: E402

_REQUEST_TAG, _DATA_TAG, _STOP_TAG = 1, 2, 3


def precise_sleeps() -> None:
    try:
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 µs
    except (OSError, AttributeError):
        pass


def shm_buffer(nbytes: int, fill: int) -> memoryview:
    """A warm buffer in /dev/shm (tmpfs pages, as the object store's)."""
    name = f"/dev/shm/pull-floor-{os.getpid()}"
    fd = os.open(name, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.unlink(name)
        os.ftruncate(fd, nbytes)
        area = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    view = memoryview(area)
    view[:] = bytes([fill]) * nbytes
    return view


def holder(comm, buffer, sleep: float) -> None:
    """Rank 1: serve each request with the buffer's bytes; look for requests every
    `sleep` seconds. Each send is waited on by a second thread (its GIL released), as
    the runtime's progress thread does: without CMA, MPI moves the bytes only while the
    sender is inside an MPI call."""
    status = MPI.Status()
    sends: queue.SimpleQueue = queue.SimpleQueue()
    progress = threading.Thread(target=_wait_each, args=(sends,), daemon=True)
    progress.start()
    while True:
        message = comm.improbe(MPI.ANY_SOURCE, MPI.ANY_TAG, status=status)
        if message is None:
            time.sleep(sleep)
            continue
        tag = status.Get_tag()
        message.recv()
        if tag == _STOP_TAG:
            break
        sends.put(comm.Isend([buffer, MPI.BYTE], 0, _DATA_TAG))
    sends.put(None)
    progress.join()


def _wait_each(requests: queue.SimpleQueue) -> None:
    while (request := requests.get()) is not None:
        request.Wait()


def pull_waiting(comm, buffer) -> float:
    """The asking thread waits inside MPI for its bytes (it spins there)."""
    start = time.perf_counter()
    comm.send(None, 1, _REQUEST_TAG)
    comm.Recv([buffer, MPI.BYTE], 1, _DATA_TAG)
    return time.perf_counter() - start


def pull_one_thread(comm, buffer, sleep: float) -> float:
    start = time.perf_counter()
    comm.send(None, 1, _REQUEST_TAG)
    receive = comm.Irecv([buffer, MPI.BYTE], 1, _DATA_TAG)
    while not receive.Test():
        time.sleep(sleep)
    return time.perf_counter() - start


class _Loop:
    """Rank 0's second thread: polls the receive it is given and wakes the asker."""

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.receive = None
        self.done = False
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            with self.lock:
                while self.receive is None and not self.stop:
                    self.changed.wait()
                if self.stop:
                    return
                receive = self.receive
            while not receive.Test():
                time.sleep(self.sleep)
            with self.lock:
                self.receive = None
                self.done = True
                self.changed.notify_all()


def pull_woken(comm, buffer, loop: _Loop) -> float:
    start = time.perf_counter()
    comm.send(None, 1, _REQUEST_TAG)
    receive = comm.Irecv([buffer, MPI.BYTE], 1, _DATA_TAG)
    with loop.lock:
        loop.done = False
        loop.receive = receive
        loop.changed.notify_all()
        while not loop.done:
            loop.changed.wait()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1Mi,8Mi")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--holder-sleep", type=float, default=100e-6)
    parser.add_argument("--receiver-sleep", type=float, default=30e-6)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    if comm.size != 2:
        raise SystemExit("run with: mpiexec -n 2 python benchmarks/pull_floor.py")
    if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
        raise SystemExit("needs MPI_THREAD_MULTIPLE")
    precise_sleeps()
    rows = []
    for nbytes in (parse_size(s) for s in args.sizes.split(",")):
        buffer = shm_buffer(nbytes, 7 if comm.rank == 1 else 0)
        times = {"raw": [], "ping": [], "pull, waiting in MPI": [], "pull, one thread": [],
                 "pull, woken thread": []}
        for _ in range(args.repeat + 5):
            comm.Barrier()
            start = time.perf_counter()
            if comm.rank == 1:
                comm.Send([buffer, MPI.BYTE], 0, _DATA_TAG)
            else:
                comm.Recv([buffer, MPI.BYTE], 1, _DATA_TAG)
            times["raw"].append(time.perf_counter() - start)
            comm.Barrier()
            start = time.perf_counter()
            if comm.rank == 1:
                comm.recv(source=0, tag=_REQUEST_TAG)
                comm.Send([buffer, MPI.BYTE], 0, _DATA_TAG)
            else:
                comm.send(None, 1, _REQUEST_TAG)
                comm.Recv([buffer, MPI.BYTE], 1, _DATA_TAG)
            times["ping"].append(time.perf_counter() - start)
        for kind in ("pull, waiting in MPI", "pull, one thread", "pull, woken thread"):
            comm.Barrier()
            if comm.rank == 1:
                holder(comm, buffer, args.holder_sleep)
                continue
            loop = _Loop(args.receiver_sleep) if kind == "pull, woken thread" else None
            for _ in range(args.repeat + 5):
                time.sleep(0.002)  # the holder back in its sleeps, as after a wait
                if kind == "pull, waiting in MPI":
                    times[kind].append(pull_waiting(comm, buffer))
                elif loop is None:
                    times[kind].append(pull_one_thread(comm, buffer, args.receiver_sleep))
                else:
                    times[kind].append(pull_woken(comm, buffer, loop))
            if loop is not None:
                with loop.lock:
                    loop.stop = True
                    loop.changed.notify_all()
                loop.thread.join()
            comm.send(None, 1, _STOP_TAG)
        if comm.rank == 0:
            if buffer[nbytes - 1] != 7:
                raise SystemExit(f"{nbytes} B arrived wrong")
            rows.append((nbytes, {k: statistics.median(v[5:]) for k, v in times.items()}))
        buffer.release()
    if comm.rank == 0:
        print(f"# pull floor: median of {args.repeat}; holder looks every "
              f"{args.holder_sleep * 1e6:.0f} µs, receiver every "
              f"{args.receiver_sleep * 1e6:.0f} µs; CMA "
              f"{os.environ.get('MPIR_CVAR_CH4_CMA_ENABLE', '1')}; load "
              f"{os.getloadavg()[0]:.2f}")
        kinds = list(rows[0][1])
        print("| size | " + " | ".join(kinds) + " |")
        print("|---" * (len(kinds) + 1) + "|")
        for nbytes, medians in rows:
            raw = medians["raw"]
            cells = [f"{medians[k] * 1e3:.3f} ms ({medians[k] / raw:.1f}x)" for k in kinds]
            print(f"| {nbytes >> 20} MiB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
