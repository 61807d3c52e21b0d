"""The node's object table: values, reference counts, waiters.

An entry exists from the moment a task that makes the object is submitted (or a value
is put) until no holder is left: a process holding an `ObjectRef` (counted once per
process), a pending task whose arguments contain it, or a stored value that contains
it. Waiters (a blocked `get`, a task waiting for its arguments) run when it is ready.
"""

from __future__ import annotations

import threading

from hpcray import exceptions, ids
from hpcray._store import StoreError
from hpcray.runtime.specs import TaskRecord
from hpcray.serialization import error_bytes

# Entry states: not made yet; its value is here (inline or in this node's store); its
# value is in the store of node `location` (multi-node: pulled here on first local use).
PENDING, READY, REMOTE = 0, 1, 2
IN_STORE = None  # an entry whose inline value is None lives in the store


class ObjectEntry:
    __slots__ = ("state", "inline", "refs", "waiters", "contained", "pin", "is_put", "size",
                 "owner", "location", "avail_waiters", "pulling", "borrowers",
                 "lent", "lender", "deferred", "primary", "primary_at", "shipped", "watched",
                 "spilled", "failed_pull")

    def __init__(self, owner: int = 0):
        self.state = PENDING
        self.inline = None      # bytes when the value travels inline
        self.refs = 0           # holders on this node: processes, pending tasks, values
        self.waiters = None     # callables(object_id) run when the value is here
        self.contained = ()     # ids this value holds alive
        self.pin = None         # StoreBuffer: the node's pin on its copy
        self.spilled = False    # READY, its bytes in a spill file, not in the store
        self.is_put = False
        self.size = 0
        self.owner = owner      # rank of the node that owns it (counts its references)
        self.location = None    # rank holding the value, while state is REMOTE
        self.avail_waiters = None  # run when the value exists anywhere (task placement)
        self.pulling = False
        # Reference counting across nodes (borrowing.py explains the protocol).
        self.borrowers = None   # owner: {rank: registrations} of nodes holding it too
        self.lent = 0           # borrower: registrations the owner counts for this node
        self.lender = None      # borrower, unregistered: the owner of the task that brought it
        self.deferred = None    # borrower, unregistered: {rank: n} to register through lender
        self.primary = False    # this node made it for its owner: keep the copy until freed
        self.primary_at = None  # owner: the node holding the primary copy
        self.shipped = False    # owner: other nodes may have copies (GCS deletes them)
        self.watched = False    # borrower: its owner was asked where the value is
        # (location, size) of the copy a pull found no room for: its readers then got
        # the error as the value, and the next reader to wait for it pulls again.
        self.failed_pull = None


class _DependencyWaiter:
    """Counts a task's unresolved arguments down; runs `ready_callback` at zero."""

    __slots__ = ("record", "ready_callback")

    def __init__(self, record: TaskRecord, ready_callback):
        self.record = record
        self.ready_callback = ready_callback

    def __call__(self, _object_id) -> None:
        record = self.record
        record.pending_deps -= 1
        if record.pending_deps == 0 and not record.cancelled:
            self.ready_callback(record)


class _Waiter:
    """Counts objects down; releases its lock when enough of them are ready."""

    __slots__ = ("remaining", "lock", "done", "callback")

    def __init__(self, remaining: int, callback=None):
        self.remaining = remaining
        self.done = False
        self.callback = callback
        self.lock = None
        if callback is None:
            self.lock = threading.Lock()
            self.lock.acquire()

    def __call__(self, _object_id) -> None:
        self.remaining -= 1
        if self.remaining <= 0 and not self.done:
            self.done = True
            if self.callback is not None:
                self.callback()
            else:
                self.lock.release()


