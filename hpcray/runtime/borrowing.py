"""Reference counting across nodes: who may still use an object that another node owns.

The owner of an object (the node whose process made the ref) frees it once no process
on the owner holds it and no other node "borrows" it. The owner counts borrowers as
registrations per rank (`entry.borrowers`); each borrower counts the registrations made
for it (`entry.lent`) and gives them all back in one `release` when nothing on it holds
the object any more. Counts, not sets, so that a release overtaking a registration
(they may come from different ranks) leaves a count of -1, not a freed object.

Only a node that is itself covered may register another one, and it does so before it
can drop its own cover, so the owner never sees every count at zero while some node
still holds the object:
- A task (or actor call) run for another node: its arguments and every ref inside them
  are covered by the submitting node, which holds them until the `done` reply. The
  executor lists in that reply the refs it still holds afterwards (kept in a worker,
  in an actor, in a value); the submitter registers them before dropping its hold.
- Refs inside the results of such a task: the executor registers the submitter with the
  owner (or with its own submitter, the same way) before sending `done`.
- A ref new to a node that is in none of those (found inside a value it read): the node
  asks the owner where the value is (`watch`), which registers it.
Refs nested inside a value that leaves its owner node (an argument value or a value
another node reads) are not traced: the owner node keeps them until the job ends.

A borrower that received a large value keeps its copy in its store unpinned once it no
longer holds it (evicted when space is needed, reused by a later pull). When the owner
frees an object, the GCS tells every node with a copy to delete it; the node that made
a task's large result keeps that primary copy until then.

Messages (control channel):
    borrow(object_id, rank, n)   a covered node -> owner: count n more for `rank`
    release(object_id, n)        borrower -> owner: it gives back its n registrations
"""

from __future__ import annotations

from hpcray import ids
from hpcray._store import StoreError
from hpcray.runtime.objects import IN_STORE, PENDING, READY, ObjectEntry


