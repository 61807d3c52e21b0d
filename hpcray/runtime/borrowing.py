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
- Refs inside a value that reaches another node travel with it (the value's
  description lists them) and the value holds them there as it does on its owner.
  Described to a known node (the answer to its `watch`), the sender registers that
  node for each of them; described as a task's argument, the submitter's hold on the
  value covers them until `done`, whose report lists those the executor still holds.
- A ref new to a node that is in none of those: the node asks the owner where the
  value is (`watch`), which registers it.

A borrower that received a large value keeps its copy in its store unpinned once it no
longer holds it (evicted when space is needed, reused by a later pull). When the owner
frees an object, the GCS tells every node with a copy to delete it; the node that made
a task's large result keeps that primary copy until then.

Actor handles are counted the same way, by the same functions (an id of 16 bytes is
an actor's, of 20 an object's). The owner is the node that created the actor, whether
it hosts it or the global scheduler placed it elsewhere; each node counts its own
holders in its record of the actor (the ActorRecord where it is hosted, else the
RemoteActor) and the creator's record counts the borrowing nodes too. A call sent to
another node holds the actor until its `done` comes back, so calls in flight finish.
When the owner's count is zero, the actor ends as in one node (after the calls it has;
actors.py `_actor_out_of_scope`), by `end_actor` if another node hosts it. Named and
detached actors never end by scope. A node's record stays when nothing on it holds the
handle any more (it hosts the actor or queues calls): it just gives its registrations
back, and counts as new to the node when a handle comes again.

Messages (control channel):
    borrow(id, rank, n)   a covered node -> owner: count n more for `rank`
    release(id, n)        borrower -> owner: it gives back its n registrations
    end_actor(actor_id)   owner -> the actor's host: no handle is left (task_router.py)
