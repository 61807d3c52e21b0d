"""Wake-ups between the nodes of one host.

MPI gives a sleeping event loop no descriptor to wait on, so a node polls for messages:
every 100 us for 5 ms after any activity (cluster._HOT_SLEEP), longer once idle. Under a
stream of tasks those polls are most of a node's passes (a non-zero rank of a 4-rank
driver feed: 4,530 of 6,483 passes found nothing) and their wake-ups take the CPU the
host's workers need. Between ranks of one host a sender can say "look now": after it
posts MPI messages to such a peer it sends that peer's datagram socket one byte, which
wakes its event loop at once. A node whose every peer can wake it polls only as a
safety net (`Network` then uses a longer hot sleep); one with a peer on another host
polls as before.

Each node binds an abstract-namespace Unix datagram socket named after the job and its
rank (gone with the process: nothing to clean up) and gives its name in the start
handshake. Peers share a host for this when their host identity (host_stores.py) and
network namespace are the same. HPCRAY_HOST_WAKES=0 turns it off; it follows
HPCRAY_HOST_READS by default, so that `HPCRAY_HOST_READS=0` still makes one machine
behave as separate hosts.
"""

from __future__ import annotations

import collections
import logging
import os
import socket

from hpcray.runtime.host_stores import host_identity

log = logging.getLogger("hpcray.host_wakes")

# A wake-up is one byte; a few pending are as good as many (the receiver drains them
# all), so the socket keeps little and a sender finding it full has nothing to add.
_RECEIVE_BUFFER = 4096


def wake_identity() -> str:
    """Equal for two processes that can wake each other: one host (host_identity) and
    one network namespace (where abstract socket names live). "" where unknown."""
    host = host_identity()
    if not host:
        return ""
    try:
        return f"{host}:{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return ""


class HostWakes:
    """This node's wake-up socket, and the addresses of the peers on its host."""

    def __init__(self, rank: int, job_key: str, sources, enabled: bool,
                 counters: dict | None = None) -> None:
        self.rank = rank
        # The node's named counts (Recorder.counters): wakes_sent, wakes_received.
        self.counters = collections.Counter() if counters is None else counters
        self.identity = wake_identity() if enabled else ""
        self.address = f"\0hpcray-{job_key}-wake-{rank}"
        self.sock: socket.socket | None = None
        self._peers: dict[int, str] = {}   # rank -> wake address, peers on this host
        self._sources = sources
        self.every_peer_wakes = False      # every other node can wake this one
        if not self.identity:
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
            sock.bind(self.address)
        except OSError as exc:
            log.info("rank %d: no wake-up socket (%s); peers on this host poll for its "
                     "messages", rank, exc)
            self.identity = ""
            return
        self.sock = sock
        sources.register(sock.fileno(), self._on_wake)

    def describe(self) -> dict:
        """What the start handshake tells the other nodes."""
        return {"wake_key": self.identity, "wake_address": self.address}

    def set_peers(self, nodes: dict) -> None:
        """Every node's description (the start handshake): those on this host."""
        if not self.identity:
            return
        self._peers = {rank: node["wake_address"] for rank, node in nodes.items()
                       if rank != self.rank and node.get("wake_key") == self.identity}
        self.every_peer_wakes = len(self._peers) == len(nodes) - 1

    def ring(self, rank: int) -> None:
        """Wake node `rank`'s event loop, if it is on this host (messages were posted)."""
        address = self._peers.get(rank)
        if address is None:
            return
        try:
            self.sock.sendto(b"w", address)
            self.counters["wakes_sent"] += 1
        except BlockingIOError:  # its socket is full: woken already
            pass
        except OSError as exc:  # gone (or never reachable): it polls for what comes
            log.debug("rank %d: cannot wake rank %d (%s)", self.rank, rank, exc)
            self.forget(rank)

    def forget(self, rank: int) -> None:
        """Node `rank` left (or cannot be woken): no more wake-ups for it."""
        self._peers.pop(rank, None)

    def can_wake(self, rank: int) -> bool:
        """Whether `ring(rank)` wakes node `rank`."""
        return rank in self._peers

    def _on_wake(self, _fd, _mask) -> None:
        sock = self.sock
        received = 0
        try:
            while True:
                sock.recv(64)
                received += 1
        except OSError:  # (BlockingIOError: all taken)
            pass
        self.counters["wakes_received"] += received

    def close(self) -> None:
        if self.sock is None:
            return
        self._sources.unregister(self.sock.fileno())
        self.sock.close()
        self.sock = None
