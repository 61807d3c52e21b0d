"""The worker processes that own actors, and the owner check a call to one waits for.

As Ray: an actor (not detached) created by a worker process dies with that process
(Actors.owner_died). The node sees that death when it reads the socket's end, some time
after the process was killed; a call made meanwhile could still run, so whether
`ray.get(child.f.remote())` right after `os.kill(owner, SIGKILL)` fails would depend on
timing. Here it always fails: a call to such an actor from any process but its owner
does not leave its caller's node before the owner was seen alive after the call was
made. The owner's node asks the kernel (`/proc/<pid>/status`, opened when the process
first creates an actor: a SIGKILL shows as pending there from the moment kill() returns,
before the process has run; Z once it exited; unreadable once reaped), and processes
the owner's death at once when it finds it. Callers on other nodes ask that node
(OwnerCheck -> OwnerAnswer), one question in flight per actor for the calls made before
it; their calls wait in the actor's queue meanwhile, found there by cancel. The answer
comes after the owner node's KillActor to the actor's host, but may reach the caller
before that reaches the host, so a "dead" answer fails the calls at the caller.

The driver's actors are not checked (the driver's death ends the job), nor detached
ones, nor the owner's own calls: their handles do not ask for it (ActorHandle info
"owner_checked", set where a worker creates one; the call's "check_owner" option).
A pool worker that left when told keeps its actors alive (node_manager._worker_died):
its actors pass the check from then on.
"""

from __future__ import annotations

import os

from hpcray import exceptions, ids
from hpcray.runtime import messages
from hpcray.runtime.messages import wire
from hpcray.runtime.specs import FINISHED

ALIVE, HELD, FAILED = range(3)   # what admit() did with a call

_SIGKILL_BIT = 1 << 8            # SIGKILL (9) in /proc's pending-signal masks


def process_gone(status_fd: int) -> bool:
    """True once the process whose /proc/<pid>/status `status_fd` reads will never run
    again: reaped (the read fails), a zombie, or with a SIGKILL pending (kill() has
    returned, the process has not run since)."""
    try:
        status = os.pread(status_fd, 4096, 0)
    except OSError:
        return True
    if not status:
        return True
    at = status.find(b"\nState:\t")
    if at < 0 or status[at + 8:at + 9] in (b"Z", b"X"):
        return True
    for field in (b"\nShdPnd:\t", b"\nSigPnd:\t"):
        at = status.find(field)
        if at >= 0 and int(status[at + len(field):at + len(field) + 16], 16) & _SIGKILL_BIT:
            return True
    return False


