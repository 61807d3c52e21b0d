"""Sending to the other node managers: one object the node's parts share.

A send goes out on the transport's control channel and wakes the node's event loop to
poll MPI soon, since replies come quickly. With HPCRAY_TRACE=1 every message between
nodes is printed (debugging).
"""

from __future__ import annotations

import os

_TRACE = bool(os.environ.get("HPCRAY_TRACE"))


class Peers:
    def __init__(self, transport, rank: int, on_sent) -> None:
        self.transport = transport
        self.rank = rank
        self.on_sent = on_sent   # the event loop polls MPI soon after this

    def send(self, rank: int, message) -> None:
        if _TRACE:
            print(f"[rank {self.rank}] -> {rank} {str(message)[:150]}", flush=True)
        self.transport.send(rank, message)
        self.on_sent()

    def is_live(self, rank: int) -> bool:
        """Whether `rank` is not known dead (a send to a dead rank goes nowhere)."""
        return rank not in self.transport.dead

    def broadcast(self, message) -> None:
        if _TRACE:
            print(f"[rank {self.rank}] -> all {str(message)[:150]}", flush=True)
        self.transport.broadcast(message)
        self.on_sent()
