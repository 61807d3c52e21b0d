"""`AsyncResult`: what `apply_async`, `map_async` and `starmap_async` return.

It is filled chunk by chunk by the dispatcher's threads (`chunk_done`), and is ready once
every chunk arrived or one of them holds a failure (Python's pool also fails a map on
its first failed chunk, without waiting for the rest). The callback or error_callback runs
before the result becomes ready, one at a time across the pool, as Python's result
thread runs them.
"""

from __future__ import annotations

import threading
import traceback
from multiprocessing import TimeoutError  # noqa: A004 - what Python's AsyncResult raises

from hpcray.util.multiprocessing.pool_actor import Failure


class AsyncResult:
    """The result of an asynchronous call on the pool: get, wait, ready, successful."""

    def __init__(self, chunks: int, callback=None, error_callback=None,
                 single: bool = False, callback_lock: threading.Lock | None = None):
        self._chunks: list = [None] * chunks
        self._missing = chunks
        self._single = single
        self._callback = callback
        self._error_callback = error_callback
        self._callback_lock = callback_lock or threading.Lock()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        if chunks == 0:
            self._finish()

    def chunk_done(self, index: int, outcomes: list) -> None:
        """Chunk `index` came back (from a dispatcher thread)."""
        with self._lock:
            if self._ready.is_set() or self._error is not None:
                return  # failed already: Python's pool drops the rest too
            failure = next((o for o in outcomes if isinstance(o, Failure)), None)
            if failure is not None:
                self._error = failure.rebuild()
            else:
                self._chunks[index] = outcomes
                self._missing -= 1
                if self._missing:
                    return
        self._finish()

    def _finish(self) -> None:
        callback, argument = ((self._error_callback, self._error) if self._error is not None
                              else (self._callback, None))
        if callback is not None:
            if self._error is None:
                argument = self._value()
            try:
                with self._callback_lock:
                    callback(argument)
            except Exception:  # noqa: BLE001 - a callback's bug must not hang get()
                traceback.print_exc()
        self._ready.set()

    def _value(self):
        values = [value for chunk in self._chunks for value in chunk]
        return values[0] if self._single else values

    def ready(self) -> bool:
        return self._ready.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def wait(self, timeout: float | None = None) -> None:
        """Until the result is ready or `timeout` seconds passed (no error either way)."""
        self._ready.wait(timeout)

    def get(self, timeout: float | None = None):
        """The value, or the call's exception raised here (its own type); after `timeout`
        seconds, multiprocessing.TimeoutError."""
        if not self._ready.wait(timeout):
            raise TimeoutError
        if self._error is not None:
            raise self._error
        return self._value()
