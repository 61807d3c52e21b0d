"""Objects another node holds: asking the owner where a value is, and pulling its bytes.

A node that needs an object it does not have asks its owner ("watch"); the owner
answers ("located") with the inline bytes or the rank holding them, once the value
exists. The node then pulls the bytes from that rank, chunk by chunk over MPI, straight
into a buffer it allocated in its own store ("pull"), and the GCS records the new copy.
From a rank on its own host it copies them out of that rank's store instead, unasked
(host_stores.py); what that store lacks is pulled.

Pulls are batched: the objects wanted while one `get` registers its waiters, or while
one batch of messages is handled (`batched`), go as one `Pull` per holder and one
transfer, each object into its own buffer (a segment). The transfer's first segment
says which of them the holder still had; an empty message stands in for each it had
not, so the rest still match their receives (that object's readers get
ObjectLostError). A `get` of 10,000 objects from one node is thus a few messages and
transfers, not 10,000 of each. An object of the relay's size (relay.py) goes alone, so
that its holder may have a node with a copy send it instead.
"""

from __future__ import annotations

import contextlib
import itertools

from hpcray import exceptions, ids
from hpcray._store import ObjectTooLargeError
from hpcray.runtime import hops, messages
from hpcray.runtime.messages import wire
from hpcray.runtime.object_table import IN_STORE, PENDING, READY, REMOTE, ObjectEntry
from hpcray.serialization import error_bytes


# One pull's objects at most: a large `get` becomes several transfers that each end
# (and make their objects ready) as soon as their bytes are in.
_BATCH_OBJECTS = 1024
_BATCH_BYTES = 64 << 20


