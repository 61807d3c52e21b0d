"""Which task wrote a pool worker's output line, so the node can prefix it as Ray does.

Ray prints a task's lines as `(f pid=123) ...`: the task's name, not just the process. A
pool worker runs one task after another and the node reads its stdout/stderr pipes at
its own pace, so the node cannot tell from the time a line arrives which task wrote it.
The worker says it in the stream itself, as Ray's workers do: before the first line a
task writes to a stream, a line `:task_name:<name>` (Ray's marker). The node takes such
lines out of what it prints (job_logs.py); the worker's log files keep them, which shows
there too which task wrote what. A task that prints nothing costs one attribute store.

What bypasses `sys.stdout` (C code writing to fd 1, a subprocess) carries the name of the
last task that printed through it.
"""

from __future__ import annotations

import sys

MARK = ":task_name:"
MARK_BYTES = MARK.encode()


class CurrentTask:
    """What the pool worker runs now: its spec and function (set per task, read only
    when the task prints)."""

    __slots__ = ("spec", "function")

    def __init__(self) -> None:
        self.spec = None
        self.function = None

    def name(self) -> str | None:
        spec = self.spec
        if spec is None:
            return None
        function = self.function
        if function is not None:  # Ray's default name: the function's, not its module's
            qualname = getattr(function, "__qualname__", None)
            if qualname and spec.name == f"{getattr(function, '__module__', '?')}.{qualname}":
                return qualname
        return spec.name


class TaskNamedStream:
    """A text stream that announces the current task (a MARK line) before the first line
    each task writes to it; everything else is the wrapped stream's."""

    def __init__(self, stream, current: CurrentTask) -> None:
        self._stream = stream
        self._current = current
        self._announced = None      # the spec whose name this stream said last
        self._line_start = True     # a MARK line may only go between lines
        # Something may wait in the wrapped stream's buffer: written, or the stream was
        # used some other way (its .buffer...) since the last flush. A worker flushes
        # after each task; two flushes of nothing were ~10% of a no-op task's CPU there.
        self.unflushed = False

    def write(self, text: str) -> int:
        self.unflushed = True
        written = len(text)
        spec = self._current.spec
        if text and spec is not self._announced and spec is not None:
            if not self._line_start:  # end the unended line under the name it began with
                head, newline, text = text.partition("\n")
                self._stream.write(head + newline)
                self._line_start = bool(newline)
            if text:
                self._stream.write(f"{MARK}{self._current.name()}\n")
                self._announced = spec
        if text:
            self._stream.write(text)
            self._line_start = text.endswith("\n")
        return written

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.unflushed = False
        self._stream.flush()

    def flush_if_written(self) -> None:
        if self.unflushed:
            self.flush()

    def __getattr__(self, name):
        self.unflushed = True
        return getattr(self._stream, name)


def install(current: CurrentTask) -> None:
    """Make this process's sys.stdout and sys.stderr announce `current`'s task."""
    sys.stdout = TaskNamedStream(sys.stdout, current)
    sys.stderr = TaskNamedStream(sys.stderr, current)


def marked_name(line: bytes) -> str | None:
    """The task name a MARK line announces, or None for an ordinary line."""
    if line.startswith(MARK_BYTES):
        return line[len(MARK_BYTES):].decode(errors="replace")
    return None
