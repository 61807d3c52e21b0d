"""This node's link to the other nodes: MPI polling, their messages, the GCS, placement.

Every rank is a node. The Network part polls the transport (with a back-off, so an idle
node costs almost nothing), hands each control message to the part that declared it
(messages.py has the table), carries the GCS client's traffic (and serves this rank's
GCS shard, if it has one), reports this node's load to rank 0, and on rank 0 runs the
global scheduler: it places the tasks and actors that nodes forward (TaskRouter decides
what to forward). Feasibility and the cluster's resources are answered here too.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time

from hpcray import exceptions, ids
from hpcray._scheduler import SPILL_SLACK_PER_CPU, GlobalScheduler
from hpcray.gcs.client import GcsClient
from hpcray.gcs.shard import GcsShard, is_gcs_request
from hpcray.options import InGroup, NodeAffinity
from hpcray.runtime import messages
from hpcray.runtime.messages import wire
from hpcray.runtime.peers import Peers
from hpcray.runtime.specs import ACTOR_CALL

log = logging.getLogger("hpcray.cluster")
# An idle node backs off to polling MPI every _IDLE_MAX_SLEEP, and once idle for T
# seconds every T * _IDLE_SHARE, up to _LONG_IDLE_MAX_SLEEP (from 1 s of idle on): a
# poll of an idle rank costs ~200 us of CPU on a loaded 2-core host (idle_cost.py), so
# 100 polls a second cost ~2% of a core per rank and 40 cost ~0.8%. The price: the
# first message after a long idle waits up to 25 ms for its receiver to look.
_IDLE_MAX_SLEEP = 0.01
_LONG_IDLE_MAX_SLEEP = 0.025
_IDLE_SHARE = 1 / 40
_BUSY_MAX_SLEEP = 0.0002   # while transfers are in flight
# While a small transfer is young (MpiTransport.expecting): its end is due within tens of
# microseconds. Not a spin: on this oversubscribed 2-core VM a spinning receiver took the
# CPU its holder needed to serve the Pull.
_EXPECTING_SLEEP = 30e-6
# For this long after its last message a node polls every _HOT_SLEEP at most: replies
# (a pull of a result just reported, a call's answer) come within milliseconds, and
# the exponential back-off alone had reached ~2 ms by then (remote get of 1 MiB).
_HOT_WINDOW = 0.005
_HOT_SLEEP = 0.0001
# ... unless every other node can wake this one when it sends (host_wakes.py): then the
# polls are a safety net, and 100 us polls cost a 4-rank driver feed ~15% of its tasks/s.
_WOKEN_HOT_SLEEP = 0.001
# A node that just told another node's owner that a result of its is in its store expects
# that owner's Pull (a get waiting, or soon to call): until it comes, for _PULL_EXPECTED_FOR
# at most, it polls every _PULL_EXPECTED_SLEEP (~50 us real). A holder polling every
# 100 us made the Pull's trip 80-95 us of a 1 MiB get's ~600; with these 38-40 us. Only
# then, until the Pull: 20 us polls for 1 ms after any message went on after the serve
# and took the CPU of the puller's wake-ups (the driver woke 65 us later). After
# _PULL_EXPECTED_MISSES windows in a row that ended without a Pull (results used where
# they were made, or gotten much later) it expects none until the next Pull comes.
_PULL_EXPECTED_FOR = 0.002
_PULL_EXPECTED_SLEEP = 20e-6
_PULL_EXPECTED_MISSES = 3
_LOAD_REPORT_PERIOD = 0.005
_SUBMITS_FOR = 0.05
# Linux lets a sleep of a normal thread end up to its timer slack (50 us by default)
# late, so that wake-ups coalesce: select(30 us) took 108-124 us here and 100 us took
# 193 us; with 1 us of slack 61-65 and 138 us. The polls above are the latency of a
# remote get (the holder's look for the Pull, the receiver's for its bytes).
_TIMER_SLACK_NS = 1000
_PR_SET_TIMERSLACK = 29
# HPCRAY_TRACE=1 prints every message between node managers (debugging).
_TRACE = bool(os.environ.get("HPCRAY_TRACE"))


def precise_sleeps() -> None:
    """Make the calling thread's short sleeps end on time: its timer slack down to 1 us
    (Linux; threads it starts inherit it)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, _TIMER_SLACK_NS, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: sleeps stay as the kernel rounds them
        pass


class ClusterLink:
    """What a node manager knows of the cluster: the transport and every node's totals."""

    def __init__(self, transport, job: dict):
        self.transport = transport
        self.rank = transport.rank
        self.size = transport.size
        self.job = job
        self.gcs_shards = min(int(job.get("gcs_shards", 1)), transport.size)
        self.fault_tolerant = getattr(transport, "fault_tolerant", False)
        if self.fault_tolerant and self.gcs_shards > 1:
            # A shard on a lost rank would take its tables with it: under ULFM the GCS
            # stays on rank 0, whose loss ends the job anyway.
            if transport.rank == 0:
                log.warning("gcs_shards=%d: under ULFM the GCS is one shard on rank 0 "
                            "(a shard on a lost rank would be lost with it)", self.gcs_shards)
            self.gcs_shards = 1
        self.nodes: dict[int, dict] = {}          # rank -> {"node_id", "resources"}
        self.backoff = 0.0
        self.last_activity = 0.0   # monotonic time of the last message in or out
        self.last_busy = 0.0       # ... of the last event-loop pass with other work
        self.pull_expected_until = 0.0  # polls are fast until then (Network.expect_pull)
        self.pulls_missed = 0           # ... windows in a row that ended without a Pull
        self.last_load_report = 0.0
        self.last_load = None
        self.last_submits = False  # what the last load report said of routed tasks
        self.stop_requested = False
        self.pulls: dict = {}   # tag -> (holder, [(object_id, entry, view)], header, transfer)
        self.actor_locations: dict[bytes, int] = {}
        self.concurrent_actors: set[bytes] = set()  # of them, those that run calls at once
        # of those, sync ones with concurrency groups: id -> actors.GroupOrder
        self.group_orders: dict = {}
        self.function_waiters: dict[bytes, list] = {}
        self.received = 0          # tasks the global scheduler placed here, so far
        self.actor_cpus = 0.0      # CPUs this node's live actors hold (Actors.place_actor)
        self.routed = 0            # own tasks routed since the last load report
        self.last_routed = -1.0    # monotonic time of the last one
        # Rank 0: actor creations no node has room for now, (source, spec, deps, hops),
        # placed as soon as a load report shows room (an actor holds its resources for
        # life, so queued on a full node it could wait forever while others free up).
        self.pending_actors: list = []
        # ULFM (node_failures.py): rank 0's record of the tasks it placed on each other
        # rank and has not heard ended, rank -> {task id: owner}; on the other ranks, the
        # placed tasks they run (`placed_here`) and those ended since the last Load.
        self.placed: dict[int, dict] = {}
        self.placed_here: set | None = set() if self.fault_tolerant and self.rank else None
        self.ended_placed: list = []
        self.spilling = False  # rank 0 hands its queued tasks on (Network.tell_to_spill)
        self.dead_nodes: set[int] = set()
        self.removed_groups: set = set()  # placement groups removed (placement_groups.py)

    def pull_came(self) -> None:
        """A Pull arrived: what Network.expect_pull polls fast for."""
        self.pull_expected_until = 0.0
        self.pulls_missed = 0


class Network:
    """This node's side of the cluster: the link to the other nodes, the GCS client (and
    shard), load reports and, on rank 0, the global scheduler. One node is a cluster of
    one (loopback.py): the same parts, on rank 0."""

    HANDLES = {messages.Load: "on_load", messages.Forward: "on_forward",
               messages.Stop: "on_stop"}

    def __init__(self, rank: int, link: ClusterLink, scheduler, total_resources: dict,
                 wake) -> None:
        self.rank = rank
        self.link = link
        self.scheduler = scheduler            # this node's LocalScheduler (its load)
        self.total_resources = total_resources
        self.wake = wake                      # makes the event loop go round now
        self.transport = link.transport
        self.gcs_shard = None
        self.woken_by_peers = False           # every other node wakes this one (host_wakes)
        self.hot_sleep = _HOT_SLEEP           # the polls' interval while messages come
        self._feasible: set = set()           # demands some node has (cluster_feasible)
        self.global_scheduler = None
        self.handlers: dict = {}              # control message type -> handler: bind()
        self.router = self.failures = None
        self.groups = None                    # GroupDirectory: bind()
        self.mover = None                     # bind(): pulls asked for by a batch go as one
        self.peers = Peers(self.transport, rank, self.wake_cluster)
        self.gcs = GcsClient(rank, link.gcs_shards, self.send_gcs)
        if rank < link.gcs_shards:
            self.gcs_shard = GcsShard(rank, link.gcs_shards)
        if rank == 0:
            self.global_scheduler = GlobalScheduler()
        # Rank 0: the CPUs each node's actors hold, as its last report said.
        self.actor_cpus: dict[int, float] = {}

    def bind(self, router, failures, handlers: dict, groups, mover) -> None:
        self.router = router
        self.failures = failures
        self.handlers = handlers
        self.groups = groups
        self.mover = mover

    def set_cluster_nodes(self, nodes: dict, woken_by_peers: bool = False) -> None:
        """Every node's id and totals (from the start handshake): feasibility and placement.
        `woken_by_peers`: every other node wakes this one when it sends (host_wakes.py)."""
        self.link.nodes = nodes
        self.woken_by_peers = woken_by_peers
        self.hot_sleep = _WOKEN_HOT_SLEEP if woken_by_peers else _HOT_SLEEP
        if self.global_scheduler is not None:
            for rank, node in sorted(nodes.items()):
                self.global_scheduler.add_node(rank, node["resources"])
        self.gcs.request("register_node", self.rank, self.total_resources)

    # ------------------------------------------------------------------ polling
    def cluster_poll_timeout(self) -> float:
        """How long the event loop may sleep before polling again (-1: until woken)."""
        cluster = self.link
        if not self.transport.needs_polling:  # one node: its own messages, next pass
            return 0.0 if self.transport.busy else -1
        if self.transport.busy:
            if self.transport.expecting:
                return min(cluster.backoff, _EXPECTING_SLEEP)
            return min(cluster.backoff, _BUSY_MAX_SLEEP)
        return cluster.backoff

    def poll_cluster(self, active: bool = False) -> None:
        """Receive and handle what other nodes sent; adjust the polling back-off
        (`active`: the node had other work this pass, so it is not idle)."""
        cluster = self.link
        transport = self.transport
        if not transport.needs_polling:
            # A cluster of one: only its own messages, and no other rank to tell its
            # load (a placement on rank 0 reads its own load first, see on_forward).
            if transport.busy:
                self.handle_cluster_messages(transport.poll())
            if self.groups.waiting:  # a placement group waits for room: look again
                self.report_load(now_=True)
            return
        moved = False
        while True:
            arrived = transport.poll()
            self.handle_cluster_messages(arrived)
            if cluster.fault_tolerant:
                ranks, transfers = transport.take_lost()
                if ranks or transfers:
                    self.failures.peers_lost(ranks, transfers)
            finished = transport.progress()  # completed pulls run their on_done (ObjectMover)
            moved = moved or bool(arrived or finished)
            # progress() also takes in what arrived meanwhile (a holder's answer to what
            # was just handled): handled now, not after the next sleep
            if not transport.has_messages:
                break
        self.report_load()
        now = time.monotonic()
        if moved:  # a look again at once, for the replies: unless they will wake this node
            cluster.backoff = self.hot_sleep if self.woken_by_peers else 0.0
            cluster.last_activity = now
            return
        if active:
            cluster.last_busy = now
        if now - cluster.last_activity < _HOT_WINDOW:
            cluster.backoff = self.hot_sleep
        else:
            idle = now - max(cluster.last_activity, cluster.last_busy)
            ceiling = min(_LONG_IDLE_MAX_SLEEP, max(_IDLE_MAX_SLEEP, idle * _IDLE_SHARE))
            cluster.backoff = min(ceiling, max(self.hot_sleep, cluster.backoff * 2))
        if cluster.pull_expected_until:
            if now < cluster.pull_expected_until:
                cluster.backoff = min(cluster.backoff, _PULL_EXPECTED_SLEEP)
            else:
                cluster.pull_expected_until = 0.0
                cluster.pulls_missed += 1

    def handle_cluster_messages(self, arrived) -> None:
        """Hand each message to the part that declared it (messages.py)."""
        if not arrived:
            return
        with self.mover.batched():
            self._handle(arrived)

    def _handle(self, arrived) -> None:
        handlers = self.handlers
        for source, channel, message in arrived:
            if _TRACE:
                print(f"[rank {self.rank}] <- {source} {channel} {str(message)[:150]}",
                      flush=True)
            try:
                if channel == "gcs":
                    self.on_gcs_message(source, message)
                else:
                    handlers[message[0]](source, *message[1:])
            except Exception:  # noqa: BLE001 - one bad message must not kill the node
                log.exception("rank %d: message %.200r from rank %d failed", self.rank,
                              message, source)

    def expect_pull(self) -> None:
        """A result kept here was reported to its owner on another node: poll fast until
        its Pull comes (ObjectMover.on_pull ends that) or _PULL_EXPECTED_FOR passes. Not
        where every node wakes this one when it sends, nor after _PULL_EXPECTED_MISSES
        windows without one."""
        if not self.woken_by_peers and self.link.pulls_missed < _PULL_EXPECTED_MISSES:
            self.link.pull_expected_until = time.monotonic() + _PULL_EXPECTED_FOR

    def wake_cluster(self) -> None:
        """Something was sent: poll MPI soon (replies come quickly); one node sent itself
        a message: go round now."""
        self.link.last_activity = time.monotonic()
        if self.link.backoff > 0 or not self.transport.needs_polling:
            self.link.backoff = 0.0
            self.wake()

    def send_gcs(self, dest: int, message) -> None:
        if dest == self.rank and self.gcs_shard is not None:
            for out_dest, out in self.gcs_shard.handle(self.rank, message):
                self.deliver_gcs(out_dest, out)
        else:
            self.transport.send(dest, message, "gcs")
            self.wake_cluster()

    def deliver_gcs(self, dest: int, message) -> None:
        if dest == self.rank:
            self.gcs.on_message(self.rank, message)
        else:
            self.transport.send(dest, message, "gcs")

    def on_gcs_message(self, source: int, message) -> None:
        if is_gcs_request(message) and self.gcs_shard is not None:
            for dest, out in self.gcs_shard.handle(source, message):
                self.deliver_gcs(dest, out)
        else:
            self.gcs.on_message(source, message)

    def report_load(self, now_: bool = False) -> None:
        """Tell the global scheduler this node's load when it changed (at most every
        few ms; `now_`: at once, as before a placement that depends on it)."""
        cluster = self.link
        now = time.monotonic()
        if not now_ and now - cluster.last_load_report < _LOAD_REPORT_PERIOD:
            return
        scheduler, last = self.scheduler, cluster.last_load
        # A node submitting its own tasks may route none in one report period (its
        # worker's next batch is on its way): it counts as submitting for a while.
        submits = cluster.routed > 0 or now - cluster.last_routed < _SUBMITS_FOR
        if last is not None and last[0] == scheduler.available \
                and last[1] == scheduler.num_waiting and last[2] == cluster.received \
                and last[3] == cluster.actor_cpus and not cluster.ended_placed and (
                    submits == cluster.last_submits if self.rank == 0 else not cluster.routed):
            # (a node routing its own tasks wants a fresh view, see on_load; rank 0 has
            # it, and reported to itself before each task it forwards: ~10% of its CPU)
            return
        load = (dict(scheduler.available), scheduler.num_waiting, cluster.received,
                cluster.actor_cpus)
        cluster.last_load = load
        cluster.last_load_report = now
        cluster.last_submits = submits
        if self.rank == 0:
            self.global_scheduler.report(0, load[0], load[1], load[2], submits)  # (copies)
            self.actor_cpus[0] = cluster.actor_cpus
            self.balance_after_report(0)
            self.place_pending_actors()
            if self.groups.waiting:
                self.groups.try_next()
        else:
            ended, cluster.ended_placed = tuple(cluster.ended_placed), []
            self.transport.send(0, wire(messages.Load, load[0], load[1], load[2],
                                        cluster.actor_cpus, ended, submits))
        cluster.routed = 0

    def on_load(self, source: int, available: dict, queued: int, received: int,
                actor_cpus: float, ended: tuple = (), wants_view: bool = False) -> None:
        if ended:
            placed = self.link.placed.get(source)
            if placed is not None:
                for task_id in ended:
                    placed.pop(task_id, None)
        scheduler = self.global_scheduler
        scheduler.report(source, available, queued, received, wants_view)
        if wants_view:
            self.transport.send(source, wire(messages.LoadView, *scheduler.view_for(source)))
        self.actor_cpus[source] = actor_cpus
        self.balance_after_report(source)
        self.place_pending_actors()
        if self.groups.waiting:
            self.groups.try_next()

    def balance_after_report(self, rank: int) -> None:
        """Rank 0, after node `rank`'s load report: CPUs free there are offered to the
        most loaded node (offer_room); a node held by its actors (held_by_actors) hands
        its queued tasks on while another node has a CPU free."""
        scheduler = self.global_scheduler
        if scheduler.available[rank].get("CPU", 0.0) >= 1:
            self.offer_room(rank)
        elif self.held_by_actors(rank) and scheduler.view_for(rank)[1] >= 1:
            self.tell_to_spill(rank)

    def held_by_actors(self, rank: int) -> bool:
        """Whether node `rank` has tasks queued that no CPU there can start until one of
        its actors ends (they hold its CPUs for life): a task placed there by a view of
        a moment ago would wait for nothing while another node's CPU idles. A node only
        busy with tasks is not: its queue drains (the slack rule moves a long one), and
        telling it too bounced a burst of short tasks between busy 1-CPU nodes whose
        first worker was still starting (353 of 400 ran on the driver's node of 4)."""
        scheduler = self.global_scheduler
        return scheduler.queued_per_cpu(rank) > 0 and scheduler.totals[rank].get(
            "CPU", 0.0) - self.actor_cpus.get(rank, 0.0) < 1

    def offer_room(self, idle: int) -> None:
        """Rank 0: node `idle` reported CPUs free; the node with the most tasks queued per
        CPU, beyond the slack a node keeps anyway, is told (its view says so) and hands
        some of its queued tasks on (TaskRouter.spill_queued). Below the slack, a node
        held by its actors is told too (held_by_actors)."""
        scheduler = self.global_scheduler
        busiest, most = -1, SPILL_SLACK_PER_CPU
        stuck, stuck_most = -1, 0.0
        for rank in scheduler.alive:
            if rank == idle:
                continue
            per_cpu = scheduler.queued_per_cpu(rank)
            if per_cpu >= most:
                busiest, most = rank, per_cpu
            elif per_cpu > stuck_most and self.held_by_actors(rank):
                stuck, stuck_most = rank, per_cpu
        self.tell_to_spill(busiest if busiest >= 0 else stuck)

    def tell_to_spill(self, rank: int) -> None:
        """Send node `rank` the view that makes it hand queued tasks on (on_load_view);
        none for -1. Rank 0 hands on its own once at a time: what it forwards reports
        its load again."""
        scheduler = self.global_scheduler
        if rank == 0 and not self.link.spilling:
            self.link.spilling = True
            try:
                self.router.on_load_view(0, *scheduler.view_for(0))
            finally:
                self.link.spilling = False
        elif rank > 0:
            self.transport.send(rank, wire(messages.LoadView, *scheduler.view_for(rank)))

    def room_now(self, demand: dict) -> bool:
        """Rank 0: whether some node has `demand` free, as the global scheduler sees it."""
        scheduler = self.global_scheduler
        return any(all(amount <= scheduler.available[rank].get(name, 0.0) + 1e-9
                       for name, amount in demand.items())
                   for rank in scheduler.alive)

    def place_pending_actors(self) -> None:
        pending = self.link.pending_actors
        if not pending:
            return
        self.link.pending_actors = []
        for source, spec, deps, hops in pending:
            self.on_forward(source, spec, deps, None, {}, hops)

    def on_stop(self, source: int) -> None:
        self.link.stop_requested = True

    # ------------------------------------------------------------------ feasibility
    def unschedulable(self, demand: dict, strategy) -> str | None:
        """Why no node of this job can ever run a request: None when one can;
        "affinity" when a hard NodeAffinity names a node that is not in the job or lacks
        the resources; "infeasible" when no node has them."""
        if type(strategy) is InGroup:  # its group's bundles exist, or will, or it is gone
            return "removed" if strategy.group_id in self.link.removed_groups else None
        if isinstance(strategy, NodeAffinity) and not strategy.soft:
            node = self.link.nodes.get(strategy.rank)
            total = node["resources"] if node is not None else None
            if total is None or not _within(demand, total):
                return "affinity"
            return None
        return None if self.cluster_feasible(demand) else "infeasible"

    def cluster_feasible(self, demand: dict) -> bool:
        # Asked on every submit: a demand found feasible is remembered (until a node of
        # the job dies: node_died).
        key = tuple(demand.items())
        if key in self._feasible:
            return True
        if any(_within(demand, node["resources"]) for rank, node in self.link.nodes.items()
               if rank not in self.link.dead_nodes):
            self._feasible.add(key)
            return True
        return False

    def node_died(self, rank: int) -> None:
        """Rank `rank` is gone (node_failures.py): what only it could run is infeasible."""
        self.link.dead_nodes.add(rank)
        self._feasible.clear()

    def cluster_resources(self) -> dict:
        total: dict = {}
        for rank, node in self.link.nodes.items():
            if rank in self.link.dead_nodes:
                continue
            for name, amount in node["resources"].items():
                total[name] = total.get(name, 0.0) + amount
        return total

    def cluster_available(self) -> dict:
        """What is free: this node's own now, the others' as their last load reports
        said (rank 0; other ranks answer for themselves)."""
        scheduler = self.scheduler
        # (a removed placement group's names linger at 0 until its last task ends)
        total = {k: max(0.0, v) for k, v in scheduler.available.items()
                 if k in scheduler.total}
        if self.global_scheduler is None:
            return total
        for rank in self.global_scheduler.alive:
            if rank != self.rank:
                for name, amount in self.global_scheduler.available[rank].items():
                    if amount > 0 or name in self.global_scheduler.totals[rank]:
                        total[name] = total.get(name, 0.0) + max(0.0, amount)
        return total

    def on_forward(self, source: int, spec, deps, strategy, arg_bytes, hops: int = 0) -> None:
        """Rank 0, the global scheduler: place a task a node did not keep. `hops`: how
        many nodes already sent this actor back for lack of room."""
        demand = spec.demand
        if source in self.link.placed:  # an actor its node sent back (hops)
            self.link.placed[source].pop(spec.actor_id, None)
        if type(strategy) is InGroup and self.groups.hold(source, spec, deps, strategy,
                                                           arg_bytes, hops):
            return  # its group is not created yet (or is removed)
        if self.rank == 0:
            self.report_load(now_=True)  # this node's own load is never stale
        if strategy is None and spec.kind != ACTOR_CALL and spec.actor_id is not None \
                and self.cluster_feasible(demand) and not self.room_now(demand):
            self.link.pending_actors.append((source, spec, deps, hops))
            return
        rank = self.global_scheduler.place(demand, arg_bytes, strategy, source)
        if rank < 0:
            error = exceptions.ResourceInfeasibleError(
                f"{spec.name} requests {demand} with strategy {strategy}, but no live node "
                "can satisfy it.")
            self.router.task_failed_remotely(spec, error)
            return
        if spec.kind != ACTOR_CALL and spec.actor_id is not None:
            message = wire(messages.RunActor, spec, deps, hops)
            if self.link.fault_tolerant and rank != self.rank:  # until its ActorAt
                self.link.placed.setdefault(rank, {})[spec.actor_id] = \
                    ids.owner_rank(spec.actor_id)
        else:
            message = wire(messages.Run, spec, deps)
            if self.link.fault_tolerant and rank != self.rank:
                self.link.placed.setdefault(rank, {})[spec.task_id] = \
                    ids.owner_rank(spec.task_id)
        if rank == self.rank:
            self.handlers[message[0]](source, *message[1:])
        else:
            self.peers.send(rank, message)


def _within(demand: dict, total: dict) -> bool:
    return all(amount <= total.get(name, 0.0) + 1e-9 for name, amount in demand.items())