class BorrowingMixin:
    """The cross-node reference counting part of NodeManager (multi-node only)."""

    # ------------------------------------------------------------------ registering
    def _register_borrower(self, object_id: bytes, rank: int, count: int = 1) -> None:
        """Have the owner count `rank` as a holder of `object_id`, `count` times more."""
        owner = ids.owner_rank(object_id)
        if rank == owner:
            return  # the owner counts its own holders
        entry = self.objects.get(object_id)
        if owner == self.rank:
            if entry is not None:
                self._count_borrower(object_id, entry, rank, count)
        elif entry is None or entry.lent > 0 or entry.escaped:
            self._send_to(owner, ("borrow", object_id, rank, count))
        else:  # covered only by the task that brought it: its submitter registers
            if entry.deferred is None:
                entry.deferred = {}
            entry.deferred[rank] = entry.deferred.get(rank, 0) + count

    def _count_borrower(self, object_id: bytes, entry: ObjectEntry, rank: int,
                        delta: int) -> None:
        borrowers = entry.borrowers
        if borrowers is None:
            borrowers = entry.borrowers = {}
        total = borrowers.get(rank, 0) + delta
        if total:
            borrowers[rank] = total
        else:
            del borrowers[rank]
            if not borrowers:
                entry.borrowers = None
                self._release_if_unused(object_id, entry)

    def _cm_borrow(self, source: int, object_id: bytes, rank: int, count: int) -> None:
        entry = self.objects.get(object_id)
        if entry is not None:
            self._count_borrower(object_id, entry, rank, count)

    def _cm_release(self, source: int, object_id: bytes, count: int) -> None:
        entry = self.objects.get(object_id)
        if entry is not None:
            self._count_borrower(object_id, entry, source, -count)

    def _drop_borrowed(self, object_id: bytes, entry: ObjectEntry) -> None:
        """Nothing on this node holds an object another node owns: forget it."""
        del self.objects[object_id]
        if entry.pin is not None:  # the copy stays, evictable, for a later pull
            entry.pin.release()
            entry.pin = None
        owner = entry.owner
        if entry.deferred:  # not reported through a task reply: register directly
            for rank, count in entry.deferred.items():
                self._send_to(owner, ("borrow", object_id, rank, count))
        if entry.lent:
            self._send_to(owner, ("release", object_id, entry.lent))
        for key in entry.contained:
            self._decref(key)

    # ------------------------------------------------------------------ tasks run here
    def _hold_task_refs(self, spec, deps, lender: int) -> None:
        """A task from node `lender` runs here: hold its argument refs until it ends."""
        where = dict(deps)
        for object_id in dict.fromkeys(spec.contained):
            if len(object_id) != ids.OBJECT_ID_SIZE:
                continue  # an actor handle
            entry = self.objects.get(object_id)
            if entry is None:
                if ids.owner_rank(object_id) == self.rank:
                    continue  # freed here already: the task gets ObjectFreedError
                entry = self.objects[object_id] = ObjectEntry(ids.owner_rank(object_id))
                entry.lender = lender
            entry.refs += 1
            described = where.get(object_id)
            if described is not None and entry.state == PENDING:
                self._fill_entry(object_id, entry, described)

    def _release_task_holds(self, spec, lender: int) -> list:
        """The task from `lender` ended here: drop its holds; -> what this node keeps,
        as [(object_id, [(rank, count), ...])] for the lender to register."""
        kept = []
        taken = []
        for object_id in dict.fromkeys(spec.contained):
            entry = self.objects.get(object_id)
            if entry is None or len(object_id) != ids.OBJECT_ID_SIZE:
                continue
            reports = None
            if entry.owner != self.rank and entry.lent == 0 and entry.lender == lender \
                    and not entry.escaped:
                reports = entry.deferred or {}
                entry.deferred = None
            taken.append((object_id, entry, reports))
        for object_id, _entry, _reports in taken:
            self._decref(object_id)
        for object_id, entry, reports in taken:
            if reports is None:
                continue
            registrations = list(reports.items())
            if self.objects.get(object_id) is entry:  # still held here afterwards
                entry.lent += 1
                entry.lender = None
                registrations.append((self.rank, 1))
            if registrations:
                kept.append((object_id, registrations))
        return kept

    def _register_kept(self, kept) -> None:
        """A task this node submitted reports the refs its executor kept."""
        for object_id, registrations in kept:
            for rank, count in registrations:
                self._register_borrower(object_id, rank, count)

    def _foreign_results(self, results) -> None:
        """Results from another node hold refs that node registered for this one."""
        for _object_id, _inline, contained, _size in results:
            for key in contained:
                if len(key) != ids.OBJECT_ID_SIZE or ids.owner_rank(key) == self.rank:
                    continue
                entry = self.objects.get(key)
                if entry is None:
                    entry = self.objects[key] = ObjectEntry(ids.owner_rank(key))
                entry.lent += 1
                entry.lender = None

    # ------------------------------------------------------------------ copies
    def _delete_copies(self, object_id: bytes) -> None:
        """The owner freed a value other nodes may have copies of: the GCS tells them."""
        self.gcs.request("delete_object", object_id)

    def _on_object_deleted(self, object_id: bytes, _payload) -> None:
        entry = self.objects.get(object_id)
        if entry is not None:
            if entry.owner == self.rank or not entry.primary:
                return  # still held here (a later copy, or a stale notice)
            entry.primary = False
            self._release_if_unused(object_id, entry)
            if self.objects.get(object_id) is entry:
                return
        try:
            self.store.delete(object_id)
        except StoreError:
            pass

    def _use_cached_copy(self, object_id: bytes, entry: ObjectEntry) -> bool:
        """A copy this node kept after it last held the object: no pull needed."""
        buffer = self.store.get(object_id)
        if buffer is None:
            return False
        buffer.release()
        entry.state = PENDING
        self._object_ready(object_id, IN_STORE, (), entry.size)
        return entry.state == READY or self.objects.get(object_id) is not entry
