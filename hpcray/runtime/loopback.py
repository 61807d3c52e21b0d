"""The transport of a cluster of one: messages a node sends itself.

One node runs the same code as many (the GCS, the tasks table, named actors, the global
scheduler are all there, on rank 0); only the transport differs. There is no other rank,
so nothing ever needs polling: a message to itself is queued and the event loop is woken
(`wake`), and object transfers cannot happen (every copy is local).
"""

from __future__ import annotations


class LoopbackTransport:
    rank = 0
    size = 1
    poll_slowly = False
    expecting = False  # no transfer between ranks is ever in flight (MpiTransport.expecting)
    needs_polling = False  # the event loop sleeps until woken: an idle node costs nothing

    dead: frozenset = frozenset()  # ranks known gone: none, in a cluster of one

    def __init__(self) -> None:
        self._inbox: list = []

    @property
    def busy(self) -> bool:
        """A message to itself waits for the next pass of the event loop."""
        return bool(self._inbox)

    def send(self, dest: int, message, channel: str = "control") -> None:
        if dest != 0:
            raise ValueError(f"a cluster of one has no rank {dest}")
        self._inbox.append((0, channel, message))

    def broadcast(self, message, channel: str = "control") -> None:
        """To every other rank: there is none."""

    corked = False

    def cork(self) -> None:
        """(MpiTransport batches a pass's messages; here each is in the inbox at once.)"""

    def uncork(self) -> None:
        pass

    def live_ranks(self) -> list:
        return [0]

    def poll(self) -> list:
        messages, self._inbox = self._inbox, []
        return messages

    def progress(self) -> list:
        return []

    def close(self, drain_timeout: float = 1.0) -> None:
        self._inbox = []
