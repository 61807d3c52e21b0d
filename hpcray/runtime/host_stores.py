"""Objects another node on this host holds: copied straight from its store.

Ranks on one host (one per GPU, or several per node) each have a store of their own, a
shared-memory segment any process of the host may map. A node that needs an object a
node on its own host holds maps that node's store (once, for the job), pins the object
there, copies it into its own store and lets go: one memory copy, no message to the
holder and no MPI transfer (whose rendezvous, polls and staging copy made a 1 MiB get
~8x raw MPI). The pin is recorded under this process's pid in the holder's store, so a
delete or an eviction there waits for the copy, and the holder's store gives it back if
this process dies.

What is "this host" is decided by identity, not by name: two nodes share one when they
share a kernel boot, a PID namespace (the pins' pids mean the same to both) and the
/dev/shm instance (containers may have their own). Anything the holder's store does
not have sealed (spilled to disk, evicted, still arriving) is pulled over MPI as before
(object_mover.py); so is everything with HPCRAY_HOST_READS=0, which is also how one
machine measures the path between hosts.

The copies of one batch of pulls (`begin_batch`) are made at once by the caller while
they add up to _INLINE_MAX bytes or less (a few hundred microseconds at most); the rest,
and any larger object, on this node's copy thread, whose completions the event loop
runs, so that the node keeps answering meanwhile (a get of 10,000 values of 200 KB
would otherwise hold its event loop for the whole 2 GB). A driver's `get` without a
timeout is the exception (`defer_copies`): its own thread, which would only wait, makes
its copies with the node's lock let go, however large, and then ends those pulls
itself. Not for: reading an object in place in another node's store (its lifetime
would then hang on that node).
"""

from __future__ import annotations

import collections
import logging
import os
import threading

from hpcray._store import Store, StoreError, copy_into
from hpcray.runtime.worker_processes import close_fd

log = logging.getLogger("hpcray.host_stores")

# Beyond this many bytes a batch's copies go to the copy thread: 4 MiB take ~0.3-0.6 ms
# on this VM's 4 KiB pages.
_INLINE_MAX = 4 << 20


def host_identity() -> str:
    """Equal for two processes exactly when each can map the other's store and read its
    pids: the same kernel boot, PID namespace and /dev/shm. "" where that is unknown
    (not Linux): then no store is read across nodes."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            boot_id = boot.read().strip()
        pid_namespace = os.stat("/proc/self/ns/pid").st_ino
        shm = os.stat("/dev/shm")
    except OSError:
        return ""
    return f"{boot_id}:{pid_namespace}:{shm.st_dev}:{shm.st_ino}"


class HostStores:
    """The stores of the other nodes on this host that this node maps to copy from."""

    def __init__(self, rank: int, link, sources, enabled: bool,
                 inline_max: int = _INLINE_MAX) -> None:
        self.rank = rank
        self.link = link            # ClusterLink: every node's host identity and store
        # This node's, for the start handshake ("host_key"); "": copy from no store.
        self.identity = host_identity() if enabled else ""
        self.inline_max = inline_max
        self._inline_left = inline_max  # of this batch's bytes, those still copied at once
        self._sources = sources     # the event loop's descriptors: the copy thread's pipe
        self._stores: dict[int, Store | None] = {}  # rank -> its mapped store, None: not
        self._deferred: list | None = None  # between defer_copies and take_deferred
        # What makes the large copies, with submit(buffer, dest, on_done) and close():
        # a _Copier made on the first (the simulation puts in its own).
        self.copier = None

    def store_of(self, rank: int) -> Store | None:
        """Node `rank`'s store, mapped here, when it shares this host; else None."""
        try:
            return self._stores[rank]
        except KeyError:
            pass
        store = None
        node = self.link.nodes.get(rank) or {}
        if self.identity and rank != self.rank and node.get("host_key") == self.identity \
                and rank not in self.link.dead_nodes:
            try:
                store = Store.attach(node["store_name"])
            except (StoreError, OSError) as exc:  # e.g. another /dev/shm after all
                log.info("rank %d: cannot map rank %d's store %s (%s); its objects come "
                         "over MPI", self.rank, rank, node["store_name"], exc)
        self._stores[rank] = store
        return store

    def take(self, rank: int, object_id: bytes, size: int):
        """The object pinned in node `rank`'s store (a StoreBuffer), or None: that node
        is elsewhere, or its store has no sealed copy of `size` bytes."""
        store = self.store_of(rank)
        if store is None:
            return None
        try:
            buffer = store.get(object_id)
        except StoreError:  # its pin table is full: over MPI, the holder pins it itself
            return None
        if buffer is not None and len(buffer) != size:
            buffer.release()
            return None
        return buffer

    def begin_batch(self) -> None:
        """The copies that follow belong to one batch of pulls (ObjectMover.flush_pulls)."""
        self._inline_left = self.inline_max

    def copy(self, buffer, dest: memoryview, on_done) -> None:
        """Copy `buffer` (from `take`) into `dest` and let go of its pin; then call
        `on_done(copied)`: before returning while the batch is small, else from the event
        loop (under the node's lock) once the copy thread is done; or, between
        `defer_copies` and `take_deferred`, whenever the caller has made it."""
        if self._deferred is not None:
            self._deferred.append((buffer, dest, on_done))
            return
        if len(buffer) <= self._inline_left:
            self._inline_left -= len(buffer)
            try:
                copy_into(dest, 0, buffer)
            finally:
                buffer.release()
            on_done(True)
            return
        if self.copier is None:
            self.copier = _Copier(self._sources)
        self.copier.submit(buffer, dest, on_done)

    def defer_copies(self) -> None:
        """Under the node's lock, from a driver's `get` without a timeout (with one, the
        copy thread copies, so that the wait can end first): the copies asked for until
        `take_deferred` are left to the caller, which makes them with the lock let go
        (`make_copies`) and then runs their `on_done` under it. Its thread waits for
        them anyway; made by the copy thread, an 8 MiB object's end went through its
        pipe, the event loop and a wake-up of the driver (~100 us of a 0.7 ms get)."""
        self._deferred = []

    def take_deferred(self) -> list:
        """The copies asked for since `defer_copies`: [(buffer, dest, on_done)]."""
        deferred, self._deferred = self._deferred, None
        return deferred or []

    def forget(self, rank: int) -> None:
        """Node `rank` died: its store is unmapped here once the copies from it end."""
        store = self._stores.get(rank)
        self._stores[rank] = None
        if store is not None:
            store.close()

    def close(self) -> None:
        """Wait for the copies in flight (their buffers are this node's), unmap."""
        if self.copier is not None:
            self.copier.close()
            self.copier = None
        for store in self._stores.values():
            if store is not None:
                store.close()
        self._stores.clear()


