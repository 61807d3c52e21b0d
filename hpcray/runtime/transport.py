"""Node-manager-to-node-manager messages and object transfers over MPI.

What this module is for: the one place where hpcray's node managers talk MPI to each
other. It moves two kinds of traffic between ranks:

- messages: any picklable value, sent on a named channel (``"control"`` between node
  managers, ``"gcs"`` for the global control store's requests and replies), delivered
  in the order they were sent from a given rank on a given channel;
- object transfers: the bytes of one object, pulled by the node that needs it. The
  receiver picks a tag (`new_transfer_tag`), tells the owner about it in a message, and
  both sides start their halves (`start_receive`, `start_send`). The bytes go in chunks,
  a few in flight at a time so that they pipeline, from the sender's buffer (a store
  segment) straight into the receiver's (a buffer allocated in its segment). One
  exception: to a rank on the same host while MPICH copies with CMA, the chunks of a
  store object of 32 MiB or more are first copied into a staging buffer of huge pages
  (see `_Staging`: the receiver's process_vm_readv of 4 KiB tmpfs pages cost ~3x its
  CPU on earlier kernels).

The caller's thread never blocks or spins: every MPI call it makes is nonblocking
(Isend, Improbe, Imrecv, Irecv, Test), because every MPI on the machines we run on
burns a whole core inside a blocking receive. An event loop calls `poll` when it wakes
up; a rank with nothing else to wait on sleeps in `wait_for_activity`, which polls with
a growing back-off so that an idle job costs almost no CPU.

The exception is `_Progress`, a thread that sits inside a blocking MPI_Wait while (and
only while) an object transfer is outstanding. MPI moves the bytes of a large message
only while some thread of each side is inside an MPI call: with single-copy CMA each
side's few polls suffice, but where CMA is off (ptrace_scope, common on clusters) or
over a network's rendezvous pipeline, a copy needs hundreds of progress calls, and an
event loop that polls every millisecond moved 64 MiB at 0.04 GB/s. The thread's wait
drives MPI continuously (its GIL released) and ends when the last transfer does. With a
rank that does not copy with CMA it waits on the transfers' own requests and wakes the
event loop when they end, so that the loop need not poll for them. Its cost: MPICH
spins inside the wait (yielding the CPU every 1000 polls; Open MPI only with
mpi_yield_when_idle, which `launch.world` sets), also while a posted receive
waits for its sender to start, which takes the holder one poll of its event loop
(milliseconds at most while it is busy). A staged send (below) does without it: its CMA
peer reads the staging buffers with no help from the sender's MPI, and the spin only
took the core that the sender's staging copies run on.

What it is not for: it knows nothing of tasks, objects ids, the store or the GCS; the
node manager decides what the messages mean and where the bytes live. It is imported
only in multi-node mode (it initialises MPI on import); single-node code paths never
import it. A transport is used from one thread only (its progress thread waits only on
its own receive).

Each channel and the object data travel on their own duplicate of the communicator, so
message tags and transfer tags can never match each other's receives.

Fault tolerance (`fault_tolerant=True`, Open MPI's ULFM: `mpiexec --with-ft ulfm`): every
communicator returns errors instead of aborting, and an MPI error in a pass over what is
outstanding means a peer may be gone. The transport then acknowledges the failures
(Ack_failed, so receives from any source work again), learns which ranks died
(Get_failed), and forgets everything it had with them: sends to them are dropped (now and
later), messages from them no longer arrive, transfers with them end (`lost`, taken by
`take_lost`). The communicators are neither revoked nor shrunk: a rank's number is its
node's id everywhere (object and task ids carry it), so the survivors keep talking on the
same ones. What the loss means is the node manager's business (cluster.py).

Messages to one peer on one channel have at most `_SENDS_IN_FLIGHT` MPI sends
outstanding; while that many are, later messages wait in a queue and leave together as
one MPI message (a list) once one completes. A rank that forwards thousands of tasks to
a slow peer thus keeps a few requests to test instead of tens of thousands (testing them
all on every poll made the rank quadratically slow), and the peer gets fewer, larger
messages. A message to an idle peer still leaves at once.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable

from mpi4py import MPI

from hpcray.runtime import hops

CHANNELS = ("control", "gcs")
log = logging.getLogger("hpcray.transport")

# Measured with benchmarks/transfer_bandwidth.py (PyPI MPICH 5.0.2, two ranks on one
# 2-core host, which copies with process_vm_readv): 8 MiB chunks with 4 in flight reach
# 0.92-1.0 of one raw Send/Recv for 100 MB and 1 GB. Chunks of 2-32 MiB and windows of
# 2-8 all measured within the noise of that shared machine; larger chunks only delay
# the first byte, smaller ones add Python work per chunk.
DEFAULT_CHUNK_BYTES = 8 << 20
DEFAULT_WINDOW = 4

_MESSAGE_TAG = 0
_SENDS_IN_FLIGHT = 4        # per peer and channel; more messages wait and go as one
_MAX_BATCH = 4096           # messages in one MPI message at most
_MIN_IDLE_SLEEP = 50e-6
_MAX_REQUESTS = 64          # chunks of one transfer in flight at most (small segments)
# While a transfer is outstanding its chunks move only while someone calls into MPI, so
# the idle back-off stops growing at this (about 3% of a core in Iprobe/Test).
_BUSY_MAX_SLEEP = 200e-6

# Buffers of requests that `close` had to abandon (a peer that never received or sent):
# MPI may still touch them, so they live as long as the process.
_abandoned_buffers: list = []


def _free_quietly(request) -> None:
    """Free a request with a dead peer (ULFM may have completed it with an error)."""
    try:
        request.Free()
    except MPI.Exception:
        pass


def _byte_view(buffer, writable: bool) -> memoryview:
    """`buffer` as a flat memoryview of bytes (no copy)."""
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise ValueError("a transfer buffer must be C-contiguous")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    if writable and view.readonly:
        raise ValueError("the destination of a transfer must be writable")
    return view


def _byte_views(buffers, writable: bool) -> list:
    """One buffer or a list of them (segments) as a list of flat byte views."""
    if isinstance(buffers, list):
        return [_byte_view(buffer, writable) for buffer in buffers]
    return [_byte_view(buffers, writable)]


# Sends of store objects to a rank on this host go through staging buffers when MPI
# copies with CMA (process_vm_readv). The store's pages are 4 KiB tmpfs pages (shared
# memory gets no transparent huge pages unless the host enables shmem_enabled), and the
# receiver's process_vm_readv pins the sender's pages one by one: it spent 11-13 ms of
# CPU per 64 MiB read from /dev/shm pages against 4.2 ms from huge-page anonymous memory
# (getrusage, receiver side). Copying each chunk first into an anonymous buffer advised
# MADV_HUGEPAGE costs the sender ~4 ms per 64 MiB, on its own core, pipelined with the
# receiver's reads. Without CMA MPICH copies through its shared cells (the sender's copy
# is then the cell copy) and staging would only add one.
_STAGE_MIN_CHUNK = 1 << 20    # smaller chunks go as they are (latency first)
# Nor are objects under this staged: on kernel 6.18 (2026-12-06) CMA from tmpfs pages ran
# at 0.8 of CMA from huge pages (raw MPI, 64 MiB: 11.5 against 9.5 ms), and a staged 8 or
# 16 MiB get was 1.2-1.3x slower than an unstaged one (its first chunk is copied whole
# before a byte moves); from 32 MiB on the two were even, within the noise.
_STAGE_MIN_SEGMENT = 32 << 20
_STAGE_BUFFERS = 4            # per rank: a window of chunks (32 MiB of 8 MiB chunks)
_HUGE_PAGE = 2 << 20
# One thread copies 4 KiB tmpfs pages at ~10 GB/s, below what CMA reads from huge pages;
# where the host has cores to spare the copy of a chunk is split over a few threads.
_STAGE_SLICE_MIN = 2 << 20    # no slice smaller than this
_STAGE_THREADS_MAX = 4


def stage_threads(ranks_on_host: int, environ=os.environ) -> int:
    """Threads that copy a chunk into a staging buffer: HPCRAY_STAGE_THREADS, else the
    host's cores per rank on it, less the node's own thread, 1 to _STAGE_THREADS_MAX."""
    chosen = environ.get("HPCRAY_STAGE_THREADS", "").strip()
    if chosen:
        return max(1, int(chosen))
    cores = len(os.sched_getaffinity(0))
    return max(1, min(_STAGE_THREADS_MAX, cores // max(1, ranks_on_host) - 1))


def _ranks_on_this_host(base) -> frozenset:
    """The ranks of `base` on this host (collective over `base`, as its Dups are)."""
    local = base.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        group, base_group = local.Get_group(), base.Get_group()
        ranks = MPI.Group.Translate_ranks(group, list(range(local.Get_size())), base_group)
        group.Free()
        base_group.Free()
    finally:
        local.Free()
    return frozenset(ranks)


def _cma_enabled(vendor: str | None = None, environ=os.environ) -> bool:
    """Whether this MPI copies between ranks of a host in one copy, the receiver reading
    the sender's memory (CMA, or XPMEM/KNEM in Open MPI), as MPICH and Open MPI do by
    default: then a chunk moves with the receiver's MPI calls alone. Told by the setting
    that turns it off: MPICH's MPIR_CVAR_CH4_CMA_ENABLE, Open MPI's `smsc` components
    (5.x) or its shared-memory BTL's single-copy mechanism (4.x) and BTL list."""
    if (vendor or MPI.get_vendor()[0]) == "Open MPI":
        return _open_mpi_single_copy(environ)
    value = environ.get("MPIR_CVAR_CH4_CMA_ENABLE", "1").strip().lower()
    return value not in ("0", "no", "false", "off")