class ActorOwners:
    """This node's processes that created actors, and the calls held for owner checks."""

    HANDLES = {messages.OwnerCheck: "on_owner_check", messages.OwnerAnswer: "on_owner_answer"}

    def __init__(self, rank: int, node, actors, peers) -> None:
        self.rank = rank
        self.node = node            # task ends, argument resolution
        self.actors = actors
        self.peers = peers
        self.owners: dict = {}      # actor id -> WorkerHandle of the process that made it
        self.status_files: dict = {}  # worker key -> fd of its /proc/<pid>/status
        self.waiting: dict = {}     # actor id -> [calls asked about, calls made since]

    # ------------------------------------------------------------------ owner's node
    def created(self, worker, actor_id: bytes) -> None:
        """A worker process here created a (not detached) actor: it dies with it."""
        if worker.owned_actors is None:
            worker.owned_actors = []
            if worker.pid:
                try:
                    self.status_files[worker.key] = os.open(f"/proc/{worker.pid}/status",
                                                            os.O_RDONLY | os.O_CLOEXEC)
                except OSError:  # no /proc: its death is seen when its socket ends
                    pass
        worker.owned_actors.append(actor_id)
        self.owners[actor_id] = worker

    def worker_died(self, worker) -> None:
        """The node read the end of this worker's socket."""
        fd = self.status_files.pop(worker.key, None)
        if fd is not None:
            os.close(fd)
        # A pool worker that left when told keeps its actors (as Ray: it would not
        # have been retired); an actor's process, however it ended, does not.
        if worker.owned_actors and (worker.actor_id is not None or not worker.retiring):
            self.owner_gone(worker)

    def close(self) -> None:
        """The node shuts down."""
        for fd in self.status_files.values():
            os.close(fd)
        self.status_files.clear()

    def owner_gone(self, worker) -> None:
        for actor_id in worker.owned_actors:
            self.owners.pop(actor_id, None)
        self.actors.owner_died(worker)
        worker.owned_actors = None  # processed: its socket's end will not do it again

    def death_of(self, actor_id: bytes) -> str | None:
        """None if the process that created the actor lives; else its death is
        processed now (if it was not yet) and this says what the actor's death says."""
        worker = self.owners.get(actor_id)
        if worker is None:  # its death was processed already
            return self.actors.owner_died_cause(actor_id, None)
        if worker.retiring and worker.actor_id is None:
            return None
        fd = self.status_files.get(worker.key)
        if worker.alive and (fd is None or not process_gone(fd)):
            return None
        self.owner_gone(worker)
        return self.actors.owner_died_cause(actor_id, worker.pid)

    def on_owner_check(self, source: int, actor_id: bytes) -> None:
        self.peers.send(source, wire(messages.OwnerAnswer, actor_id, self.death_of(actor_id)))

    # ------------------------------------------------------------------ caller's node
    def admit(self, record) -> int:
        """A call from a process on this node, to an actor another worker process
        created: ALIVE (the owner lives: go on as usual), FAILED (its owner is dead: the
        call failed), or HELD (asked the owner's node: queue the call, its answer
        releases it; `pending_deps` holds it in its queue until then)."""
        actor_id = record.spec.actor_id
        owner = ids.owner_rank(actor_id)
        if owner == self.rank:
            death = self.death_of(actor_id)
            if death is None:
                return ALIVE
            self._fail(record, death)
            return FAILED
        if not self.peers.is_live(owner):  # no answer would ever come
            self._fail(record, _node_death(owner))
            return FAILED
        record.pending_deps = 1
        asked = self.waiting.get(actor_id)
        if asked is None:
            self.waiting[actor_id] = [[record], []]
            self.peers.send(owner, wire(messages.OwnerCheck, actor_id))
        else:  # asked before this call was made: the next question covers it
            asked[1].append(record)
        return HELD

    def on_owner_answer(self, source: int, actor_id: bytes, death: str | None) -> None:
        asked, since = self.waiting.pop(actor_id, ([], []))
        if death is not None:
            asked += since
            since = []
        for record in asked:
            if record.cancelled or record.state == FINISHED:
                continue  # cancelled in its queue, or failed with its actor
            if death is None:
                self.node._resolve_deps(record, lambda _r: self.actors.pump_calls(actor_id))
            else:
                self._unqueue(record)
                self._fail(record, death)
        if since:
            self.waiting[actor_id] = [since, []]
            self.peers.send(source, wire(messages.OwnerCheck, actor_id))

    def node_died(self, dead: int) -> None:
        """The owner's node is gone: so is the owner."""
        for actor_id in [a for a in self.waiting if ids.owner_rank(a) == dead]:
            self.on_owner_answer(dead, actor_id, _node_death(dead))

    def _unqueue(self, record) -> None:
        actor_id = record.spec.actor_id
        hosted = self.actors.get(actor_id)
        if hosted is not None and record in hosted.queue:
            hosted.queue.remove(record)
            return
        remote = self.actors.remote_actors.get(actor_id)
        if remote is not None and record in remote.queue:
            remote.queue.remove(record)
            self.actors.actor_decref(actor_id)  # each remote call holds the actor

    def _fail(self, record, death: str) -> None:
        self.node._fail_task(record, exceptions.ActorDiedError(death))


def _node_death(rank: int) -> str:
    return f"The actor is dead because its owner's node (rank {rank}) died."
