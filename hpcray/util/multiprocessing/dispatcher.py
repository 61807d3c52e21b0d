"""Which pool actor runs each chunk of work, and the threads that collect the results.

Chunks wait in `backlog` and go to the actor with the fewest chunks in flight (idle ones
in turn), at most `IN_FLIGHT_PER_ACTOR` each (one running, one queued behind it so the
actor never waits for a round trip): like the shared task queue of Python's pool, a slow
chunk holds back only its own actor. A pool actor runs its calls one at a time, in the
order sent, so a busy actor's results come back in that order too: one thread per busy
actor waits on its oldest call, hands the result to its owner (an AsyncResult or an
IMapIterator), sends what the backlog holds, and ends when its actor has nothing in
flight. So nothing polls, and the threads never outnumber the actors.

With `maxtasksperchild`, an actor that was sent that many chunks is replaced by a fresh
one (its initializer runs again); the old one finishes what it was sent, and its handle,
dropped by its thread, ends it.
"""

from __future__ import annotations

import threading
from collections import deque

import hpcray
from hpcray.exceptions import RayActorError
from hpcray.util.multiprocessing.pool_actor import Failure

IN_FLIGHT_PER_ACTOR = 2


class Chunk:
    """Calls sent together to one actor: (args, kwargs) items, and whom to tell."""

    __slots__ = ("func", "items", "owner", "index")

    def __init__(self, func, items: list, owner, index: int):
        self.func, self.items, self.owner, self.index = func, items, owner, index

    def fail(self, exception: BaseException) -> None:
        self.owner.chunk_done(self.index, [Failure(exception)] * len(self.items))


class _Slot:
    """One process of the pool: its actor, the calls in flight on it, how many sent."""

    __slots__ = ("actor", "in_flight", "sent", "watched")

    def __init__(self, actor):
        self.actor = actor
        self.in_flight: deque = deque()  # (ref, Chunk), oldest first
        self.sent = 0
        self.watched = False


class Dispatcher:
    def __init__(self, new_actor, processes: int, maxtasksperchild: int | None):
        self._new_actor = new_actor
        self._maxtasksperchild = maxtasksperchild
        self._slots = [_Slot(new_actor()) for _ in range(processes)]
        self._retiring: list[_Slot] = []  # replaced, still running what they were sent
        self._backlog: deque = deque()
        self._next_slot = 0  # where the search for the least busy actor starts
        self._outstanding = 0  # chunks submitted and not yet handed back
        self._stopped = False
        self._lock = threading.Lock()
        self._all_done = threading.Condition(self._lock)

    @property
    def actors(self) -> list:
        return [slot.actor for slot in self._slots]

    def submit(self, chunk: Chunk) -> None:
        with self._lock:
            if self._stopped:
                stopped = True
            else:
                stopped = False
                self._outstanding += 1
                self._backlog.append(chunk)
                to_watch, failed = self._dispatch()
        if stopped:
            chunk.fail(ValueError("Pool not running"))
            return
        self._after_dispatch(to_watch, failed)

    def _dispatch(self) -> tuple[list, list]:
        """Send backlog chunks to actors with room (lock held): the slots that now need
        a thread, and the chunks whose call could not be made, with why."""
        to_watch, failed = [], []
        while self._backlog and self._slots:
            # The least busy actor, the first such after the last one sent to: idle
            # actors take turns, so a burst of work reaches every one of them.
            count = len(self._slots)
            turn = [(self._next_slot + k) % count for k in range(count)]
            index = min(turn, key=lambda i: len(self._slots[i].in_flight))
            slot = self._slots[index]
            if len(slot.in_flight) >= IN_FLIGHT_PER_ACTOR:
                break
            self._next_slot = (index + 1) % count
            chunk = self._backlog.popleft()
            try:
                ref = slot.actor.run_chunk.remote(chunk.func, chunk.items)
            except Exception as exc:  # noqa: BLE001 - an unpicklable function: its result's error
                failed.append((chunk, exc))
                continue
            slot.in_flight.append((ref, chunk))
            slot.sent += 1
            if not slot.watched:
                slot.watched = True
                to_watch.append(slot)
            if self._maxtasksperchild and slot.sent >= self._maxtasksperchild:
                self._slots[index] = _Slot(self._new_actor())
                self._retiring.append(slot)
        return to_watch, failed

    def _after_dispatch(self, to_watch: list, failed: list) -> None:
        for slot in to_watch:
            threading.Thread(target=self._watch, args=(slot,), daemon=True,
                             name="hpcray-pool-results").start()
        for chunk, exc in failed:
            chunk.fail(exc)
            self._handed_back()

    def _watch(self, slot: _Slot) -> None:
        while True:
            with self._lock:
                if not slot.in_flight:
                    slot.watched = False
                    if slot in self._retiring:
                        self._retiring.remove(slot)
                        slot.actor = None  # its last handle: the actor ends
                    return
                ref, chunk = slot.in_flight[0]
            try:
                outcomes = hpcray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the actor died, was killed, ...
                outcomes = [Failure(exc)] * len(chunk.items)
            with self._lock:
                slot.in_flight.popleft()
                to_watch, failed = self._dispatch()
            self._after_dispatch(to_watch, failed)
            try:
                chunk.owner.chunk_done(chunk.index, outcomes)
            finally:
                self._handed_back()

    def _handed_back(self) -> None:
        with self._lock:
            self._outstanding -= 1
            if not self._outstanding:
                self._all_done.notify_all()

    def wait_all_done(self) -> None:
        """Until every chunk submitted has been handed back."""
        with self._lock:
            self._all_done.wait_for(lambda: not self._outstanding)

    def stop(self, kill: bool) -> None:
        """No more chunks. kill: end the actors now; what they had fails (RayActorError)
        and so does the backlog. Else they are ended once everything was handed back."""
        with self._lock:
            self._stopped = True
            if kill:
                dropped, self._backlog = list(self._backlog), deque()
                actors = [s.actor for s in self._slots + self._retiring if s.actor is not None]
                self._slots = []
            else:
                dropped, actors = [], []
        for chunk in dropped:
            chunk.fail(RayActorError("The pool was terminated."))
            self._handed_back()
        for actor in actors:
            hpcray.kill(actor)

    def release(self) -> None:
        """Once all was handed back: end every actor."""
        self.wait_all_done()
        with self._lock:
            actors = [slot.actor for slot in self._slots]
            self._slots = []
        for actor in actors:
            hpcray.kill(actor)