def _single_copy_components() -> set[str]:
    """Open MPI's single-copy components this host can run: CMA always (Linux), XPMEM and
    KNEM where their kernel modules are loaded."""
    return {"cma"} | {name for name in ("xpmem", "knem") if os.path.exists("/dev/" + name)}


def _open_mpi_single_copy(environ) -> bool:
    """Whether Open MPI's parameters (as OMPI_MCA_* variables: `mpiexec --mca` sets
    them too) leave its shared-memory BTL a single-copy mechanism. Not read: a site's
    openmpi-mca-params.conf (taken wrongly, a transfer still ends, only more slowly)."""
    def selection(name: str) -> tuple[bool, set[str]] | None:
        value = environ.get("OMPI_MCA_" + name, "").replace(" ", "").lower()
        if not value:
            return None
        return value.startswith("^"), set(value.lstrip("^").split(","))

    for name in ("btl_sm_single_copy_mechanism", "btl_vader_single_copy_mechanism"):
        if environ.get("OMPI_MCA_" + name, "").strip().lower() == "none":
            return False
    btl = selection("btl")
    if btl is not None:
        excluded, names = btl
        if bool(names & {"sm", "vader"}) == excluded:
            return False  # no shared-memory BTL: every byte goes through another one
    smsc = selection("smsc")
    if smsc is not None:
        excluded, names = smsc
        available = _single_copy_components()
        return bool(available - names if excluded else available & names)
    return True


