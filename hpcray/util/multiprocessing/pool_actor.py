"""The actor behind each process of a `Pool`, and how a failed call travels back.

The actor runs the pool's initializer once, in its constructor, then chunks of calls:
one actor call per chunk, each item's result or `Failure` in the list it returns. A call
that raises does not stop the rest of its chunk (as in Ray's pool); the pool raises the
first failure it sees.
"""

from __future__ import annotations

import os
import traceback
from multiprocessing.pool import MaybeEncodingError, RemoteTraceback

import cloudpickle

import hpcray
from hpcray.util.multiprocessing.namespace import ScriptNamespaces


class Failure:
    """A call that raised: the exception (the user's own type) and its traceback's text."""

    def __init__(self, exception: BaseException, remote_traceback: str | None = None):
        self.exception = exception
        self.remote_traceback = remote_traceback

    @classmethod
    def of(cls, exception: Exception) -> Failure:
        text = "".join(traceback.format_exception(exception))
        text = f"in a pool actor, pid {os.getpid()}:\n{text}"
        try:
            cloudpickle.dumps(exception)
        except Exception as unpicklable:  # noqa: BLE001 - as Python's pool: say why
            exception = MaybeEncodingError(unpicklable, exception)
        return cls(exception, text)

    def rebuild(self) -> BaseException:
        """The exception to raise in the caller, the remote traceback as its cause (as
        Python's pool does)."""
        if self.remote_traceback is not None and self.exception.__cause__ is None:
            self.exception.__cause__ = RemoteTraceback(f'\n"""\n{self.remote_traceback}"""')
        return self.exception


@hpcray.remote
class PoolActor:
    """One process of a pool: its initializer, then `run_chunk` calls."""

    def __init__(self, initializer=None, initargs=()):
        self._namespaces = ScriptNamespaces()
        if initializer is not None:
            self._namespaces.run_initializer(initializer, tuple(initargs or ()))

    def run_chunk(self, func, items: list) -> list:
        """func(*args, **kwargs) for each (args, kwargs) of items: results or Failures."""
        func = self._namespaces.bind(func)
        outcomes = []
        for args, kwargs in items:
            try:
                outcomes.append(func(*args, **kwargs))
            except Exception as exc:  # noqa: BLE001 - handed to the caller, as Python's pool
                outcomes.append(Failure.of(exc))
        return outcomes
