"""The node manager's actors: placement, a process each, ordered calls, restarts, death.

Calls to an actor queue here in submission order and are sent to its process as soon
as their arguments are ready (the process runs them one at a time, or concurrently for
threaded and async actors); an actor that runs one call at a time gets them in submission
order, an async or threaded one whenever each one's arguments are ready, a sync one with
concurrency groups in submission order within each group, as in Ray.
When the process dies the actor restarts (re-running its constructor) while
`max_restarts` allows, retrying the calls it was running while `max_task_retries` allows;
otherwise every pending and future call fails with `ActorDiedError`.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from hpcray import exceptions, ids
from hpcray.gcs import tables as gcs_tables
from hpcray.runtime import messages
from hpcray.runtime.messages import wire
from hpcray.runtime.protocol import encode
from hpcray.runtime.object_table import _DependencyWaiter
from hpcray.runtime.owners import FAILED, HELD
from hpcray.runtime.specs import QUEUED, RUNNING, TaskRecord, TaskSpec

if TYPE_CHECKING:
    from hpcray.runtime.worker_processes import WorkerHandle

# Actor states
A_PENDING, A_STARTING, A_ALIVE, A_RESTARTING, A_DEAD = range(5)
# Sends of one KillActor after which no node passes it on (kill_actor)
KILL_HOPS = 3


def take_ready(queue: collections.deque, in_order) -> list:
    """The calls of `queue` whose arguments are ready, taken off it: with `in_order` True
    (a serial actor) only those before the first that waits for an argument; with a
    `GroupOrder` (a sync actor with concurrency groups) the same within each group."""
    if in_order is True:
        ready = []
        while queue and queue[0].pending_deps == 0:
            ready.append(queue.popleft())
        return ready
    if in_order:
        return _take_ready_by_group(queue, in_order)
    ready = [record for record in queue if record.pending_deps == 0]
    if len(ready) == len(queue):
        queue.clear()
    elif ready:
        waiting = [record for record in queue if record.pending_deps != 0]
        queue.clear()
        queue.extend(waiting)
    return ready


def _take_ready_by_group(queue: collections.deque, group_of) -> list:
    ready, waiting, blocked = [], [], set()
    for record in queue:
        group = group_of(record)
        if group in blocked:
            waiting.append(record)
        elif record.pending_deps == 0:
            ready.append(record)
        else:
            blocked.add(group)
            waiting.append(record)
    if ready:
        queue.clear()
        queue.extend(waiting)
    return ready


class GroupOrder:
    """The calls of a sync actor (max_concurrency 1) with concurrency groups run in
    submission order within each group, and in none across groups (as Ray 2.60: a call
    waiting for its argument holds back the later calls of its group only): a call's group
    as `take_ready` sees it, as the worker routes it (worker._Groups)."""

    __slots__ = ("method_groups",)

    def __init__(self, method_groups: dict | None):
        self.method_groups = method_groups or {}

    def __call__(self, record) -> str | None:
        return call_group(record.spec, self.method_groups)


def call_group(spec, method_groups: dict) -> str | None:
    """A call's concurrency group: the one its `.options()` named, else its method's
    (`@method`), else None (the default group)."""
    options = spec.options
    if options:
        group = options.get("concurrency_group")
        if group:
            return group
    return method_groups.get(spec.method)


def kill_route(host: int | None, here: int, hops: int, known: bool) -> str:
    """What a node that does not host an actor does with a kill of it: "send" it to
    `host` (where the node last knew the actor to be), "broadcast" it, "drop" it, or
    find it "unknown" (kill() of a handle no node could have made). `hops`: sends of
    this KillActor so far, 0 where kill() was called; `known`: the node has heard of the
    actor or does not own it. Only the node kill() was called on broadcasts, and no
    KillActor is passed on once sent KILL_HOPS times: nodes that know no more than their
    sender would otherwise pass a kill around forever."""
    if host is not None and host != here and hops < KILL_HOPS:
        return "send"
    if hops:
        return "drop"
    if not known:
        return "unknown"
    return "broadcast" if host is None else "drop"


class ActorHandles:
    """How many hold an actor's handles, as one node counts them (borrowing.py): the
    record of the node that hosts the actor (ActorRecord) or of another node that holds
    its handles or calls it (RemoteActor). The fields mirror an ObjectEntry's."""

    __slots__ = ("owner", "refs", "borrowers", "lent", "lender", "deferred", "scoped")

    def __init__(self, actor_id: bytes):
        self.owner = ids.owner_rank(actor_id)  # the node that created it counts handles
        self.refs = 0           # holders on this node: processes, tasks, values, calls out
        self.borrowers = None   # owner: {rank: registrations} of nodes holding it too
        self.lent = 0           # borrower: registrations the owner counts for this node
        self.lender = None      # borrower, unregistered: the owner of the task that brought it
        self.deferred = None    # borrower, unregistered: {rank: n} to register through lender
        self.scoped = False     # owner: unnamed and not detached, so it ends with its handles

    def take_handles(self, other: ActorHandles) -> None:
        """This record counts what `other` counted (the actor moved between records)."""
        for name in ActorHandles.__slots__:
            setattr(self, name, getattr(other, name))
        other.refs, other.borrowers, other.lent = 0, None, 0
        other.lender = other.deferred = None


class ActorRecord(ActorHandles):
    """An actor this node hosts (or created and has not placed yet)."""

    __slots__ = ("actor_id", "spec", "state", "worker", "queue", "inflight", "restarts_left",
                 "restarts", "name", "info", "death", "killed", "kill_cause", "gpu_ids",
                 "placed", "serial", "in_order", "repr_name")

    def __init__(self, spec: TaskSpec, info: dict):
        super().__init__(spec.actor_id)
        self.actor_id = spec.actor_id
        self.spec = spec
        self.state = A_PENDING
        self.worker = None
        self.queue: collections.deque = collections.deque()   # calls not yet sent, in order
        self.inflight: dict = {}                              # task id -> TaskRecord
        self.restarts_left = spec.options.get("max_restarts", 0)
        self.restarts = 0
        self.name = spec.options.get("name")
        self.scoped = self.name is None and not spec.options.get("detached")
        self.info = info        # what an ActorHandle needs: class name, methods
        self.death = None       # the exception calls get once the actor is dead
        self.killed = False
        self.kill_cause = None  # what its death says when it was not kill() (owner_died)
        self.gpu_ids = ()
        self.placed = False
        self.repr_name = None   # repr() of the instance, its log prefix (Ray's actor repr)
        # runs one call at a time (no async methods, no threads): see submit_actor_call
        one_at_a_time = (not info.get("is_async")
                         and spec.options.get("max_concurrency") in (None, 1))
        self.serial = one_at_a_time and not spec.options.get("concurrency_groups")
        # how pump_actor takes calls (take_ready): all in order, in order per concurrency
        # group (a GroupOrder), or in no order (async, max_concurrency > 1: as Ray)
        self.in_order = self.serial or (
            GroupOrder(info.get("method_groups")) if one_at_a_time else False)


class RemoteActor(ActorHandles):
    """An actor hosted by another node, as its callers' nodes see it: calls queue here in
    order until the host is known and their arguments exist, then go to the host. Each
    call counts as a holder of the actor until its `done` comes back."""

    __slots__ = ("actor_id", "host", "queue", "sent", "creation")

    def __init__(self, actor_id: bytes, host: int | None):
        super().__init__(actor_id)
        self.actor_id = actor_id
        self.host = host        # its rank; None: not known yet; -1: the actor is dead
        self.queue: collections.deque = collections.deque()
        # Calls sent and not answered, in the order sent: task id -> (the rank they went
        # to, TaskRecord). If that rank dies they are retried (max_task_retries) or fail.
        self.sent: dict = {}
        self.creation = None    # owner: the creation spec, to restart it if its node dies