class _Staging:
    """A rank's staging buffers for sends (see _STAGE_MIN_CHUNK): made on first use,
    kept for the transport's life. `copy_in` returns None when every one is in flight;
    that chunk is then sent from where it is."""

    def __init__(self, chunk_bytes: int, count: int, threads: int = 1) -> None:
        self.chunk_bytes = chunk_bytes
        self._count = count
        self._free: list = []
        self._made = 0
        self._threads = threads
        self._pool = None  # made on the first chunk worth splitting

    def copy_in(self, chunk: memoryview):
        """A staging buffer holding `chunk` at its start, or None (none free)."""
        if len(chunk) > self.chunk_bytes:
            return None
        buffer = self._take()
        if buffer is not None:
            self._copy(MPI.buffer(buffer).address, MPI.buffer(chunk).address, len(chunk))
        return buffer

    def _copy(self, dst: int, src: int, nbytes: int) -> None:
        # ctypes.memmove releases the GIL: the driver thread (and the other slices' threads)
        # go on meanwhile
        parts = min(self._threads, nbytes // _STAGE_SLICE_MIN)
        if parts <= 1:
            ctypes.memmove(dst, src, nbytes)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(self._threads - 1, "hpcray-stage")
        step = -(-nbytes // parts) + 4095 & ~4095  # whole pages per slice
        slices = [self._pool.submit(ctypes.memmove, dst + at, src + at, min(step, nbytes - at))
                  for at in range(step, nbytes, step)]
        ctypes.memmove(dst, src, min(step, nbytes))
        for done in slices:
            done.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def give_back(self, buffer: memoryview) -> None:
        self._free.append(buffer)

    def _take(self):
        if self._free:
            return self._free.pop()
        if self._made >= self._count:
            return None
        # Private (a shared anonymous mapping is tmpfs again) and 2 MiB-aligned, so that
        # transparent huge pages can back all of it.
        area = mmap.mmap(-1, self.chunk_bytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE)
        start = -MPI.buffer(area).address % _HUGE_PAGE
        try:
            area.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):  # no THP here: still one copy, fewer pins
            pass
        self._made += 1
        return memoryview(area)[start:start + self.chunk_bytes]


class _Chunk:
    """One posted piece of a transfer: its request and the bytes it covers. `done` is
    set by whoever saw the request complete: the transport's thread (Testsome) or, for
    a chunk `handed` to it, the progress thread."""

    __slots__ = ("request", "nbytes", "segment", "start", "staged", "wakes", "done",
                 "handed")

    def __init__(self, request, nbytes: int, segment: int, start: int, staged,
                 wakes: bool) -> None:
        self.request = request
        self.nbytes = nbytes
        self.segment = segment
        self.start = start
        self.staged = staged  # a send's staging buffer, or None
        self.wakes = wakes    # its end is news for the event loop (see _Progress)
        self.done = False
        self.handed = False


class Transfer:
    """One half (send or receive) of an object transfer with one peer.

    A transfer moves one buffer, or several (`segments`: the objects of one batched
    pull, each straight from or into its own buffer); both sides list the same sizes in
    the same order. `done` turns true when every chunk has completed on this side;
    `on_done` (if any) is then called once, from the next `poll` or `progress` of the
    transport.

    A send may have a `gate(segment, end)`: a chunk is posted only once it says true
    for that chunk (a relay sends an object on as its own receive brings it in,
    relay.py); the sizes and order of the chunks stay the same.

    With a `_watcher` (the progress thread, see _Progress) the large chunks posted are
    handed to it: it waits on their requests and marks them done.
    """

    __slots__ = ("tag", "peer", "nbytes", "done", "on_done", "is_send",
                 "_comm", "_views", "_chunk_bytes", "_window", "_segment", "_next_offset",
                 "_chunks_left", "_chunks", "_tested", "_requests", "_handed", "_sizes",
                 "_gate", "_staging", "_unposted", "stages", "_watcher")

    def __init__(self, comm, peer: int, tag: int, views: list, is_send: bool,
                 chunk_bytes: int, window: int, on_done: Callable[[], None] | None,
                 gate: Callable[[int, int], bool] | None = None,
                 staging: _Staging | None = None):
        self.tag = tag
        self.peer = peer
        self._sizes = [len(view) for view in views]
        self.nbytes = sum(self._sizes)
        self._gate = gate
        self.done = False
        self.on_done = on_done
        self.is_send = is_send
        self._comm = comm
        self._views = views
        self._chunk_bytes = chunk_bytes
        self._window = window
        self._segment = 0
        self._next_offset = 0
        # A zero-length segment still travels as one empty message, so that a sender
        # and a receiver that disagree on the size get a truncation error instead of a
        # hang on one side.
        self._chunks_left = sum(max(1, math.ceil(len(view) / chunk_bytes)) for view in views)
        self._unposted = self.nbytes  # bytes of chunks not posted yet
        self._chunks: list[_Chunk] = []  # posted and not seen complete, in order
        self._tested: list[_Chunk] = []  # ... of those, the ones this side tests
        self._requests: list = []        # ... and their requests (for Testsome)
        self._handed: list[_Chunk] = []  # ... and those handed to the progress thread
        self._staging = staging      # a send's chunks are copied through it (see _Staging)
        # a send whose large chunks are staged: this rank copies, its peer reads with CMA
        self.stages = staging is not None and any(size >= _STAGE_MIN_SEGMENT
                                                  for size in self._sizes)
        self._watcher: _Progress | None = None  # set by the transport (_watcher_for)

    def __repr__(self) -> str:
        kind = "send to" if self.is_send else "receive from"
        state = "done" if self.done else f"{self._chunks_left} chunks left"
        return f"<Transfer {kind} {self.peer} tag {self.tag}, {self.nbytes} B, {state}>"

    def _post_chunks(self) -> None:
        # Chunks share one tag: MPI matches messages with the same source, tag and
        # communicator in the order they were sent, so chunk i lands in receive i. The
        # window is in bytes (`window` full chunks), so many small segments pipeline
        # too, up to _MAX_REQUESTS messages at once.
        budget = self._window * self._chunk_bytes - sum(c.nbytes for c in self._chunks)
        posted: list[_Chunk] = []
        in_flight = len(self._chunks)
        while self._chunks_left and in_flight < _MAX_REQUESTS:
            view = self._views[self._segment]
            start = self._next_offset
            end = min(start + self._chunk_bytes, len(view))
            if in_flight and end - start > budget:
                break
            if self._gate is not None and not self._gate(self._segment, end):
                break
            chunk = view[start:end]
            staged = None
            if self.is_send:
                if self._staging is not None and end - start >= _STAGE_MIN_CHUNK and \
                        len(view) >= _STAGE_MIN_SEGMENT:
                    staged = self._staging.copy_in(chunk)
                    if staged is not None:
                        chunk = staged[:end - start]
                request = self._comm.Isend([chunk, MPI.BYTE], self.peer, self.tag)
            else:
                request = self._comm.Irecv([chunk, MPI.BYTE], self.peer, self.tag)
            self._chunks_left -= 1
            # the loop wants to hear of a receive's end, and of room for more chunks
            wakes = bool(self._chunks_left) or not self.is_send
            posted.append(_Chunk(request, end - start, self._segment, start, staged, wakes))
            in_flight += 1
            budget -= end - start
            self._unposted -= end - start
            if end >= len(view):
                self._segment += 1
                self._next_offset = 0
            else:
                self._next_offset = end
        if posted:
            self._chunks += posted
            self._take_in(posted)

    def _take_in(self, chunks: list[_Chunk]) -> None:
        """Hand `chunks` to the progress thread where it takes them; test the rest."""
        if self._watcher is not None and self._watcher.hand(chunks):
            for chunk in chunks:
                if chunk.handed:
                    self._handed.append(chunk)
                else:
                    self._tested.append(chunk)
                    self._requests.append(chunk.request)
        else:
            self._tested += chunks
            self._requests += [c.request for c in chunks]

    @property
    def bytes_left(self) -> int:
        """Bytes of this side's chunks that have not completed."""
        return self._unposted + sum(c.nbytes for c in self._chunks if not c.done)

    @property
    def watched(self) -> bool:
        """Every chunk in flight is the progress thread's: it tells when one ends."""
        return bool(self._handed) and not self._tested

    def segment_received(self, index: int) -> int:
        """Bytes of segment `index` that have arrived, from its start without a gap (a
        receive; chunks are posted in order, so they end where the oldest still
        outstanding one begins)."""
        if self.done:
            return self._sizes[index]
        if self._views is None:
            return 0  # ended with its peer (or never posted: a dead one)
        oldest = next((c for c in self._chunks if not c.done), None)
        segment, start = (oldest.segment, oldest.start) if oldest is not None else \
            (self._segment, self._next_offset)
        if segment != index:
            return self._sizes[index] if segment > index else 0
        return start

    def _advance(self) -> bool:
        """Test the chunks in flight and post the next ones; true if any completed."""
        posted = False
        if self._gate is not None and self._chunks_left and \
                len(self._chunks) < _MAX_REQUESTS:
            before = len(self._chunks)  # the gate may have opened since the last pass
            self._post_chunks()
            posted = len(self._chunks) > before
        completed = MPI.Request.Testsome(self._requests) if self._requests else None
        if completed:
            for index in completed:
                self._tested[index].done = True
            self._tested = [c for c in self._tested if not c.done]
            self._requests = [c.request for c in self._tested]
        if any(chunk.done for chunk in self._handed):  # (the thread marks them)
            self._handed = [c for c in self._handed if not c.done]
        elif not completed:
            return posted
        still = []
        for chunk in self._chunks:
            if not chunk.done:
                still.append(chunk)
            elif chunk.staged is not None:
                self._staging.give_back(chunk.staged)
        self._chunks = still
        self._post_chunks()
        if not self._chunks and not self._chunks_left:
            self.done = True
            self._views = None
            self._gate = None
            if hops.ENABLED:
                hops.stamp("send.complete" if self.is_send else "recv.complete")
        return True

    def _abandon(self) -> None:
        """Withdraw every chunk in flight (cancel receives, free sends)."""
        if self._handed:
            self._watcher.take_back(self._handed)
        outstanding = [c for c in self._chunks if not c.done]
        for chunk in outstanding:
            if self.is_send:
                chunk.request.Free()  # cancelling a send is deprecated and may never return
            else:
                chunk.request.Cancel()
                chunk.request.Wait()
        if outstanding and self.is_send:
            _abandoned_buffers.append(self._views)
            _abandoned_buffers.append([c.staged for c in outstanding])  # MPI may read them
        self._chunks, self._tested, self._requests, self._handed = [], [], [], []
        self._views = None
        self._gate = None


# The progress thread starts with a transfer of this size or more, or with a peer that
# does not copy with CMA; a smaller one to a CMA peer gets it only if still running after
# _PROGRESS_SMALL_AFTER seconds (with CMA a 1 MB copy is done by then, and waking the
# thread costs a 1 MB transfer ~30 µs on a busy 2-core host).
_PROGRESS_NOW_BYTES = 2 << 20
_PROGRESS_SMALL_AFTER = 100e-6
# A transfer under _PROGRESS_NOW_BYTES ends within a poll or two of both sides (a CMA
# copy of ~50 us for 1 MiB; without CMA both must call MPI while it moves): for its first
# _EXPECT_FOR seconds both event loops poll every few tens of microseconds (`expecting`,
# cluster.py). Sleeps of 100-200 us cost the receiver of a remote get of 1 MiB ~250 us of
# its ~650 (wake-ups on a loaded 2-core host), and the sender waited in 1 ms epolls.
_EXPECT_FOR = 0.002
# The progress thread waits on chunks of this size or more (`hand`); the event loop tests
# smaller ones itself (each handed chunk costs the thread a return from MPI and the GIL:
# 10,000 objects of 200 KB pulled in one get read 5-20% slower handed). Chunks up to
# _EAGER_MAX_BYTES go as one message into MPICH's shared cells and need no one's progress.
_HAND_MIN_BYTES = 1 << 20
_EAGER_MAX_BYTES = 64 << 10


class _Progress:
    """A thread that keeps MPI progressing while object transfers are outstanding (see
    the module docstring), in one of two ways:

    - Transfers with a rank that does not copy with CMA (another host, or ptrace
      forbidden) hand it the chunks they post (`hand`, between `on()` and `off()`): it
      waits in MPI_Waitsome on their requests, marks those that complete done, and calls
      `on_chunks_done` (from this thread) when a receive's chunk ended or a transfer has
      room for more, so that the event loop wakes for them instead of polling for them.
      MPICH moved 64 MiB without CMA in 10.2-10.6 ms (raw Send/Recv: 11.2) for a thread
      waiting on the receive's request, in 16-22 ms for one waiting on a receive from
      itself (the other way, below), and in 13-15 ms when another thread also tested the
      request every 200 us (mpi4py alone, 2 ranks on this 2-core VM). Chunks under
      _HAND_MIN_BYTES stay the caller's to test; once a transfer has a chunk above
      _EAGER_MAX_BYTES the thread also waits in MPI between its chunks and after them,
      until `off()` (see `hand`).
    - For transfers with a CMA peer, `spin()`: it waits on a receive from itself (its
      poke) alone until `off()`, and the event loop tests the chunks (the copy runs in
      whichever MPI call finds the sender's notice). Handing those chunks to it made
      1 MiB gets 0.15 ms slower: its wake-up came later than the loop's own polls.

    New chunks are taken in when one of those it waits on completes: its wait is not
    interrupted for them, because while it spins in MPI any MPI call of another thread
    can wait milliseconds for MPICH's lock (a receive posted just after the thread began
    its wait: 3.5 ms). Only a spin, `take_back`, `off` after a spin and `close`
    interrupt it, by completing the poke with a matching empty send; every poke it posts
    gets exactly one send (the lock pairs them; a poke whose send came while the thread
    was not waiting is completed before it sleeps). A handed chunk is the thread's until
    it completes or `take_back` returns; with nothing to wait on (after `off`) it sleeps
    on an Event."""

    def __init__(self, on_chunks_done: Callable[[], None] | None = None) -> None:
        self._comm = MPI.COMM_SELF.Dup()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # `_waits_on` was cleared
        self._work = threading.Event()  # chunks were handed, or the thread must end
        self._on = False    # chunks are handed to it
        self._spin = False  # it waits even with none handed (see `spin`)
        self._waiting = False  # a poke is posted and no send has answered it yet
        self._closing = False
        self._thread: threading.Thread | None = None
        self._handed: list[_Chunk] = []
        self._waits_on: list[_Chunk] | None = None  # the chunks inside the thread's wait
        self.on_chunks_done = on_chunks_done

    def on(self) -> None:
        if hops.ENABLED:
            hops.stamp("progress.on")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hpcray-mpi-progress",
                                            daemon=True)
            self._thread.start()
        self._on = True

    def spin(self) -> None:
        """Wait in MPI until `off()`, also with no chunk handed (the caller tests its
        chunks)."""
        self.on()
        with self._lock:
            self._spin = True
            self._work.set()

    def is_on(self) -> bool:
        return self._on

    def off(self) -> None:
        """No transfer is outstanding: chunks are no longer handed, and the thread, with
        none left, sleeps."""
        with self._lock:
            self._on = False
            if self._spin:
                self._spin = False
                self._release()

    def hand(self, chunks: list[_Chunk]) -> bool:
        """Wait on those of these chunks' requests that are large enough (`handed`
        says which), if on; the caller tests the others. False: none was taken."""
        with self._lock:
            if self._closing or not self._on:
                return False
            large = [chunk for chunk in chunks if chunk.nbytes >= _HAND_MIN_BYTES]
            for chunk in large:
                chunk.handed = True
            self._handed.extend(large)
            if not self._spin and any(chunk.nbytes > _EAGER_MAX_BYTES for chunk in chunks):
                # It waits in MPI until `off`, also once the chunks it holds have ended:
                # for the smaller ones the caller tests, and because a thread that slept
                # once its last chunk ended made a 1 MiB get's receive step 284-319 us
                # against 227-236 (without CMA, hop A/Bs, 2026-12-07)
                self._spin = True
            self._work.set()
            if large and self._waits_on == []:  # a spin: it takes them in now
                self._release()
            return bool(large)

    def take_back(self, chunks: list[_Chunk]) -> None:
        """Stop waiting on `chunks` (a transfer being withdrawn); returns once the thread
        no longer waits on any of them. Those that completed meanwhile are `done`."""
        with self._changed:
            self._handed = [c for c in self._handed if c not in chunks]
            for chunk in chunks:
                chunk.handed = False
            while self._waits_on is not None and any(c in self._waits_on for c in chunks):
                self._release()
                self._changed.wait()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._work.set()
            self._release()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._comm.Free()

    def _release(self) -> None:
        if self._waiting:
            self._waiting = False
            self._comm.Send([b"", MPI.BYTE], 0, 0)

    def _run(self) -> None:
        poke = None
        while True:
            self._work.wait()
            with self._lock:
                if self._closing:
                    if poke is not None:
                        poke.Wait()  # answered by close()
                    return
                if not self._handed and not self._spin:
                    if poke is not None and not self._waiting:
                        poke.Wait()  # its send came (off): done now, not at the next wait
                        poke = None
                    self._work.clear()
                    continue
                if poke is None:
                    poke = self._comm.Irecv([bytearray(0), MPI.BYTE], 0, 0)
                    self._waiting = True
                chunks = self._waits_on = list(self._handed)
            # GIL released; MPI progresses every outstanding request meanwhile
            if hops.ENABLED:
                hops.stamp("thread.wait")
            if chunks:
                completed = MPI.Request.Waitsome([poke] + [c.request for c in chunks]) or ()
            else:  # a spin
                poke.Wait()
                completed = (0,)
            if hops.ENABLED:
                hops.stamp("thread.woke")
            ended = [chunks[i - 1] for i in completed if i]
            with self._changed:
                self._waits_on = None
                self._changed.notify_all()
                if 0 in completed:
                    poke = None
                for chunk in ended:
                    chunk.done = True
                if ended:
                    self._handed = [c for c in self._handed if not c.done]
            if any(chunk.wakes for chunk in ended) and self.on_chunks_done is not None:
                self.on_chunks_done()


