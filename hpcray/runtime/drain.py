"""Draining a job before its allocation ends: `sbatch --signal=B:USR1@N` (the batch
script passes it on to the step), `--signal=USR1@N`, `scancel -s USR1`, or SIGTERM at the
time limit when HPCRAY_DRAIN_SIGNALS lists TERM.

When a drain signal reaches the driver (rank 0; other ranks ignore it, launch.py):
1. no task that is not running yet starts, on any node (the Drain message; task_router.py
   holds them); running tasks, their retries and actor calls go on;
2. once every node holds its new tasks, the callbacks the program registered with
   `hpcray.util.on_drain` run, in a thread of the driver (the signal may come while the
   main thread holds the node's lock): save a checkpoint, tell the main loop to stop
   (or let it look at `hpcray.util.draining()`);
3. that thread asks every node every 0.2 s how many tasks run; once none does, or
   HPCRAY_DRAIN_GRACE seconds (30) after the signal, it signals the main thread again,
   which raises DrainExit (a SystemExit, status 0) in the program. Its `finally` blocks
   run, and shutdown ends every rank, kills the workers of tasks still running, writes
   the logs and removes every segment.
A program that ends by itself during the drain ends as it chooses. Two log lines
(logger hpcray.drain, WARNING: stderr and the node's log) say when the drain began and
how it ended.

Not for: Ctrl-C (KeyboardInterrupt, at once) or a plain SIGTERM (SystemExit(143), at
once): those end the job now.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

log = logging.getLogger("hpcray.drain")
_POLL_SECONDS = 0.2

_callbacks: list = []     # hpcray.util.on_drain
_current = None           # the Drain of the running job, once its signal came


class DrainExit(SystemExit):
    """Raised in the driver's program when a drain is over (exit status 0)."""


def on_drain(callback) -> None:
    """Call `callback(signum)` (in a thread of the driver) when the job starts draining,
    once no node starts new tasks."""
    if not callable(callback):
        raise TypeError(f"on_drain() needs a callable, got {type(callback).__name__}.")
    _callbacks.append(callback)


def draining() -> bool:
    """Whether the job is draining (a drain signal came)."""
    return _current is not None


class Drain:
    """One job's drain, from its signal to the program's end."""

    def __init__(self, client, signum: int) -> None:
        self.client = client
        self.signum = signum
        self.grace = client.config.drain_grace
        self.started = time.monotonic()
        self.over = False

    def start(self) -> None:
        threading.Thread(target=self._run, name="hpcray-drain", daemon=True).start()

    def _run(self) -> None:
        log.warning("hpcray: %s: the job drains: no new task starts; the running ones get "
                    "up to %g s (HPCRAY_DRAIN_GRACE), then the program ends",
                    signal.Signals(self.signum).name, self.grace)
        self.client.drain()
        # Asked after the Drain, on the same channel: once every node has answered,
        # every node holds its new tasks, and the callbacks see a drained cluster.
        running = self._running_tasks()
        for callback in list(_callbacks):
            try:
                callback(self.signum)
            except Exception:  # noqa: BLE001 - the drain goes on; the program says why
                log.exception("hpcray: the drain callback %r failed", callback)
        deadline = self.started + self.grace
        while running != 0 and time.monotonic() < deadline:
            time.sleep(min(_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            running = self._running_tasks()
        self._end(running)

    def _running_tasks(self):
        """Tasks running on every node now (None: the job is ending, or no answer)."""
        from hpcray import context
        if context.client is not self.client:
            return None
        try:
            rows = self.client.list_state("status", timeout=5.0)
        except Exception:  # noqa: BLE001 - shutting down meanwhile; the deadline holds
            return None
        return sum(row[2] for row in rows)  # status.STATUS_ROW_FIELDS: running

    def _end(self, running) -> None:
        from hpcray import context
        if context.client is not self.client:  # the program ended by itself
            return
        self.over = True
        took = time.monotonic() - self.started
        if running == 0:
            log.warning("hpcray: drained in %.1f s: no task runs any more; the program ends",
                        took)
        else:
            log.warning("hpcray: the drain's grace of %g s is over with %s tasks running: "
                        "they are cancelled and the program ends", self.grace, running)
        signal.pthread_kill(threading.main_thread().ident, self.signum)


def install(signals: list, client_of) -> None:
    """In the driver's main thread: drain on each of `signals` whose handler is still the
    default. `client_of()`: the running job's client, or None."""
    if threading.current_thread() is not threading.main_thread():
        return

    def on_signal(signum, _frame):
        # Nothing here takes the node's lock: the main thread may hold it (a signal
        # handler runs between any two of its bytecodes). The drain's thread does.
        global _current
        drain = _current
        if drain is not None:
            if drain.over:
                raise DrainExit(0)
            return  # a second signal while draining changes nothing
        client = client_of()
        if client is None:
            return
        _current = Drain(client, signum)
        _current.start()

    for signum in signals:
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, on_signal)


def job_ended() -> None:
    """The job shut down: the next one starts undrained."""
    global _current
    _current = None
