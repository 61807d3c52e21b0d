"""A node's worker processes as processes: the fork server that starts them, their
sockets and output pipes, the signals sent to them, and closing them at the end.

What a worker's messages and its death mean for tasks and actors is the node's
(node_manager.py: `on_worker_messages`, `worker_died`); this part moves bytes and
processes only. The simulation (tests/sim/simcluster.py) replaces it with threads.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from hpcray.runtime import messages, proctitle, protocol
from hpcray.runtime.job_logs import WorkerStreams
from hpcray.runtime.messages import wire

log = logging.getLogger("hpcray.node")


class WorkerHandle:
    __slots__ = ("key", "conn", "pid", "alive", "ready", "task", "functions", "actor_id",
                 "pipes", "output", "started_at", "interrupt_wait", "stderr_tail", "holds",
                 "calls", "sigint_after_flush", "launched_ms", "ready_ms", "owned_actors",
                 "retiring", "doomed", "pipelined")

    def __init__(self, key, conn, pipes, actor_id=None):
        self.key = key
        self.conn = conn
        self.pid = None
        self.alive = True
        self.ready = False
        self.task = None          # the TaskRecord a pool worker runs
        self.pipelined = []       # TaskRecords sent to run after it, in order
        self.functions = set()    # function ids this worker has been sent
        self.actor_id = actor_id
        self.pipes = pipes        # {fd: stream name} of its stdout/stderr
        self.output = WorkerStreams()  # its lines not ended yet, its log files
        self.started_at = time.monotonic()
        self.launched_ms = round(time.time() * 1000)  # for list_workers
        self.ready_ms = None
        self.interrupt_wait = None  # ends the worker's pending get/wait with an error
        self.stderr_tail = collections.deque(maxlen=12)  # why it died, if it does
        self.holds = set()        # ids it holds refs to (its process counts once each)
        self.calls = None         # {function id: runs} of functions that set max_calls
        self.sigint_after_flush = False  # a CancelTask waits to go out: signal after it
        self.owned_actors = None  # ids of the (not detached) actors its process created
        self.retiring = False     # a pool worker sent ExitWorker: its exit is no death
        self.doomed = False       # the node SIGKILLed it: no new work until its death shows


class EventSources:
    """The descriptors the node's event loop waits on (one epoll), each with the handler
    called with (fd, mask) when it is ready."""

    def __init__(self, rank: int):
        self.rank = rank
        self.epoll = select.epoll()
        self.handlers: dict[int, object] = {}

    def register(self, fd: int, handler, events=select.EPOLLIN) -> None:
        self.handlers[fd] = handler
        self.epoll.register(fd, events)

    def unregister(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def watch_writable(self, fd: int, writable: bool) -> None:
        """Also wake for `fd` becoming writable (bytes wait in its outbox), or no more."""
        try:
            self.epoll.modify(fd, select.EPOLLIN | select.EPOLLOUT if writable
                              else select.EPOLLIN)
        except OSError:
            pass

    def dispatch(self, events) -> None:
        for fd, mask in events:
            handler = self.handlers.get(fd)
            if handler is not None:
                try:
                    handler(fd, mask)
                except Exception:  # noqa: BLE001 - one bad event must not kill the node
                    log.exception("rank %d: handling an event on fd %d failed",
                                  self.rank, fd)

    def close(self) -> None:
        self.epoll.close()


class WorkerProcesses:
    """`workers` (key -> WorkerHandle), the fork server, and each worker's socket and
    pipes. `on_messages(worker, messages)`: what a worker sent, decoded; `on_closed(worker)`:
    its socket closed (it died or exited)."""

    def __init__(self, rank: int, sources: EventSources, job_logs, forkserver_job: dict,
                 on_messages, on_closed):
        self.rank = rank
        self.sources = sources
        self.job_logs = job_logs
        self.on_messages = on_messages
        self.on_closed = on_closed
        self.workers: dict[int, WorkerHandle] = {}
        self.keys = itertools.count(1)
        self.stopping = False
        self.forkserver_ready = threading.Event()
        self.holding = False        # the tasks for a worker are held (hold_tasks)
        self._held: dict[WorkerHandle, list] = {}  # worker -> its RunTask frames, held
        self.forkserver_job = forkserver_job
        self.forkserver = None                   # its Popen, and our end of its socket:
        self.forkserver_sock = None              # None once it died and none replaced it
        self.forkserver_gone: str | None = None  # why no fork server runs (none replaced it)
        self._server_ready = False             # the running fork server said it is ready
        self._server_deaths: list[float] = []  # when fork servers died while the node ran
        self._orphans: list[WorkerHandle] = []  # a dead server's workers, deaths unhandled
        self._start_forkserver(forkserver_job)

    # ------------------------------------------------------------------ fork server
    def _start_forkserver(self, job: dict) -> None:
        # SEQPACKET keeps each request (and the descriptors it carries) a message of its own.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ, HPCRAY_FORKSERVER_JOB=json.dumps(job),
                   HPCRAY_FORKSERVER_FD=str(theirs.fileno()))
        # The driver's sys.path, so workers import the same modules (tests, __main__'s dir).
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] +
                                            [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.forkserver = subprocess.Popen(
            [sys.executable, "-m", "hpcray.runtime.forkserver", proctitle.ROOM],
            pass_fds=[theirs.fileno()],
            env=env, stdin=subprocess.DEVNULL, start_new_session=False)
        theirs.close()
        self.forkserver_sock = ours
        self.sources.register(ours.fileno(), self._on_forkserver)

    def stop_forkserver(self) -> None:
        """Its socket's end makes it reap its children, unlink the store and exit."""
        if self.forkserver_sock is None:
            return  # it died and none took its place
        try:
            self.forkserver_sock.close()
        except OSError:
            pass
        try:
            self.forkserver.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.forkserver.kill()
            self.forkserver.wait()

    def _on_forkserver(self, fd, _mask) -> None:
        if not self._on_forkserver_message() and not self.stopping:
            self._forkserver_died()
            self._bury_orphans()

    # A fork server that dies this often within the window is not replaced again.
    _SERVER_DEATHS = 3
    _SERVER_DEATH_WINDOW_S = 60.0

    def _forkserver_died(self) -> None:
        """It died while the node runs (a signal, the OOM killer). Its workers die with
        it (their parent-death signal), and so that new workers can start another one
        takes its place, which also takes over the store's unlinking should this node
        die. One that dies before it was ever ready (its start fails: so would the next
        one's), or for the `_SERVER_DEATHS`th time in `_SERVER_DEATH_WINDOW_S`, is not
        replaced: every worker asked for then fails to start, saying why, and the node
        fails the tasks waiting for one (NodeManager._worker_start_failed).

        Its workers' deaths are handled together, by `_bury_orphans`."""
        dead, sock, was_ready = self.forkserver, self.forkserver_sock, self._server_ready
        self.sources.unregister(sock.fileno())
        sock.close()
        self.forkserver_sock = None
        self._server_ready = False
        self.forkserver_ready.set()  # init waits for nothing any more
        dead.kill()  # (if its socket broke some other way)
        code = dead.wait()
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        orphans = [worker for worker in self.workers.values() if worker.alive]
        self._orphans += orphans
        for worker in orphans:
            worker.doomed = True  # killed, not a failure to start (not ready yet)
            if worker.pid:
                # Its parent-death signal has killed it; the group is what its user code
                # started, which has no undertaker now.
                for kill in (os.kill, os.killpg):
                    try:
                        kill(worker.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                self.job_logs.exited(worker.pid, signal.SIGKILL)
        now = time.monotonic()
        self._server_deaths = [t for t in self._server_deaths
                               if now - t < self._SERVER_DEATH_WINDOW_S] + [now]
        if not was_ready:
            self.forkserver_gone = (f"the fork server (pid {dead.pid}) ended ({how}) "
                                    "before it was ready")
        elif len(self._server_deaths) >= self._SERVER_DEATHS:
            self.forkserver_gone = (
                f"the fork server died {len(self._server_deaths)} times in "
                f"{self._SERVER_DEATH_WINDOW_S:.0f} s, the last (pid {dead.pid}) by {how}")
        if self.forkserver_gone is not None:
            log.error("rank %d: %s; no new workers can start", self.rank, self.forkserver_gone)
        else:
            log.warning("rank %d: the fork server (pid %d) died (%s) and its workers with "
                        "it; another one takes its place", self.rank, dead.pid, how)
            self._start_forkserver(self.forkserver_job)

    def _bury_orphans(self) -> None:
        """Handle the deaths of a dead fork server's workers now, all together, from the
        event loop (not from within the node's handling of something else): one by one,
        as their sockets' close showed, an idle one would be given the task retried
        after a busy one's death, and take it down with it. The idle ones go first."""
        orphans, self._orphans = self._orphans, []
        for worker in sorted(orphans, key=lambda w: w.task is not None):
            if worker.alive:
                self.on_closed(worker)

    def _on_forkserver_message(self) -> bool:
        """Read one report of the fork server; False once it is gone."""
        try:
            data = self.forkserver_sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        message = messages.record(protocol.decode(data))
        if type(message) is messages.ForkServerReady:
            self._server_ready = True
            self.forkserver_ready.set()
        elif type(message) is messages.WorkerExited:
            worker = self.job_logs.by_pid.get(message.pid)
            if worker is not None:  # its last words first: the log line quotes them
                self.read_all_output(worker)
            self.job_logs.exited(message.pid, message.status)
        return True

    def read_exit_reports(self, deadline: float) -> None:
        """At shutdown: the exit statuses of workers that died while the node ran, so
        their crash is logged (the fork server reports them as it reaps them)."""
        sock = self.forkserver_sock
        if sock is None:
            return
        poller = select.poll()  # (not select(): a replacement's socket may be above 1023)
        poller.register(sock, select.POLLIN)
        while self.job_logs.ran and time.monotonic() < deadline:
            ready = poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
            if not ready or not self._on_forkserver_message():
                return

    # ------------------------------------------------------------------ workers
    def start(self, actor_id: bytes | None = None) -> WorkerHandle:
        """Ask the fork server for a worker (an actor's own process with `actor_id`); it
        says Hello once it runs."""
        key = next(self.keys)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        protocol.tune(ours)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        request = protocol.encode(wire(messages.ForkWorker, key, actor_id is not None))
        if not self._ask_forkserver(request, [theirs.fileno(), out_w, err_w]):
            # Nobody forks it: its socket's close at once is its failure to start.
            os.write(err_w, f"hpcray: {self.forkserver_gone}\n".encode())
        theirs.close()
        os.close(out_w)
        os.close(err_w)
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        worker = WorkerHandle(key, protocol.NonBlockingConnection(ours),
                              {out_r: "stdout", err_r: "stderr"}, actor_id)
        self.workers[key] = worker
        self.sources.register(ours.fileno(), lambda fd, mask, w=worker: self._on_socket(w, mask))
        for fd in (out_r, err_r):
            self.sources.register(fd, lambda fd, mask, w=worker: self._on_output(w, fd))
        return worker

    def _ask_forkserver(self, request: bytes, fds: list) -> bool:
        """Send a ForkWorker with its descriptors; False if no fork server runs. One that
        died before the loop read its end is found here and replaced first."""
        for _ in range(2):
            if self.forkserver_sock is None:
                return False
            try:
                socket.send_fds(self.forkserver_sock, [request], fds)
                return True
            except OSError:  # its workers' deaths are handled as the first one's shows
                self._forkserver_died()
        return False

    def kill(self, worker: WorkerHandle, why: str) -> None:
        """SIGKILL one of this node's workers on purpose (kill(), cancel(force=True), a
        removed placement group). What it sent before it died may still come in before
        its connection closes: a WorkDone then must not make it idle and given the next
        task, which would die with it, never having run."""
        if worker.pid and worker.alive:
            worker.doomed = True
            self.job_logs.kill_on_purpose(worker.pid, why)
            self.signal(worker.pid, signal.SIGKILL)

    def signal(self, pid: int, signum: int) -> None:
        """Send one of this node's worker processes a signal (kill(), cancel, removal of
        its placement group); one that is gone already is no error."""
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def send(self, worker: WorkerHandle, message) -> None:
        if self._held and worker in self._held:  # what was held for it goes first
            self.send_frames(worker, [protocol.encode(message)])
        elif worker.conn.send(message):
            self.sources.watch_writable(worker.conn.fileno(), True)

    def send_task(self, worker: WorkerHandle, message) -> None:
        """A RunTask: held while `holding` (the event loop's pass), else sent now."""
        if self.holding:
            self._held.setdefault(worker, []).append(protocol.encode(message))
        else:
            self.send(worker, message)

    def hold_tasks(self) -> None:
        """From now until `release_tasks`, the tasks sent to a worker go in one write.
        A worker woken by the first of several tasks would otherwise take that one alone
        (the kernel runs a woken process at once, the node is preempted mid-pass), run
        it, report, and sleep again before the next: a wake-up per task, not per pass."""
        self.holding = True

    def release_tasks(self) -> None:
        self.holding = False
        while self._held:
            self.send_frames(next(iter(self._held)), [])

    def send_frames(self, worker: WorkerHandle, frames: list) -> None:
        """Messages already encoded (protocol.encode), in one write: the calls an actor
        gets in one pass cost one system call, not one each."""
        held = self._held.pop(worker, None) if self._held else None
        if held is not None:  # the tasks held for it go first, in the same write
            frames = held + frames
        if worker.conn.send_raw(frames[0] if len(frames) == 1 else b"".join(frames)):
            self.sources.watch_writable(worker.conn.fileno(), True)

    def _on_socket(self, worker: WorkerHandle, mask) -> None:
        if mask & select.EPOLLOUT:
            if not worker.conn.flush():
                self.sources.watch_writable(worker.conn.fileno(), False)
                if worker.sigint_after_flush and worker.alive and worker.pid:
                    worker.sigint_after_flush = False  # its CancelTask is out (cancellation.py)
                    self.signal(worker.pid, signal.SIGINT)
        if not mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return
        try:
            received = worker.conn.receive_ready()
        except EOFError:
            self._closed(worker)
            return
        self.on_messages(worker, received)
        if worker.conn.closed and worker.alive:
            self._closed(worker)

    def _closed(self, worker: WorkerHandle) -> None:
        """Its socket closed. A fork server that died killed it and every other worker:
        their deaths are handled together, before the event that shows the server's."""
        if self.forkserver_sock is not None and self.forkserver.poll() is not None:
            self._forkserver_died()
        if self._orphans:
            self._bury_orphans()
        if worker.alive:
            self.on_closed(worker)

    def disconnect(self, worker: WorkerHandle) -> None:
        """Its socket closed: no more events from it (its pipes end by themselves)."""
        self.sources.unregister(worker.conn.fileno())
        worker.conn.close()

    def _on_output(self, worker: WorkerHandle, fd: int) -> bool:
        """Read what the worker wrote on `fd`; False once nothing more is there now."""
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return False
        stream_name = worker.pipes.get(fd)
        if not data:
            self.sources.unregister(fd)
            close_fd(fd)
            worker.pipes.pop(fd, None)
            self.job_logs.output_ended(worker, stream_name)
            return False
        if stream_name == "stderr":
            worker.stderr_tail.extend(data.decode(errors="replace").splitlines())
        self.job_logs.output(worker, stream_name, data)
        return True

    def read_all_output(self, worker: WorkerHandle) -> None:
        """Everything the worker left in its pipes so far: a worker that ended (before
        saying why it ended), or an actor's before its log prefix changes."""
        for fd in list(worker.pipes):
            for _ in range(64):  # bounded: a child it left behind may still be writing
                if not self._on_output(worker, fd):
                    break

    # ------------------------------------------------------------------ the end
    def ask_to_exit(self, busy) -> None:
        """The first step of the node's shutdown (under its lock): an idle worker is told
        to exit; a busy one (`busy(worker)`) would read that only when its task ends,
        after a Ctrl-C maybe never, so it is killed (Ray's shutdown kills workers too)."""
        self.stopping = True
        doomed = []
        for worker in self.workers.values():
            if worker.alive and worker.pid and busy(worker):
                doomed.append(worker.pid)
            elif worker.alive:
                worker.conn.send(wire(messages.ExitWorker))
        for pid in doomed:
            self.signal(pid, signal.SIGKILL)

    def close(self, grace: float = 2.0) -> None:
        """The last step: wait up to `grace` seconds for every worker to exit (then kill
        it), log the crashes the fork server reports, stop it, close every descriptor."""
        deadline = time.monotonic() + grace
        for pid in [w.pid for w in self.workers.values() if w.alive and w.pid]:
            while time.monotonic() < deadline and pid_alive(pid):
                time.sleep(0.005)
            if pid_alive(pid):
                self.signal(pid, signal.SIGKILL)
        self.read_exit_reports(deadline=time.monotonic() + 1.0)
        self.stop_forkserver()
        for worker in self.workers.values():
            worker.conn.close()
            for fd, stream_name in worker.pipes.items():
                close_fd(fd)
                self.job_logs.output_ended(worker, stream_name)


def pid_alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
