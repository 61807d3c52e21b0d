"""One object pulled by many nodes: the copies serve later pullers (a relay tree).

When many nodes pull one large object (model weights for a task on every rank) from
the node that holds it, that holder sends it itself to `fanout` of them only. Each
later puller is pointed to a node that holds a copy or is receiving one (`Relay`),
which sends it on chunk by chunk as its own chunks arrive (a gated send, transport.py).
The copies form a k-ary tree in the order the pulls came, pipelined by chunks: the
holder's link carries `fanout` copies instead of N, and the time grows with the depth
(log_k N hops of one chunk each), not with N (benchmarks/README.md has the model).

Holder. `trees` is its directory of the copies it seeded, per object it holds: the
members in the order they joined and how many pullers each was given. A Pull of one
object of `min_bytes` or more goes to the first member given fewer than `fanout`
(breadth first), the holder itself included. It learns that a copy is gone when its
node refuses (`RelayRefused`), when a puller comes back (`PullDirect`: its relay died
or its copy failed) and when the node dies; the tree goes when the holder lets go of
its own copy (`forget`).

Relay. On `Relay(puller, tag, ...)` a node sends from its sealed copy (pinned until
sent) or from its receive in progress (`_Source`: the send's chunks wait for the
receive's), and tells the puller `PullFrom`; with neither it answers `RelayRefused`,
and the holder serves the puller itself. A relayed transfer ends with a trailer byte:
1 once the relay's own copy arrived whole, 0 if its pull failed (its holder died or
no longer had the object). Then the relay still sends every chunk (the bytes it
has), so that each receive the puller posted is matched, since an unmatched receive
would take a later transfer's bytes; its buffer is freed only after (`_Source.abort`).

Puller. On `PullFrom` the receive it had posted from the holder (which sends nothing
now) is withdrawn and posted again from the relay, with the trailer. A trailer of 0,
or the relay's death, abandons the copy and asks the holder itself (`PullDirect`).
"""

from __future__ import annotations

import logging
import mmap

from hpcray.runtime import messages
from hpcray.runtime.messages import wire
from hpcray.runtime.object_table import REMOTE

log = logging.getLogger("hpcray.relay")

_SENT = b"\x01"


class _Tree:
    """The copies of one object a holder seeded: who joined, in order, under whom, with
    the tag of the pull that brings each its copy, and how many pullers each was given
    (and which: `asked`, told if their relay dies)."""

    __slots__ = ("members", "given", "parent", "tags", "next", "asked")

    def __init__(self, holder: int) -> None:
        self.members = [holder]
        self.given = {holder: 0}
        self.parent: dict[int, int] = {}  # member -> who sends it its copy
        self.tags: dict[int, int] = {}    # member -> the tag of that pull
        self.next = 0    # members before it were given `fanout` already
        self.asked: list[tuple[int, int, int]] = []   # (relay, puller, tag)

    def place(self, puller: int, tag: int, fanout: int, holder: int) -> int:
        """Who sends to `puller`'s pull `tag`: the first member with room (breadth
        first), else the holder. The puller joins as a leaf (again, if it had a copy
        before). A relay sends from that member's pull named here (or a sealed copy),
        which began before this one: a pull never waits on a later one, so no cycle."""
        self.remove(puller)
        members, given = self.members, self.given
        chosen = holder
        while self.next < len(members):
            member = members[self.next]
            if given[member] < fanout:
                chosen = member
                break
            self.next += 1
        self._join(puller, tag, chosen)
        return chosen

    def direct(self, puller: int, tag: int, holder: int) -> None:
        """The holder sends to `puller` itself (its relay failed)."""
        self.remove(puller)
        self._join(puller, tag, holder)

    def _join(self, puller: int, tag: int, parent: int) -> None:
        self.given[parent] += 1
        self.parent[puller] = parent
        self.tags[puller] = tag
        self.given[puller] = 0
        self.members.append(puller)

    def remove(self, rank: int) -> None:
        """`rank`'s copy is gone or failing: it leaves, with every member placed under
        it (their copies come through it), and whoever sent to it has room again."""
        if rank not in self.parent:
            return  # not a member (the holder is never removed: its tree goes)
        gone = {rank}
        for member in self.members:  # a member joins after whoever sends to it
            if self.parent.get(member) in gone:
                gone.add(member)
        for member in gone:
            parent = self.parent.pop(member)
            del self.given[member]
            del self.tags[member]
            if parent not in gone:
                self.given[parent] -= 1
        self.members = [member for member in self.members if member not in gone]
        self.next = 0


