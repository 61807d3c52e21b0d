"""The node manager's multi-node half: other nodes over MPI, the GCS, the global scheduler.

Every rank is a node. A task is owned by the node where it was submitted: that node
resolves its arguments, keeps it (bottom-up) when it has the resources and a short queue,
and otherwise forwards it to the global scheduler on rank 0, which picks a node by
resources, load and where the arguments' bytes are. The node that runs a task sends the
results back to the owner: small values inline, large ones stay in its store and the
owner records where. Moving objects between nodes: remote_objects.py; which node may
still use an object another node owns: borrowing.py.

Control messages between node managers (all on the transport's "control" channel):
    forward(spec, deps, strategy, arg_bytes)   owner -> rank 0: place this task
    run(spec, deps)                            rank 0 / owner -> the node that runs it
    done(task_id, results, kept)               executor -> owner (kept: borrowing.py)
    watch / located / pull / pull_failed       objects (remote_objects.py)
    borrow / release                           reference counts (borrowing.py)
    actor_at(actor_id, rank)                   the actor's node -> every node
    end_actor(actor_id)                        owner -> the actor's node: no handle left
    actor_call(spec, deps) / kill_actor(...)   a caller's node -> the actor's node
    cancel(task_id, force, recursive)          owner -> every node
    load(available, queued, received)          node -> rank 0, when it changed
    function_request(id) / function(id, bytes) executor <-> the submitting node
    stop() / stopped()                         rank 0 <-> node (shutdown, see launch.py)

`deps` describes each top-level argument as ("inline", bytes, contained) or ("at", rank,
size, contained), `contained` being the refs inside the value (borrowing.py).
"""

from __future__ import annotations

import logging
import os
import time

from hpcray import exceptions, ids
from hpcray._scheduler import LOCALITY_BYTES, GlobalScheduler
from hpcray.gcs.client import GcsClient
from hpcray.gcs.shard import OBJECT_DELETED, GcsShard, is_gcs_request
from hpcray.runtime.actors import A_DEAD, RemoteActor
from hpcray.runtime.remote_objects import RemoteObjectsMixin
from hpcray.runtime.objects import IN_STORE, REMOTE, ObjectEntry
from hpcray.runtime.specs import ACTOR_CALL, NORMAL_TASK, QUEUED, RUNNING, TaskRecord
from hpcray.serialization import error_bytes

log = logging.getLogger("hpcray.cluster")
_IDLE_MAX_SLEEP = 0.01     # an idle node polls MPI 100 times a second at most
_BUSY_MAX_SLEEP = 0.0002   # while transfers are in flight
_LOAD_REPORT_PERIOD = 0.005
# HPCRAY_TRACE=1 prints every message between node managers (debugging).
_TRACE = bool(os.environ.get("HPCRAY_TRACE"))


class ClusterLink:
    """What a node manager knows of the cluster: the transport and every node's totals."""

    def __init__(self, transport, job: dict):
        self.transport = transport
        self.rank = transport.rank
        self.size = transport.size
        self.job = job
        self.gcs_shards = min(int(job.get("gcs_shards", 1)), transport.size)
        self.nodes: dict[int, dict] = {}          # rank -> {"node_id", "resources"}
        self.backoff = 0.0
        self.last_load_report = 0.0
        self.last_load = None
        self.stop_requested = False
        self.pulls: dict = {}                     # transfer tag -> (object_id, dest view)
        self.actor_locations: dict[bytes, int] = {}
        self.function_waiters: dict[bytes, list] = {}
        self.received = 0          # tasks the global scheduler placed here, so far
        self.keep_limit = 0        # queue length up to which own tasks stay here
        # Rank 0: actor creations no node has room for now, (source, spec, deps, hops),
        # placed as soon as a load report shows room (an actor holds its resources for
        # life, so queued on a full node it could wait forever while others free up).
        self.pending_actors: list = []


