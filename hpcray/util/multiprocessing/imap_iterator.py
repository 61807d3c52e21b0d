"""`IMapIterator`: what `imap` and `imap_unordered` return.

The input is read lazily, `chunksize` items a chunk, and at most `window` chunks are out
(sent, or back and not yet taken) at a time, so an iterable too large for memory streams
through; each `next()` tops the window up. `Pool.close()` sends the rest at once
(`submit_all`), since a closed pool still finishes the work it was given, as Python's
does. A call that raised raises at its place in the results, and iteration can go on.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from multiprocessing import TimeoutError  # noqa: A004 - what Python's iterator raises

from hpcray.util.multiprocessing.pool_actor import Failure


class IMapIterator:
    """Results of func over an iterable: in its order (imap) or as they come (unordered)."""

    def __init__(self, submit, func, iterable, chunksize: int, ordered: bool, window: int):
        self._submit = submit  # (func, items, owner, index) -> None
        self._func = func
        self._inputs = iter(iterable)
        self._chunksize = chunksize
        self._ordered = ordered
        self._window = window
        self._feed_lock = threading.Lock()
        self._sent = 0            # chunks submitted
        self._input_done = False
        self._input_error: BaseException | None = None
        self._arrived = threading.Condition()
        self._chunks: dict = {}   # index -> outcomes, arrived and not taken
        self._taken = 0           # chunks taken (in order, for imap)
        self._items: deque = deque()  # outcomes of taken chunks, to yield
        self._feed()

    def _feed(self, everything: bool = False) -> None:
        with self._feed_lock:
            while not self._input_done and (everything or self._sent - self._taken < self._window):
                try:
                    items = list(itertools.islice(self._inputs, self._chunksize))
                except Exception as exc:  # noqa: BLE001 - raised where the input ended
                    self._input_error = exc
                    items = []
                if not items:
                    self._input_done = True
                    break
                self._submit(self._func, [((item,), {}) for item in items], self,
                             self._sent)
                self._sent += 1

    def submit_all(self) -> None:
        self._feed(everything=True)

    def chunk_done(self, index: int, outcomes: list) -> None:
        with self._arrived:
            self._chunks[index] = outcomes
            self._arrived.notify_all()

    def __iter__(self):
        return self

    def __next__(self):
        return self.next()

    def next(self, timeout: float | None = None):
        """The next result; multiprocessing.TimeoutError after `timeout` seconds."""
        while not self._items:
            with self._arrived:
                if self._taken == self._sent and self._input_done:
                    error, self._input_error = self._input_error, None
                    if error is not None:
                        raise error
                    raise StopIteration
                if not self._arrived.wait_for(self._next_arrived, timeout):
                    raise TimeoutError
                index = self._taken if self._ordered else next(iter(self._chunks))
                self._items.extend(self._chunks.pop(index))
                self._taken += 1
            self._feed()
        item = self._items.popleft()
        if isinstance(item, Failure):
            raise item.rebuild()
        return item

    def _next_arrived(self) -> bool:
        return (self._taken in self._chunks) if self._ordered else bool(self._chunks)