class MpiTransport:
    """Messages and object transfers between the ranks of one communicator.

    `chunk_bytes` and `window` must be the same on every rank: a receiver posts its
    receives in chunks of the size the sender sends.
    """

    needs_polling = True  # MPI messages arrive unannounced

    def __init__(self, comm=None, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 window: int = DEFAULT_WINDOW, fault_tolerant: bool = False):
        if chunk_bytes < 1 or window < 1:
            raise ValueError("chunk_bytes and window must be positive")
        base = MPI.COMM_WORLD if comm is None else comm
        self.rank: int = base.Get_rank()
        self.size: int = base.Get_size()
        self.chunk_bytes = chunk_bytes
        self.window = window
        self._channel_comms = {channel: base.Dup() for channel in CHANNELS}
        self._data_comm = base.Dup()
        # The ranks that copy from this one's memory themselves (CMA on this host): a
        # transfer with any other moves only while both sides are inside MPI
        self._cma_peers = _ranks_on_this_host(base) if _cma_enabled() else frozenset()
        self._staging = _Staging(chunk_bytes, _STAGE_BUFFERS,
                                 stage_threads(len(self._cma_peers) or 1))
        self._stage_peers = self._peers_to_stage_for(base.Get_size())
        self._tag_ub: int = MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)
        self._status = MPI.Status()
        # Per (peer, channel): MPI sends not yet complete with the pickles they read
        # from, and the messages waiting for one of them to complete.
        self._in_flight: dict[tuple[int, str], list] = {}
        self._queued: dict[tuple[int, str], deque] = {}
        self._corked = False
        self._corked_keys: list = []
        # Called with the destination after messages were posted to it (host_wakes.py).
        self.on_post = None
        # Messages matched but not yet fully received, in the order MPI matched them:
        # (source, channel, request, buffer).
        self._arriving: list = []
        self._inbox: list[tuple[int, str, object]] = []
        self._transfers: list[Transfer] = []
        self._receive_tags: set[int] = set()
        self._next_tag = 1
        self._finished_transfers: list[Transfer] = []
        self._progress = _Progress(self._chunks_done)
        # Called from the progress thread when chunks it waited on completed (the event
        # loop's wake-up; without one the loop's own polls find them).
        self.on_chunks_done: Callable[[], None] | None = None
        self._progress_from = 0.0  # small transfers get the progress thread from then on
        self._expect_until = 0.0   # `expecting` until then (a small transfer started)
        self._idle_sleep = _MIN_IDLE_SLEEP
        self._closed = False
        self.fault_tolerant = fault_tolerant
        self.dead: set[int] = set()   # ranks known gone (fault-tolerant mode only)
        self._lost_ranks: list[int] = []
        self._lost_transfers: list[Transfer] = []
        self._failure_logged = 0.0
        if fault_tolerant:
            for comm in self._comms():
                comm.Set_errhandler(MPI.ERRORS_RETURN)

    # ------------------------------------------------------------------ messages

    def send(self, dest: int, message, channel: str = "control") -> None:
        """Send `message` (pickled) to rank `dest`; returns at once, never blocks."""
        self._channel_comm(channel)  # checks the name
        if dest in self.dead:
            return
        key = (dest, channel)
        queued = self._queued.get(key)
        if queued:
            queued.append(message)
        elif not self._corked and len(self._in_flight.get(key, ())) < _SENDS_IN_FLIGHT:
            self._post(key, [message])
        else:
            self._queued[key] = deque((message,))
            if self._corked:
                self._corked_keys.append(key)

    def cork(self) -> None:
        """Hold back what `send` is given until `uncork`, which posts it as one MPI
        message per peer and channel: the node's event loop corks each pass, so the
        tasks a pass places on a node, or the results it reports, travel together (one
        probe, receive and unpickle on the other side, not one per task)."""
        self._corked = True

    @property
    def corked(self) -> bool:
        return self._corked

    def uncork(self) -> None:
        self._corked = False
        keys, self._corked_keys = self._corked_keys, []
        for key in keys:
            if key in self._queued and len(self._in_flight.get(key, ())) < _SENDS_IN_FLIGHT:
                self._post_queued(key, limit=len(self._in_flight.get(key, ())) + 1)
        if keys:  # small sends complete at once (eager): not `busy` through the next wait,
            self._progress_sends()  # which would then be a slow one (poll_slowly)

    def broadcast(self, message, channel: str = "control") -> None:
        """Send `message` to every rank but this one."""
        for dest in range(self.size):
            if dest != self.rank and dest not in self.dead:
                self.send(dest, message, channel)

    def live_ranks(self) -> list[int]:
        """Every rank not known dead, this one included."""
        return [rank for rank in range(self.size) if rank not in self.dead]

    def take_lost(self) -> tuple[list[int], list[Transfer]]:
        """Ranks found dead since the last call, and the receives from them that will
        never complete (their `dest` buffers are free again); fault-tolerant mode."""
        ranks, self._lost_ranks = self._lost_ranks, []
        transfers, self._lost_transfers = self._lost_transfers, []
        return ranks, transfers

    def _post(self, key: tuple[int, str], messages: list) -> None:
        payload = pickle.dumps(messages, protocol=5)
        request = self._channel_comms[key[1]].Isend([payload, MPI.BYTE], key[0], _MESSAGE_TAG)
        in_flight = self._in_flight.get(key)
        if in_flight is None:
            in_flight = self._in_flight[key] = []
        in_flight.append((request, payload))
        if self.on_post is not None:
            self.on_post(key[0])

    def _post_queued(self, key: tuple[int, str], limit: int = _SENDS_IN_FLIGHT) -> None:
        queued = self._queued.get(key)
        while queued and len(self._in_flight.get(key, ())) < limit:
            count = min(len(queued), _MAX_BATCH)
            self._post(key, [queued.popleft() for _ in range(count)])
        if queued is not None and not queued:
            del self._queued[key]

    def poll(self) -> list[tuple[int, str, object]]:
        """Progress sends and transfers, and return every message that has arrived.

        Returns ``[(source, channel, message), ...]``, in the order each source sent
        them on each channel. Transfers that completed get their `on_done` called here
        (see `progress`). Never blocks.
        """
        self.progress()
        messages, self._inbox = self._inbox, []
        if messages:  # activity: the next wait_for_activity starts from short sleeps
            self._idle_sleep = _MIN_IDLE_SLEEP
        return messages

    def wait_for_activity(self, max_sleep: float, timeout: float | None = None) -> bool:
        """Sleep until `poll` would return a message or a transfer or send progressed.

        For a loop with nothing else to wait on. It polls MPI between sleeps that start
        at 50 us and double up to `max_sleep` (up to 200 us while a transfer is
        outstanding); the back-off carries over from one call to the next and starts
        again from 50 us after any activity, so an idle rank wakes about 1/max_sleep
        times a second. Returns True on activity, False when `timeout` seconds passed
        without any (None: no limit).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._advance() or self._inbox or self._finished_transfers:
                self._idle_sleep = _MIN_IDLE_SLEEP
                return True
            sleep = min(self._idle_sleep, max_sleep)
            if self._transfers:
                sleep = min(sleep, _BUSY_MAX_SLEEP)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                sleep = min(sleep, remaining)
            time.sleep(sleep)
            self._idle_sleep = min(self._idle_sleep * 2, max(max_sleep, _MIN_IDLE_SLEEP))

    # ------------------------------------------------------------------ transfers

    def new_transfer_tag(self) -> int:
        """A tag that none of this rank's outstanding receives uses (1..MPI.TAG_UB)."""
        for _ in range(len(self._receive_tags) + 1):
            tag = self._next_tag
            self._next_tag = tag % self._tag_ub + 1
            if tag not in self._receive_tags:
                return tag
        raise RuntimeError("no free transfer tag")  # unreachable: the loop has one spare

    def start_receive(self, source: int, tag: int, dest) -> Transfer:
        """Receive the object that rank `source` sends with `tag` straight into `dest`.

        `dest` is a writable, C-contiguous buffer of exactly the object's size, or a
        list of them (the segments the sender lists in the same order). It must stay
        alive and untouched until the transfer is done.
        """
        if tag in self._receive_tags:
            raise ValueError(f"tag {tag} is already used by an outstanding receive")
        if not 0 <= tag <= self._tag_ub:
            raise ValueError(f"tag {tag} is outside 0..{self._tag_ub}")
        if source in self.dead:  # it never comes: reported lost at the next take_lost
            transfer = Transfer.__new__(Transfer)
            transfer.tag, transfer.peer, transfer.is_send, transfer.done = tag, source, False, False
            transfer.nbytes, transfer.on_done, transfer._chunks = 0, None, []
            transfer._tested, transfer._requests, transfer._handed = [], [], []
            transfer._views, transfer.stages = None, False
            self._lost_transfers.append(transfer)
            return transfer
        transfer = Transfer(self._data_comm, source, tag, _byte_views(dest, writable=True),
                            False, self.chunk_bytes, self.window, None)
        self._receive_tags.add(tag)
        self._add_transfer(transfer)
        return transfer

    def start_send(self, dest: int, tag: int, src,
                   on_done: Callable[[], None] | None = None,
                   gate: Callable[[int, int], bool] | None = None,
                   stage: bool = False) -> Transfer:
        """Send the bytes of `src` (read-only is fine; or a list of segments) to rank
        `dest`, which asked with `tag`.

        The transfer keeps a view of `src`, so its memory stays alive until the transfer
        is done; `on_done()` is then called from `poll` or `progress`. With a `gate`,
        the chunk of segment s ending at byte e is sent once `gate(s, e)` is true
        (asked again at every pass over the transfers until it is). `stage`: `src` is
        in shared memory of 4 KiB pages (the object store, a mapped file): large chunks
        go through this rank's staging buffers where that is faster (_Staging).
        """
        if dest in self.dead:
            raise ValueError(f"rank {dest} is dead")
        staging = self._staging if stage and dest in self._stage_peers else None
        transfer = Transfer(self._data_comm, dest, tag, _byte_views(src, writable=False),
                            True, self.chunk_bytes, self.window, on_done, gate, staging)
        self._add_transfer(transfer)
        return transfer

    def _add_transfer(self, transfer: Transfer) -> None:
        self._transfers.append(transfer)
        transfer._watcher = self._watcher_for(transfer)
        if transfer.stages:
            # No progress thread for it: its peer's CMA reads need nothing of this rank's
            # MPI, and the thread's spin took the core the staging copies run on (64
            # and 256 MiB gets 7-10% faster without it on 2 cores)
            transfer._post_chunks()
        elif transfer._watcher is not None:
            # (without CMA a 1 MiB remote get took 1.1-4 ms, 0.6-0.7 ms with the thread
            # at once)
            self._progress.on()
            transfer._post_chunks()  # (after `on`: its chunks go to the thread)
        elif transfer.nbytes >= _PROGRESS_NOW_BYTES or transfer.peer not in self._cma_peers:
            transfer._post_chunks()
            self._progress.spin()  # (after posting: a spin holds up others' MPI calls)
        else:  # with CMA, waking the thread costs a small transfer more than the copy
            now = time.monotonic()
            if not self._progress.is_on():
                self._progress_from = now + _PROGRESS_SMALL_AFTER
            self._expect_until = now + _EXPECT_FOR
            transfer._post_chunks()

    def _watcher_for(self, transfer: Transfer) -> _Progress | None:
        """The progress thread, to which `transfer` hands its chunks while it runs, or
        None: not with a rank that copies with CMA (the loop's own polls run those
        copies and find their ends sooner than the thread's wake-up: handing them made
        1 and 8 MiB gets 0.1-0.15 ms slower), nor where a request may end in an error
        (fault-tolerant mode: a dead peer), which the thread's wait could not report."""
        if self.fault_tolerant or transfer.peer in self._cma_peers:
            return None
        return self._progress

    def _chunks_done(self) -> None:
        if self.on_chunks_done is not None:
            self.on_chunks_done()

    def cancel_receive(self, transfer: Transfer) -> None:
        """Withdraw a receive whose sender will never send (it no longer has the object):
        its posted chunks are cancelled, so `dest` may be reused once this returns."""
        if transfer in self._lost_transfers:
            self._lost_transfers.remove(transfer)
            return
        if transfer.peer in self.dead and transfer not in self._transfers:
            return  # already ended with its peer
        if transfer.is_send or transfer not in self._transfers:
            raise ValueError(f"{transfer!r} is not an outstanding receive")
        transfer._abandon()
        self._transfers.remove(transfer)
        self._receive_tags.discard(transfer.tag)
        if not self._transfers:
            self._progress.off()

    def progress(self) -> list[Transfer]:
        """Test what is outstanding; return the transfers that completed since last time.

        Each completed transfer is reported once, by whichever of `poll` and `progress`
        runs first after it completed (poll calls progress), and its `on_done` is
        called then.
        """
        self._advance()
        finished, self._finished_transfers = self._finished_transfers, []
        for transfer in finished:
            if transfer.on_done is not None:
                transfer.on_done()
        return finished

    @property
    def busy(self) -> bool:
        """True while sends, partly received messages or transfers are outstanding.

        A completed transfer whose `on_done` has not run yet (it runs in the next `poll`
        or `progress`) counts as outstanding, so `while t.busy: t.poll()` runs them all.
        """
        return bool(self._in_flight or self._queued or self._arriving or self._transfers
                    or self._finished_transfers)

    @property
    def expecting(self) -> bool:
        """True while a transfer under _PROGRESS_NOW_BYTES started less than _EXPECT_FOR
        ago is outstanding: its end is due within microseconds, so poll often."""
        return bool(self._transfers) and time.monotonic() < self._expect_until

    @property
    def has_messages(self) -> bool:
        """True when messages were taken in (by `progress`) that `poll` has not returned."""
        return bool(self._inbox)

    @property
    def poll_slowly(self) -> bool:
        """True while polling MPI every few tens of microseconds costs more than it
        gains (measured): this rank sends an object's bytes (that made 7+ MiB pulls
        5-10x slower, causes inside MPICH not found), or receives from a rank that does
        not copy with CMA and the progress thread waits on every chunk in flight (it
        wakes the loop when one ends) or more than a chunk's bytes are left (the polls
        contend with the thread's wait: 64 MiB 12% slower), or only messages are
        outstanding (as before transfers had a rule of their own: a rank sending bursts
        of messages would wake many times per millisecond for nothing). A slow poll is
        a 1 ms epoll tick, which a receive's end used to wait for: polled every 200 µs
        instead, a 2 MiB get went 1.3 -> 0.55 ms with CMA, 1.4-1.7 -> 0.8-0.9 ms
        without, and 8 MiB without CMA 2.4 -> 1.6 ms."""
        if self._transfers:
            return any(t.is_send or (t.peer not in self._cma_peers
                                     and (t.watched or t.bytes_left > self.chunk_bytes))
                       for t in self._transfers)
        return self.busy

    def close(self, drain_timeout: float = 1.0) -> None:
        """Release everything: the communicators and whatever is still outstanding.

        Sends of messages get up to `drain_timeout` seconds to complete first (a
        shutdown message should reach its peers); then receives are cancelled and sends
        abandoned. Messages that arrived but were not polled are dropped.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + drain_timeout
        for key in list(self._queued):
            self._post_queued(key, limit=1 << 30)
        while self._in_flight and time.monotonic() < deadline:
            self._progress_sends()
            if self._in_flight:
                time.sleep(_BUSY_MAX_SLEEP)
        for in_flight in self._in_flight.values():
            for request, payload in in_flight:
                request.Free()
                _abandoned_buffers.append(payload)
        self._in_flight = {}
        for _, _, request, buffer in self._arriving:
            request.Free()  # matched messages cannot be cancelled
            _abandoned_buffers.append(buffer)
        self._arriving = []
        for transfer in self._transfers:
            transfer._abandon()
        self._transfers = []
        self._receive_tags.clear()
        self._progress.close()
        self._staging.close()
        for comm in self._comms():
            comm.Free()

    # ------------------------------------------------------------------ internals

    def _channel_comm(self, channel: str):
        try:
            return self._channel_comms[channel]
        except KeyError:
            raise ValueError(f"unknown channel {channel!r}; use one of {CHANNELS}") from None

    def _peers_to_stage_for(self, size: int) -> frozenset:
        """The ranks whose receives read this rank's memory with CMA (_Staging).
        HPCRAY_STAGED_SENDS=0 stages for none, =1 for every rank."""
        forced = os.environ.get("HPCRAY_STAGED_SENDS", "")
        if forced == "0":
            return frozenset()
        if forced == "1":
            return frozenset(range(size))
        return self._cma_peers

    def _comms(self) -> tuple:
        return (*self._channel_comms.values(), self._data_comm)

    def _advance(self) -> bool:
        """One nonblocking pass over everything outstanding; true if anything moved."""
        if self._closed:
            raise RuntimeError("the transport is closed")
        if not self.fault_tolerant:
            return self._advance_once()
        try:
            return self._advance_once()
        except MPI.Exception as exc:
            return self._peers_failed(exc)

    def _peers_failed(self, exc) -> bool:
        """An MPI call failed: acknowledge the failures, learn which ranks are gone and
        forget what was outstanding with them. True if a rank was newly found dead."""
        failed: set[int] = set()
        for comm in self._comms():
            comm.Ack_failed()
            group = comm.Get_failed()
            try:
                failed.update(group.Translate_ranks(list(range(group.Get_size())),
                                                    comm.Get_group()))
            finally:
                group.Free()
        new = sorted(failed - self.dead - {self.rank})
        if not new:
            now = time.monotonic()
            if now - self._failure_logged > 10:  # an error that named no dead rank
                self._failure_logged = now
                log.warning("rank %d: MPI error with no failed rank: %s", self.rank, exc)
            return False
        self.dead.update(new)
        self._lost_ranks.extend(new)
        self._forget(set(new))
        return True

    def _forget(self, dead: set) -> None:
        for key in [key for key in self._in_flight if key[0] in dead]:
            for request, payload in self._in_flight.pop(key):
                _free_quietly(request)
                _abandoned_buffers.append(payload)
        for key in [key for key in self._queued if key[0] in dead]:
            del self._queued[key]
        still_arriving = []
        for entry in self._arriving:
            if entry[0] in dead:
                _free_quietly(entry[2])
                _abandoned_buffers.append(entry[3])
            else:
                still_arriving.append(entry)
        self._arriving = still_arriving
        self._inbox = [item for item in self._inbox if item[0] not in dead]
        still_running = []
        for transfer in self._transfers:
            if transfer.peer not in dead:
                still_running.append(transfer)
                continue
            for chunk in transfer._chunks:
                _free_quietly(chunk.request)
            if transfer.is_send and transfer._views is not None:
                _abandoned_buffers.append(transfer._views)
                _abandoned_buffers.append([c.staged for c in transfer._chunks])
            transfer._chunks, transfer._tested, transfer._requests = [], [], []
            transfer._handed = []  # (none: nothing is handed in fault-tolerant mode)
            transfer._views = None
            if transfer.is_send:
                if transfer.on_done is not None:  # lets go of what it sent from
                    self._finished_transfers.append(transfer)
            else:
                self._receive_tags.discard(transfer.tag)
                self._lost_transfers.append(transfer)
        self._transfers = still_running
        if not still_running:
            self._progress.off()

    def _advance_once(self) -> bool:
        moved = self._progress_sends()
        moved |= self._progress_transfers()
        moved |= self._receive_messages()
        return moved

    def _progress_sends(self) -> bool:
        moved = False
        for key, in_flight in list(self._in_flight.items()):
            completed = MPI.Request.Testsome([request for request, _ in in_flight])
            if not completed:
                continue
            moved = True
            finished = set(completed)
            in_flight[:] = [sent for i, sent in enumerate(in_flight) if i not in finished]
            if key in self._queued:
                self._post_queued(key)
            if not in_flight:
                del self._in_flight[key]
        return moved

    def _progress_transfers(self) -> bool:
        moved = False
        still_running = []
        for transfer in self._transfers:
            moved |= transfer._advance()
            if transfer.done:
                if not transfer.is_send:
                    self._receive_tags.discard(transfer.tag)
                self._finished_transfers.append(transfer)
            else:
                still_running.append(transfer)
        self._transfers = still_running
        if not still_running:
            if moved:
                self._progress.off()
        elif not self._progress.is_on() and time.monotonic() >= self._progress_from and \
                not all(transfer.stages for transfer in still_running):
            self._progress.spin()  # small transfers that CMA did not finish at once
        return moved

    def _receive_messages(self) -> bool:
        # Matched probes (Improbe + Imrecv) so a message is received by the request that
        # probed it; nonblocking receives so a large message never holds up the loop
        # while its sender is between polls.
        status = self._status
        for channel, comm in self._channel_comms.items():
            while True:
                message = comm.Improbe(MPI.ANY_SOURCE, _MESSAGE_TAG, status)
                if message is None:
                    break
                if hops.ENABLED:
                    hops.stamp("msg.matched")
                buffer = bytearray(status.Get_count(MPI.BYTE))
                request = message.Irecv([buffer, MPI.BYTE])
                self._arriving.append((status.Get_source(), channel, request, buffer))
        if not self._arriving:
            return False
        delivered = len(self._inbox)
        # A message is delivered only after every earlier one from the same source on
        # the same channel, so order holds even when a big one completes late.
        blocked = set()
        still_arriving = []
        for entry in self._arriving:
            source, channel, request, buffer = entry
            if (source, channel) not in blocked and request.Test():
                self._inbox.extend((source, channel, message)
                                   for message in pickle.loads(buffer))
            else:
                blocked.add((source, channel))
                still_arriving.append(entry)
        self._arriving = still_arriving
        return len(self._inbox) > delivered
