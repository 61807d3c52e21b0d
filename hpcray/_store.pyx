# cython: language_level=3
"""Python binding of the node object store in csrc/store.c.

What it is for: creating, sealing, reading (zero-copy, pinned) and deleting
objects in one node's POSIX shared-memory segment, from any process on the
node. What it is not for: serialization, reference counting across the
cluster, or moving objects between nodes; the runtime builds those on top.

A thin shell: every call goes straight to C, with the GIL released around the
calls that take the store lock or copy, and `_check` turns C status codes into
the typed exceptions below.
"""
import os

cimport cython
from cpython.buffer cimport (PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_FillInfo,
                             PyBuffer_Release, PyObject_GetBuffer)
from libc.errno cimport errno
from libc.stdint cimport int32_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

ID_SIZE = STORE_ID_SIZE


class StoreError(Exception):
    """A store operation failed. `errno` is set when a system call did."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.errno = code


class ObjectExistsError(StoreError):
    """An object with this id is already in the store (possibly delete-pending)."""


class StoreFullError(StoreError):
    """No room even after evicting every unpinned sealed object."""


class ObjectTooLargeError(StoreFullError):
    """The object is larger than the store's whole data area."""


class TooManyPinsError(StoreError):
    """The pin table has no room for one more (process, object) pair."""


class SharedMemoryFullError(StoreError):
    """/dev/shm (tmpfs) has no room for the pages of an object: something else on the
    host filled it since the store was made (another job's files, other ranks' stores).
    Nothing was created, and nothing that was written is hurt. `reason` says so, and
    what is free there, without naming the object."""


cdef int _check(store_status rc, int err, str what, object object_id=None) except -1:
    """Raises the exception that C status `rc` stands for; returns 0 on STORE_OK."""
    if rc == STORE_OK:
        return 0
    subject = what if object_id is None else f"{what} {bytes(object_id).hex()}"
    if rc == STORE_EXISTS:
        raise ObjectExistsError(f"{subject}: object already exists")
    if rc == STORE_TOO_LARGE:
        raise ObjectTooLargeError(f"{subject}: larger than the whole store")
    if rc == STORE_FULL:
        raise StoreFullError(f"{subject}: store full (pinned or unsealed objects hold the rest)")
    if rc == STORE_NOT_FOUND:
        raise StoreError(f"{subject}: no such object")
    if rc == STORE_NOT_SEALED:
        raise StoreError(f"{subject}: object not sealed")
    if rc == STORE_BAD_STATE:
        raise StoreError(f"{subject}: object is not in the CREATED state")
    if rc == STORE_INVALID:
        raise StoreError(f"{subject}: invalid argument")
    if rc == STORE_TOO_MANY_PINS:
        raise TooManyPinsError(f"{subject}: too many objects pinned (pin table full)")
    if rc == STORE_NO_SPACE:
        reason = _shm_full_reason(err)
        error = SharedMemoryFullError(f"{subject}: {reason}", err)
        error.reason = reason  # without the subject: what a user is told
        raise error
    if rc == STORE_BAD_SEGMENT:
        raise StoreError(f"{subject}: not an hpcray store segment (or another version)")
    raise StoreError(f"{subject}: {os.strerror(err)}", err)


def _shm_full_reason(int err) -> str:
    """Why a create failed for want of /dev/shm space, with what is free there now."""
    try:
        stat = os.statvfs("/dev/shm")
        free = f"{stat.f_bavail * stat.f_frsize} bytes free of {stat.f_blocks * stat.f_frsize}"
    except OSError:
        free = "its free space unknown"
    return (f"/dev/shm has no room for its pages ({os.strerror(err)}; {free}): something "
            "else on this host filled it after the store was made (files there, other "
            "ranks' stores). Free space there, or start with a smaller "
            "object_store_memory.")


def copy_into(dest, Py_ssize_t offset, src):
    """dest[offset:offset + len(src)] = src, the GIL released. When `dest` is
    (a slice of) a buffer from Store.create_object, a large copy runs on the
    store's copy threads and pre-faults the pages it writes (store_write).
    Both sides must be contiguous."""
    cdef Py_buffer to, source
    cdef _WritableBuffer target = None
    cdef store *s = NULL
    cdef uint64_t at = 0
    owner = dest.obj if type(dest) is memoryview else dest
    if type(owner) is _WritableBuffer:
        target = <_WritableBuffer>owner
    PyObject_GetBuffer(dest, &to, PyBUF_WRITABLE)
    try:
        PyObject_GetBuffer(src, &source, PyBUF_SIMPLE)
        try:
            if offset < 0 or source.len > to.len - offset:
                raise ValueError(f"copy of {source.len} bytes at {offset} does not fit in "
                                 f"{to.len}")
            if target is not None:
                s = target._store._s  # mapped while the buffer lives
                at = target._offset + <uint64_t>(<uint8_t *>to.buf - target._ptr) + offset
                with nogil:
                    store_write(s, at, source.buf, <uint64_t>source.len)
            else:
                with nogil:
                    memcpy(<uint8_t *>to.buf + offset, source.buf, <size_t>source.len)
        finally:
            PyBuffer_Release(&source)
    finally:
        PyBuffer_Release(&to)


