"""Spilling: referenced objects moved from the node's store to local disk when it is full,
and read back when someone needs them (Ray's object spilling).

A value the node pins for its holders (`entry.pin`) takes store space for as long as it
is referenced. When a create does not fit (a put or a task's value in any process of
the node, a copy pulled from another node, a restore), the node writes the least
recently read of those objects that nobody else maps (its pin is the only one: no
zero-copy view, no reader, no send in flight) to a file of its own, then frees it from
the store (`StoreBuffer.release_if_sole`, atomic against a reader's get). The entry stays
READY with `spilled` set. A reader that finds the object gone from the store asks the
node to `restore` it (the driver in process, a worker with the `restore` node operation)
and reads it again; another node's pull of it is served from the file (mapped, sent as
it is: no store space needed on a node that is full). The file stays until the object is
freed, so an object restored and chosen again later is dropped, not written twice.

Files live in one folder per node and job: `<base>/hpcray-spill-<pid>-<job>-n<rank>`,
where `base` is HPCRAY_SPILL_DIR (init(object_spilling_directory=...)), else
$SLURM_TMPDIR, $TMPDIR or /tmp. The node removes it at shutdown; the fork server (the
node's undertaker) removes it when the node dies. Not for: choosing what to spill by
anything but recency, or spilling to other nodes.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import time

from hpcray import exceptions
from hpcray._store import ObjectTooLargeError, SharedMemoryFullError, StoreFullError
from hpcray.runtime.object_table import READY

log = logging.getLogger("hpcray.spill")

_IO_CHUNK = 1 << 30  # one read or write call moves at most this much
_BATCH_FRACTION = 32  # make_room spills at least this part of the store
# A write that failed for want of room: a full disk, a quota, a file size limit.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def spill_directory(config, store_name: str) -> str:
    """The folder this node spills into (made at its first spill)."""
    base = (config.spill_dir or os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR")
            or "/tmp")
    return os.path.join(base, "hpcray-spill" + store_name.rsplit("/hpcray", 1)[-1])


def remove_directory(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


class SpillStats:
    """What this node spilled and restored since it started."""

    __slots__ = ("spilled_objects", "spilled_bytes", "written_bytes", "spill_seconds",
                 "restored_objects", "restored_bytes", "restore_seconds", "served_from_disk")

    def __init__(self) -> None:
        self.spilled_objects = self.spilled_bytes = 0  # moved out of the store
        self.written_bytes = 0  # of those, written (not already in a file)
        self.restored_objects = self.restored_bytes = 0
        self.spill_seconds = self.restore_seconds = 0.0  # writing, reading back
        self.served_from_disk = 0  # other nodes' pulls answered from a file

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class Spiller:
    """This node's spill files: which objects are on disk, making room in the store by
    writing some there, and reading them back."""

    def __init__(self, rank: int, objects, store, directory: str) -> None:
        self.rank = rank
        self.objects = objects
        self.store = store
        self.directory = directory
        self.files: dict[bytes, int] = {}  # object id -> bytes in its file
        self.stats = SpillStats()
        self._made_directory = False

    def path(self, object_id: bytes) -> str:
        return os.path.join(self.directory, object_id.hex())

    # ------------------------------------------------------------------ making room
    def create_object(self, object_id: bytes, size: int, populate: bool = False):
        """store.create_object, spilling what it must first (the node's own creates: a
        pulled copy, a restore). Raises StoreFullError when nothing more can go, and
        ObjectStoreFullError when /dev/shm has no room for its pages."""
        while True:
            no_shm = None
            try:
                return self.store.create_object(object_id, size, populate=populate)
            except ObjectTooLargeError:
                raise
            except StoreFullError:
                if not self.make_room(size):
                    raise
            except SharedMemoryFullError as exc:
                no_shm = exc.reason
            if no_shm is not None:  # raised outside the handler: no context kept
                raise exceptions.ObjectStoreFullError(
                    f"No room for object {object_id.hex()} ({size} bytes) on node "
                    f"{self.rank}: {no_shm}")

    def make_room(self, size: int) -> int:
        """Spill the least recently read objects that only this node maps, at least
        `size` bytes of them (fewer when no more can go); returns how many bytes went.
        The caller tries its create again (the free space may be in pieces: again)."""
        capacity = self.store.capacity
        if size > capacity:
            return 0
        wanted = size
        # A batch at a time: each call walks the store's table once to choose.
        size = max(size, capacity // _BATCH_FRACTION)
        freed = 0
        for object_id, object_size in self.store.sole_pinned():
            entry = self.objects.get(object_id)
            if entry is None or entry.pin is None or entry.state != READY:
                continue  # not this node's pin (a process's view of a freed object)
            if self.spill(object_id, entry, wanted):
                freed += max(object_size, 1)
                if freed >= size:
                    break
        return freed

    def spill(self, object_id: bytes, entry, wanted: int = 0) -> bool:
        """Write one object's bytes to its file (unless there from an earlier spill) and
        free it from the store; False when another process mapped it meanwhile."""
        pin = entry.pin
        size = pin.size
        stats = self.stats
        if object_id not in self.files:
            started = time.perf_counter()
            self._write(object_id, pin, wanted)
            self.files[object_id] = size
            stats.spill_seconds += time.perf_counter() - started
            stats.written_bytes += size
        if not pin.release_if_sole():
            return False  # read now: it stays (its file will serve the next spill)
        entry.pin = None
        entry.spilled = True
        stats.spilled_objects += 1
        stats.spilled_bytes += size
        return True

    def _write(self, object_id: bytes, pin, wanted: int) -> None:
        if not self._made_directory:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            self._made_directory = True
        size = pin.size
        free_disk = _free_bytes(self.directory)
        if free_disk < size:
            raise self._disk_full(object_id, size, wanted, f"{free_disk} bytes free")
        path = self.path(object_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        failed = None
        try:
            with memoryview(pin) as view:
                written = 0
                while written < size:
                    written += os.write(fd, view[written:written + _IO_CHUNK])
        except OSError as exc:
            failed = exc.errno
        os.close(fd)
        if failed is None:
            return
        # Raised here, not in the handler: its context would keep the callers' frames.
        os.unlink(path)
        if failed in _NO_ROOM:
            raise self._disk_full(object_id, size, wanted,
                                  f"{_free_bytes(self.directory)} bytes free, "
                                  f"and the write failed: {os.strerror(failed)}")
        raise OSError(failed, f"writing spill file {path}: {os.strerror(failed)}")

    def _disk_full(self, object_id: bytes, size: int, wanted: int, room: str):
        return exceptions.ObjectStoreFullError(
            f"The object store of node {self.rank} ({self.store.capacity} bytes) is full and "
            f"object {object_id.hex()} ({size} bytes) cannot be spilled to make room for "
            f"{wanted} bytes: "
            f"{self.directory} has {room}. Set HPCRAY_SPILL_DIR to a larger local disk, or "
            "start with a larger object_store_memory.")

    # ------------------------------------------------------------------ reading back
    def restore(self, object_id: bytes) -> bool:
        """Put a spilled object back in the store, pinned for its holders; True when it is
        in the store now (restored, or never gone), False when this node has no value
        for it there or on disk."""
        entry = self.objects.get(object_id)
        if entry is None or entry.state != READY:
            return False
        if not entry.spilled:
            return entry.pin is not None
        size = self.files[object_id]
        started = time.perf_counter()
        try:
            view = self.create_object(object_id, size, populate=True)
        except StoreFullError:
            raise exceptions.ObjectStoreFullError(
                f"Object {object_id.hex()} ({size} bytes) was spilled to disk and cannot be "
                f"restored: the object store of node {self.rank} ({self.store.capacity} "
                "bytes) is in use (mapped by processes, being read or written), so nothing "
                "can be spilled to make room.") from None
        try:
            fd = os.open(self.path(object_id), os.O_RDONLY | os.O_CLOEXEC)
            try:
                done = 0
                while done < size:
                    got = os.readv(fd, [view[done:done + _IO_CHUNK]])
                    if got == 0:
                        raise OSError(errno.EIO, f"spill file of {object_id.hex()} is short")
                    done += got
            finally:
                os.close(fd)
        except BaseException:
            view.release()
            self.store.abort(object_id)
            raise
        view.release()
        self.store.seal(object_id, unclaimed=True)
        entry.pin = self.store.get(object_id)
        entry.spilled = False
        self.stats.restored_objects += 1
        self.stats.restored_bytes += size
        self.stats.restore_seconds += time.perf_counter() - started
        return True

    def file_view(self, object_id: bytes):
        """A read-only view of a spilled object's file (to send it to another node), or
        None. The mapping stays valid after the file is removed."""
        size = self.files.get(object_id)
        if size is None:
            return None
        if size == 0:
            return memoryview(b"")
        with open(self.path(object_id), "rb") as f:
            mapped = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        self.stats.served_from_disk += 1
        return memoryview(mapped)

    # ------------------------------------------------------------------ freeing
    def discard(self, object_id: bytes) -> None:
        """The object is freed here: its file goes."""
        if self.files.pop(object_id, None) is not None:
            try:
                os.unlink(self.path(object_id))
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """The node stops: every file goes, and the folder."""
        self.files.clear()
        remove_directory(self.directory)

    def totals(self) -> dict:
        """Objects and bytes spilled and restored so far (the report page's figures)."""
        stats = self.stats
        return {"spilled_objects": stats.spilled_objects, "spilled_bytes": stats.spilled_bytes,
                "restored_objects": stats.restored_objects,
                "restored_bytes": stats.restored_bytes}

    def counters(self) -> dict:
        """SpillStats, with the files on disk now."""
        counters = self.stats.as_dict()
        counters["files"] = len(self.files)
        counters["bytes_on_disk"] = sum(self.files.values())
        return counters


def _free_bytes(directory: str) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize
