"""Where this node's tasks run: here, or forwarded to the global scheduler.

A task is owned by the node where it was submitted: that node resolves its arguments,
keeps it (bottom-up) when it can start it now, or when no other node has room and this
one is not overloaded against the least loaded other (SpillPolicy, _scheduler.pyx), and
otherwise forwards it to the global scheduler on rank 0 (cluster.py), which picks a node by
resources, load and where the arguments' bytes are. The node that runs a task sends the
results back to the owner: small values inline, large ones stay in its store and the
owner records where. Calls to actors hosted elsewhere queue here until the host is
known, then go to it in order. Functions travel to the node that runs them once.

A task's `deps` describes each top-level argument as ("inline", bytes, contained) or
("at", rank, size, contained), `contained` being the refs inside the value
(borrowing.py).
"""

from __future__ import annotations

import time

from hpcray import exceptions, ids
from hpcray._scheduler import LOCALITY_BYTES, SpillPolicy
from hpcray.options import InGroup, NodeAffinity
from hpcray.runtime import messages
from hpcray.runtime.messages import wire
from hpcray.runtime.actors import A_DEAD, GroupOrder, RemoteActor, take_ready
from hpcray.runtime.object_table import IN_STORE, READY, REMOTE, ObjectEntry
from hpcray.runtime.specs import ACTOR_CALL, QUEUED, RUNNING, TaskRecord
from hpcray.serialization import error_bytes