def make_copies(copies: list) -> tuple[list, BaseException | None]:
    """Make the copies `take_deferred` gave, the GIL released in each, and let go of
    their pins: ([(on_done, copied)] for every one of them, for the caller to run under
    the node's lock, and what interrupted them, or None). After an interruption (a
    KeyboardInterrupt) the rest are not copied: they go over MPI instead."""
    results: list = []
    error = None
    for buffer, dest, on_done in copies:
        copied = False
        if error is not None:
            buffer.release()
        else:
            try:
                copied = _copy_and_release(buffer, dest)
            except BaseException as interrupted:  # noqa: BLE001 - raised by the caller
                error = interrupted
        results.append((on_done, copied))
    return results, error


def _copy_and_release(buffer, dest: memoryview) -> bool:
    """Copy `buffer` into `dest` and let go of its pin; False if the copy failed (the
    object is then pulled over MPI instead)."""
    try:
        copy_into(dest, 0, buffer)
        return True
    except Exception:  # noqa: BLE001 - the caller pulls it over MPI
        log.exception("a copy from another node's store on this host failed")
        return False
    finally:
        buffer.release()


class _Copier:
    """One thread that makes the large copies in turn (each one split over the store's
    copy threads); the event loop runs what follows each copy when its pipe says so."""

    def __init__(self, sources) -> None:
        self._sources = sources
        self._jobs: collections.deque = collections.deque()
        self._done: collections.deque = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._closing = False
        # True from the pipe's write until the loop takes what ended: one wake-up serves
        # every copy that ends meanwhile (10,000 small ones would be 10,000 passes).
        self._signalled = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        sources.register(self._wake_r, self._on_copied)
        self._thread = threading.Thread(target=self._run, name="hpcray-host-copies",
                                        daemon=True)
        self._thread.start()

    def submit(self, buffer, dest: memoryview, on_done) -> None:
        with self._ready:
            self._jobs.append((buffer, dest, on_done))
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._jobs and not self._closing:
                    self._ready.wait()
                if not self._jobs:
                    return
                buffer, dest, on_done = self._jobs.popleft()
            copied = _copy_and_release(buffer, dest)
            self._done.append((on_done, copied, dest))  # (before the flag is read)
            if not self._signalled:
                self._signalled = True
                try:
                    os.write(self._wake_w, b"c")
                except BlockingIOError:  # the loop has a wake-up pending anyway
                    pass

    def _on_copied(self, fd: int, _mask: int) -> None:
        """On the event loop's thread, under the node's lock: the copies that ended."""
        try:
            os.read(fd, 4096)
        except BlockingIOError:
            pass
        self._signalled = False  # (before the queue is read: a copy ending now writes)
        while self._done:
            on_done, copied, _ = self._done.popleft()
            on_done(copied)

    def close(self) -> None:
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join()
        for _, _, dest in self._done:  # ended after the loop's last pass: nobody reads them
            dest.release()
        self._done.clear()
        self._sources.unregister(self._wake_r)
        close_fd(self._wake_r)
        close_fd(self._wake_w)