ctypedef store_status (*_object_lister)(store *, store_object_info *, size_t,
                                        size_t *) noexcept nogil


cdef const uint8_t *_id_ptr(bytes object_id) except NULL:
    if len(object_id) != STORE_ID_SIZE:
        raise ValueError(f"object ids are {STORE_ID_SIZE} bytes, got {len(object_id)}")
    return <const uint8_t *><const char *>object_id


cdef class Store:
    """One process's mapping of a node's object store segment.

    Make one with Store.create (the node manager) or Store.attach (every
    other process on the node). Buffers handed out keep the mapping alive:
    close() stops further calls at once but unmaps only when the last one is
    gone, so a view into the segment never points at unmapped memory.
    """
    cdef store *_s
    cdef str _name
    cdef uint64_t _capacity
    cdef bint _closed
    cdef Py_ssize_t _exports  # live StoreBuffer / _WritableBuffer objects

    def __init__(self):
        raise TypeError("use Store.create() or Store.attach()")

    @staticmethod
    cdef Store _wrap(store *s, str name):
        cdef Store self = Store.__new__(Store)
        self._s = s
        self._name = name
        self._capacity = store_capacity(s)
        return self

    @staticmethod
    def create(str name not None, capacity, table_capacity=None):
        """Creates (O_EXCL, mode 0600), maps and initialises segment `name`
        with a data area of `capacity` bytes rounded up to a page. The object
        table has `table_capacity` slots (default: one per 8 KiB of data, at
        least 1024; rounded up to a power of two) and holds 7/8 that many
        objects; past that, creating an object evicts as a full data area does.
        Raises StoreError (errno EEXIST when the name is taken, ENOSPC when
        /dev/shm has no room for it)."""
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        cdef bytes cname = os.fsencode(name)
        cdef const char *cn = cname
        cdef uint64_t cap = capacity
        cdef uint64_t tcap = 0 if table_capacity is None else table_capacity
        cdef store *s = NULL
        cdef store_status rc
        cdef int err = 0
        with nogil:
            rc = store_create(cn, cap, tcap, &s)
            err = errno
        _check(rc, err, f"create {name!r}")
        return Store._wrap(s, name)

    @staticmethod
    def attach(str name not None):
        """Maps segment `name`, made by Store.create in another process."""
        cdef bytes cname = os.fsencode(name)
        cdef const char *cn = cname
        cdef store *s = NULL
        cdef store_status rc
        cdef int err = 0
        with nogil:
            rc = store_attach(cn, &s)
            err = errno
        _check(rc, err, f"attach {name!r}")
        return Store._wrap(s, name)

    @staticmethod
    def unlink_name(str name not None):
        """Removes segment `name`; no error when it does not exist."""
        cdef bytes cname = os.fsencode(name)
        cdef store_status rc = store_unlink(cname)
        _check(rc, errno, f"unlink {name!r}")

    @property
    def name(self):
        return self._name

    @property
    def capacity(self):
        return self._capacity

    @property
    def copy_threads(self):
        """Threads that copy_into uses for a large copy into this store's
        objects; setting 0 restores the default (the CPUs this process may
        run on, at most 8)."""
        return store_copy_threads(self._handle())

    @copy_threads.setter
    def copy_threads(self, threads):
        if threads < 0:
            raise ValueError("copy_threads must be >= 0")
        store_set_copy_threads(self._handle(), threads)

    cdef store *_handle(self) except NULL:
        if self._closed:
            raise StoreError(f"store {self._name!r} is closed")
        return self._s

    def create_object(self, bytes object_id not None, size, bint populate=False):
        """Reserves `size` bytes as a CREATED object pinned by the caller and
        returns a writable memoryview over them (zero-copy, 64-byte aligned).
        `populate`: fault its pages in first (for a buffer MPI will receive
        into; copy_into does it by itself). May evict. Raises
        ObjectExistsError, StoreFullError, ObjectTooLargeError."""
        if size < 0:
            raise ValueError("size must be >= 0")
        cdef store *s = self._handle()
        cdef const uint8_t *cid = _id_ptr(object_id)
        cdef uint64_t csize = size
        cdef uint64_t offset = 0
        cdef store_status rc
        cdef int err = 0
        with nogil:
            rc = store_create_object(s, cid, csize, &offset)
            err = errno
            if rc == STORE_OK and populate:
                store_populate(s, offset, csize)
        _check(rc, err, "create_object", object_id)
        return memoryview(_WritableBuffer._new(self, offset, csize))

    def seal(self, bytes object_id not None, bint unclaimed=False):
        """CREATED -> SEALED; drops the creator's pin. Writes made before seal
        are visible to every later get, in any process. `unclaimed`: a value
        for the node to take in (it pins it when told): it is not evicted
        before its first get."""
        cdef store *s = self._handle()
        cdef const uint8_t *cid = _id_ptr(object_id)
        cdef store_status rc
        cdef int err = 0
        with nogil:
            if unclaimed:
                rc = store_seal_unclaimed(s, cid)
            else:
                rc = store_seal(s, cid)
            err = errno
        _check(rc, err, "seal", object_id)

    def abort(self, bytes object_id not None):
        """Frees an object that was created and not sealed."""
        cdef store *s = self._handle()
        cdef const uint8_t *cid = _id_ptr(object_id)
        cdef store_status rc
        cdef int err = 0
        with nogil:
            rc = store_abort(s, cid)
            err = errno
        _check(rc, err, "abort", object_id)

    def get(self, bytes object_id not None):
        """Pins a sealed object for this process and returns a StoreBuffer over
        it, or None when it is absent, unsealed or delete-pending. Raises
        TooManyPinsError when the pin table is full."""
        cdef store *s = self._handle()
        cdef const uint8_t *cid = _id_ptr(object_id)
        cdef uint64_t offset = 0, size = 0
        cdef store_status rc
        cdef int err = 0
        with nogil:
            rc = store_get(s, cid, &offset, &size)
            err = errno
        if rc == STORE_NOT_FOUND or rc == STORE_NOT_SEALED:
            return None
        _check(rc, err, "get", object_id)
        try:
            return StoreBuffer._new(self, object_id, offset, size)
        except BaseException:
            with nogil:
                store_release(s, cid, offset)
            raise

    def contains(self, bytes object_id not None):
        """Whether a sealed, not delete-pending object has this id."""
        cdef store *s = self._handle()
        cdef const uint8_t *cid = _id_ptr(object_id)
        cdef int found = 0
        cdef store_status rc
        cdef int err = 0
        with nogil:
            rc = store_contains(s, cid, &found)
            err = errno
        _check(rc, err, "contains", object_id)
        return bool(found)

    def delete(self, bytes object_id not None):
        """Frees the object now if unpinned, else when its last pin drops.
        Returns False when there is no such object (or it is already pending)."""
        cdef store *s = self._handle()
        cdef const uint8_t *cid = _id_ptr(object_id)
        cdef store_status rc
        cdef int err = 0
        with nogil:
            rc = store_delete(s, cid)
            err = errno
        if rc == STORE_NOT_FOUND:
            return False
        _check(rc, err, "delete", object_id)
        return True

    def abort_dead_creators(self):
        """Frees the CREATED objects whose creating process has died (a client
        killed between create_object and seal); returns how many. All clients
        must share this process's PID namespace."""
        cdef store *s = self._handle()
        cdef uint64_t count = 0
        cdef store_status rc
        cdef int err = 0
        with nogil:
            rc = store_abort_dead_creators(s, &count)
            err = errno
        _check(rc, err, "abort_dead_creators")
        return count

    def release_pins_of(self, int32_t pid):
        """Drops every pin that process `pid` holds (it died: call this once
        it is reaped, or a recycled pid's pins go too); returns how many.
        Objects left unpinned become evictable, or are freed if deleted."""
        cdef store *s = self._handle()
        cdef uint64_t count = 0
        cdef store_status rc
        cdef int err = 0
        with nogil:
            rc = store_release_pins_of(s, pid, &count)
            err = errno
        _check(rc, err, "release_pins_of")
        return count

    def release_dead_pins(self):
        """Drops the pins of every process that no longer exists (a reader
        killed while it held views); returns how many. All clients must share
        this process's PID namespace; an unreaped zombie still counts as alive."""
        cdef store *s = self._handle()
        cdef uint64_t count = 0
        cdef store_status rc
        cdef int err = 0
        with nogil:
            rc = store_release_dead_pins(s, &count)
            err = errno
        _check(rc, err, "release_dead_pins")
        return count

    def pins(self):
        """[(object_id, pid, count)]: who pins what. For tests and debugging."""
        cdef store *s = self._handle()
        cdef size_t room = self.stats()["num_pin_records"] + 64
        cdef size_t count = 0
        cdef store_pin_info *infos = NULL
        cdef store_status rc
        cdef int err = 0
        while True:
            infos = <store_pin_info *>malloc(room * sizeof(store_pin_info))
            if infos == NULL:
                raise MemoryError()
            with nogil:
                rc = store_list_pins(s, infos, room, &count)
                err = errno
            if rc == STORE_OK and count > room:
                free(infos)
                room = count + 64
                continue
            break
        try:
            _check(rc, err, "pins")
            return [(bytes((<char *>infos[i].id)[:STORE_ID_SIZE]), infos[i].pid, infos[i].count)
                    for i in range(count)]
        finally:
            free(infos)

    def sole_pinned(self):
        """[(object_id, size)] of the sealed objects with exactly one pin, least
        recently read first: what the node that holds that pin may spill."""
        return [(info[0], info[1]) for info in
                self._list_objects(store_list_sole_pinned, self.stats()["num_pinned"],
                                   "sole_pinned")]

    def stats(self):
        """capacity, used_bytes, num_objects, num_pinned, num_evictions,
        table_capacity, num_recoveries, num_pin_records, pin_table_capacity,
        num_created (objects not sealed yet), num_holders (processes counted as
        holding pins or unsealed objects), holders_overflow (1: more of them
        than the counts track, so the clean-up after a death walks the tables)."""
        cdef store *s = self._handle()
        cdef store_stats st
        cdef store_status rc
        cdef int err = 0
        with nogil:
            rc = store_get_stats(s, &st)
            err = errno
        _check(rc, err, "stats")
        return {
            "capacity": st.capacity,
            "used_bytes": st.used_bytes,
            "num_objects": st.num_objects,
            "num_pinned": st.num_pinned,
            "num_evictions": st.num_evictions,
            "table_capacity": st.table_capacity,
            "num_recoveries": st.num_recoveries,
            "num_pin_records": st.num_pin_records,
            "pin_table_capacity": st.pin_table_capacity,
            "num_created": st.num_created,
            "num_holders": st.num_holders,
            "holders_overflow": st.holders_overflow,
            "cleanup_walks": st.cleanup_walks,
        }

    def objects(self):
        """[(object_id, size, state, pins)], state one of "CREATED", "SEALED",
        "DELETE_PENDING". For tests and debugging: walks the whole table."""
        return [(object_id, size, "DELETE_PENDING" if delete_pending else
                 "SEALED" if state == STORE_STATE_SEALED else "CREATED", pins)
                for object_id, size, state, pins, delete_pending in
                self._list_objects(store_list, self.stats()["num_objects"], "objects")]

    cdef list _list_objects(self, _object_lister lister, size_t expected, str what):
        """[(object_id, size, state, pins, delete_pending)] from a table walk."""
        cdef store *s = self._handle()
        cdef size_t room = expected + 64
        cdef size_t count = 0
        cdef store_object_info *infos = NULL
        cdef store_status rc
        cdef int err = 0
        while True:
            infos = <store_object_info *>malloc(room * sizeof(store_object_info))
            if infos == NULL:
                raise MemoryError()
            with nogil:
                rc = lister(s, infos, room, &count)
                err = errno
            if rc == STORE_OK and count > room:
                free(infos)
                room = count + 64
                continue
            break
        try:
            _check(rc, err, what)
            return [(bytes((<char *>infos[i].id)[:STORE_ID_SIZE]), infos[i].size,
                     infos[i].state, infos[i].pins, infos[i].delete_pending)
                    for i in range(count)]
        finally:
            free(infos)

    def close(self):
        """Ends this handle: further calls raise StoreError. Unmaps now, or
        when the last buffer from it is gone. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._exports == 0:
            self._unmap()

    def unlink(self):
        """Removes this segment's name; mappings stay valid until closed."""
        Store.unlink_name(self._name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    cdef void _unmap(self) noexcept:
        cdef store *s = self._s
        self._s = NULL
        if s != NULL:
            with nogil:
                store_close(s)

    def __dealloc__(self):
        if self._s != NULL:
            store_close(self._s)
            self._s = NULL

    def _debug_hold_lock(self, int notify_fd=-1):
        """Test hook: takes the store lock, writes one byte to notify_fd and
        blocks forever holding it (kill the process to end it)."""
        cdef store *s = self._handle()
        cdef store_status rc
        cdef int err = 0
        with nogil:
            rc = store_debug_lock_forever(s, notify_fd)
            err = errno
        _check(rc, err, "_debug_hold_lock")

    def _debug_check(self):
        """Test hook: True when table, counters and allocator are consistent."""
        cdef store *s = self._handle()
        cdef int bad
        with nogil:
            bad = store_debug_check(s)
        return bad == 0

    def _debug_crash_after(self, long long steps):
        """Test hook: this process _exits(77), holding the store lock, at the
        steps-th crash point inside a later mutation (0 disarms)."""
        store_debug_crash_after(self._handle(), steps)


cdef class _WritableBuffer:
    """The writable bytes of one CREATED object; create_object wraps it in a
    memoryview. Holds the Store so the mapping outlives every view."""
    cdef Store _store
    cdef uint64_t _offset
    cdef uint8_t *_ptr
    cdef Py_ssize_t _size

    @staticmethod
    cdef _WritableBuffer _new(Store owner, uint64_t offset, uint64_t size):
        cdef _WritableBuffer self = _WritableBuffer.__new__(_WritableBuffer)
        self._store = owner
        self._offset = offset
        self._ptr = store_ptr(owner._s, offset)
        self._size = <Py_ssize_t>size
        owner._exports += 1
        return self

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self._ptr, self._size, 0, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __dealloc__(self):
        if self._store is not None:
            self._store._exports -= 1
            if self._store._closed and self._store._exports == 0:
                self._store._unmap()


@cython.no_gc_clear
cdef class StoreBuffer:
    """A read-only, zero-copy buffer over one sealed object, holding one pin.

    memoryview(buf), numpy.frombuffer(buf) and pickle's out-of-band buffers
    view the segment directly; each view keeps this object (and its pin)
    alive. release() drops the pin early (views made before it then see
    bytes that may be reused); it is idempotent, and dropping the last
    reference releases too.
    """
    cdef Store _store
    cdef bytes _object_id
    cdef uint64_t _offset
    cdef uint8_t *_ptr
    cdef Py_ssize_t _size
    cdef bint _released

    def __init__(self):
        raise TypeError("StoreBuffer objects come from Store.get()")

    @staticmethod
    cdef StoreBuffer _new(Store owner, bytes object_id, uint64_t offset, uint64_t size):
        cdef StoreBuffer self = StoreBuffer.__new__(StoreBuffer)
        self._store = owner
        self._object_id = object_id
        self._offset = offset
        self._ptr = store_ptr(owner._s, offset)
        self._size = <Py_ssize_t>size
        owner._exports += 1
        return self

    @property
    def size(self):
        return self._size

    @property
    def object_id(self):
        return self._object_id

    def release(self):
        """Drops this buffer's pin (once; later calls do nothing)."""
        self._unpin()

    def release_if_sole(self):
        """Drops this buffer's pin and frees the object at once, when that pin is
        the object's only one; returns True then. Otherwise (another pin: someone
        reads it) changes nothing and returns False. No view of this buffer may
        be left when it returns True: the bytes are gone."""
        if self._released or self._store is None:
            return False
        cdef store *s = self._store._handle()
        cdef const uint8_t *cid = <const uint8_t *><const char *>self._object_id
        cdef uint64_t offset = self._offset
        cdef int freed = 0
        cdef store_status rc
        cdef int err = 0
        with nogil:
            rc = store_release_if_sole(s, cid, offset, &freed)
            err = errno
        _check(rc, err, "release_if_sole", self._object_id)
        if freed:
            self._released = True
        return bool(freed)

    cdef void _unpin(self) noexcept:
        if self._released or self._store is None:
            return
        self._released = True
        cdef store *s = self._store._s  # still mapped: this buffer defers the unmap
        cdef const uint8_t *cid = <const uint8_t *><const char *>self._object_id
        cdef uint64_t offset = self._offset
        with nogil:
            store_release(s, cid, offset)

    def __getbuffer__(self, Py_buffer *view, int flags):
        if self._released:
            raise BufferError("StoreBuffer was released")
        PyBuffer_FillInfo(view, self, self._ptr, self._size, 1, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __len__(self):
        return self._size

    def __repr__(self):
        return (f"<StoreBuffer {self._object_id.hex()} size={self._size}"
                f"{' released' if self._released else ''}>")

    def __dealloc__(self):
        if self._store is None:
            return
        self._unpin()
        self._store._exports -= 1
        if self._store._closed and self._store._exports == 0:
            self._store._unmap()