class ClusterMixin(RemoteObjectsMixin):
    """The multi-node part of NodeManager; inert when `self.cluster` is None."""

    def _init_cluster(self, cluster: ClusterLink | None) -> None:
        self.cluster = cluster
        self.rank = cluster.rank if cluster is not None else 0
        self.gcs = None
        self.gcs_shard = None
        self.global_scheduler = None
        if cluster is None:
            return
        transport = cluster.transport
        self.gcs = GcsClient(self.rank, cluster.gcs_shards,
                             lambda dest, message: self._send_gcs(dest, message))
        if self.rank < cluster.gcs_shards:
            self.gcs_shard = GcsShard(self.rank, cluster.gcs_shards)
        if self.rank == 0:
            self.global_scheduler = GlobalScheduler()
        self.gcs.subscribe_handler(OBJECT_DELETED, self._on_object_deleted)
        self._transport = transport

    def set_cluster_nodes(self, nodes: dict) -> None:
        """Every node's id and totals (from the start handshake): feasibility and placement."""
        self.cluster.nodes = nodes
        if self.global_scheduler is not None:
            for rank, node in sorted(nodes.items()):
                self.global_scheduler.add_node(rank, node["resources"])
        self.gcs.request("register_node", self.rank, self.total_resources)

    # ------------------------------------------------------------------ polling
    def _cluster_poll_timeout(self) -> float:
        cluster = self.cluster
        if self._transport.busy:
            return min(cluster.backoff, _BUSY_MAX_SLEEP)
        return cluster.backoff

    def _poll_cluster(self) -> None:
        """Receive and handle what other nodes sent; adjust the polling back-off."""
        cluster = self.cluster
        transport = self._transport
        messages = transport.poll()
        self.handle_cluster_messages(messages)
        finished = transport.progress()  # completed pulls run _pull_done (their on_done)
        self._report_load()
        if messages or finished:
            cluster.backoff = 0.0
        else:
            cluster.backoff = min(_IDLE_MAX_SLEEP, max(5e-5, cluster.backoff * 2))

    def handle_cluster_messages(self, messages) -> None:
        for source, channel, message in messages:
            if _TRACE:
                print(f"[rank {self.rank}] <- {source} {channel} {str(message)[:150]}",
                      flush=True)
            try:
                if channel == "gcs":
                    self._on_gcs_message(source, message)
                else:
                    getattr(self, "_cm_" + message[0])(source, *message[1:])
            except Exception:  # noqa: BLE001 - one bad message must not kill the node
                log.exception("rank %d: message %.200r from rank %d failed", self.rank,
                              message, source)

    def _wake_cluster(self) -> None:
        """Something was sent: poll MPI soon (replies come quickly)."""
        if self.cluster is not None and self.cluster.backoff > 0:
            self.cluster.backoff = 0.0
            self._wake()

    def _send_to(self, rank: int, message) -> None:
        if _TRACE:
            print(f"[rank {self.rank}] -> {rank} {str(message)[:150]}", flush=True)
        self._transport.send(rank, message)
        self._wake_cluster()

    def _send_gcs(self, dest: int, message) -> None:
        if dest == self.rank and self.gcs_shard is not None:
            for out_dest, out in self.gcs_shard.handle(self.rank, message):
                self._deliver_gcs(out_dest, out)
        else:
            self._transport.send(dest, message, "gcs")
            self._wake_cluster()

    def _deliver_gcs(self, dest: int, message) -> None:
        if dest == self.rank:
            self.gcs.on_message(self.rank, message)
        else:
            self._transport.send(dest, message, "gcs")

    def _on_gcs_message(self, source: int, message) -> None:
        if is_gcs_request(message) and self.gcs_shard is not None:
            for dest, out in self.gcs_shard.handle(source, message):
                self._deliver_gcs(dest, out)
        else:
            self.gcs.on_message(source, message)

    def _report_load(self, now_: bool = False) -> None:
        """Tell the global scheduler this node's load when it changed (at most every
        few ms; `now_`: at once, as before a placement that depends on it)."""
        cluster = self.cluster
        now = time.monotonic()
        if not now_ and now - cluster.last_load_report < _LOAD_REPORT_PERIOD:
            return
        load = (tuple(sorted(self.scheduler.available.items())), self.scheduler.num_queued,
                cluster.received)
        if load == cluster.last_load:
            return
        cluster.last_load = load
        cluster.last_load_report = now
        if self.rank == 0:
            self.global_scheduler.report(0, dict(load[0]), load[1], load[2])
            self._place_pending_actors()
        else:
            self._transport.send(0, ("load", dict(load[0]), load[1], load[2]))

    def _req_feasible(self, worker, req_id, demand) -> None:
        self._reply(worker, req_id, self.cluster_feasible(demand))

    def _cm_load(self, source: int, available: dict, queued: int, received: int) -> None:
        self.global_scheduler.report(source, available, queued, received)
        self._place_pending_actors()

    def _room_now(self, demand: dict) -> bool:
        """Rank 0: whether some node has `demand` free, as the global scheduler sees it."""
        scheduler = self.global_scheduler
        return any(all(amount <= scheduler.available[rank].get(name, 0.0) + 1e-9
                       for name, amount in demand.items())
                   for rank in scheduler.alive)

    def _place_pending_actors(self) -> None:
        pending = self.cluster.pending_actors
        if not pending:
            return
        self.cluster.pending_actors = []
        for source, spec, deps, hops in pending:
            self._cm_forward(source, spec, deps, None, {}, hops)

    def _cm_stop(self, source: int) -> None:
        self.cluster.stop_requested = True

    # ------------------------------------------------------------------ feasibility
    def cluster_feasible(self, demand: dict) -> bool:
        if self.cluster is None:
            return self.scheduler.is_feasible(demand)
        for node in self.cluster.nodes.values():
            total = node["resources"]
            if all(amount <= total.get(name, 0.0) + 1e-9 for name, amount in demand.items()):
                return True
        return False

    def cluster_resources(self) -> dict:
        if self.cluster is None:
            return dict(self.total_resources)
        total: dict = {}
        for node in self.cluster.nodes.values():
            for name, amount in node["resources"].items():
                total[name] = total.get(name, 0.0) + amount
        return total

    def cluster_available(self) -> dict:
        if self.global_scheduler is None:
            return self.available_resources()
        total: dict = {}
        for rank in self.global_scheduler.alive:
            for name, amount in self.global_scheduler.available[rank].items():
                total[name] = total.get(name, 0.0) + max(0.0, amount)
        return total

    # ------------------------------------------------------------------ routing tasks
    def _route(self, record: TaskRecord) -> None:
        """Arguments exist somewhere: run the task here, or hand it to the global scheduler."""
        spec = record.spec
        if self.cluster is None:
            self._localize(record, self._enqueue)
            return
        strategy = _strategy_of(spec)
        arg_bytes = self._argument_bytes(spec)
        local_bytes = arg_bytes.get(self.rank, 0)
        keep = (strategy is None and self.scheduler.is_feasible(spec.demand)
                and self.scheduler.num_queued < self._keep_limit()
                and (self.scheduler.fits(spec.demand) or self.scheduler.num_queued == 0)
                and max(arg_bytes.values(), default=0) - local_bytes < LOCALITY_BYTES)
        if strategy is not None and strategy[0] == "node" and strategy[1] == self.rank \
                and self.scheduler.is_feasible(spec.demand):
            keep = True
        if keep:
            self._localize(record, self._enqueue)
            return
        record.state = RUNNING  # elsewhere, as far as this node is concerned
        record.worker = None
        deps = self._describe_deps(spec)
        if self.rank == 0:
            self._cm_forward(0, spec, deps, strategy, arg_bytes)
        else:
            self._send_to(0, ("forward", spec, deps, strategy, arg_bytes))

    # Bottom-up spill threshold. A node keeps its own tasks while its queue is shorter
    # than this; beyond, it forwards them. When the global scheduler sends a forwarded
    # task straight back (no node was less loaded), the threshold doubles, so a node
    # whose peers are as busy stops paying a round trip through rank 0 per task; when
    # it places one elsewhere, the threshold halves back toward the base.
    _KEEP_LIMIT_MAX_PER_CPU = 64

    def _keep_limit(self) -> int:
        cluster = self.cluster
        if cluster.keep_limit == 0:
            cluster.keep_limit = self._base_keep_limit()
        return cluster.keep_limit

    def _base_keep_limit(self) -> int:
        return max(2, 2 * self.scheduler.target_workers)

    def _forwarded_task_placed(self, rank: int) -> None:
        cluster = self.cluster
        limit = self._keep_limit()
        if rank == self.rank:
            cluster.keep_limit = min(limit * 2, self._KEEP_LIMIT_MAX_PER_CPU
                                     * max(1, self.scheduler.target_workers))
        else:
            cluster.keep_limit = max(self._base_keep_limit(), limit // 2)

    def _argument_bytes(self, spec) -> dict:
        where: dict = {}
        for dep in spec.deps:
            entry = self.objects.get(dep)
            if entry is None or entry.inline is not IN_STORE:
                continue
            rank = entry.location if entry.state == REMOTE else self.rank
            where[rank] = where.get(rank, 0) + entry.size
        return where

    def _describe_deps(self, spec) -> list:
        """How another node finds each top-level argument: inline bytes or a location.
        The refs themselves stay held here until the task's `done` (borrowing.py)."""
        return [(dep, self._describe_value(self.objects[dep])) for dep in spec.deps]

    def _describe_value(self, entry: ObjectEntry, dest: int | None = None):
        """Where another node gets this value, with the refs inside it. Sent to `dest`,
        those refs are registered for it; without (a task's argument, its node not
        chosen yet) this node's hold on the value covers them until the task's `done`."""
        contained = tuple(entry.contained)
        if dest is not None:
            for key in contained:
                self._register_borrower(key, dest)
        if entry.inline is not IN_STORE:
            return ("inline", entry.inline, contained)
        if entry.state == REMOTE:
            return ("at", entry.location, entry.size, contained)
        entry.shipped = True
        return ("at", self.rank, entry.size, contained)

    def _cm_forward(self, source: int, spec, deps, strategy, arg_bytes, hops: int = 0) -> None:
        """Rank 0, the global scheduler: place a task a node did not keep. `hops`: how
        many nodes already sent this actor back for lack of room."""
        demand = spec.demand
        if self.rank == 0:
            self._report_load(now_=True)  # this node's own load is never stale
        if strategy is None and spec.kind != ACTOR_CALL and spec.actor_id is not None \
                and self.cluster_feasible(demand) and not self._room_now(demand):
            self.cluster.pending_actors.append((source, spec, deps, hops))
            return
        rank = self.global_scheduler.place(demand, arg_bytes, strategy, source)
        if rank < 0:
            error = exceptions.ResourceInfeasibleError(
                f"{spec.name} requests {demand} with strategy {strategy}, but no live node "
                "can satisfy it.")
            self._task_failed_remotely(spec, error)
            return
        if spec.kind != ACTOR_CALL and spec.actor_id is not None:
            message = ("run_actor", spec, deps, hops)
        else:
            message = ("run", spec, deps)
        if rank == self.rank:
            getattr(self, "_cm_" + message[0])(source, *message[1:])
        else:
            self._send_to(rank, message)

    def _task_failed_remotely(self, spec, error) -> None:
        blob = error_bytes(error)
        results = [(oid, blob, (), len(blob)) for oid in spec.return_ids]
        owner = ids.owner_rank(spec.task_id)
        if owner == self.rank:
            self._cm_done(self.rank, spec.task_id, results, (), True)
        else:
            self._send_to(owner, ("done", spec.task_id, results, (), True))

    def _fill_entry(self, object_id: bytes, entry: ObjectEntry, where,
                    lender: int | None = None) -> None:
        """The value of a PENDING entry is known: inline bytes or a location, and the refs
        inside it, which the value holds here. Registered for this node by the sender
        (`lender` None), or covered by the task from `lender` that brought the value."""
        entry.watched = True
        contained = where[-1]
        if entry.contained:  # known already (held through it): not held twice
            if lender is None:
                self._give_back(contained)
            contained = ()
        self._borrow_contained(contained, lender)
        if where[0] == "inline":
            self._object_ready(object_id, where[1], contained, len(where[1]))
        else:
            self._object_ready(object_id, IN_STORE, contained, where[2], where[1])

    def _cm_run(self, source: int, spec, deps) -> None:
        """Run a task the global scheduler placed here (maybe one this node forwarded)."""
        self.cluster.received += 1
        record = TaskRecord(spec, spec.max_retries)
        record.owner = ids.owner_rank(spec.task_id)
        if record.owner == self.rank:
            self._forwarded_task_placed(self.rank)
        self.tasks[spec.task_id] = record
        self._hold_task_refs(spec, deps, record.owner)
        self._with_function(spec.function_id, record.owner,
                            lambda: self._localize(record, self._enqueue))

    def export_function(self, function_id: bytes, pickled: bytes) -> None:
        """A process on this node defined a function or class: keep it, and with many
        nodes record it in the GCS functions table too."""
        if function_id in self.functions:
            return
        self.functions[function_id] = pickled
        if self.cluster is not None:
            self.gcs.request("put_function", function_id, pickled)

    def _with_function(self, function_id: bytes, submitter: int, then) -> None:
        """Run `then` once this node has the pickled function, fetched from the node that
        submitted the task (its process exported the function there), else the GCS."""
        if function_id is None or function_id in self.functions:
            then()
            return
        waiters = self.cluster.function_waiters.get(function_id)
        if waiters is None:
            self.cluster.function_waiters[function_id] = [then]
            self._send_to(submitter, ("function_request", function_id))
        else:
            waiters.append(then)

    def _cm_function_request(self, source: int, function_id: bytes) -> None:
        self._send_to(source, ("function", function_id, self.functions.get(function_id)))

    def _cm_function(self, source: int, function_id: bytes, pickled) -> None:
        if pickled is None and source != self.rank:  # not there: ask the GCS
            self.gcs.request("get_function", function_id, callback=lambda found:
                             self._cm_function(self.rank, function_id, found))
            return
        if pickled is not None:
            self.functions.setdefault(function_id, pickled)
        for then in self.cluster.function_waiters.pop(function_id, ()):
            then()  # without the function, the worker reports it as unknown

    def _localize(self, record: TaskRecord, then) -> None:
        """Pull the arguments that live on other nodes, then `then(record)`."""
        objects = self.objects
        remote = [dep for dep in record.spec.deps
                  if (entry := objects.get(dep)) is not None and entry.state == REMOTE]
        self._wait_for_objects(record, remote, self._add_waiter, then)

    def _enqueue(self, record: TaskRecord) -> None:
        record.state = QUEUED
        self._run_actions(self.scheduler.task_ready(record.spec.task_id, record.spec.demand))

    # ------------------------------------------------------------------ results
    def _send_results_to_owner(self, record: TaskRecord, results, transitions,
                               failed: bool = False) -> None:
        """A task that another node owns finished here: its large results stay here (the
        primary copy), refs inside them are registered for the owner, and the reply
        says which of the task's refs this node keeps (borrowing.py)."""
        owner = record.owner
        for object_id, inline, contained, size in results:
            for key in contained:
                self._register_borrower(key, owner)
            if inline is IN_STORE:
                entry = self.objects.get(object_id)
                if entry is None:
                    entry = self.objects[object_id] = ObjectEntry(owner)
                entry.primary = True
                self._object_ready(object_id, IN_STORE, (), size)
                self.gcs.request("add_location", object_id, self.rank, size, owner,
                                 record.spec.task_id)
        self._apply_transitions(transitions)
        kept = self._release_task_holds(record.spec, owner)
        self._send_to(owner, ("done", record.spec.task_id, results, kept, failed))

    def _cm_done(self, source: int, task_id: bytes, results, kept, failed=False) -> None:
        """Results of a task this node owns, run elsewhere (or failed there)."""
        record = self.tasks.pop(task_id, None)
        if record is None:
            return
        if record.spec.kind == NORMAL_TASK:
            self.task_events.ended(task_id, failed)
        self._register_kept(kept)
        if source != self.rank:
            self._foreign_results(results)
            if record.spec.kind != ACTOR_CALL and _strategy_of(record.spec) is None:
                self._forwarded_task_placed(source)
        for object_id, inline, contained, size in results:
            self._object_ready(object_id, inline, contained, size,
                               None if inline is not IN_STORE else source)
        for key in record.spec.contained:
            self._decref(key)
        if record.spec.kind == ACTOR_CALL:
            self._actor_decref(record.spec.actor_id)  # the call's hold on the actor

    # ------------------------------------------------------------------ actors
    def _route_actor(self, actor, record: TaskRecord) -> None:
        """An actor's constructor arguments exist: host it here, or have it placed."""
        spec = actor.spec
        if actor.state == A_DEAD:
            return  # out of scope (or killed) before its arguments were ready
        strategy = _strategy_of(spec)
        # An actor holds its resources for its whole life: it stays here only if they are
        # free now, else the global scheduler finds a node with room (queued here, it
        # would wait for actors that may never end while other nodes sit idle).
        if self.cluster is None or (strategy is None and self.scheduler.fits(spec.demand)) \
                or (strategy is not None and strategy[0] == "node" and strategy[1] == self.rank
                    and self.scheduler.is_feasible(spec.demand)):
            self._localize(record, lambda _r: self._actor_deps_ready(actor))
            return
        # Hosted elsewhere: this node keeps only a RemoteActor for its own calls, which
        # goes on counting the actor's handles for the whole cluster (borrowing.py).
        del self.actors[actor.actor_id]
        remote = self.remote_actors[actor.actor_id] = RemoteActor(actor.actor_id, None)
        remote.take_handles(actor)
        self._move_calls(actor, remote)
        deps = self._describe_deps(spec)
        if self.rank == 0:
            self._cm_forward(0, spec, deps, strategy, {})
        else:
            self._send_to(0, ("forward", spec, deps, strategy, {}))

    def _move_calls(self, actor, remote) -> None:
        """Calls made before the actor's arguments were ready go to its host instead."""
        for _ in actor.queue:
            self._actor_incref(actor.actor_id)  # held until its `done`, as every remote call
        self._requeue_calls(actor.queue, remote.queue,
                            lambda _record: self._pump_remote_actor(remote))

    def _submit_remote_actor_call(self, record: TaskRecord) -> None:
        actor_id = record.spec.actor_id
        remote = self.remote_actors.get(actor_id)
        if remote is None:
            remote = self.remote_actors[actor_id] = RemoteActor(
                actor_id, self.cluster.actor_locations.get(actor_id))
        self._actor_incref(actor_id)  # until its `done`: the actor must not end before
        remote.queue.append(record)
        self._resolve_deps(record, lambda _r: self._pump_remote_actor(remote))

    def _pump_remote_actor(self, remote) -> None:
        """Send the host, in submission order, every call whose arguments exist."""
        if remote.host is None:
            return
        queue = remote.queue
        while queue and queue[0].pending_deps == 0:
            record = queue.popleft()
            if record.cancelled:
                self._actor_decref(remote.actor_id)
                continue
            record.state = RUNNING
            self.tasks[record.spec.task_id] = record
            self._send_to(remote.host, ("actor_call", record.spec,
                                        self._describe_deps(record.spec)))

    def _cm_run_actor(self, source: int, spec, deps, hops: int = 0) -> None:
        """Host an actor another node created (placed here by the global scheduler). Its
        creator holds the constructor's refs for good, so this node's holds never end.
        An actor holds its resources for life, so one placed from a stale view of this
        node's load goes back to the global scheduler (with this node's load first)
        rather than wait here for actors that may never end (a bounded number of times:
        the global scheduler's view and this node's could disagree)."""
        self.cluster.received += 1
        if _strategy_of(spec) is None and not self.scheduler.fits(spec.demand) \
                and hops < 3 * self.cluster.size:
            self._report_load(now_=True)
            if self.rank == 0:
                self._cm_forward(0, spec, deps, None, {}, hops + 1)
            else:
                self._send_to(0, ("forward", spec, deps, None, {}, hops + 1))
            return
        self._hold_task_refs(spec, deps, ids.owner_rank(spec.actor_id))
        self._with_function(spec.function_id, ids.owner_rank(spec.actor_id),
                            lambda: self._host_actor(spec))

    def _cm_actor_at(self, source: int, actor_id: bytes, rank: int) -> None:
        self.cluster.actor_locations[actor_id] = rank
        remote = self.remote_actors.get(actor_id)
        if remote is not None:
            remote.host = rank
            self._pump_remote_actor(remote)
            if remote.owner == self.rank and remote.refs <= 0:
                self._actor_unused(actor_id, remote)  # no handle left before it started

    def _cm_end_actor(self, source: int, actor_id: bytes) -> None:
        """The owner counted no handle left anywhere: end the actor hosted here."""
        actor = self.actors.get(actor_id)
        if actor is not None:
            self._actor_out_of_scope(actor)

    def _cm_actor_call(self, source: int, spec, deps) -> None:
        record = TaskRecord(spec, 0)
        record.owner = ids.owner_rank(spec.task_id)
        self._hold_task_refs(spec, deps, record.owner)
        self._submit_actor_call(record)

    def _cm_kill_actor(self, source: int, actor_id: bytes, no_restart: bool) -> None:
        try:
            self.kill_actor(actor_id, no_restart)
        except ValueError:
            pass

    def _cm_cancel(self, source: int, task_id: bytes, force: bool, recursive: bool) -> None:
        self._cancel_task(task_id, force, recursive)


def _strategy_of(spec):
    options = spec.options
    if not options:
        return None
    strategy = options.get("scheduling_strategy")
    if strategy in (None, "DEFAULT"):
        return None
    return strategy