class ObjectTable:
    """This node's objects: entry per id (its value or where it is, its holders here,
    its waiters). A mapping of id -> ObjectEntry, with the operations on it.

    It frees an object its node owns once nothing holds it here and no other node
    borrows it; an object another node owns it forgets (and gives its registrations
    back: Borrowing) once nothing here holds it. Values on other nodes come through
    the ObjectMover; actor handles in ref transitions go to Actors.
    """

    def __init__(self, rank: int, store, pins) -> None:
        self.rank = rank
        self.store = store
        self.pins = pins  # LineagePins: a freed return may release its task's spec
        self.entries: dict[bytes, ObjectEntry] = {}
        self.mover = self.borrowing = self.actors = self.generators = None  # bind()
        self.spiller = None
        self.relay = None       # the copies this node seeded as holder (relay.py)

    def bind(self, mover, borrowing, actors, generators=None, spiller=None,
             relay=None) -> None:
        self.mover = mover
        self.borrowing = borrowing
        self.actors = actors
        self.generators = generators
        self.spiller = spiller
        self.relay = relay

    # A mapping of the entries, as the other parts read it.
    def get(self, object_id: bytes):
        return self.entries.get(object_id)

    def __getitem__(self, object_id: bytes) -> ObjectEntry:
        return self.entries[object_id]

    def __setitem__(self, object_id: bytes, entry: ObjectEntry) -> None:
        self.entries[object_id] = entry

    def __delitem__(self, object_id: bytes) -> None:
        del self.entries[object_id]

    def __contains__(self, object_id: bytes) -> bool:
        return object_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def items(self):
        return self.entries.items()

    def values(self):
        return self.entries.values()

    def clear(self) -> None:
        self.entries.clear()

    def entry(self, object_id: bytes) -> ObjectEntry:
        entry = self.entries.get(object_id)
        if entry is None:
            entry = self.entries[object_id] = ObjectEntry(self.rank)
        return entry

    def apply_transitions(self, transitions) -> None:
        for key, delta in transitions:
            if delta > 0:
                self.incref(key)
            else:
                self.decref(key)

    def incref(self, key: bytes) -> None:
        entry = self.entries.get(key)
        if entry is None:
            if len(key) == ids.ACTOR_ID_SIZE:
                self.actors.actor_incref(key)  # an actor handle (actors.py)
                return
            entry = self.mover.remote_entry(key)  # a ref another node owns, new to this node
            if entry is None:
                return
        entry.refs += 1

    def decref(self, key: bytes) -> None:
        entry = self.entries.get(key)
        if entry is not None:
            entry.refs -= 1
            if entry.refs <= 0:
                self.release_if_unused(key, entry)
            return
        if len(key) == ids.ACTOR_ID_SIZE:
            self.actors.actor_decref(key)

    def release_if_unused(self, key: bytes, entry: ObjectEntry) -> None:
        """Nothing on this node holds `key`: the owner frees it once no other node holds
        it either; another node drops its entry and tells the owner (borrowing.py)."""
        if entry.refs > 0 or entry.waiters or entry.is_put or entry.pulling:
            return
        if entry.owner == self.rank:
            generators = self.generators
            if generators is not None and generators.streams:
                generators.completion_unused(key)  # a generator's consumer is gone
            if entry.state != PENDING and not entry.borrowers:
                self.free_object(key, entry)
        elif not entry.primary:
            self.borrowing.drop_borrowed(key, entry)
        else:  # the primary copy stays until the owner frees it; the borrowing ends now
            self.borrowing.give_up_borrowing(key, entry)

    def free_object(self, object_id: bytes, entry: ObjectEntry) -> None:
        del self.entries[object_id]
        self.pins.freed(object_id)
        if entry.inline is None:
            self.let_go(object_id, entry)
            try:
                self.store.delete(object_id)
            except StoreError:
                pass
            if entry.shipped or entry.primary_at is not None:
                self.borrowing.delete_copies(object_id)
        for key in entry.contained:
            self.decref(key)

    def let_go(self, object_id: bytes, entry: ObjectEntry) -> None:
        """This node stops keeping a value in its store: its pin goes (the bytes stay
        until deleted or evicted), and its spill file."""
        if entry.pin is not None:
            entry.pin.release()
            entry.pin = None
        spiller = self.spiller
        if spiller is not None and spiller.files:
            spiller.discard(object_id)
        if self.relay is not None and self.relay.trees:
            self.relay.forget(object_id)  # no longer its holder: the copies it seeded

    def object_ready(self, object_id: bytes, inline, contained, size: int,
                      location: int | None = None) -> None:
        """The value of `object_id` exists now: inline bytes, or sealed in the store of
        this node (location None) or of node `location`."""
        entry = self.entries.get(object_id)
        if entry is None:
            entry = self.entries[object_id] = ObjectEntry(self.rank)
        elif entry.state == READY:
            return  # a retried task made it again
        entry.inline = inline
        entry.size = size
        if inline is IN_STORE and location is not None and location != self.rank:
            entry.state = REMOTE
            entry.location = location
            if entry.owner == self.rank:
                entry.primary_at = location
        else:
            entry.state = READY
            entry.location = None
            if inline is IN_STORE:
                entry.pin = self.store.get(object_id)  # the copy stays while referenced
        if contained and not entry.contained:
            entry.contained = contained
            for key in contained:
                self.incref(key)
        waiters = entry.avail_waiters
        if waiters:
            entry.avail_waiters = None
            for waiter in waiters:
                waiter(object_id)
        if entry.state == REMOTE:
            if entry.waiters:
                self.mover.start_pull(object_id, entry)
        else:
            waiters = entry.waiters
            if waiters:
                entry.waiters = None
                for waiter in waiters:
                    waiter(object_id)
        if entry.refs <= 0 and self.entries.get(object_id) is entry:
            self.release_if_unused(object_id, entry)

    def wait_for_objects(self, record: TaskRecord, object_ids, add_waiter, then) -> None:
        """`then(record)` once `add_waiter` has called back for each of `object_ids`
        that it registered. A waiter can run while being registered (a pull served by a
        copy already in this store), so the count starts at one and that guard goes
        last: the record cannot reach zero before every waiter is in."""
        if not object_ids:  # no arguments to wait for (most tasks): no waiter to make
            record.pending_deps = 0
            if not record.cancelled:
                then(record)
            return
        waiter = _DependencyWaiter(record, then)
        record.pending_deps = 1
        with self.mover.batched():  # one pull per holder for all of them
            for object_id in object_ids:
                record.pending_deps += 1
                if not add_waiter(object_id, waiter):
                    record.pending_deps -= 1
        waiter(None)

    def add_waiter(self, object_id: bytes, waiter) -> bool:
        """Call `waiter(object_id)` once the value is on this node; False if it already is
        (or is unknown here and cannot be fetched): then nothing is registered."""
        entry = self.entries.get(object_id)
        if entry is None:
            entry = self.mover.remote_entry(object_id)
            if entry is None:
                return False
        if entry.state == READY:
            if entry.failed_pull is None:
                return False
            # The error stays its value for the readers woken with it until this pull ends.
            entry.state = REMOTE
            (entry.location, entry.size), entry.failed_pull = entry.failed_pull, None
        if entry.waiters is None:
            entry.waiters = [waiter]
        else:
            entry.waiters.append(waiter)
        if entry.state == REMOTE:
            self.mover.start_pull(object_id, entry)
        elif not entry.watched and entry.owner != self.rank:
            self.mover.watch(object_id, entry)
        return True

    def add_avail_waiter(self, object_id: bytes, waiter) -> bool:
        """Call `waiter(object_id)` once the value exists on any node; False if it does."""
        entry = self.entries.get(object_id)
        if entry is None:
            entry = self.mover.remote_entry(object_id)
            if entry is None:
                return False
        if entry.state != PENDING:
            return False
        if entry.avail_waiters is None:
            entry.avail_waiters = [waiter]
        else:
            entry.avail_waiters.append(waiter)
        if not entry.watched and entry.owner != self.rank:
            self.mover.watch(object_id, entry)
        return True

    def remove_waiter(self, object_id: bytes, waiter) -> None:
        entry = self.entries.get(object_id)
        if entry is None:
            return
        if entry.waiters and waiter in entry.waiters:
            entry.waiters.remove(waiter)
        if entry.avail_waiters and waiter in entry.avail_waiters:
            entry.avail_waiters.remove(waiter)

    def payload(self, object_id: bytes):
        """What a reader needs: inline bytes, IN_STORE, or an exception if gone."""
        entry = self.entries.get(object_id)
        if entry is None:
            return error_bytes(exceptions.ObjectFreedError(
                f"Object {object_id.hex()} was freed (no reference held it) or never existed."))
        return entry.inline

    def put(self, object_id: bytes, inline, contained, owner_holds_ref: bool, size: int) -> None:
        entry = self.entry(object_id)
        entry.refs += 1 if owner_holds_ref else 0
        entry.is_put = True  # not freed at refs 0 before its holders count it
        self.object_ready(object_id, inline, contained, size)
        entry.is_put = False

    def register_get(self, object_ids, num_returns: int, callback=None, local: bool = True):
        """A waiter released when `num_returns` of `object_ids` are here (`local`; else
        when they exist on any node, as `wait(fetch_local=False)`), or None if they are."""
        objects = self.entries
        done = (READY,) if local else (READY, REMOTE)
        missing = [oid for oid in object_ids
                   if (e := objects.get(oid)) is None and self.mover.remote_entry(oid) is not None
                   or e is not None and (e.state not in done
                                         or local and e.failed_pull is not None)]
        ready = len(object_ids) - len(missing)
        if ready >= num_returns:
            return None
        waiter = _Waiter(num_returns - ready, callback)
        add = self.add_waiter if local else self.add_avail_waiter
        with self.mover.batched():  # one pull per holder for all of them
            for oid in missing:
                add(oid, waiter)
        return waiter

    def cancel_waiter(self, object_ids, waiter) -> None:
        for oid in object_ids:
            self.remove_waiter(oid, waiter)

    def ready_ids(self, object_ids, local: bool = True) -> list:
        """The ids whose value is here (`local`; else anywhere), or that are unknown here
        for good (get raises)."""
        objects = self.entries
        rank = self.rank
        owner_rank = ids.owner_rank
        if local:  # (the usual case first: wait() over 1,000 refs asks this per call)
            return [oid for oid in object_ids
                    if (e := objects.get(oid)) is not None and e.state == READY
                    or e is None and owner_rank(oid) == rank]
        return [oid for oid in object_ids
                if (e := objects.get(oid)) is not None and (e.state == READY or e.state == REMOTE)
                or e is None and owner_rank(oid) == rank]

    def payloads(self, object_ids) -> list:
        return [self.payload(oid) for oid in object_ids]