class _Source:
    """This node's receive in progress of an object it relays on to others."""

    __slots__ = ("tag", "transfer", "segment", "view", "finished", "sends", "trailers",
                 "pin", "abort", "waiting")

    def __init__(self, tag: int, transfer, segment: int, view) -> None:
        self.tag = tag                # the pull's
        self.transfer = transfer      # the receive (replaced if it moves to a relay)
        self.segment = segment        # the object's segment in it
        self.view = view              # the buffer it fills (this node's store)
        self.finished = False         # the receive ended (whole, or failed)
        self.sends = 0                # relayed sends not done yet
        self.trailers: list = []      # each send's trailer byte
        self.pin = None               # the sealed copy, kept until the sends end
        self.abort = False            # the receive failed: abort the buffer after them
        self.waiting = None           # an entry to pull again once the buffer is gone

    def gate(self, segment: int, end: int) -> bool:
        """May a relayed send post its chunk of `segment` that ends at `end`."""
        if segment == 0 or self.finished:
            return True
        return segment == 1 and end <= self.transfer.segment_received(self.segment)


class ObjectRelay:
    """The relay tree of objects many nodes pull: the holder's directory of the copies
    it seeded, the relays this node sends, the pulls it gets from a relay."""

    HANDLES = {messages.Relay: "on_relay", messages.PullFrom: "on_pull_from",
               messages.RelayRefused: "on_relay_refused",
               messages.PullDirect: "on_pull_direct", messages.RelayGone: "on_relay_gone"}

    def __init__(self, rank: int, link, objects, store, spiller, peers, recorder,
                 min_bytes: int, fanout: int) -> None:
        self.rank = rank
        self.link = link                  # ClusterLink: `pulls`, the transport
        self.transport = link.transport
        self.objects = objects
        self.store = store
        self.spiller = spiller
        self.peers = peers
        self.recorder = recorder
        self.min_bytes = max(1, min_bytes)
        self.fanout = max(1, fanout)
        self.mover = None                 # bind()
        self.copy_lost = None             # bind(): NodeFailures.copy_lost
        self.trees: dict[bytes, _Tree] = {}       # holder: object id -> its copies
        self.sources: dict[bytes, _Source] = {}   # relay: object id -> its receive
        self.relayed: dict[int, tuple] = {}       # puller: tag -> (relay, trailer)

    def bind(self, mover, copy_lost) -> None:
        self.mover = mover
        self.copy_lost = copy_lost

    # ------------------------------------------------------------------ holder
    def redirect(self, puller: int, tag: int, objects: list) -> bool:
        """A Pull this node holds the object of: true if a relay serves it instead."""
        if len(objects) != 1:
            return False
        object_id, size = objects[0]
        if size < self.min_bytes or object_id not in self.objects or not (
                self.store.contains(object_id) or object_id in self.spiller.files):
            return False  # small, a copy this node no longer keeps, or not here at all
        tree = self.trees.get(object_id)
        if tree is None:
            tree = self.trees[object_id] = _Tree(self.rank)
        for rank in self.transport.dead:
            tree.remove(rank)
        member = tree.place(puller, tag, self.fanout, self.rank)
        if member == self.rank:
            return False
        tree.asked.append((member, puller, tag))
        self.peers.send(member, wire(messages.Relay, puller, tag, object_id, size,
                                     tree.tags[member]))
        self.recorder.count("relays_asked")
        return True

    def on_relay_refused(self, source: int, puller: int, tag: int, object_id: bytes,
                         size: int) -> None:
        self.recorder.count("relays_refused")
        self._direct(object_id, source, puller, tag)
        self._serve(puller, tag, [(object_id, size)])

    def on_pull_direct(self, source: int, tag: int, objects: list, failed: int) -> None:
        for object_id, _ in objects:
            self._direct(object_id, failed, source, tag)
        self._serve(source, tag, objects)

    def _direct(self, object_id: bytes, failed: int, puller: int, tag: int) -> None:
        """Relay `failed` gave `puller` no copy: it leaves the tree with the members
        under it, and the puller joins under this node, which serves it."""
        tree = self.trees.get(object_id)
        if tree is not None:
            tree.remove(failed)
            tree.direct(puller, tag, self.rank)

    def _serve(self, puller: int, tag: int, objects: list) -> None:
        if puller not in self.transport.dead:
            self.mover.serve(puller, tag, objects)

    def forget(self, object_id: bytes) -> None:
        """This node no longer keeps the object: its directory of copies goes."""
        self.trees.pop(object_id, None)

    def node_lost(self, rank: int) -> None:
        """A node died: it leaves every tree, and the pullers pointed to it are told
        (it may have died before it said PullFrom: they would wait for this node)."""
        dead = self.transport.dead
        for object_id, tree in self.trees.items():
            tree.remove(rank)
            for relay, puller, tag in tree.asked:
                if relay == rank and puller not in dead:
                    self.peers.send(puller, wire(messages.RelayGone, tag, object_id, rank))
            tree.asked = [ask for ask in tree.asked if rank not in (ask[0], ask[1])]

    # ------------------------------------------------------------------ relay
    def on_relay(self, source: int, puller: int, tag: int, object_id: bytes,
                 size: int, source_tag: int) -> None:
        if puller in self.transport.dead:
            return
        segments = None
        buffer = self.store.get(object_id)
        if buffer is not None:  # a sealed copy: pinned until sent
            if len(buffer) == size:
                segments, on_done, gate = [_SENT, memoryview(buffer), _SENT], buffer.release, None
            else:
                buffer.release()
        elif object_id in self.objects and object_id in self.spiller.files:
            view = self.spiller.file_view(object_id)  # unmapped when the send lets go
            if view is not None and len(view) == size:
                segments, on_done, gate = [_SENT, view, _SENT], None, None
        else:
            source_ = self._receiving(object_id, size, source_tag)
            if source_ is not None:
                trailer = bytearray(1)
                source_.trailers.append(trailer)
                source_.sends += 1
                segments, gate = [_SENT, source_.view, trailer], source_.gate
                on_done = lambda: self._relay_sent(object_id)  # noqa: E731
                self.recorder.count("relayed_arriving")  # sent on as it comes in
        if segments is None:
            self.peers.send(source, wire(messages.RelayRefused, puller, tag, object_id, size))
            return
        self.peers.send(puller, wire(messages.PullFrom, tag, object_id, size))
        self.transport.start_send(puller, tag, segments, on_done=on_done, gate=gate)
        self.peers.on_sent()
        self.recorder.count("relayed")
        self.recorder.count("bytes_sent", size)

    def _receiving(self, object_id: bytes, size: int, tag: int) -> _Source | None:
        """This node's pull `tag` of the object, still arriving, as a source to relay
        from (no other: a later pull may wait on the puller's own)."""
        source = self.sources.get(object_id)
        if source is not None:
            return None if source.finished or source.tag != tag else source
        pulled = self.link.pulls.get(tag)
        if pulled is None:
            return None
        _, batch, _, transfer = pulled
        for i, (pulled_id, entry, view) in enumerate(batch):
            if pulled_id == object_id and entry.size == size:
                source = self.sources[object_id] = _Source(tag, transfer, i + 1, view)
                return source
        return None

    def received(self, object_id: bytes) -> None:
        """This node's copy arrived whole and is sealed: the relays from it send the
        rest, then a trailer of 1; the copy stays pinned until they are done."""
        source = self.sources.get(object_id)
        if source is None:
            return
        for trailer in source.trailers:
            trailer[0] = 1
        source.finished = True
        if source.sends:
            source.pin = self.store.get(object_id)
        else:  # its pullers died meanwhile
            del self.sources[object_id]

    def receive_failed(self, object_id: bytes) -> bool:
        """This node's pull of the object ended without it. True if relays still send
        from its buffer: it is aborted after them (they send a trailer of 0)."""
        source = self.sources.get(object_id)
        if source is None:
            return False
        source.finished = True
        if not source.sends:  # its pullers died meanwhile
            del self.sources[object_id]
            return False
        source.abort = True
        return True

    def buffer_busy(self, object_id: bytes, entry) -> bool:
        """Relays still send from this node's buffer of the object (a receive that
        failed, or a copy already deleted here but pinned by them): no new copy can be
        made in the store yet; `entry` is pulled once they are done."""
        source = self.sources.get(object_id)
        if source is None:
            return False
        source.waiting = entry
        return True

    def _relay_sent(self, object_id: bytes) -> None:
        source = self.sources[object_id]
        source.sends -= 1
        if source.sends or not source.finished:
            return
        del self.sources[object_id]
        if source.pin is not None:
            source.pin.release()
        if source.abort:
            self.store.abort(object_id)
        entry = source.waiting
        if entry is not None and self.objects.get(object_id) is entry and \
                entry.state == REMOTE and entry.waiters and not entry.pulling:
            self.mover.start_pull(object_id, entry)

    def moved(self, object_id: bytes, transfer) -> None:
        """This node's receive of the object now comes from a relay."""
        source = self.sources.get(object_id)
        if source is not None:
            source.transfer = transfer

    # ------------------------------------------------------------------ puller
    def on_pull_from(self, source: int, tag: int, object_id: bytes, size: int) -> None:
        pulled = self.link.pulls.get(tag)
        if pulled is None or len(pulled[1]) != 1 or pulled[1][0][0] != object_id:
            self._drain(source, tag, size)
            return
        holder, batch, header, transfer = pulled
        self.transport.cancel_receive(transfer)  # the holder sends nothing on it now
        trailer = bytearray(1)
        moved = self.transport.start_receive(source, tag, [header, batch[0][2], trailer])
        moved.on_done = lambda: self._relayed_done(tag)
        self.link.pulls[tag] = (holder, batch, header, moved)
        self.relayed[tag] = (source, trailer)
        self.moved(object_id, moved)

    def on_relay_gone(self, source: int, tag: int, object_id: bytes, relay: int) -> None:
        pulled = self.link.pulls.get(tag)
        if pulled is not None and tag not in self.relayed and pulled[0] == source and \
                len(pulled[1]) == 1 and pulled[1][0][0] == object_id:
            self._pull_again(tag, relay)  # still posted from the holder: it sends nothing

    def _drain(self, source: int, tag: int, size: int) -> None:
        """A relay sends a pull this node gave up meanwhile (its holder died): take the
        bytes anyway, so that no receive of a later transfer matches them."""
        scratch = mmap.mmap(-1, max(size, 1))  # pages only as they are written
        transfer = self.transport.start_receive(
            source, tag, [bytearray(1), memoryview(scratch)[:size], bytearray(1)])
        transfer.on_done = None  # the scratch goes with the transfer's views

    def _relayed_done(self, tag: int) -> None:
        relay, trailer = self.relayed.pop(tag, (None, None))
        if trailer is None or trailer[0]:
            self.mover.pull_done(tag)
        else:
            log.debug("rank %d: the copy relayed by rank %d failed; pulling it from its "
                      "holder", self.rank, relay)
            self.recorder.count("relays_failed")
            self._pull_again(tag, relay)

    def relay_lost(self, tag: int) -> bool:
        """Pull `tag`'s receive ended with its peer: true if that was a relay (the pull
        goes to the holder again, or is lost with it); else a pull as any other."""
        relayed = self.relayed.pop(tag, None)
        if relayed is None:
            return False
        self._pull_again(tag, relayed[0])
        return True

    def _pull_again(self, tag: int, relay: int) -> None:
        """Relay `relay` gave no copy: from the holder itself (or, with the holder
        dead too, as any copy lost with its node)."""
        for object_id, entry in self.mover.abandon_pull(tag):
            if entry is None or self.objects.get(object_id) is not entry:
                continue
            if entry.location in self.transport.dead:  # the holder died too
                self.copy_lost(object_id, entry, entry.location)
            else:
                self.mover.pull_direct(object_id, entry, relay)

    def idle(self) -> bool:
        """Nothing of the relay left (the simulation's end)."""
        return not (self.trees or self.sources or self.relayed)