"""

from __future__ import annotations

from hpcray import ids
from hpcray._store import StoreError
from hpcray.runtime import messages
from hpcray.runtime.messages import wire
from hpcray.runtime.object_table import IN_STORE, PENDING, ObjectEntry


class Borrowing:
    """Cross-node reference counts of this node: registrations it counts as an owner,
    those counted for it elsewhere, and the holds of tasks run here for other nodes."""

    HANDLES = {messages.Borrow: "on_borrow", messages.Release: "on_release"}

    def __init__(self, rank: int, objects, store, gcs, peers) -> None:
        self.rank = rank
        self.objects = objects
        self.store = store
        self.gcs = gcs                    # GcsClient
        self.peers = peers
        self.actors = None                # bind()

    def bind(self, actors) -> None:
        self.actors = actors

    # ------------------------------------------------------------------ registering
    def counted(self, key: bytes):
        """What counts the holders of `key` on this node: the ObjectEntry of an object,
        the ActorRecord or RemoteActor of an actor (None if this node has none)."""
        if len(key) == ids.OBJECT_ID_SIZE:
            return self.objects.get(key)
        return self.actors.actor_handles(key)

    def register_borrower(self, key: bytes, rank: int, count: int = 1) -> None:
        """Have the owner count `rank` as a holder of `key`, `count` times more."""
        owner = ids.owner_rank(key)
        if rank == owner:
            return  # the owner counts its own holders
        entry = self.counted(key)
        if owner == self.rank:
            if entry is not None:
                self.count_borrower(key, entry, rank, count)
        elif entry is None or entry.lent > 0 \
                or (entry.refs <= 0 and len(key) == ids.ACTOR_ID_SIZE):  # nothing holds it
            self.peers.send(owner, wire(messages.Borrow, key, rank, count))
        else:  # covered only by the task that brought it: its submitter registers
            if entry.deferred is None:
                entry.deferred = {}
            entry.deferred[rank] = entry.deferred.get(rank, 0) + count

    def count_borrower(self, key: bytes, entry, rank: int, delta: int) -> None:
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
                if len(key) == ids.OBJECT_ID_SIZE:
                    self.objects.release_if_unused(key, entry)
                else:
                    self.actors.actor_unused(key, entry)

    def on_borrow(self, source: int, key: bytes, rank: int, count: int) -> None:
        entry = self.counted(key)
        if entry is not None:
            self.count_borrower(key, entry, rank, count)

    def on_release(self, source: int, key: bytes, count: int) -> None:
        entry = self.counted(key)
        if entry is not None:
            self.count_borrower(key, entry, source, -count)

    def drop_borrowed(self, object_id: bytes, entry: ObjectEntry) -> None:
        """Nothing on this node holds an object another node owns: forget it."""
        del self.objects[object_id]
        self.objects.let_go(object_id, entry)  # the copy stays, evictable, for a later pull
        self.give_registrations_back(object_id, entry.owner, entry.deferred, entry.lent)
        for key in entry.contained:
            self.objects.decref(key)

    def give_up_borrowing(self, object_id: bytes, entry: ObjectEntry) -> None:
        """Nothing here holds an object whose primary copy this node keeps for its
        owner: give the registrations back, keep the entry (and copy) until the owner
        frees the object (the GCS's delete notice)."""
        deferred, lent = entry.deferred, entry.lent
        entry.deferred = entry.lender = None
        entry.lent = 0
        self.give_registrations_back(object_id, entry.owner, deferred, lent)

    def drop_borrowed_actor(self, actor_id: bytes, handles) -> None:
        """Nothing on this node holds a handle of an actor another node owns: give its
        registrations back. The record stays (it hosts the actor or queues calls)."""
        deferred, lent = handles.deferred, handles.lent
        handles.deferred = handles.lender = None
        handles.lent = 0
        self.give_registrations_back(actor_id, handles.owner, deferred, lent)

    def give_registrations_back(self, key: bytes, owner: int, deferred, lent: int) -> None:
        """This node lets go of `key`: registrations it still had to make (not reported
        through a task reply) go straight to the owner, then its own `lent` come back."""
        if deferred:
            for rank, count in deferred.items():
                self.peers.send(owner, wire(messages.Borrow, key, rank, count))
        if lent:
            self.peers.send(owner, wire(messages.Release, key, lent))

    # ------------------------------------------------------------------ tasks run here
    def hold_task_refs(self, spec, deps, lender: int) -> None:
        """A task from node `lender` runs here: hold its argument refs until it ends.
        A task of this node's own that came back through the global scheduler is held
        by its submission already (and its end releases only that)."""
        if lender == self.rank:
            return
        where = dict(deps)
        for key in dict.fromkeys(spec.contained):
            if len(key) != ids.OBJECT_ID_SIZE:
                self.hold_task_actor(key, lender)
                continue
            entry = self.objects.get(key)
            if entry is None:
                if ids.owner_rank(key) == self.rank:
                    continue  # freed here already: the task gets ObjectFreedError
                entry = self.objects[key] = ObjectEntry(ids.owner_rank(key))
            if entry.refs <= 0 and entry.lent == 0 and entry.lender is None:
                entry.lender = lender  # nothing here covers it (new, or a primary copy)
            entry.refs += 1
            described = where.get(key)
            if described is not None and entry.state == PENDING:
                self.fill_entry(key, entry, described, lender)

    def hold_task_actor(self, actor_id: bytes, lender: int) -> None:
        handles = self.actors.actor_handles(actor_id, create=True)
        if handles is None:
            return
        if handles.refs <= 0 and handles.lent == 0 and handles.owner != self.rank:
            handles.lender = lender
        handles.refs += 1

    def borrow_contained(self, contained, lender: int | None) -> None:
        """Refs inside a value that reached this node: registered for it by the sender
        (`lender` None), or covered by the task from `lender` that brought the value."""
        for key in contained:
            if ids.owner_rank(key) == self.rank:
                continue  # this node owns it and counts its holders itself
            if len(key) == ids.OBJECT_ID_SIZE:
                entry = self.objects.get(key)
                if entry is None:
                    entry = self.objects[key] = ObjectEntry(ids.owner_rank(key))
            else:
                entry = self.actors.actor_handles(key, create=True)
                if entry is None:
                    continue
            if lender is None:
                entry.lent += 1
                entry.lender = None
            elif entry.lent == 0 and entry.refs <= 0 and entry.lender is None:
                entry.lender = lender

    def give_back(self, contained) -> None:
        """Registrations made for this node that it will not use (a second description
        of a value it already had): one release each, to each ref's owner."""
        for key in contained:
            owner = ids.owner_rank(key)
            if owner != self.rank:
                self.peers.send(owner, wire(messages.Release, key, 1))

    def release_task_holds(self, spec, lender: int) -> list:
        """The task from `lender` ended here: drop its holds; -> what this node keeps,
        as [(id, [(rank, count), ...])] for the lender to register. That includes refs
        inside its argument values that something here still holds."""
        kept = []
        taken = []
        held_keys = dict.fromkeys(spec.contained)
        inside = {}
        for dep in spec.deps:
            entry = self.objects.get(dep)
            if entry is not None:
                inside.update(dict.fromkeys(k for k in entry.contained if k not in held_keys))
        for key in (*held_keys, *inside):
            entry = self.counted(key)
            if entry is None:
                continue
            reports = None
            if entry.owner != self.rank and entry.lent == 0 and entry.lender == lender:
                reports = entry.deferred or {}
                entry.deferred = None
            taken.append((key, entry, reports))
        for key, _entry, _reports in taken:
            if key in held_keys:
                self.objects.decref(key)
        for key, entry, reports in taken:
            if reports is None:
                continue
            registrations = list(reports.items())
            # Still used here: a holder, or (objects) a waiter or a pull in progress. An
            # entry kept only as the primary copy of a task's result holds nothing: were
            # it registered, the owner would wait for a release that never comes, and
            # the owner's free is what ends the primary copy.
            held = entry.refs > 0 or (len(key) == ids.OBJECT_ID_SIZE
                                      and self.objects.get(key) is entry
                                      and bool(entry.waiters or entry.pulling))
            if held:  # still held here afterwards
                entry.lent += 1
                entry.lender = None
                registrations.append((self.rank, 1))
            if registrations:
                kept.append((key, registrations))
        return kept

    def register_kept(self, kept) -> None:
        """A task this node submitted reports the refs its executor kept."""
        for key, registrations in kept:
            for rank, count in registrations:
                self.register_borrower(key, rank, count)

    def foreign_results(self, results) -> None:
        """Results from another node hold refs that node registered for this one."""
        for _object_id, _inline, contained, _size in results:
            self.borrow_contained(contained, None)

    # ------------------------------------------------------------------ copies
    def delete_copies(self, object_id: bytes) -> None:
        """The owner freed a value other nodes may have copies of: the GCS tells them."""
        self.gcs.request("delete_object", object_id)

    def on_object_deleted(self, object_id: bytes, _payload) -> None:
        entry = self.objects.get(object_id)
        if entry is not None:
            if entry.owner == self.rank or not entry.primary:
                return  # still held here (a later copy, or a stale notice)
            entry.primary = False
            self.objects.release_if_unused(object_id, entry)
            if self.objects.get(object_id) is entry:
                return
        try:
            self.store.delete(object_id)
        except StoreError:
            pass

    def fill_entry(self, object_id: bytes, entry: ObjectEntry, where,
                   lender: int | None = None) -> None:
        """The value of a PENDING entry is known: inline bytes or a location, and the refs
        inside it, which the value holds here. Registered for this node by the sender
        (`lender` None), or covered by the task from `lender` that brought the value."""
        entry.watched = True
        contained = where[-1]
        if entry.contained:  # known already (held through it): not held twice
            if lender is None:
                self.give_back(contained)
            contained = ()
        self.borrow_contained(contained, lender)
        if where[0] == "inline":
            self.objects.object_ready(object_id, where[1], contained, len(where[1]))
        else:
            self.objects.object_ready(object_id, IN_STORE, contained, where[2], where[1])
