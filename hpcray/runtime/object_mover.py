"""Objects another node holds: asking the owner where a value is, and pulling its bytes.

A node that needs an object it does not have asks its owner ("watch"); the owner
answers ("located") with the inline bytes or the rank holding them, once the value
exists. The node then pulls the bytes from that rank, chunk by chunk over MPI, straight
into a buffer it allocated in its own store ("pull"; "pull_failed" when that rank no
longer has them), and the GCS records the new copy.
"""

from __future__ import annotations

from hpcray import exceptions, ids
from hpcray.runtime import messages
from hpcray.runtime.messages import wire
from hpcray.runtime.object_table import IN_STORE, PENDING, READY, REMOTE, ObjectEntry
from hpcray.serialization import error_bytes


class ObjectMover:
    """Values this node needs from other nodes: asking owners where they are, pulling
    the bytes into this node's store, serving other nodes' pulls."""

    HANDLES = {messages.Watch: "on_watch", messages.Located: "on_located",
               messages.Pull: "on_pull", messages.PullFailed: "on_pull_failed"}

    def __init__(self, rank: int, cluster, objects, borrowing, store, spiller, gcs, peers,
                 recorder) -> None:
        self.rank = rank
        self.cluster = cluster            # ClusterLink
        self.transport = cluster.transport
        self.objects = objects
        self.borrowing = borrowing
        self.store = store
        self.spiller = spiller
        self.gcs = gcs
        self.peers = peers
        self.recorder = recorder  # records each pull for the timeline

    def remote_entry(self, object_id: bytes):
        """An entry for a ref another node owns that this node has not seen: the owner
        registers this node as a borrower and says where the value is."""
        if len(object_id) != ids.OBJECT_ID_SIZE:
            return None
        owner = ids.owner_rank(object_id)
        if owner == self.rank or owner >= self.cluster.size:
            return None
        entry = self.objects[object_id] = ObjectEntry(owner)
        if owner in self.cluster.dead_nodes:  # ULFM: nobody can say where it is
            self.objects.object_ready(object_id, owner_died(object_id, owner), (), 0)
            return entry
        entry.lent = 1
        entry.watched = True
        self.peers.send(owner, wire(messages.Watch, object_id, True))
        return entry

    def watch(self, object_id: bytes, entry: ObjectEntry) -> None:
        """Ask the owner where the value of an entry this node already holds is."""
        entry.watched = True
        self.peers.send(entry.owner, wire(messages.Watch, object_id, False))

    def on_watch(self, source: int, object_id: bytes, register: bool) -> None:
        entry = self.objects.get(object_id)
        if entry is None:
            self.peers.send(source, wire(messages.Located, object_id, ("inline", error_bytes(
                exceptions.ObjectFreedError(f"Object {object_id.hex()} was freed before "
                                            "another node read it.")), ())))
            return
        if register:
            self.borrowing.count_borrower(object_id, entry, source, 1)

        def answer(_oid=None):
            self.peers.send(source, wire(messages.Located, object_id,
                                   self.describe_value(entry, dest=source)))

        if entry.state == PENDING:
            if entry.avail_waiters is None:
                entry.avail_waiters = [answer]
            else:
                entry.avail_waiters.append(answer)
        else:
            answer()

    def on_located(self, source: int, object_id: bytes, where) -> None:
        entry = self.objects.get(object_id)
        if entry is not None and entry.state == PENDING:
            self.borrowing.fill_entry(object_id, entry, where)
        else:  # known meanwhile (or dropped): the registrations made for us go back
            self.borrowing.give_back(where[-1])

    def start_pull(self, object_id: bytes, entry: ObjectEntry) -> None:
        if entry.pulling or self.use_cached_copy(object_id, entry):
            return
        entry.pulling = True
        transport = self.transport
        try:
            view = self.spiller.create_object(object_id, entry.size, populate=True)
        except Exception as exc:  # noqa: BLE001 - the store is full: readers get the error
            entry.pulling = False
            error = exceptions.ObjectStoreFullError(
                f"No room in this node's object store for {entry.size} bytes of object "
                f"{object_id.hex()} pulled from node {entry.location}: {exc}")
            entry.state = PENDING
            self.objects.object_ready(object_id, error_bytes(error), (), 0)
            return
        tag = transport.new_transfer_tag()
        transfer = transport.start_receive(entry.location, tag, view)
        transfer.on_done = lambda: self.pull_done(tag)
        self.cluster.pulls[tag] = (object_id, view, transfer)
        self.recorder.pull_started(tag)
        self.peers.send(entry.location, wire(messages.Pull, object_id, tag))

    def on_pull(self, source: int, object_id: bytes, tag: int) -> None:
        buffer = self.store.get(object_id)
        if buffer is not None:
            self.transport.start_send(source, tag, memoryview(buffer), on_done=buffer.release)
            self.recorder.count("bytes_sent", len(buffer))
        else:  # spilled: sent from its file, this node's store left alone
            entry = self.objects.get(object_id)
            view = self.spiller.file_view(object_id) if entry is not None else None
            if view is None:
                self.peers.send(source, wire(messages.PullFailed, object_id, tag))
                return
            self.transport.start_send(source, tag, view)  # unmapped when the send lets go
            self.recorder.count("bytes_sent", len(view))
        self.peers.on_sent()

    def on_pull_failed(self, source: int, object_id: bytes, tag: int) -> None:
        entry = self.abandon_pull(source, object_id, tag)
        if entry is not None:
            entry.state = PENDING
            self.objects.object_ready(object_id, error_bytes(exceptions.ObjectLostError(
                f"Object {object_id.hex()} is no longer on node {source}.")), (), 0)

    def abandon_pull(self, source: int, object_id: bytes, tag: int):
        """Give up a pull from `source`: its buffer is freed; returns the object's entry
        (still REMOTE, no longer pulling), or None if the pull or the entry is gone."""
        pulled = self.cluster.pulls.pop(tag, None)
        if pulled is None:
            return None
        _, view, transfer = pulled
        self.recorder.pull_ended(tag, object_id, source, -1)
        self.transport.cancel_receive(transfer)  # the buffer is ours again
        view.release()
        self.store.abort(object_id)
        entry = self.objects.get(object_id)
        if entry is not None:
            entry.pulling = False
        return entry

    def pull_done(self, tag: int) -> None:
        pulled = self.cluster.pulls.pop(tag, None)
        if pulled is None:
            return
        object_id, view, _ = pulled
        view.release()
        self.store.seal(object_id, unclaimed=True)
        entry = self.objects.get(object_id)
        if entry is None:
            self.recorder.pull_ended(tag, object_id, -1, -1)
            self.store.delete(object_id)
            return
        entry.pulling = False
        entry.state = PENDING
        self.recorder.pull_ended(tag, object_id, entry.location, entry.size)
        self.objects.object_ready(object_id, IN_STORE, (), entry.size)
        self.gcs.request("add_location", object_id, self.rank, entry.size, entry.owner, None)

    def use_cached_copy(self, object_id: bytes, entry: ObjectEntry) -> bool:
        """A copy this node kept after it last held the object: no pull needed."""
        buffer = self.store.get(object_id)
        if buffer is None:
            return False
        buffer.release()
        entry.state = PENDING
        self.objects.object_ready(object_id, IN_STORE, (), entry.size)
        return entry.state == READY or self.objects.get(object_id) is not entry

    def describe_value(self, entry: ObjectEntry, dest: int | None = None):
        """Where another node gets this value, with the refs inside it. Sent to `dest`,
        those refs are registered for it; without (a task's argument, its node not
        chosen yet) this node's hold on the value covers them until the task's `done`."""
        contained = tuple(entry.contained)
        if dest is not None:
            for key in contained:
                self.borrowing.register_borrower(key, dest)
        if entry.inline is not IN_STORE:
            return ("inline", entry.inline, contained)
        if entry.state == REMOTE:
            return ("at", entry.location, entry.size, contained)
        entry.shipped = True
        return ("at", self.rank, entry.size, contained)


def owner_died(object_id: bytes, owner: int) -> bytes:
    """The error value of an object whose owner's node died (Ray's OwnerDiedError)."""
    return error_bytes(exceptions.OwnerDiedError(
        f"Object {object_id.hex()} was lost: its owner, node {owner} (rank {owner}), died."))
