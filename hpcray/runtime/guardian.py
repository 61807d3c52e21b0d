"""The rank guardian: a parent for each rank's process that outlives it, to say how it died.

Under a launcher, `python -m hpcray` forks once, before MPI starts: the child is the rank
(node manager, and the driver on rank 0), the parent waits for it. Without ULFM the MPI
launcher ends the whole job a few milliseconds after any rank dies (MPICH's Hydra sends
SIGKILL to every rank's process group), so nothing inside the job can report the loss;
and a process watching from the side (the fork server) cannot tell the rank that died
first from the ranks the launcher killed after it, nor can it print once the launcher has
gone. The guardian is what the launcher waits for: it sees its child's death (and why,
from waitpid) before the launcher knows anything, prints one line naming the rank, its
host, its pid and what its node was running, then lets the launcher end the job (under
Hydra by closing the rank's PMI connection first: `_let_hydra_end_the_job`) and exits
with 128 + the signal.

What the node was running comes from the ActivityBoard: a small anonymous shared mapping
made before the fork, where the node manager writes a worker's task or actor name as it
starts it and clears it when it ends (a few hundred nanoseconds, no system call); the
guardian reads it only after the rank is gone.

Not for: signals. The guardian ignores SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2: the
rank shares its process group, and every launcher here signals the group (Hydra) or every
process of the step (Slurm), so the rank gets them itself; forwarding would deliver them
twice. The rank dies with its guardian (PR_SET_PDEATHSIG), so a SIGKILL of the guardian
still ends the rank, and the fork server then cleans the node up.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import socket
import stat
import sys
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
# Signals the launcher delivers to the rank's process group (see the module docstring).
_LAUNCHER_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1,
                     signal.SIGUSR2)
_SLOTS = 512                # workers whose work is recorded at once (more are not named)
_SLOT_BYTES = 64            # one length byte, then the name (cut to 63 bytes)
_NAMES_SHOWN = 6            # distinct names in the message, the most frequent first
_HYDRA_KILL_WAIT_S = 10.0   # how long a guardian waits for Hydra to end the job

_board = None               # this rank's ActivityBoard, when it has a guardian


class ActivityBoard:
    """What a node's workers run, in memory its guardian shares: a slot per worker."""

    def __init__(self, memory: mmap.mmap | None = None) -> None:
        self.memory = memory if memory is not None else mmap.mmap(-1, _SLOTS * _SLOT_BYTES)
        self.slots: dict = {}                       # worker key -> slot index
        self.written: dict = {}                     # worker key -> the name in its slot
        self.free = list(range(_SLOTS - 1, -1, -1))

    def reset(self) -> None:
        """A new node (job) starts: no worker of the last one runs anything."""
        self.memory[:] = bytes(len(self.memory))
        self.slots.clear()
        self.written.clear()
        self.free = list(range(_SLOTS - 1, -1, -1))

    def running(self, key, name: str) -> None:
        """Worker `key` now runs `name` (a task's function, "actor Class")."""
        if self.written.get(key) == name:  # its next task of the same function
            return
        slot = self.slots.get(key)
        if slot is None:
            if not self.free:
                return
            slot = self.slots[key] = self.free.pop()
        self.written[key] = name
        data = name.encode(errors="replace")[:_SLOT_BYTES - 1]
        start = slot * _SLOT_BYTES
        self.memory[start + 1:start + 1 + len(data)] = data
        self.memory[start] = len(data)

    def idle(self, key) -> None:
        self.written.pop(key, None)
        slot = self.slots.pop(key, None)
        if slot is not None:
            self.memory[slot * _SLOT_BYTES] = 0
            self.free.append(slot)

    def names(self) -> list:
        """Every name a slot holds (read by the guardian once the rank is gone)."""
        found = []
        for start in range(0, len(self.memory), _SLOT_BYTES):
            length = self.memory[start]
            if length:
                found.append(self.memory[start + 1:start + 1 + length].decode(errors="replace"))
        return found


