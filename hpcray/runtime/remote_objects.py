"""Objects another node holds: asking the owner where a value is, and pulling its bytes.

A node that needs an object it does not have asks its owner ("watch"); the owner
answers ("located") with the inline bytes or the rank holding them, once the value
exists. The node then pulls the bytes from that rank, chunk by chunk over MPI, straight
into a buffer it allocated in its own store ("pull"; "pull_failed" when that rank no
longer has them), and the GCS records the new copy.
"""

from __future__ import annotations

from hpcray import exceptions, ids
from hpcray.runtime.objects import IN_STORE, PENDING, ObjectEntry
from hpcray.serialization import error_bytes


class RemoteObjectsMixin:
    """The object-moving part of ClusterMixin."""

    def _remote_entry(self, object_id: bytes):
        """An entry for a ref another node owns that this node has not seen: the owner
        registers this node as a borrower and says where the value is."""
        if self.cluster is None or len(object_id) != ids.OBJECT_ID_SIZE:
            return None
        owner = ids.owner_rank(object_id)
        if owner == self.rank or owner >= self.cluster.size:
            return None
        entry = self.objects[object_id] = ObjectEntry(owner)
        entry.lent = 1
        entry.watched = True
        self._send_to(owner, ("watch", object_id, True))
        return entry

    def _watch(self, object_id: bytes, entry: ObjectEntry) -> None:
        """Ask the owner where the value of an entry this node already holds is."""
        entry.watched = True
        self._send_to(entry.owner, ("watch", object_id, False))

    def _cm_watch(self, source: int, object_id: bytes, register: bool) -> None:
        entry = self.objects.get(object_id)
        if entry is None:
            self._send_to(source, ("located", object_id, ("inline", error_bytes(
                exceptions.ObjectFreedError(f"Object {object_id.hex()} was freed before "
                                            "another node read it.")), ())))
            return
        if register:
            self._count_borrower(object_id, entry, source, 1)

        def answer(_oid=None):
            self._send_to(source, ("located", object_id,
                                   self._describe_value(entry, dest=source)))

        if entry.state == PENDING:
            if entry.avail_waiters is None:
                entry.avail_waiters = [answer]
            else:
                entry.avail_waiters.append(answer)
        else:
            answer()

    def _cm_located(self, source: int, object_id: bytes, where) -> None:
        entry = self.objects.get(object_id)
        if entry is not None and entry.state == PENDING:
            self._fill_entry(object_id, entry, where)
        else:  # known meanwhile (or dropped): the registrations made for us go back
            self._give_back(where[-1])

    def _start_pull(self, object_id: bytes, entry: ObjectEntry) -> None:
        if entry.pulling or self._use_cached_copy(object_id, entry):
            return
        entry.pulling = True
        transport = self._transport
        try:
            view = self.store.create_object(object_id, entry.size, populate=True)
        except Exception as exc:  # noqa: BLE001 - the store is full: readers get the error
            entry.pulling = False
            error = exceptions.ObjectStoreFullError(
                f"No room in this node's object store for {entry.size} bytes of object "
                f"{object_id.hex()} pulled from node {entry.location}: {exc}")
            entry.state = PENDING
            self._object_ready(object_id, error_bytes(error), (), 0)
            return
        tag = transport.new_transfer_tag()
        transfer = transport.start_receive(entry.location, tag, view)
        transfer.on_done = lambda: self._pull_done(tag)
        self.cluster.pulls[tag] = (object_id, view, transfer)
        self._send_to(entry.location, ("pull", object_id, tag))

    def _cm_pull(self, source: int, object_id: bytes, tag: int) -> None:
        buffer = self.store.get(object_id)
        if buffer is None:
            self._send_to(source, ("pull_failed", object_id, tag))
            return
        self._transport.start_send(source, tag, memoryview(buffer), on_done=buffer.release)
        self._wake_cluster()

    def _cm_pull_failed(self, source: int, object_id: bytes, tag: int) -> None:
        pulled = self.cluster.pulls.pop(tag, None)
        if pulled is None:
            return
        _, view, transfer = pulled
        self._transport.cancel_receive(transfer)  # the buffer is ours again
        view.release()
        self.store.abort(object_id)
        entry = self.objects.get(object_id)
        if entry is not None:
            entry.pulling = False
            entry.state = PENDING
            self._object_ready(object_id, error_bytes(exceptions.ObjectLostError(
                f"Object {object_id.hex()} is no longer on node {source}.")), (), 0)

    def _pull_done(self, tag: int) -> None:
        pulled = self.cluster.pulls.pop(tag, None)
        if pulled is None:
            return
        object_id, view, _ = pulled
        view.release()
        self.store.seal(object_id)
        entry = self.objects.get(object_id)
        if entry is None:
            self.store.delete(object_id)
            return
        entry.pulling = False
        entry.state = PENDING
        self._object_ready(object_id, IN_STORE, (), entry.size)
        self.gcs.request("add_location", object_id, self.rank, entry.size, entry.owner, None)
