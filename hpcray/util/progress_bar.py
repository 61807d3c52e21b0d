"""How far a batch of refs has come, while waiting for it: `hpcray.util.progress(refs)`
and `hpcray.util.as_completed(refs)`.

    values = hpcray.util.progress([f.remote(i) for i in range(1000)], desc="f")
    for ref in hpcray.util.as_completed(refs):   # each ref once it is ready
        handle(hpcray.get(ref))

`progress` returns what `get(refs)` returns (the values in the order of `refs`; the
first error in that order raises, as get), after showing how many are done;
`as_completed` yields each ref as it becomes ready, fastest first, with the same display
(as concurrent.futures.as_completed; Ray has no such helper, its tqdm_ray is a bar only).
The display goes to `file` (default stderr): a tqdm bar when it is a terminal and tqdm is
installed; otherwise one plain line every `interval` seconds and one at the end
(`f: 370/1000 done, 12.3 s`), which is what a batch job's log wants. Waiting uses
`wait` with a timeout up to the next line: nothing spins.
"""

from __future__ import annotations

import sys
import time

from hpcray import api
from hpcray.object_ref import ObjectRef

try:  # optional: plain lines without it
    from tqdm import tqdm as _tqdm
except ImportError:
    _tqdm = None

DEFAULT_INTERVAL = 10.0


def progress(refs, desc: str | None = None, *, interval: float = DEFAULT_INTERVAL,
             file=None):
    """get(refs), showing how many of `refs` are done while it waits."""
    if isinstance(refs, ObjectRef):
        return progress([refs], desc, interval=interval, file=file)[0]
    refs = list(refs)
    for _ in as_completed(refs, desc, interval=interval, file=file):
        pass
    return api.get(refs)


def as_completed(refs, desc: str | None = None, *, interval: float = DEFAULT_INTERVAL,
                 file=None):
    """Yield each of `refs` once it is ready (errors too: get raises them), showing how
    many are done."""
    pending = list(refs)
    meter = _Meter(len(pending), desc, interval, file)
    try:
        while pending:
            ready, pending = api.wait(pending, num_returns=1, timeout=meter.until_next_line())
            if ready and pending:  # take every other ref ready by now in the same pass
                more, pending = api.wait(pending, num_returns=len(pending), timeout=0)
                ready += more
            meter.advance(len(ready))
            yield from ready
    finally:
        meter.close()


class _Meter:
    """The display: a tqdm bar on a terminal (with tqdm installed), else plain lines."""

    def __init__(self, total: int, desc: str | None, interval: float, file) -> None:
        self.total = total
        self.desc = desc or "progress"
        self.interval = interval
        self.file = file or sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self.next_line = self.started + interval
        self.bar = None
        is_terminal = getattr(self.file, "isatty", lambda: False)()
        if is_terminal and _tqdm is not None:
            self.bar = _tqdm(total=total, desc=desc, file=self.file)

    def until_next_line(self) -> float | None:
        """How long the next wait may take: None (no limit) for a bar, which redraws on
        each update, else the time to the next plain line."""
        if self.bar is not None:
            return None
        return max(0.0, self.next_line - time.monotonic())

    def advance(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        if now >= self.next_line and self.done < self.total:
            self._line(now)
            self.next_line = now + self.interval

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        try:
            self.file.write(f"{self.desc}: {self.done}/{self.total} done, "
                            f"{now - self.started:.1f} s\n")
            self.file.flush()
        except (OSError, ValueError):
            pass
