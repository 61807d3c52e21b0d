"""A worker's process title, as Ray sets it: what ps, top and psutil's cmdline() show.

Ray titles a worker `ray::<name>` while a task or an actor method runs (the name that
`.options(name=...)` gave, else the function's, `Class.method` for an actor's),
`ray::IDLE` while a pool worker waits for work and `ray::<Class>` while an actor waits
(Ray's miscellaneous page asserts `psutil.Process().cmdline()[0] == "ray::special_f"`
inside a task). Here the title is the first argument and the fork server's own
arguments follow it (`ray::f -m hpcray.runtime.forkserver`), so whatever recognises
hpcray's workers by their command line still does.

Not for: naming threads or `comm` (psutil's name()), which stays the interpreter's.

How: Linux keeps a process's command line in the process's own memory, the area between
/proc/self/stat's arg_start and arg_end, and /proc/<pid>/cmdline reads it from there. The
interpreter copied its arguments at start-up (sys.argv), so the area is free to write over
(the setproctitle package does the same). The fork server measures the area once
(`measure`, before it forks: its workers share the addresses) and is started with a blank
last argument that gives titles room; a longer title is cut. Without /proc, no titles.
"""

from __future__ import annotations

import ctypes

# The fork server's last argument, blank: room for titles in its workers' argv area.
ROOM = " " * 96

_area: tuple[int, int] | None = None  # (address, size) of this process's argv area
_tail = b""  # what follows the title: the fork server's arguments, NUL-separated
_current: str | None = None
_written: dict[str, bytes] = {}  # title -> the area's bytes for it


def measure(keep: list[str]) -> None:
    """Find this process's argv area; the title's tail is `keep`, the arguments after
    argv[0] to show after it (the blank room is not one). Blanks the room now."""
    global _area, _tail
    try:
        with open("/proc/self/stat", "rb") as stat:
            text = stat.read()
        fields = text[text.rindex(b")") + 2:].split()  # field 3 (state) first
        start, end = int(fields[48 - 3]), int(fields[49 - 3])
        with open("/proc/self/cmdline", "rb") as cmdline:
            argv0 = cmdline.read().split(b"\0", 1)[0]
    except (OSError, ValueError, IndexError):
        return
    if not 0 < start < end:
        return
    _area = (start, end - start)
    _tail = b"".join(b"\0" + arg.encode() for arg in keep)
    _write(argv0)


def set_title(title: str) -> None:
    """`title` as this process's argv[0], the kept arguments after it."""
    global _current
    if _area is None or title == _current:
        return
    _current = title
    data = _written.get(title)
    if data is None:  # each title's bytes are built once: a worker sets two per call
        if len(_written) >= 1024:
            _written.clear()
        data = _written[title] = _padded(title.encode(errors="replace"))
    if data:
        ctypes.memmove(_area[0], data, _area[1])


def _write(head: bytes) -> None:
    data = _padded(head)
    if data:
        ctypes.memmove(_area[0], data, _area[1])


def _padded(head: bytes) -> bytes:
    """The whole area's new bytes: `head` (cut to the room), the tail, NULs ("" when the
    area has no room)."""
    size = _area[1]
    room = size - len(_tail) - 1  # the area's last byte stays NUL: the kernel stops there
    if room <= 0:
        return b""
    data = head[:room] + _tail
    return data + b"\0" * (size - len(data))
