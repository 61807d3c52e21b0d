"""`Queue`: a first-in, first-out queue shared by the driver, tasks and actors, as
`ray.util.queue`.

The items live in an async actor (an `asyncio.Queue`), so a `get` blocked on an empty
queue or a `put` blocked on a full one waits inside the actor without keeping any other
caller out. A `Queue` pickles as its actor handle: pass it to tasks and actors on any
node and they share the same items. The actor holds no CPU (hpcray's default for
actors), so consumers blocked in `get` never starve the producers of a place to run.

Not for large-scale data movement: every item goes through the actor; pass ObjectRefs
as items when they are big.
"""

from __future__ import annotations

import asyncio
import queue as _stdlib_queue
from collections.abc import Iterable
from typing import Any

from hpcray import api

__all__ = ["Empty", "Full", "Queue"]


class Empty(_stdlib_queue.Empty):
    """Raised when getting an item from an empty Queue: at once without blocking, or
    when a blocking get times out."""


class Full(_stdlib_queue.Full):
    """Raised when putting an item into a full Queue: at once without blocking, or when
    a blocking put times out."""


class Queue:
    """A FIFO queue whose items live in an actor; `maxsize=0` is unbounded.

    `actor_options` go to the actor's `.options(...)` (resources, name, lifetime...).
    As with Ray, several producers putting into a full queue (or consumers getting
    from an empty one) are served in no guaranteed order.
    """

    def __init__(self, maxsize: int = 0, actor_options: dict | None = None) -> None:
        self.maxsize = maxsize
        self.actor = _queue_actor_class().options(**(actor_options or {})).remote(maxsize)

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        """The number of items in the queue."""
        return api.get(self.actor.qsize.remote())

    def qsize(self) -> int:
        """The number of items in the queue."""
        return self.size()

    def empty(self) -> bool:
        return api.get(self.actor.empty.remote())

    def full(self) -> bool:
        return api.get(self.actor.full.remote())

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Add `item`. A full queue raises Full at once when `block` is False; else the
        call waits for room, at most `timeout` seconds (then Full), forever when None."""
        if not block:
            if not api.get(self.actor.put_nowait.remote(item)):
                raise Full
            return
        _check_timeout(timeout)
        if not api.get(self.actor.put.remote(item, timeout)):
            raise Full

    async def put_async(self, item: Any, block: bool = True,
                        timeout: float | None = None) -> None:
        """`put` for coroutines: awaits room without blocking the event loop."""
        if not block:
            if not await self.actor.put_nowait.remote(item):
                raise Full
            return
        _check_timeout(timeout)
        if not await self.actor.put.remote(item, timeout):
            raise Full

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the oldest item. An empty queue raises Empty at once when
        `block` is False; else the call waits for an item, at most `timeout` seconds
        (then Empty), forever when None."""
        if not block:
            found, item = api.get(self.actor.get_nowait.remote())
        else:
            _check_timeout(timeout)
            found, item = api.get(self.actor.get.remote(timeout))
        if not found:
            raise Empty
        return item

    async def get_async(self, block: bool = True, timeout: float | None = None) -> Any:
        """`get` for coroutines: awaits an item without blocking the event loop."""
        if not block:
            found, item = await self.actor.get_nowait.remote()
        else:
            _check_timeout(timeout)
            found, item = await self.actor.get.remote(timeout)
        if not found:
            raise Empty
        return item

    def put_nowait(self, item: Any) -> None:
        """put(item, block=False)."""
        return self.put(item, block=False)

    def put_nowait_batch(self, items: Iterable) -> None:
        """Add all of `items`, in order, or none of them (Full) when they do not fit."""
        if not isinstance(items, Iterable):
            raise TypeError("Argument 'items' must be an Iterable")
        refused = api.get(self.actor.put_nowait_batch.remote(list(items)))
        if refused:
            raise Full(refused)

    def get_nowait(self) -> Any:
        """get(block=False)."""
        return self.get(block=False)

    def get_nowait_batch(self, num_items: int) -> list:
        """Remove and return the `num_items` oldest items, or none of them (Empty) when
        the queue holds fewer."""
        if not isinstance(num_items, int):
            raise TypeError("Argument 'num_items' must be an int")
        if num_items < 0:
            raise ValueError("'num_items' must be nonnegative")
        found, items = api.get(self.actor.get_nowait_batch.remote(num_items))
        if not found:
            raise Empty(items)
        return items

    def shutdown(self, force: bool = False, grace_period_s: int = 5) -> None:
        """End the queue's actor; its items are gone and every later call on it fails.

        Ray first lets the actor finish the calls already queued to it (for up to
        `grace_period_s`) unless `force`. An async actor's calls run concurrently, so
        here both end it at once; calls still waiting in it get RayActorError, as the
        ones Ray's fallback kill ends do.
        """
        if self.actor is not None:
            api.kill(self.actor, no_restart=True)
        self.actor = None


def _check_timeout(timeout) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")


class _QueueActor:
    """The queue's state. Every method is a coroutine, so all run on the actor's event
    loop, one at a time between awaits: no lock is needed. Outcomes come back as values
    (found or not, accepted or not) rather than exceptions, so the caller raises a
    plain Empty/Full without a remote traceback."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.queue = asyncio.Queue(maxsize)

    async def qsize(self) -> int:
        return self.queue.qsize()

    async def empty(self) -> bool:
        return self.queue.empty()

    async def full(self) -> bool:
        return self.queue.full()

    async def put(self, item, timeout=None) -> bool:
        try:
            await asyncio.wait_for(self.queue.put(item), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def get(self, timeout=None) -> tuple:
        try:
            return True, await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return False, None

    async def put_nowait(self, item) -> bool:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            return False
        return True

    async def put_nowait_batch(self, items: list) -> str | None:
        """None when all were added, else why none was."""
        if self.maxsize > 0 and len(items) + self.queue.qsize() > self.maxsize:
            return (f"Cannot add {len(items)} items to queue of size {self.queue.qsize()} "
                    f"and maxsize {self.maxsize}.")
        for item in items:
            self.queue.put_nowait(item)
        return None

    async def get_nowait(self) -> tuple:
        try:
            return True, self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return False, None

    async def get_nowait_batch(self, num_items: int) -> tuple:
        if num_items > self.queue.qsize():
            return False, f"Cannot get {num_items} items from queue of size {self.queue.qsize()}."
        return True, [self.queue.get_nowait() for _ in range(num_items)]


_queue_actor = None


def _queue_actor_class():
    """The actor class, made once per process (it exports the class on first use)."""
    global _queue_actor
    if _queue_actor is None:
        _queue_actor = api.remote(_QueueActor)
    return _queue_actor
