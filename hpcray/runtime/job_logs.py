"""The job's log folder: what a batch job leaves behind, and workers' output on the terminal.

One folder per job, on the file system the job was submitted from (not node-local
/tmp, which goes with the allocation): `HPCRAY_LOG_DIR`, or by default
`hpcray-logs/<job id>/` in the submission directory (SLURM_SUBMIT_DIR under Slurm, else
the driver's working directory). The job id is SLURM_JOB_ID under Slurm, else the
driver's start time and hpcray's job id (`20261203-162545-1a2b3c4d`), said once on
stderr. Rank 0 picks the folder; every node gets it in the job's config. In it:

    node-<rank>.log            the `logging` records of the node's process (the hpcray.*
                               loggers), the rank on every record: starts, stops,
                               warnings, and every worker that crashed, with the task or
                               actor it was running
    node-<rank>-worker-<pid>.out / .err
                               what each worker of that node wrote to stdout / stderr,
                               whole (pids repeat across hosts: the rank keeps them apart)

Workers' lines still reach the driver's terminal (rank 0's directly, the others' through
the MPI launcher) prefixed as Ray does: `(f pid=123)` (the task that wrote it, as its
worker announces: task_output.py), `(Counter pid=123)` (or the actor's repr,
`(Counter(n=1) pid=123)`, where its class defines __repr__), with the rank when the job
has several nodes (`(f pid=123, rank=1)`). Not for: logs of the driver
program itself (its own prints and loggers are the user's).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

from hpcray.experimental import tqdm_ray
from hpcray.runtime import task_output

log = logging.getLogger("hpcray.node")

_FORMAT = "%(asctime)s rank %(rank)s %(levelname)s %(name)s: %(message)s"


def choose_folder(job_id: str, chosen: str = "", environ=os.environ) -> tuple[str, str | None]:
    """(the job's log folder as an absolute path, the job name to announce or None).

    `chosen`: HPCRAY_LOG_DIR, used as it is. Otherwise hpcray-logs/<job name> in the
    directory the job was submitted from; the name is announced when hpcray made it
    (no SLURM_JOB_ID to name it by), so the user can find it."""
    if chosen:
        return os.path.abspath(chosen), None
    base = environ.get("SLURM_SUBMIT_DIR") or os.getcwd()
    slurm_job = environ.get("SLURM_JOB_ID")
    name = slurm_job or f"{time.strftime('%Y%m%d-%H%M%S')}-{job_id}"
    return os.path.join(os.path.abspath(base), "hpcray-logs", name), \
        (None if slurm_job else name)


def node_file(rank: int) -> str:
    return f"node-{rank}.log"


def worker_file(rank: int, pid: int, suffix: str) -> str:
    """The name of a worker's output file; `suffix` "out" (stdout) or "err" (stderr)."""
    return f"node-{rank}-worker-{pid}.{suffix}"


class _RankOnRecord(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


class _ToRootAsBefore(logging.Handler):
    """Hands the root logger's handlers hpcray's warnings and errors: those at or above
    the root's level and WARNING (with no handler there, logging's last resort prints
    them). The INFO records (a worker started, the node stopped) stay in the node log,
    as Ray's stay in its own logs: a driver that sets its root logger to INFO for its
    own records (Ray's doc program t.py does) does not get hpcray's too. A handler that
    is on the hpcray logger too (pytest puts its capture on every logger that does not
    propagate) has the record already."""

    def emit(self, record: logging.LogRecord) -> None:
        root = logging.getLogger()
        if record.levelno < max(root.getEffectiveLevel(), logging.WARNING) \
                or not root.filter(record):
            return
        if not root.handlers:
            last = logging.lastResort
            if last is not None and record.levelno >= last.level:
                last.handle(record)
            return
        ours = logging.getLogger("hpcray").handlers
        for handler in root.handlers:
            if handler not in ours and record.levelno >= handler.level:
                handler.handle(record)


class WorkerStreams:
    """One worker's output as the node reads it: the line not ended yet per stream
    (printed once whole), its open files, and what it wrote before its pid was known."""
    __slots__ = ("partial", "files", "early", "task_name")

    def __init__(self) -> None:
        self.partial: dict[str, bytes] = {}
        self.task_name: dict[str, str] = {}  # per stream: the task its lines come from
        self.files: dict[str, object] = {}
        self.early: list[tuple[str, bytes]] = []


class JobLogs:
    """A node's share of the job's log folder, and of the terminal.

    Handed the folder ("" for none: workers' output then only reaches the terminal), the
    rank, whether the job has several nodes (the prefix then says the rank), whether
    workers' output goes to the terminal (log_to_driver), and `actor_name(actor_id)`."""

    def __init__(self, folder: str, rank: int, several_nodes: bool, to_terminal: bool,
                 actor_name) -> None:
        self.folder = folder
        self.rank = rank
        self.several_nodes = several_nodes
        self.to_terminal = to_terminal
        self.actor_name = actor_name
        self.by_pid: dict[int, object] = {}   # live workers that said hello
        self.ran: dict[int, str] = {}         # pid -> what a dead worker was running
        self.killing: dict[int, str] = {}     # pid -> why the node itself killed it
        # pid -> (end ms, Ray's exit type, exit detail) of the workers reaped (list_workers)
        self.exits: dict[int, tuple] = {}
        self._handlers: list[logging.Handler] = []
        self._previous = None  # the hpcray logger's (level, propagate) before the file
        if folder:
            try:
                os.makedirs(folder, exist_ok=True)
                self._attach_node_log()
            except OSError as exc:  # a job runs without its log files rather than not at all
                self.folder = ""
                log.warning("rank %d cannot write the job's logs to %s (%s); set "
                            "HPCRAY_LOG_DIR to a folder every node can write", rank, folder,
                            exc)

    # ------------------------------------------------------------------ node log
    def _attach_node_log(self) -> None:
        """The file gets the hpcray loggers' INFO records too; what else sees them is as
        before: the records the root logger's level lets through go to its handlers (or
        logging's last resort, stderr), not the INFO ones a file wants."""
        logger = logging.getLogger("hpcray")
        to_file = logging.FileHandler(os.path.join(self.folder, node_file(self.rank)))
        to_file.setFormatter(logging.Formatter(_FORMAT))
        to_file.addFilter(_RankOnRecord(self.rank))
        self._handlers = [to_file]
        if logger.level == logging.NOTSET:  # a level the user chose stays, as it works
            self._previous = (logger.level, logger.propagate)
            logger.setLevel(logging.INFO)
            logger.propagate = False
            self._handlers.append(_ToRootAsBefore())
        for handler in self._handlers:
            logger.addHandler(handler)

    def close(self) -> None:
        """Detach the node log and close every worker file (the node is shutting down)."""
        logger = logging.getLogger("hpcray")
        for handler in self._handlers:
            logger.removeHandler(handler)
            try:
                handler.close()
            except OSError:  # its last flush failed (disk full, a file size limit): the
                pass         # records are lost, the shutdown must still finish
        self._handlers = []
        if self._previous is not None:
            logger.setLevel(self._previous[0])
            logger.propagate = self._previous[1]
            self._previous = None

    # ------------------------------------------------------------------ workers
    def hello(self, worker) -> None:
        """`worker` said hello: its pid names its files; what it wrote before goes there."""
        self.by_pid[worker.pid] = worker
        log.info("worker pid=%d started (%s)", worker.pid,
                 "task pool" if worker.actor_id is None else self.describe(worker))
        early, worker.output.early = worker.output.early, []
        for stream_name, data in early:
            self._to_file(worker, stream_name, data)

    def output(self, worker, stream_name: str, data: bytes) -> None:
        """`data` read from the worker's stdout or stderr pipe."""
        self._to_file(worker, stream_name, data)
        if not self.to_terminal:
            return
        streams = worker.output
        data = streams.partial.pop(stream_name, b"") + data
        lines = data.split(b"\n")
        if lines[-1]:
            streams.partial[stream_name] = lines[-1]
        self._print(worker, stream_name, lines[:-1])

    def output_ended(self, worker, stream_name: str) -> None:
        """The worker's pipe closed: print its last line if unended, close its file."""
        streams = worker.output
        rest = streams.partial.pop(stream_name, b"")
        if rest and self.to_terminal:
            self._print(worker, stream_name, [rest])
        file = streams.files.pop(stream_name, None)
        if file is not None:
            file.close()

    def _to_file(self, worker, stream_name: str, data: bytes) -> None:
        if not self.folder:
            return
        streams = worker.output
        if worker.pid is None:
            streams.early.append((stream_name, data))
            return
        file = streams.files.get(stream_name)
        if file is None:
            suffix = "out" if stream_name == "stdout" else "err"
            try:
                # Unbuffered: what a worker wrote is on disk even if the node is killed.
                file = open(os.path.join(self.folder, worker_file(self.rank, worker.pid, suffix)),
                            "ab", buffering=0)
            except OSError as exc:
                log.warning("cannot write worker %d's %s to %s: %s", worker.pid, stream_name,
                            self.folder, exc)
                self.folder = ""
                return
            streams.files[stream_name] = file
        file.write(data)

    def _print(self, worker, stream_name: str, lines) -> None:
        stream = sys.stdout if stream_name == "stdout" else sys.stderr
        pid = f"pid={worker.pid}" if worker.pid else "starting worker"
        rank = f", rank={self.rank}" if self.several_nodes else ""
        if worker.actor_id is not None:
            name = self.actor_name(worker.actor_id)
        else:  # a pool worker says which task writes (task_output.py)
            name = worker.output.task_name.get(stream_name)
        parts = []
        for line in lines:
            announced = task_output.marked_name(line)
            if announced is not None:
                name = worker.output.task_name[stream_name] = announced
                continue
            who = f"{name} {pid}" if name else pid
            state = tqdm_ray.bar_state(line)
            if state is not None:  # a tqdm_ray bar's: drawn, not printed
                tqdm_ray.board().show(f"({who}{rank})", state)
                continue
            parts.append(f"({who}{rank}) {line.decode(errors='replace')}\n")
        text = "".join(parts)
        if not text:
            return
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------------ crashes
    def describe(self, worker) -> str:
        """What `worker` runs, for a log line: a task, an actor, or nothing."""
        if worker.actor_id is not None:
            return f"actor {self.actor_name(worker.actor_id) or '?'} " \
                   f"(actor id {worker.actor_id.hex()})"
        record = worker.task
        if record is not None:
            return f"task {record.spec.name!r} (task id {record.spec.task_id.hex()})"
        return "no task"

    def kill_on_purpose(self, pid: int, why: str) -> None:
        """The node is about to kill worker `pid` (kill(), cancel(force=True)): not a crash."""
        self.killing[pid] = why

    def died(self, worker) -> None:
        """The worker's socket closed (before the node forgets what it ran): its exit
        status, from the fork server, will be logged with this (unless it came first)."""
        if worker.pid in self.by_pid:
            self.ran[worker.pid] = self.describe(worker)

    def exited(self, pid: int, status: int) -> None:
        """The fork server reaped worker `pid` (`status` as os.waitpid gives it)."""
        worker = self.by_pid.pop(pid, None)
        what = self.ran.pop(pid, None)
        if what is None:
            what = self.describe(worker) if worker is not None else "no task"
        files = worker_file(self.rank, pid, "out/.err") if self.folder else "no log files"
        why = self.killing.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if why is not None:
            exit_type, detail = "INTENDED_USER_EXIT", f"killed by {why} while running {what}"
            log.info("worker pid=%d was %s", pid, detail)
        elif code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "?"
            exit_type = "SYSTEM_ERROR"
            detail = f"killed by signal {-code} ({name}) while running {what}"
            log.warning("worker pid=%d was %s; its output: %s", pid, detail, files)
        elif code != 0:
            # Its last line on stderr says why (an exception that escaped the worker's
            # loop ends with its type and message); the whole of it is in its .err file.
            last = [line for line in (worker.stderr_tail if worker is not None else ())
                    if line.strip()]
            exit_type = "SYSTEM_ERROR"
            detail = f"exited with status {code} while running {what}"
            if last:
                detail += f"; its stderr ended with: {last[-1].strip()}"
            log.warning("worker pid=%d %s; its output: %s", pid, detail, files)
        elif what == "no task":
            exit_type, detail = "INTENDED_SYSTEM_EXIT", "exited (idle, retired or stopped)"
            log.info("worker pid=%d exited", pid)
        else:
            exit_type, detail = "INTENDED_USER_EXIT", f"exited with status 0 while running {what}"
            log.info("worker pid=%d %s", pid, detail)
        self.exits[pid] = (round(time.time() * 1000), exit_type, detail)