class ObjectMover:
    """Values this node needs from other nodes: asking owners where they are, pulling
    the bytes into this node's store, serving other nodes' pulls."""

    HANDLES = {messages.Watch: "on_watch", messages.Located: "on_located",
               messages.Pull: "on_pull"}

    def __init__(self, rank: int, cluster, objects, borrowing, store, spiller, gcs, peers,
                 recorder, host_stores) -> None:
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
        self.host_stores = host_stores  # HostStores: the stores of this host's other nodes
        self._host_copies = itertools.count(1)  # their keys in the recorder: -1, -2, ...
        self._copying = 0         # copies from this host's other stores in flight
        self._batching = 0        # > 0 inside `batched`: pulls wait for its end
        self.copy_missing = None  # Lineage.copy_missing: an owned value's copy was gone
        self._wanted: dict[int, list] = {}   # holder rank -> [(object_id, entry)]
        # Pulls that found the store full while others were in flight: tried again as
        # those end (object id -> (entry, relay that failed it or None)).
        self._no_room: dict[bytes, tuple] = {}
        self.relay = None         # bind(): ObjectRelay (relay.py)

    def bind(self, relay) -> None:
        self.relay = relay

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

    @contextlib.contextmanager
    def batched(self):
        """Pulls started inside go out together at the end, one per holder."""
        self._batching += 1
        try:
            yield
        finally:
            self._batching -= 1
            if not self._batching and self._wanted:
                self.flush_pulls()

    def start_pull(self, object_id: bytes, entry: ObjectEntry) -> None:
        if entry.pulling or self.use_cached_copy(object_id, entry) or \
                self.relay.buffer_busy(object_id, entry):
            return
        if entry.location in getattr(self.transport, "dead", ()) and \
                entry.location not in self.cluster.dead_nodes:
            return  # lost with its node: NodeDied (soon) rebuilds it or asks its owner
        entry.pulling = True
        self._wanted.setdefault(entry.location, []).append((object_id, entry))
        if not self._batching:
            self.flush_pulls()

    def flush_pulls(self) -> None:
        wanted, self._wanted = self._wanted, {}
        self.host_stores.begin_batch()
        for location, items in wanted.items():
            batch, batch_bytes = [], 0
            for object_id, entry in items:
                if self.objects.get(object_id) is not entry or not entry.pulling:
                    continue  # dropped meanwhile
                if hops.ENABLED:
                    hops.stamp("pull.create")
                view = self._create(object_id, entry, None)
                if hops.ENABLED:
                    hops.stamp("pull.created")
                if view is None or self._copy_on_host(location, object_id, entry, view):
                    continue
                if entry.size >= self.relay.min_bytes:  # alone: its holder may relay it
                    self._pull(location, [(object_id, entry, view)])
                    continue
                batch.append((object_id, entry, view))
                batch_bytes += entry.size
                if len(batch) >= _BATCH_OBJECTS or batch_bytes >= _BATCH_BYTES:
                    self._pull(location, batch)
                    batch, batch_bytes = [], 0
            if batch:
                self._pull(location, batch)

    def _create(self, object_id: bytes, entry: ObjectEntry, failed_relay: int | None):
        """A buffer in this store for a pulled copy, or None: the store is full, and the
        pull waits for the ones in flight (their copies can be spilled once in), or, with
        none in flight, its readers get the error."""
        try:
            return self.spiller.create_object(object_id, entry.size, populate=True)
        except Exception as exc:  # noqa: BLE001 - the store is full
            entry.pulling = False
            if (self.cluster.pulls or self._copying) and \
                    not isinstance(exc, ObjectTooLargeError):
                self._no_room[object_id] = (entry, failed_relay)
                return None
            error = exceptions.ObjectStoreFullError(
                f"No room in this node's object store for {entry.size} bytes of object "
                f"{object_id.hex()} pulled from node {entry.location}: {exc}")
            copy = (entry.location, entry.size)
            entry.state = PENDING
            self.objects.object_ready(object_id, error_bytes(error), (), 0)
            entry.failed_pull = copy  # not its value for good: a later get pulls again
            return None

    def pull_direct(self, object_id: bytes, entry: ObjectEntry, failed: int) -> None:
        """Pull again from the holder itself: the relay `failed` gave no copy."""
        if entry.pulling or self.relay.buffer_busy(object_id, entry):
            return
        entry.pulling = True
        view = self._create(object_id, entry, failed)
        if view is not None:
            self._pull(entry.location, [(object_id, entry, view)], failed)

    def _copy_on_host(self, holder: int, object_id: bytes, entry: ObjectEntry,
                      view: memoryview) -> bool:
        """Copy the object from the holder's own store when it shares this host
        (host_stores.py). False: pull it over MPI."""
        buffer = self.host_stores.take(holder, object_id, entry.size)
        if buffer is None:
            return False
        if hops.ENABLED:
            hops.stamp("host.taken")
        tag = -next(self._host_copies)  # (MPI transfer tags are positive)
        self.recorder.pull_started(tag)
        self._copying += 1

        def copied(ok: bool) -> None:
            if hops.ENABLED:
                hops.stamp("host.copied")
            self._copying -= 1
            if ok:
                self.recorder.count("bytes_copied_on_host", entry.size)
                self._arrived(tag, object_id, view, holder, True)
                self._retry_no_room()
            else:  # the holder's memory could not be read: over MPI after all
                self.recorder.pull_ended(tag, object_id, holder, -1)
                self._pull(holder, [(object_id, entry, view)])
        self.host_stores.copy(buffer, view, copied)
        return True

    def _pull(self, location: int, batch: list, failed_relay: int | None = None) -> None:
        transport = self.transport
        tag = transport.new_transfer_tag()
        # The Pull leaves before the receives are posted (MPI keeps what arrives first for
        # them, in order): the holder starts serving ~30-100 us sooner.
        objects = [(object_id, entry.size) for object_id, entry, _ in batch]
        if failed_relay is None:
            self.peers.send(location, wire(messages.Pull, tag, objects))
        else:
            self.peers.send(location, wire(messages.PullDirect, tag, objects, failed_relay))
        if hops.ENABLED:
            hops.stamp("pull.sent")
        header = bytearray(len(batch))
        transfer = transport.start_receive(location, tag, [header] + [v for _, _, v in batch])
        transfer.on_done = lambda: self.pull_done(tag)
        self.cluster.pulls[tag] = (location, batch, header, transfer)
        self.recorder.pull_started(tag)

    def on_pull(self, source: int, tag: int, objects: list) -> None:
        self.cluster.pull_came()
        if not self.relay.redirect(source, tag, objects):
            self.serve(source, tag, objects)

    def serve(self, source: int, tag: int, objects: list) -> None:
        """Send these objects to `source` on its transfer `tag` (the ones not here: a 0
        in the first segment and an empty message)."""
        if hops.ENABLED:
            hops.stamp("serve.start")
        header = bytearray(len(objects))
        segments = [header]
        pins = []
        for i, (object_id, size) in enumerate(objects):
            buffer = self.store.get(object_id)
            if buffer is not None:
                pins.append(buffer)
                view = memoryview(buffer)
            else:  # spilled: sent from its file, this node's store left alone
                view = self.spiller.file_view(object_id) if object_id in self.objects else None
            if view is None or len(view) != size:
                segments.append(b"")  # not here: the puller's readers get ObjectLostError
                continue
            header[i] = 1
            segments.append(view)  # a file view is unmapped when the send lets go
            self.recorder.count("bytes_sent", size)

        def release() -> None:
            for buffer in pins:
                buffer.release()
        self.transport.start_send(source, tag, segments, on_done=release, stage=True)
        self.peers.on_sent()
        if hops.ENABLED:
            hops.stamp("serve.posted")

    def pull_done(self, tag: int) -> None:
        if hops.ENABLED:
            hops.stamp("pull.done")
        pulled = self.cluster.pulls.pop(tag, None)
        if pulled is None:
            return
        source, batch, header, _ = pulled
        for i, (object_id, _, view) in enumerate(batch):
            last = i == len(batch) - 1
            if header[i]:
                self._arrived(tag, object_id, view, source, last)
                continue
            view.release()
            self.recorder.pull_ended(tag, object_id, source, -1, last)
            self._lost(object_id, source)
        if hops.ENABLED:
            hops.stamp("pull.ready")
        self._retry_no_room()

    def _arrived(self, tag: int, object_id: bytes, view: memoryview, source: int,
                 last: bool) -> None:
        """A copy from `source` is whole in its buffer: sealed, its readers told, the GCS
        told of the new location (`last`: the last object of pull `tag`)."""
        view.release()
        self.store.seal(object_id, unclaimed=True)
        self.relay.received(object_id)
        entry = self.objects.get(object_id)
        if entry is None:
            self.recorder.pull_ended(tag, object_id, -1, -1, last)
            self.store.delete(object_id)
            return
        entry.pulling = False
        entry.state = PENDING
        self.recorder.pull_ended(tag, object_id, source, entry.size, last)
        self.objects.object_ready(object_id, IN_STORE, (), entry.size)
        self.gcs.request("add_location", object_id, self.rank, entry.size, entry.owner, None)

    def _retry_no_room(self) -> None:
        """A pull ended: those that found the store full try again (its copy, or its
        buffer freed, may make room)."""
        if not self._no_room:
            return
        waiting, self._no_room = self._no_room, {}
        with self.batched():
            for object_id, (entry, failed_relay) in waiting.items():
                if self.objects.get(object_id) is not entry or entry.state != REMOTE:
                    continue  # freed, or known another way meanwhile
                if failed_relay is None:
                    self.start_pull(object_id, entry)
                else:
                    self.pull_direct(object_id, entry, failed_relay)

    def _lost(self, object_id: bytes, source: int) -> None:
        """The holder no longer had the bytes: the owner makes the value again (lineage);
        another node's readers get ObjectLostError."""
        entry = self._abandon(object_id)
        if entry is not None and entry.owner == self.rank:
            self.copy_missing(object_id, entry, source)
            return
        self.object_lost(object_id, entry, source)

    def object_lost(self, object_id: bytes, entry, source: int) -> None:
        """A pull given up: the readers of the object get ObjectLostError."""
        if entry is not None:
            entry.state = PENDING
            self.objects.object_ready(object_id, error_bytes(exceptions.ObjectLostError(
                f"Object {object_id.hex()} is no longer on node {source}.")), (), 0)

    def _abandon(self, object_id: bytes):
        """The buffer of a pull given up is freed; returns the object's entry (still
        REMOTE, no longer pulling), or None if it is gone."""
        if not self.relay.receive_failed(object_id):  # else after the relays from it
            self.store.abort(object_id)
        entry = self.objects.get(object_id)
        if entry is not None:
            entry.pulling = False
        return entry

    def abandon_pull(self, tag: int) -> list:
        """Give up pull `tag` (its holder died, node_failures.py): its buffers are
        freed; returns [(object_id, entry)] of its objects (each entry still REMOTE and
        no longer pulling, or None if gone), for the caller to decide their fate."""
        pulled = self.cluster.pulls.pop(tag, None)
        if pulled is None:
            return []
        source, batch, _, transfer = pulled
        if not transfer.done:
            self.transport.cancel_receive(transfer)  # the buffers are ours again
        abandoned = []
        for i, (object_id, _, view) in enumerate(batch):
            self.recorder.pull_ended(tag, object_id, source, -1, i == len(batch) - 1)
            view.release()
            abandoned.append((object_id, self._abandon(object_id)))
        self._retry_no_room()
        return abandoned

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
