"""`ray.experimental.tqdm_ray.tqdm`: a progress bar that a task or actor draws where the
job's output is read, not inside a worker whose stdout is a pipe.

    from ray.experimental.tqdm_ray import tqdm
    @ray.remote
    def f(name):
        for x in tqdm(range(100), desc=name):
            ...

In a worker, the bar's state goes out as one line on the worker's stdout: MAGIC and
its JSON state (what Ray's does too), at its first update, then at most every
`flush_interval_s`, and at close. The node that reads the worker's pipe (job_logs.py)
keeps such lines in the worker's log file but does not print them: it hands them to
its `BarBoard`, which draws them. In the driver's process a bar goes straight to the
process's board, which its node's workers' bars share.

A board draws a tqdm bar per live bar when its stream is a terminal and tqdm is
installed, each bar on its own line (Ray's `position` within its worker); elsewhere (a
batch job's log, mpiexec's merged output) a plain line per bar update it receives,
`(f pid=12) task 1: 40/100 (40%)`, and one at close: at most one a second per bar.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

from hpcray import context

MAGIC = "__hpcray_tqdm__"
_MAGIC_BYTES = MAGIC.encode()


class tqdm:  # noqa: N801 - Ray's name
    """Ray's subset of tqdm.tqdm: iterate, update, set_description, close."""

    def __init__(self, iterable=None, desc: str | None = None, total: int | None = None,
                 position: int | None = None, flush_interval_s: float = 1.0) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except (TypeError, AttributeError):
                total = None
        self._iterable = iterable
        self._desc = desc or ""
        self._total = total
        self._pos = position or 0
        self._uuid = uuid.uuid4().hex
        self._pid = os.getpid()
        self._x = 0
        self._closed = False
        self._interval = flush_interval_s
        self._next_flush = 0.0  # the first update goes out at once

    def set_description(self, desc: str) -> None:
        self._desc = desc
        self._dump_state(force=True)

    def update(self, n: int = 1) -> None:
        self._x += n
        self._dump_state()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._dump_state(force=True)

    def __iter__(self):
        if self._iterable is None:
            raise ValueError("No iterable provided")
        for item in self._iterable:
            self.update(1)
            yield item
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _dump_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_flush:
            return
        self._next_flush = now + self._interval
        state = {"uuid": self._uuid, "pid": self._pid, "pos": self._pos, "desc": self._desc,
                 "x": self._x, "total": self._total, "closed": self._closed}
        if context.worker is not None:  # to the node, through the worker's stdout
            sys.stdout.write(MAGIC + json.dumps(state) + "\n")
            sys.stdout.flush()
        else:
            board().show("", state)


def bar_state(line: bytes) -> dict | None:
    """The state in a worker's output line, if it is a bar's line."""
    if not line.startswith(_MAGIC_BYTES):
        return None
    try:
        return json.loads(line[len(_MAGIC_BYTES):])
    except ValueError:
        return None


class BarBoard:
    """Draws the bars whose states a node reads (or the driver's own) on `stream`."""

    PLAIN_EVERY = 1.0  # seconds between a bar's plain lines (its last one always shows)

    def __init__(self, stream) -> None:
        self.stream = stream
        self.bars: dict[str, object] = {}   # uuid -> a tqdm bar, or when its last line went
        self.shown: dict[str, int] = {}     # uuid -> the count its bar shows
        self.tqdm = None
        if getattr(stream, "isatty", lambda: False)():
            self.tqdm = _real_tqdm()

    def show(self, who: str, state: dict) -> None:
        """`who`: the prefix of the worker that drew it ("" for the driver's own)."""
        key = state["uuid"]
        label = f"{who} {state['desc']}".strip()
        if self.tqdm is not None:
            self._draw(key, label, state)
        else:
            self._line(key, label, state)

    def _draw(self, key: str, label: str, state: dict) -> None:
        bar = self.bars.get(key)
        if bar is None:
            if state["closed"] and not state["x"]:
                return
            bar = self.bars[key] = self.tqdm(desc=label, total=state["total"], leave=False,
                                             position=len(self.bars), file=self.stream)
            self.shown[key] = 0
        if bar.desc != label:
            bar.set_description(label, refresh=False)
        bar.update(state["x"] - self.shown[key])
        self.shown[key] = state["x"]
        if state["closed"]:
            bar.close()
            del self.bars[key], self.shown[key]

    def _line(self, key: str, label: str, state: dict) -> None:
        now = time.monotonic()
        last = self.bars.get(key)
        if state["closed"]:
            self.bars.pop(key, None)
        elif last is not None and now - last < self.PLAIN_EVERY:
            return
        else:
            self.bars[key] = now
        total = state["total"]
        count = f"{state['x']}/{total} ({100 * state['x'] // total}%)" if total else \
            f"{state['x']}"
        try:
            self.stream.write(f"{label}: {count}{', done' if state['closed'] else ''}\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass


def _real_tqdm():
    """tqdm.tqdm if the tqdm package is installed, else None. Only the package: a
    program named tqdm.py (Ray's own doc program is) would otherwise be imported
    again, here in the node's thread, and run its `get` there."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("tqdm")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.submodule_search_locations is None:
        return None
    from tqdm import tqdm as real_tqdm
    return real_tqdm


_board: BarBoard | None = None


def board() -> BarBoard:
    """This process's board, on stderr (tqdm's): the driver's bars and its node's
    workers' share it, so their positions do not collide."""
    global _board
    if _board is None:
        _board = BarBoard(sys.stderr)
    return _board