class Actors:
    """The actors this node hosts (a mapping of actor id -> ActorRecord) and the handles
    of actors hosted elsewhere that it counts (RemoteActor)."""

    def __init__(self, rank: int, link, node, objects, scheduler, gcs, peers) -> None:
        self.rank = rank
        self.cluster = link               # ClusterLink
        self.node = node                  # workers, GPUs, task ends
        self.objects = objects
        self.scheduler = scheduler
        self.gcs = gcs
        self.peers = peers
        self.functions = node.functions
        self.hosted: dict[bytes, ActorRecord] = {}
        self.remote_actors: dict[bytes, RemoteActor] = {}
        self.router = self.borrowing = self.owners = None   # bind()

    HANDLES = {messages.ActorReady: "on_actor_ready"}

    def bind(self, router, borrowing, owners) -> None:
        self.router = router
        self.borrowing = borrowing
        self.owners = owners

    # A mapping of the hosted actors, as the other parts read it.
    def get(self, actor_id: bytes):
        return self.hosted.get(actor_id)

    def __getitem__(self, actor_id: bytes) -> ActorRecord:
        return self.hosted[actor_id]

    def __delitem__(self, actor_id: bytes) -> None:
        del self.hosted[actor_id]

    def __contains__(self, actor_id: bytes) -> bool:
        return actor_id in self.hosted

    def values(self):
        return self.hosted.values()

    def create_actor(self, spec: TaskSpec, pending: bool = False) -> None:
        """`pending`: no node of the job can host it; it stays A_PENDING here, unplaced,
        its calls queued, until killed or out of scope (unschedulable.py)."""
        # A named actor's client claimed the name (claim_actor_name) before submitting.
        actor = ActorRecord(spec, spec.options["info"])
        actor.refs = 1  # the creator's handle
        self.hosted[spec.actor_id] = actor
        for key in spec.contained:
            self.objects.incref(key)
        if pending:
            return
        record = TaskRecord(spec, 0)
        self.node._resolve_deps(record, lambda r, a=actor: self.router.route_actor(a, r))

    def host_actor(self, spec: TaskSpec) -> None:
        """Host an actor that another node created and the global scheduler placed here."""
        actor = ActorRecord(spec, spec.options["info"])
        self.hosted[spec.actor_id] = actor
        remote = self.remote_actors.pop(spec.actor_id, None)
        if remote is not None:  # its handles (or calls) reached this node first
            actor.take_handles(remote)
            calls = len(remote.queue)
            self.requeue_calls(remote.queue, actor.queue,
                                lambda _record: self.pump_actor(actor))
            for _ in range(calls):  # calls made here hold the actor only while remote
                self.actor_decref(spec.actor_id)
        record = TaskRecord(spec, 0)
        self.router.localize(record, lambda _r: self.actor_deps_ready(actor))

    def requeue_calls(self, calls: collections.deque, queue: collections.deque, pump) -> None:
        """Move calls not sent yet to another queue of the same actor (kept in order);
        `pump(record)` runs once the arguments of one that waits are ready."""
        for record in calls:
            queue.append(record)
            if record.pending_deps:
                for dep in record.spec.deps:
                    entry = self.objects.get(dep)
                    for waiter in (entry.avail_waiters or ()) if entry is not None else ():
                        if isinstance(waiter, _DependencyWaiter) and waiter.record is record:
                            waiter.ready_callback = pump
        calls.clear()

    def actor_deps_ready(self, actor: ActorRecord) -> None:
        if actor.state == A_DEAD:
            return
        self.node._run_actions(self.scheduler.task_ready(actor.actor_id, actor.spec.demand,
                                                    needs_worker=False))

    def place_actor(self, actor: ActorRecord) -> None:
        if actor.state == A_DEAD:  # ended while it waited for room: the room is free again
            self.scheduler.release(actor.spec.demand)
            self.node._run_actions(self.scheduler.reschedule())
            return
        actor.placed = True
        self.cluster.actor_cpus += actor.spec.demand.get("CPU", 0.0)
        actor.gpu_ids = self.node._take_gpus(actor.spec)
        actor.state = A_STARTING
        actor.worker = self.node.processes.start(actor.actor_id)
        # Every node learns where to send its calls.
        self.cluster.actor_locations[actor.actor_id] = self.rank
        in_order = actor.in_order
        self.peers.broadcast(wire(messages.ActorAt, actor.actor_id, self.rank,
                                  not actor.serial,
                                  in_order.method_groups if type(in_order) is GroupOrder
                                  else None))
        self.record_actor(actor, node=self.rank)

    def send_actor_creation(self, actor: ActorRecord, worker: WorkerHandle) -> None:
        spec = actor.spec
        function = self.functions.get(spec.function_id)
        worker.functions.add(spec.function_id)
        self.node.task_events.running(spec, worker.pid)
        self.node.recorder.creating(spec.actor_id)
        self.node.activity.running(worker.key, f"actor {actor.info['class_name']}")
        self.node.processes.send(worker, wire(messages.CreateActor,
            spec.to_wire(), function, self.node._dep_payloads(spec), actor.gpu_ids))

    def on_actor_ready(self, worker: WorkerHandle, actor_id: bytes, error_blob, repr_name,
                       transitions) -> None:
        self.objects.apply_transitions(transitions)
        actor = self.hosted.get(actor_id)
        if actor is None or actor.worker is not worker:
            return
        if repr_name != actor.repr_name:
            # What the constructor printed (flushed before ActorReady) keeps the name it
            # was printed under; the repr names what comes after, as in Ray.
            self.node.processes.read_all_output(worker)
            actor.repr_name = repr_name
        self.node.recorder.created(actor.spec, worker.pid, error_blob is not None)
        if error_blob is not None:
            from hpcray.serialization import deserialize_inline
            cause = deserialize_inline(error_blob).error
            actor.restarts_left = 0
            self.actor_dead(actor, exceptions.ActorDiedError(
                f"The actor {actor.info['class_name']} died: its constructor raised:\n{cause}"))
            self.node.processes.send(worker, wire(messages.ExitWorker))
            return
        actor.state = A_ALIVE
        self.record_actor(actor, state=gcs_tables.ALIVE)
        self.pump_actor(actor)

    def submit_actor_call(self, record: TaskRecord, check_owner: bool = False) -> None:
        """`check_owner`: a call made here to an actor that another worker process
        created; it leaves once that process is seen alive (owners.py)."""
        actor_id = record.spec.actor_id
        held = False
        if check_owner:
            admitted = self.owners.admit(record)
            if admitted == FAILED:
                return
            held = admitted == HELD
        actor = self.hosted.get(actor_id)
        if actor is None and (actor_id in self.remote_actors
                              or ids.owner_rank(actor_id) != self.rank):
            self.router.submit_remote_actor_call(record, held)
            return
        if actor is None or actor.state == A_DEAD:
            error = actor.death if actor is not None else exceptions.RayActorError(
                "The actor is unknown or was killed.")
            self.node._fail_task(record, error)
            return
        actor.queue.append(record)
        if held:
            return
        if actor.serial and actor.inflight and not record.spec.deps:
            # Busy with a call whose end pumps the queue: this one leaves then, in one write
            # with the others queued meanwhile (one system call and one wake-up of the
            # worker for many calls, which it would run one at a time anyway). If the
            # process dies first, these count as sent (actor_process_died), as in Ray.
            record.pending_deps = 0
            return
        self.node._resolve_deps(record, lambda _r, a=actor: self.pump_actor(a))

    def pump_calls(self, actor_id: bytes) -> None:
        """Send what can go of the actor's calls queued here, wherever it is hosted."""
        actor = self.hosted.get(actor_id)
        if actor is not None:
            self.pump_actor(actor)
        elif actor_id in self.remote_actors:
            self.router.pump_remote_actor(self.remote_actors[actor_id])

    def pump_actor(self, actor: ActorRecord) -> None:
        """Send the actor, in submission order, every call whose arguments are ready: a
        serial actor's calls wait behind an earlier call whose arguments are not; an async
        or threaded actor's do not (Ray promises those no order: its page "Actor Task
        Execution Order")."""
        if actor.state != A_ALIVE or actor.killed:  # a killed one's calls fail at its end
            return
        worker = actor.worker
        if worker.doomed:  # kill(no_restart=False): its calls wait for the restart
            return
        queue = actor.queue
        frames, started = [], []
        for record in take_ready(queue, actor.in_order):
            if record.cancelled:
                continue
            record.state = RUNNING
            spec = record.spec
            actor.inflight[spec.task_id] = record
            started.append(spec.task_id)
            frames.append(encode(wire(messages.RunTask, spec.to_wire(), None,
                                      self.node._dep_payloads(spec), ())))
        if frames:
            self.node.task_events.calls_running(started, worker.pid)
            self.node.processes.send_frames(worker, frames)
        if not queue and not actor.inflight and actor.refs <= 0 and actor.death is not None:
            self.node.processes.send(worker, wire(messages.ExitWorker))

    def actor_call_done(self, worker, task_id, results, retry, started, ended,
                        transitions) -> None:
        actor = self.hosted.get(worker.actor_id)
        record = actor.inflight.pop(task_id, None) if actor is not None else None
        if record is None:
            self.objects.apply_transitions(transitions)
            return
        self.node.recorder.ran(record.spec, worker.pid, started, ended, results)
        if "generator_budget" in actor.spec.options:
            self.node.generators.budgets.call_ended(actor.actor_id, task_id)
        self.node._finish_task(record, results, transitions)
        if actor.queue:
            self.pump_actor(actor)  # what waited for this call's end (and ExitWorker after)
        elif actor.death is not None and not actor.inflight:
            self.node.processes.send(worker, wire(messages.ExitWorker))

    # ------------------------------------------------------------------ handles
    # Each node counts its own holders in its record of the actor (the ActorRecord where
    # it is hosted, else a RemoteActor), and the creator's record also counts the other
    # nodes that hold one (borrowing.py); the actor ends when the creator's count is zero.

    def actor_handles(self, actor_id: bytes, create: bool = False):
        """This node's count of an actor's handles: its ActorRecord when it hosts the
        actor, else its RemoteActor (made if `create`, for an actor another node owns)."""
        handles = self.hosted.get(actor_id)
        if handles is None:
            handles = self.remote_actors.get(actor_id)
            if handles is None and create:
                owner = ids.owner_rank(actor_id)
                if owner != self.rank and owner < self.cluster.size:
                    handles = self.remote_actors[actor_id] = RemoteActor(
                        actor_id, self.cluster.actor_locations.get(actor_id))
        return handles

    def actor_incref(self, actor_id: bytes) -> None:
        handles = self.actor_handles(actor_id, create=True)
        if handles is None:
            return
        if handles.refs <= 0 and handles.lent == 0 and handles.lender is None \
                and handles.owner != self.rank:
            # New to this node outside any task or value that would cover it (looked up
            # by name): it registers itself with the owner.
            handles.lent = 1
            self.peers.send(handles.owner, wire(messages.Borrow, actor_id, self.rank, 1))
        handles.refs += 1

    def actor_decref(self, actor_id: bytes) -> None:
        handles = self.hosted.get(actor_id)
        if handles is None:
            handles = self.remote_actors.get(actor_id)
            if handles is None:
                return
        handles.refs -= 1
        if handles.refs <= 0:
            self.actor_unused(actor_id, handles)

    def actor_unused(self, actor_id: bytes, handles) -> None:
        """Nothing on this node may hold the actor's handle any more: another node tells
        the owner; the owner ends the actor once no other node holds one either."""
        if handles.refs > 0:
            return
        if handles.owner != self.rank:
            self.borrowing.drop_borrowed_actor(actor_id, handles)
            return
        if handles.borrowers or not handles.scoped:
            return
        if isinstance(handles, ActorRecord):
            self.actor_out_of_scope(handles)
        elif handles.host is not None and handles.host >= 0:  # else once the host says
            self.peers.send(handles.host, wire(messages.EndActor, actor_id))

    def actor_out_of_scope(self, actor: ActorRecord) -> None:
        if actor.state == A_DEAD or actor.death is not None:
            return
        # As Ray: the actor ends once the calls it already has are done.
        actor.death = exceptions.ActorDiedError(
            f"The actor {actor.info['class_name']} went out of scope (no handle is left).")
        actor.restarts_left = 0
        if actor.state == A_ALIVE and not actor.queue and not actor.inflight:
            self.node.processes.send(actor.worker, wire(messages.ExitWorker))
        elif actor.state == A_PENDING and not actor.queue:
            # Not started and nothing to run. With calls queued (`A.remote().f.remote()`
            # while A waits for a CPU) it starts, runs them, then exits (_pump_actor).
            self.actor_dead(actor, actor.death)

    def actor_process_died(self, worker: WorkerHandle) -> None:
        actor = self.hosted.get(worker.actor_id)
        if actor is None or actor.worker is not worker or actor.state == A_DEAD:
            return
        self.node.generators.budgets.process_died(actor.actor_id)
        if actor.death is not None and not actor.killed:
            self.actor_dead(actor, actor.death)  # exited after going out of scope
            return
        if actor.restarts_left != 0 and not actor.killed:
            if actor.restarts_left > 0:
                actor.restarts_left -= 1
            sent = list(actor.inflight.values())
            # and the calls submit_actor_call held back, unless the node killed it: then
            # pump_actor held them, and they go to the restarted actor
            if actor.state == A_ALIVE and not worker.doomed:
                while actor.queue and actor.queue[0].pending_deps == 0:
                    record = actor.queue.popleft()
                    if not record.cancelled:  # (a cancelled one has ended already)
                        sent.append(record)
            retry, lost = [], []
            for record in sent:
                (retry if record.retries_left != 0 and not record.cancelled
                 else lost).append(record)
            actor.inflight = {}
            for record in lost:
                self.node._fail_task(record, exceptions.RayActorError(
                    f"The actor {actor.info['class_name']} (pid={worker.pid}) died while "
                    "running this call; it is restarting, but the call had no retries left."))
            for record in reversed(retry):
                if record.retries_left > 0:
                    record.retries_left -= 1
                self.node.recorder.count("retries")
                record.state = QUEUED
                actor.queue.appendleft(record)
            actor.state = A_RESTARTING
            actor.restarts += 1
            self.node.recorder.count("actor_restarts")
            self.record_actor(actor, state=gcs_tables.RESTARTING, restarts=actor.restarts)
            actor.repr_name = None  # the new constructor prints under the class name
            actor.worker = self.node.processes.start(actor.actor_id)
            return
        cause = (actor.kill_cause or "was killed with kill()") if actor.killed else \
            f"process (pid={worker.pid}) died unexpectedly"
        self.actor_dead(actor, exceptions.ActorDiedError(
            f"The actor {actor.info['class_name']} {cause}."))

    def node_died(self, dead: int) -> None:
        """Rank `dead` is gone (node_failures.py): calls to its actors wait for their
        new host; this node restarts the ones it owns elsewhere, or declares them dead.
        Actors the dead rank created die with it (as Ray: fate sharing with the owner),
        detached ones excepted: no node could restart them."""
        locations = self.cluster.actor_locations
        for actor_id in [a for a, rank in locations.items() if rank == dead]:
            del locations[actor_id]
        for remote in list(self.remote_actors.values()):
            if remote.host != dead:
                continue
            remote.host = None
            if remote.owner == self.rank:
                self.restart_elsewhere(remote, dead)
            elif remote.owner == dead:  # its owner and host both gone: never again
                locations[remote.actor_id] = remote.host = -1
                self.router.pump_remote_actor(remote)
        cause = f"is dead because its owner's node (rank {dead}) died"
        for actor in list(self.hosted.values()):
            if actor.owner == dead and not actor.spec.options.get("detached"):
                self.kill_actor(actor.actor_id, True, cause)
        self.owners.node_died(dead)

    def restart_elsewhere(self, remote: RemoteActor, dead: int) -> None:
        spec = remote.creation
        if remote.refs <= 0 and not remote.borrowers and remote.scoped:
            # Out of scope: it was ended (EndActor), or would have been; never again.
            self.cluster.actor_locations[remote.actor_id] = -1
            self.router.on_actor_at(self.rank, remote.actor_id, -1)
            return
        left = spec.options.get("max_restarts", 0) if spec is not None else 0
        if left == 0:
            self.gcs.request("update_actor", remote.actor_id, {
                "state": gcs_tables.DEAD,
                "death_cause": f"its node (rank {dead}) died and max_restarts is spent"})
            self.cluster.actor_locations[remote.actor_id] = -1
            self.peers.broadcast(wire(messages.ActorAt, remote.actor_id, -1))
            self.router.on_actor_at(self.rank, remote.actor_id, -1)
            return
        options = dict(spec.options)
        if left > 0:
            options["max_restarts"] = left - 1
        spec = remote.creation = TaskSpec(
            spec.task_id, spec.kind, spec.function_id, spec.name, spec.args, spec.deps,
            spec.contained, spec.return_ids, spec.demand, spec.max_retries,
            spec.retry_exceptions, spec.actor_id, spec.method, options)
        self.node.recorder.count("actor_restarts")
        self.gcs.request("update_actor", remote.actor_id, {"state": gcs_tables.RESTARTING})
        self.router.forward_actor(spec)

    def actor_dead(self, actor: ActorRecord, error: BaseException) -> None:
        self.node.recorder.constructing.pop(actor.actor_id, None)
        self.node.generators.budgets.actor_dead(actor.actor_id)
        actor.state = A_DEAD
        actor.death = error
        self.record_actor(actor, state=gcs_tables.DEAD)  # a name is free again
        for record in list(actor.inflight.values()) + list(actor.queue):
            self.node._fail_task(record, error)
        actor.inflight.clear()
        actor.queue.clear()
        if actor.placed:
            actor.placed = False
            self.cluster.actor_cpus -= actor.spec.demand.get("CPU", 0.0)
            self.scheduler.release(actor.spec.demand)
            self.node._release_gpus(actor)
            self.node._run_actions(self.scheduler.reschedule())
        else:
            self.scheduler.cancel(actor.actor_id)
        if actor.spec.contained:
            contained, actor.spec.contained = actor.spec.contained, ()
            for key in contained:
                self.objects.decref(key)

    def kill_actor(self, actor_id: bytes, no_restart: bool = True,
                   cause: str | None = None, hops: int = 0) -> None:
        """kill() (or, with `cause`, the death of the process that created the actor:
        owner_died), wherever the actor is hosted. `hops`: how often a KillActor was sent
        to get here (0: asked here). A node that does not host the actor passes the kill
        to the host it knows of, while under KILL_HOPS (the actor may have moved on a
        restart); only the node asked first broadcasts it, when it knows of no host:
        nodes that knew no more would otherwise broadcast it back and forth forever."""
        actor = self.hosted.get(actor_id)
        if actor is None:
            remote = self.remote_actors.get(actor_id)
            host = remote.host if remote is not None else \
                self.cluster.actor_locations.get(actor_id)
            route = kill_route(host, self.rank, hops,
                               remote is not None or ids.owner_rank(actor_id) != self.rank)
            if route == "unknown":
                raise ValueError("kill() got an unknown actor handle.")
            if route == "send":
                self.peers.send(host, wire(messages.KillActor, actor_id, no_restart, cause,
                                           hops + 1))
            elif route == "broadcast":  # its host has not said where it is yet
                self.peers.broadcast(wire(messages.KillActor, actor_id, no_restart, cause,
                                          KILL_HOPS))
            return
        if actor.state == A_DEAD:
            return
        if no_restart:
            actor.killed = True
            actor.kill_cause = cause
        worker = actor.worker
        if worker is not None and worker.pid and worker.alive:
            self.node.processes.kill(worker, "kill()")
        elif actor.state == A_PENDING:
            self.actor_dead(actor, exceptions.ActorDiedError(
                f"The actor {actor.info['class_name']} {cause or 'was killed with kill()'}."))

    def owner_died(self, worker: WorkerHandle) -> None:
        """As Ray: the actors a process created die with it (fate sharing with their
        owner), detached ones excepted, whoever else still holds their handles."""
        cause = _owner_died(worker.pid)
        for actor_id in worker.owned_actors:
            try:
                self.kill_actor(actor_id, True, cause)
            except ValueError:  # never submitted (its creation failed)
                pass

    def owner_died_cause(self, actor_id: bytes, pid: int | None) -> str:
        """What a call to an actor whose owner (process `pid`) died says."""
        actor = self.hosted.get(actor_id)
        remote = self.remote_actors.get(actor_id)
        spec = actor.spec if actor is not None else remote.creation if remote else None
        name = f" {spec.options['info']['class_name']}" if spec is not None else ""
        return f"The actor{name} {_owner_died(pid)}."

    def record_actor(self, actor: ActorRecord, **fields) -> None:
        """Keep the GCS actors table up to date: the hosting node registers its actor
        when placing it (a named one is registered already, by its name's claim), then
        updates state, node and restarts. Alive or dead, its creation task has ended
        (the tasks table shows it FINISHED or FAILED)."""
        state = fields.get("state")
        if state == gcs_tables.ALIVE:
            fields["pid"] = actor.worker.pid
            self.node.task_events.actor_created(actor.spec)
        elif state == gcs_tables.DEAD:
            if actor.death is not None:
                fields["death_cause"] = str(actor.death)
            self.node.task_events.actor_created(actor.spec, "ACTOR_DIED")
        if "node" in fields and actor.name is None:
            self.gcs.register_actor(actor.actor_id, gcs_tables.ActorInfo(
                state=gcs_tables.PENDING_CREATION, node=fields["node"],
                class_name=actor.info["class_name"], info=actor.info))
        else:
            self.gcs.request("update_actor", actor.actor_id, fields)

    # ------------------------------------------------------------------ names
    # Names live in the GCS (claimed there before the creation is submitted, released
    # when the actor dies), so a name is unique across the job and visible from every
    # node. The answers come through a callback (at once from this rank's own shard).

    def claim_actor_name(self, name: str, actor_id: bytes, info: dict, answer) -> None:
        """answer(None) once `name` belongs to `actor_id`; answer(holder id) if a live
        actor already holds it."""
        record = gcs_tables.ActorInfo(name=name, class_name=info["class_name"], info=info)

        def registered(result) -> None:
            answer(result.actor_id if isinstance(result, gcs_tables.NameTaken) else None)

        self.gcs.register_actor(actor_id, record, callback=registered)

    def release_actor_name(self, name: str, actor_id: bytes) -> None:
        """Give back a name whose actor was never submitted (its submission failed)."""
        self.gcs.request("update_actor", actor_id, {"state": gcs_tables.DEAD})

    def lookup_actor(self, name: str, answer) -> None:
        """answer((actor_id, info)) of the live actor named `name`, or answer(None)."""
        def found(actor_id) -> None:
            if actor_id is None:
                answer(None)
                return
            self.gcs.request("get_actor", actor_id, callback=lambda record: answer(
                None if record is None or record.state == gcs_tables.DEAD
                else (actor_id, record.info)))

        self.gcs.request("lookup_actor_name", name, callback=found)


def _owner_died(pid: int | None) -> str:
    process = "the process" if pid is None else f"the process, pid={pid},"
    return f"is dead because its owner has died ({process} that created it)"