class NoBoard:
    """The board of a node without a guardian (one node, or `init()` under mpirun)."""

    def reset(self) -> None:
        pass

    def running(self, key, name: str) -> None:
        pass

    def idle(self, key) -> None:
        pass


def board():
    """This rank's ActivityBoard, or a NoBoard where no guardian watches."""
    return _board if _board is not None else NoBoard()


def launcher_rank(environ=os.environ) -> int | None:
    """This process's rank as the launcher set it, before MPI starts (None: no launcher)."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        value = environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return None


def guard(rank: int, program: str) -> None:
    """Fork: return in the child, which goes on as the rank; in the parent, wait for it,
    report its death if a signal caused it, and leave with its exit status (never
    returns). `program`: what rank 0 runs, for the report."""
    global _board
    activity = ActivityBoard()
    # Held back across the fork: the guardian ignores them, the rank handles them.
    signal.pthread_sigmask(signal.SIG_BLOCK, _LAUNCHER_SIGNALS)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _LAUNCHER_SIGNALS)
        if os.getppid() == 1:  # the guardian died before prctl: nobody would report us
            os._exit(1)
        _board = activity
        return
    for signum in _LAUNCHER_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _LAUNCHER_SIGNALS)
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, b"hpcray-guard", 0, 0, 0)
    except (AttributeError, OSError):
        pass
    os._exit(_wait_and_report(pid, rank, program, activity))


def _wait_and_report(pid: int, rank: int, program: str, activity: ActivityBoard) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            return 1
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    signum = os.WTERMSIG(status)
    try:
        os.write(2, (death_message(rank, pid, signum, activity.names(), program) +
                     "\n").encode(errors="replace"))
    except OSError:
        pass
    _let_hydra_end_the_job()
    return 128 + signum


def _let_hydra_end_the_job(environ=os.environ) -> None:
    """Under MPICH's Hydra, close the rank's PMI connection and wait to be killed.

    Hydra's proxy ends the job when a rank's PMI socket closes, but only while the process
    it started (this guardian) is not yet reaped: when the guardian's exit and the socket's
    close reach the proxy together, it sometimes reaps first, ignores the close, and the
    job hangs with the other ranks running (measured: 1 kill in ~40). Closing the socket
    while alive orders the two: the proxy sees the close, SIGKILLs every process it
    started, this one included. The wait is bounded in case it does not."""
    fd = environ.get("PMI_FD", "")
    if "HYDI_CONTROL_FD" not in environ or not fd.isdigit():
        return
    try:
        if not stat.S_ISSOCK(os.fstat(int(fd)).st_mode):
            return
        os.close(int(fd))  # the last copy: the rank that shared it is dead
    except OSError:
        return
    time.sleep(_HYDRA_KILL_WAIT_S)


def death_message(rank: int, pid: int, signum: int, running: list, program: str) -> str:
    """The one line the guardian prints for a rank killed by `signum`. Open MPI may be
    running with ULFM, where the job goes on: only the loss is stated there."""
    try:
        how = signal.Signals(signum).name
    except ValueError:
        how = f"signal {signum}"
    who = f"rank {rank}" + (f" (the driver, {program})" if rank == 0 else "")
    counts: dict = {}
    for name in running:
        counts[name] = counts.get(name, 0) + 1
    shown = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    parts = [name if count == 1 else f"{name} x{count}"
             for name, count in shown[:_NAMES_SHOWN]]
    if len(shown) > _NAMES_SHOWN:
        parts.append(f"{len(shown) - _NAMES_SHOWN} more")
    doing = ("while its node ran " + ", ".join(parts)) if parts else \
        "while its node ran no task or actor"
    ending = "" if os.environ.get("OMPI_COMM_WORLD_RANK") is not None else \
        "; the job ends (this MPI cannot go on without a rank)"
    return (f"hpcray: lost {who} on host {socket.gethostname()} (pid {pid}, killed by "
            f"{how}) {doing}{ending}")