class TaskRouter:
    """Keeps or forwards this node's tasks and actors; runs what was placed here."""

    HANDLES = {messages.Run: "on_run", messages.RunActor: "on_run_actor",
               messages.TaskDone: "on_done", messages.TaskReturned: "on_task_returned",
               messages.FunctionRequest: "on_function_request",
               messages.Function: "on_function", messages.ActorAt: "on_actor_at",
               messages.EndActor: "on_end_actor", messages.ActorCall: "on_actor_call",
               messages.KillActor: "on_kill_actor", messages.Drain: "on_drain",
               messages.LoadView: "on_load_view"}

    def __init__(self, rank: int, link, node, network, objects, borrowing, mover, actors,
                 scheduler, task_events, peers) -> None:
        self.rank = rank
        self.link = link                  # ClusterLink
        self.node = node                  # its tasks, workers and GPUs
        self.network = network
        self.objects = objects
        self.borrowing = borrowing
        self.mover = mover
        self.actors = actors
        self.scheduler = scheduler
        self.task_events = task_events
        self.peers = peers
        self.tasks = node.tasks
        self.functions = node.functions
        self.gcs = network.gcs
        self.generators = None  # bind()
        self.held = None  # draining: the tasks that would start now wait here, in order
        self.spill = SpillPolicy(scheduler.total.get("CPU", 1.0))
        self.clock = time.monotonic  # how old a view is (the simulation has no clock)

    def bind(self, generators) -> None:
        self.generators = generators

    # ------------------------------------------------------------------ routing tasks
    def route(self, record: TaskRecord) -> None:
        """Arguments exist somewhere: run the task here, or hand it to the global scheduler."""
        spec = record.spec
        if self.link.size == 1:  # a cluster of one: nowhere else to weigh
            self.localize(record, self.enqueue)
            return
        strategy = _strategy_of(spec)
        arg_bytes = self.argument_bytes(spec)
        local_bytes = arg_bytes.get(self.rank, 0)
        keep = (strategy is None and self.scheduler.is_feasible(spec.demand)
                and max(arg_bytes.values(), default=0) - local_bytes < LOCALITY_BYTES
                and self.keeps(spec.demand, bool(arg_bytes)))
        if isinstance(strategy, NodeAffinity) and strategy.on(self.rank) \
                and self.scheduler.is_feasible(spec.demand):
            keep = True
        elif type(strategy) is InGroup and self.scheduler.is_feasible(spec.demand) and (
                strategy.index >= 0 or self.scheduler.fits(spec.demand)):
            keep = True  # its bundle is here (any bundle: one here has room now)
        if keep:
            self.localize(record, self.enqueue)
            return
        self.forward(record, strategy, arg_bytes)

    def forward(self, record: TaskRecord, strategy, arg_bytes: dict) -> None:
        """Hand a task of this node's to the global scheduler."""
        spec = record.spec
        record.state = RUNNING  # elsewhere, as far as this node is concerned
        record.worker = None
        deps = self.describe_deps(spec)
        if self.rank == 0:
            self.network.on_forward(0, spec, deps, strategy, arg_bytes)
        else:
            self.peers.send(0, wire(messages.Forward, spec, deps, strategy, arg_bytes))

    def keeps(self, demand: dict, stored_args: bool) -> bool:
        """Bottom-up: whether this node keeps a task it could run (SpillPolicy)."""
        now = self.clock()
        self.link.routed += 1  # the next Load asks rank 0 for a fresh view
        self.link.last_routed = now
        if not self.spill.fair_share:
            self.spill.fair_share = self.spill.cpus / max(
                1.0, self.network.cluster_resources().get("CPU", 0.0))
        if self.rank == 0:  # the global scheduler is here: its view is the freshest,
            least, free, _, least_submits = self.network.global_scheduler.view_for(0)
            # and its own queue is known now (a driver's burst comes faster than its
            # reports: by the one of 5 ms ago, it would keep the whole burst)
            self.spill.update(least, free, self.scheduler.num_waiting / self.spill.cpus, now,
                              least_submits)
        return self.spill.keep(self.scheduler.num_waiting, self.scheduler.fits(demand),
                               demand, now, stored_args)

    def on_load_view(self, _source: int, least_per_cpu: float, free_cpus: float,
                     own_per_cpu: float, least_submits: bool) -> None:
        """Rank 0's view of the nodes' load: the answer to this node's Load (for `keeps`),
        or word that another node has CPUs free while this one has tasks queued."""
        self.spill.update(least_per_cpu, free_cpus, own_per_cpu, self.clock(),
                          least_submits)
        if free_cpus >= 1 and self.scheduler.num_queued and self.held is None:
            # A task per CPU free there, no more: a long task must not wait here while a
            # CPU idles there, but short ones are done here about as soon (this node's
            # thread handles each task either way), and moving more of the driver's
            # node's fair share away as the others run dry made its share depend on
            # timing again (9% of a 12k burst over 4 ranks when half the surplus moved).
            self.spill_queued(int(free_cpus))

    def spill_queued(self, count: int) -> None:
        """Hand up to `count` of this node's queued tasks, newest first, to the global
        scheduler: another node has CPUs free (SpillPolicy's docstring). Its own go to
        rank 0. One rank 0 placed here goes back to its owner, which has its record, but
        only while this node's actors hold its CPUs (Network.held_by_actors): a node
        busy with tasks drains its queue, and sending those back too bounced a burst
        between the nodes (most of it ended on the owner's node)."""
        movable = self._movable
        if self.scheduler.total.get("CPU", 0.0) - self.link.actor_cpus >= 1:
            movable = self._movable_own
        for key in self.scheduler.take_newest(count, movable):
            record = self.tasks[key]
            if record.owner == self.rank:
                self.forward(record, None, self.argument_bytes(record.spec))
            else:
                self.return_placed(record)

    def _movable(self, task_key) -> bool:
        # Not one with a strategy or an argument in this node's store: it belongs here.
        record = self.tasks.get(task_key)
        if record is None or record.cancelled or record.spec.kind == ACTOR_CALL \
                or _strategy_of(record.spec) is not None:
            return False
        return not self.argument_bytes(record.spec).get(self.rank)

    def _movable_own(self, task_key) -> bool:
        record = self.tasks.get(task_key)
        return record is not None and record.owner == self.rank and self._movable(task_key)

    def return_placed(self, record: TaskRecord) -> None:
        """A task rank 0 placed here, queued, goes back to its owner (TaskReturned)."""
        task_id = record.spec.task_id
        del self.tasks[task_id]
        placed_here = self.link.placed_here
        if placed_here and task_id in placed_here:  # ULFM: rank 0 forgets it
            placed_here.discard(task_id)
            self.link.ended_placed.append(task_id)
        kept = self.borrowing.release_task_holds(record.spec, record.owner)
        self.peers.send(record.owner, wire(messages.TaskReturned, task_id, kept))

    def on_task_returned(self, source: int, task_id: bytes, kept) -> None:
        """A task of this node's that rank 0 had placed elsewhere came back unstarted:
        forward it again (failed as cancelled if it was cancelled meanwhile: the cancel
        found it nowhere)."""
        self.borrowing.register_kept(kept)
        record = self.tasks.get(task_id)
        if record is None:
            return
        if record.cancelled:
            self.task_failed_remotely(record.spec, exceptions.TaskCancelledError(
                f"{record.spec.name} was cancelled."))
            return
        self.forward(record, None, self.argument_bytes(record.spec))

    def argument_bytes(self, spec) -> dict:
        where: dict = {}
        for dep in spec.deps:
            entry = self.objects.get(dep)
            if entry is None or entry.inline is not IN_STORE:
                continue
            rank = entry.location if entry.state == REMOTE else self.rank
            where[rank] = where.get(rank, 0) + entry.size
        return where

    def describe_deps(self, spec) -> list:
        """How another node finds each top-level argument: inline bytes or a location.
        The refs themselves stay held here until the task's `done` (borrowing.py)."""
        return [(dep, self.mover.describe_value(self.objects[dep])) for dep in spec.deps]

    def task_failed_remotely(self, spec, error) -> None:
        blob = error_bytes(error)
        results = [(oid, blob, (), len(blob)) for oid in spec.return_ids]
        owner = ids.owner_rank(spec.task_id)
        if owner == self.rank:
            self.on_done(self.rank, spec.task_id, results, (), True)
        else:
            self.peers.send(owner, wire(messages.TaskDone, spec.task_id, results, (), True))

    def on_run(self, source: int, spec, deps) -> None:
        """Run a task the global scheduler placed here (maybe one this node forwarded)."""
        self.link.received += 1
        if self.link.placed_here is not None:  # rank 0 is told when it ends (Load)
            self.link.placed_here.add(spec.task_id)
        record = TaskRecord(spec, spec.max_retries)
        record.owner = ids.owner_rank(spec.task_id)
        self.tasks[spec.task_id] = record
        self.borrowing.hold_task_refs(spec, deps, record.owner)
        self.with_function(spec.function_id, record.owner,
                            lambda: self.localize(record, self.enqueue))

    def export_function(self, function_id: bytes, pickled: bytes) -> None:
        """A process on this node defined a function or class: keep it, and record it
        in the GCS functions table too."""
        if function_id in self.functions:
            return
        self.functions[function_id] = pickled
        self.gcs.request("put_function", function_id, pickled)

    def with_function(self, function_id: bytes, submitter: int, then) -> None:
        """Run `then` once this node has the pickled function, fetched from the node that
        submitted the task (its process exported the function there), else the GCS."""
        if function_id is None or function_id in self.functions:
            then()
            return
        waiters = self.link.function_waiters.get(function_id)
        if waiters is None:
            self.link.function_waiters[function_id] = [then]
            self.peers.send(submitter, wire(messages.FunctionRequest, function_id))
        else:
            waiters.append(then)

    def on_function_request(self, source: int, function_id: bytes) -> None:
        self.peers.send(source, wire(messages.Function, function_id,
                                     self.functions.get(function_id)))

    def on_function(self, source: int, function_id: bytes, pickled) -> None:
        if pickled is None and source != self.rank:  # not there: ask the GCS
            self.gcs.request("get_function", function_id, callback=lambda found:
                             self.on_function(self.rank, function_id, found))
            return
        if pickled is not None:
            self.functions.setdefault(function_id, pickled)
        for then in self.link.function_waiters.pop(function_id, ()):
            then()  # without the function, the worker reports it as unknown

    def localize(self, record: TaskRecord, then) -> None:
        """Pull the arguments that live on other nodes, then `then(record)`. One PENDING
        again (its only copy was lost with a node: being rebuilt, or asked of its owner
        again) is waited for too."""
        if record.cancelled:  # while its function was on its way (cancellation.py)
            return
        objects = self.objects
        # Not only REMOTE: an argument may be PENDING again by now (its copy was lost
        # with a node while the function came: NodeDied asks its owner again).
        remote = [dep for dep in record.spec.deps
                  if (entry := objects.get(dep)) is not None and entry.state != READY]
        self.objects.wait_for_objects(record, remote, self.objects.add_waiter, then)

    def enqueue(self, record: TaskRecord) -> None:
        record.state = QUEUED
        if self.held is not None:
            self.held.append(record)
            return
        self.node._run_actions(self.scheduler.task_ready(record.spec.task_id, record.spec.demand,
                                                         True, self.node.pipelinable(record.spec)))

    def on_drain(self, _source: int) -> None:
        """The job drains: no task starts here any more (running ones and their retries
        go on, as do actor calls: a program saving its state may need its actors)."""
        if self.held is None:  # and those already waiting for a worker
            self.held = [self.tasks[key] for key in self.scheduler.take_queued()
                         if key in self.tasks]

    # ------------------------------------------------------------------ results
    def send_results_to_owner(self, record: TaskRecord, results, transitions,
                               failed: bool = False) -> None:
        """A task that another node owns finished here: its large results stay here (the
        primary copy), refs inside them are registered for the owner, and the reply
        says which of the task's refs this node keeps (borrowing.py)."""
        owner = record.owner
        self.keep_results_for_owner(owner, record.spec.task_id, results)
        self.objects.apply_transitions(transitions)
        kept = self.borrowing.release_task_holds(record.spec, owner)
        self.peers.send(owner, wire(messages.TaskDone, record.spec.task_id, results, kept, failed))

    def keep_results_for_owner(self, owner: int, task_id: bytes, results) -> None:
        """Results (or a generator's items) made here for `owner`: refs inside them are
        registered for it, large values stay here as the primary copy."""
        for object_id, inline, contained, size in results:
            for key in contained:
                self.borrowing.register_borrower(key, owner)
            if inline is IN_STORE:
                entry = self.objects.get(object_id)
                if entry is None:
                    entry = self.objects[object_id] = ObjectEntry(owner)
                entry.primary = True
                self.objects.object_ready(object_id, IN_STORE, (), size)
                self.gcs.request("add_location", object_id, self.rank, size, owner, task_id)
                if owner != self.rank:
                    self.network.expect_pull()

    def on_done(self, source: int, task_id: bytes, results, kept, failed=False) -> None:
        """Results of a task this node owns, run elsewhere (or failed there)."""
        record = self.tasks.pop(task_id, None)
        if record is None:
            return
        self.task_events.ended(task_id, results, failed, record.cancelled, record.spec.name)
        self.borrowing.register_kept(kept)
        if record.cancelled:  # it ended before the cancel reached it: never a value
            results = self.node.canceller.cancelled_results(
                record, results, source if source != self.rank else None)
        if source != self.rank:
            self.borrowing.foreign_results(results)
        if task_id in self.generators.streams:
            self.generators.task_ended(task_id, results)
        for object_id, inline, contained, size in results:
            self.objects.object_ready(object_id, inline, contained, size,
                               None if inline is not IN_STORE else source)
        for key in record.spec.contained:
            self.objects.decref(key)
        if record.spec.kind == ACTOR_CALL:
            remote = self.actors.remote_actors.get(record.spec.actor_id)
            if remote is not None:
                remote.sent.pop(task_id, None)
            self.actors.actor_decref(record.spec.actor_id)  # the call's hold on the actor

    # ------------------------------------------------------------------ actors
    def route_actor(self, actor, record: TaskRecord) -> None:
        """An actor's constructor arguments exist: host it here, or have it placed."""
        spec = actor.spec
        if actor.state == A_DEAD:
            return  # out of scope (or killed) before its arguments were ready
        strategy = _strategy_of(spec)
        # An actor holds its resources for its whole life: it stays here only if they are
        # free now, else the global scheduler finds a node with room (queued here, it
        # would wait for actors that may never end while other nodes sit idle).
        if self.link.size == 1 or (strategy is None and self.scheduler.fits(spec.demand)) \
                or (isinstance(strategy, NodeAffinity) and strategy.on(self.rank)
                    and self.scheduler.is_feasible(spec.demand)) \
                or (type(strategy) is InGroup and self.scheduler.is_feasible(spec.demand)):
            self.localize(record, lambda _r: self.actors.actor_deps_ready(actor))
            return
        # Hosted elsewhere: this node keeps only a RemoteActor for its own calls, which
        # goes on counting the actor's handles for the whole cluster (borrowing.py).
        del self.actors[actor.actor_id]
        remote = self.actors.remote_actors[actor.actor_id] = RemoteActor(actor.actor_id, None)
        remote.take_handles(actor)
        remote.creation = spec
        self.move_calls(actor, remote)
        self.forward_actor(spec)

    def forward_actor(self, spec) -> None:
        """Have the global scheduler place an actor (its first start, or a restart after
        its node died: node_failures.py)."""
        strategy = _strategy_of(spec)
        deps = self.describe_deps(spec)
        if self.rank == 0:
            self.network.on_forward(0, spec, deps, strategy, {})
        else:
            self.peers.send(0, wire(messages.Forward, spec, deps, strategy, {}))

    def move_calls(self, actor, remote) -> None:
        """Calls made before the actor's arguments were ready go to its host instead."""
        for _ in actor.queue:
            self.actors.actor_incref(actor.actor_id)  # held until its `done`, as every remote call
        self.actors.requeue_calls(actor.queue, remote.queue,
                            lambda _record: self.pump_remote_actor(remote))

    def submit_remote_actor_call(self, record: TaskRecord, held: bool = False) -> None:
        """`held`: waiting for an owner check (owners.py), which releases it."""
        actor_id = record.spec.actor_id
        remote = self.actors.remote_actors.get(actor_id)
        if remote is None:
            remote = self.actors.remote_actors[actor_id] = RemoteActor(
                actor_id, self.link.actor_locations.get(actor_id))
        self.actors.actor_incref(actor_id)  # until its `done`: the actor must not end before
        remote.queue.append(record)
        if not held:
            self.node._resolve_deps(record, lambda _r: self.pump_remote_actor(remote))

    def pump_remote_actor(self, remote) -> None:
        """Send the host every call whose arguments exist: in submission order, behind
        any whose arguments do not yet, unless the actor runs calls concurrently."""
        if remote.host is None:
            return
        queue = remote.queue
        if remote.host < 0:  # dead, its node lost with no restart left (node_failures.py)
            while queue:
                record = queue.popleft()
                record.state = RUNNING
                self.tasks[record.spec.task_id] = record
                self.task_failed_remotely(record.spec, exceptions.ActorDiedError(
                    f"The actor of {record.spec.name} died with its node."))
            return
        in_order = remote.actor_id not in self.link.concurrent_actors
        if not in_order:  # (a GroupOrder: in order within each concurrency group)
            in_order = self.link.group_orders.get(remote.actor_id, False)
        for record in take_ready(queue, in_order):
            if record.cancelled:
                self.actors.actor_decref(remote.actor_id)
                continue
            record.state = RUNNING
            self.tasks[record.spec.task_id] = record
            remote.sent[record.spec.task_id] = (remote.host, record)
            self.peers.send(remote.host, wire(messages.ActorCall, record.spec,
                                        self.describe_deps(record.spec)))

    def on_run_actor(self, source: int, spec, deps, hops: int = 0) -> None:
        """Host an actor another node created (placed here by the global scheduler). Its
        creator holds the constructor's refs for good, so this node's holds never end.
        An actor holds its resources for life, so one placed from a stale view of this
        node's load goes back to the global scheduler (with this node's load first)
        rather than wait here for actors that may never end (a bounded number of times:
        the global scheduler's view and this node's could disagree)."""
        self.link.received += 1
        if _strategy_of(spec) is None and not self.scheduler.fits(spec.demand) \
                and hops < 3 * self.link.size:
            self.network.report_load(now_=True)
            if self.rank == 0:
                self.network.on_forward(0, spec, deps, None, {}, hops + 1)
            else:
                self.peers.send(0, wire(messages.Forward, spec, deps, None, {}, hops + 1))
            return
        self.borrowing.hold_task_refs(spec, deps, ids.owner_rank(spec.actor_id))
        self.with_function(spec.function_id, ids.owner_rank(spec.actor_id),
                            lambda: self.actors.host_actor(spec))

    def on_actor_at(self, source: int, actor_id: bytes, rank: int,
                    concurrent: bool = False, groups: dict | None = None) -> None:
        self.link.actor_locations[actor_id] = rank
        if concurrent:
            self.link.concurrent_actors.add(actor_id)
        if groups is not None:
            self.link.group_orders[actor_id] = GroupOrder(groups)
        if source in self.link.placed:  # rank 0 under ULFM: its placement arrived
            self.link.placed[source].pop(actor_id, None)
        remote = self.actors.remote_actors.get(actor_id)
        if remote is not None:
            remote.host = rank
            self.pump_remote_actor(remote)
            if remote.owner == self.rank and remote.refs <= 0 and rank >= 0:
                self.actors.actor_unused(actor_id, remote)  # no handle left before it started

    def on_end_actor(self, source: int, actor_id: bytes) -> None:
        """The owner counted no handle left anywhere: end the actor hosted here."""
        actor = self.actors.get(actor_id)
        if actor is not None:
            self.actors.actor_out_of_scope(actor)

    def on_actor_call(self, source: int, spec, deps) -> None:
        record = TaskRecord(spec, spec.max_retries)  # the caller's max_task_retries
        record.owner = ids.owner_rank(spec.task_id)
        self.borrowing.hold_task_refs(spec, deps, record.owner)
        self.actors.submit_actor_call(record)

    def on_kill_actor(self, source: int, actor_id: bytes, no_restart: bool,
                      cause: str | None = None, hops: int = 1) -> None:
        self.actors.kill_actor(actor_id, no_restart, cause, hops)


def _strategy_of(spec):
    options = spec.options
    if not options:
        return None
    strategy = options.get("scheduling_strategy")
    if strategy in (None, "DEFAULT"):
        return None
    return strategy

