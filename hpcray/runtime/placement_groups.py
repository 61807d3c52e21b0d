"""Placement groups (Ray's): bundles of resources reserved on nodes, all of them or none.

Rank 0 keeps the directory (`GroupDirectory`): every group, its state, where its bundles
are, and the tasks and actors forwarded into a group not created yet. It creates groups
one at a time, in two phases: it picks a node per bundle by the group's strategy from
what it knows of each node's free resources, sends each chosen node `PrepareBundles`,
and once every one answered `BundlesPrepared(ok)` sends them `CommitBundles`; one
refusal (the node's own view is fresher) rolls the others back (`ReturnBundles`) and the
group waits. Under ULFM, the bundles of a created group that were on a lost rank are
placed again the same way, before any new group (`node_died`; the group is RESCHEDULING
meanwhile and what is forwarded into those bundles is parked). A group no set of nodes
could ever hold stays PENDING with one warning, as in Ray; one that fits the totals but
not what is free now is tried again whenever a node's load changes (cluster.py: a Load
report, or rank 0's own load) while it waits, and costs nothing otherwise. Removing a
group (`GroupRemoved`, to every node) fails the tasks parked for it.

Every node's `Bundles` part reserves on its LocalScheduler: a prepared bundle takes its
resources out of the free pool; a committed one gives them back under the group's
names (Ray's `CPU_group_<i>_<id>`, `CPU_group_<id>`, and 1000 of `bundle_group_...`),
which only tasks submitted into the group ask for (`options.demand_in_group`). So the
local and global schedulers keep such tasks on the bundle's node, and only there, with
nothing new in their paths: a task outside any group costs what it did. On removal a
node frees the bundles, fails the group's tasks that wait or are queued
(TaskUnschedulableError), kills the workers running its tasks and its actors.

GPUs: a bundle that holds GPUs reserves their ids when it is prepared (whole ones from
the node's free ids; a fraction of one takes an id to share), and a task or actor in the
group gets its ids from its bundle's (any bundle of the group on this node for index
-1), as in Ray: CUDA_VISIBLE_DEVICES and get_gpu_ids() name the bundle's GPUs. The ids go
back to the node's free ones when the bundles are returned or the group removed.
"""

from __future__ import annotations

import itertools
import logging
import time

from hpcray import exceptions, ids
from hpcray.options import (BUNDLE_MARKER_UNITS, BUNDLE_RESOURCE, InGroup, group_resource)
from hpcray.runtime import messages
from hpcray.runtime.actors import A_PENDING
from hpcray.runtime.messages import wire
from hpcray.runtime.specs import ACTOR_CREATION, QUEUED, RUNNING, WAITING

log = logging.getLogger("hpcray.placement_groups")

PENDING, CREATED, REMOVED, RESCHEDULING = "PENDING", "CREATED", "REMOVED", "RESCHEDULING"
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def deliver(network, peers, rank: int, message) -> None:
    """Send a control message, or handle it at once when it is for this node."""
    if rank == network.rank:
        network.handlers[message[0]](rank, *message[1:])
    else:
        peers.send(rank, message)


def group_resources(group_id: bytes, bundles) -> tuple[dict, dict]:
    """What bundles [(index, demand)] take from a node's pool, and what they give back
    under the group's names."""
    group_hex = group_id.hex()
    taken: dict = {}
    named: dict = {}
    for index, demand in bundles:
        for name, amount in {**demand, BUNDLE_RESOURCE: BUNDLE_MARKER_UNITS}.items():
            if name != BUNDLE_RESOURCE:
                taken[name] = taken.get(name, 0.0) + amount
            for key in (group_resource(name, group_hex), group_resource(name, group_hex, index)):
                named[key] = named.get(key, 0.0) + amount
    return taken, named


class _Group:
    __slots__ = ("group_id", "bundles", "strategy", "name", "detached", "state", "nodes",
                 "waiting", "prepared", "refused", "infeasible", "created_at", "attempts",
                 "submitted", "lost")

    def __init__(self, group_id, bundles, strategy, name, detached):
        self.group_id = group_id
        self.bundles = bundles
        self.strategy = strategy
        self.name = name
        self.detached = detached
        self.state = PENDING
        self.nodes: list = []        # rank of each bundle, once chosen
        self.waiting: set = set()    # ranks whose BundlesPrepared is due
        self.prepared: set = set()   # ranks that reserved
        self.refused = False
        self.infeasible = False
        self.submitted = time.time()
        self.created_at = None
        self.attempts = 0
        self.lost = None             # RESCHEDULING: indexes of the bundles placed again

    def placed_bundles(self) -> list:
        """Indexes of the bundles that hold their node's resources now."""
        lost = self.lost or ()
        return [i for i in range(len(self.bundles)) if i not in lost]


class GroupDirectory:
    """Rank 0: every placement group, their creation (two phases) and removal."""

    HANDLES = {messages.CreateGroup: "on_create_group", messages.RemoveGroup: "on_remove_group",
               messages.GroupQuery: "on_group_query",
               messages.BundlesPrepared: "on_bundles_prepared"}

    def __init__(self, rank: int, link, network, scheduler, peers) -> None:
        self.rank = rank
        self.link = link                  # every node's totals
        self.network = network            # the global scheduler; placing parked tasks
        self.scheduler = scheduler        # this node's (rank 0's own free pool, fresh)
        self.peers = peers
        self.router = None                # bind(): failing parked tasks
        self.groups: dict = {}            # group id -> _Group
        self.pending: list = []           # groups to create, in order
        self.creating = None              # the group whose prepare is in flight
        self.parked: dict = {}            # group id -> [(source, spec, deps, arg_bytes, hops)]
        self.waiting = False              # a group that fits the totals waits for room

    def bind(self, router) -> None:
        self.router = router

    # ------------------------------------------------------------------ requests
    def on_create_group(self, source: int, group_id: bytes, bundles: list, strategy: str,
                        name: str, detached: bool) -> None:
        group = self.groups[group_id] = _Group(group_id, bundles, strategy, name, detached)
        totals = {rank: node["resources"] for rank, node in self.link.nodes.items()}
        if choose_nodes(bundles, strategy, totals) is None:
            group.infeasible = True
            log.warning(
                "The placement group %s (%s, bundles %s) cannot be created: no set of this "
                "cluster's nodes can hold it (they have %s). It stays pending, as in Ray, "
                "until removed (an hpcray job's nodes are fixed at launch, so it will not be "
                "created in this job).", group_id.hex(), strategy, bundles,
                {rank: dict(total) for rank, total in sorted(totals.items())})
        self.pending.append(group)
        self.try_next()

    def on_remove_group(self, source: int, group_id: bytes) -> None:
        group = self.groups.get(group_id)
        if group is None or group.state == REMOVED:
            return
        committed = group.state in (CREATED, RESCHEDULING)
        group.state = REMOVED
        if group in self.pending:
            self.pending.remove(group)
        if self.creating is group:
            self.creating = None  # the nodes that reserved free it on GroupRemoved
        if committed:
            for rank, bundles in _by_rank(group, group.placed_bundles()).items():
                self.network.global_scheduler.remove_resources(
                    rank, group_resources(group_id, bundles)[1])
        for parked in self.parked.pop(group_id, ()):
            self.refuse(group_id, *parked)
        self.peers.broadcast(wire(messages.GroupRemoved, group_id))
        self.network.handlers[messages.GroupRemoved.CODE](self.rank, group_id)
        self.try_next()

    def on_group_query(self, source: int, request_id: int, group_id, name) -> None:
        rows = [self.row(group) for group in self.groups.values()
                if (group_id is None or group.group_id == group_id)
                and (name is None or (group.name == name and group.state != REMOVED))]
        deliver(self.network, self.peers, source, wire(messages.GroupRows, request_id, rows))

    def row(self, group: _Group) -> dict:
        """The group as Ray's placement_group_table shows it."""
        node_ids = {rank: node["node_id"] for rank, node in self.link.nodes.items()}
        end = group.created_at
        return {"placement_group_id": group.group_id.hex(), "name": group.name,
                "bundles": {i: dict(b) for i, b in enumerate(group.bundles)},
                "bundles_to_node_id": {i: node_ids.get(group.nodes[i])
                                       for i in group.placed_bundles()
                                       if group.state in (CREATED, RESCHEDULING)},
                "strategy": group.strategy, "state": group.state,
                "is_detached": group.detached,
                "stats": {"end_to_end_creation_latency_ms":
                          0.0 if end is None else (end - group.submitted) * 1000.0,
                          "scheduling_attempt": group.attempts,
                          "scheduling_state": {PENDING: "INFEASIBLE" if group.infeasible
                                               else "QUEUED", CREATED: "FINISHED",
                                               REMOVED: "REMOVED",
                                               RESCHEDULING: "QUEUED"}[group.state]}}

    # ------------------------------------------------------------------ creation
    def try_next(self) -> None:
        """Start creating the first pending group that fits what is free now; the
        Network calls this again when a node's load changes while one waits."""
        if self.creating is not None:
            return
        free = self.free_view()
        self.waiting = False
        for group in self.pending:
            if group.infeasible:
                continue
            nodes = choose_nodes(group.bundles, group.strategy, free) if group.lost is None \
                else self.choose_again(group, free)
            if nodes is None:
                self.waiting = True
                continue
            self.pending.remove(group)
            self.prepare(group, nodes)
            return

    def free_view(self) -> dict:
        """rank -> free resources: rank 0's own now, the others' as last reported."""
        scheduler = self.network.global_scheduler
        view = {rank: dict(scheduler.available[rank]) for rank in scheduler.alive}
        view[self.rank] = dict(self.scheduler.available)
        return view

    def prepare(self, group: _Group, nodes: list) -> None:
        self.creating = group
        group.attempts += 1
        group.nodes = nodes
        group.refused = False
        group.prepared = set()
        by_rank = _by_rank(group, group.lost)
        group.waiting = set(by_rank)
        for rank, bundles in by_rank.items():
            deliver(self.network, self.peers, rank,
                    wire(messages.PrepareBundles, group.group_id, bundles))

    def on_bundles_prepared(self, source: int, group_id: bytes, ok: bool) -> None:
        group = self.groups.get(group_id)
        if group is None or group is not self.creating:
            return  # removed meanwhile: GroupRemoved frees what that node reserved
        group.waiting.discard(source)
        if ok:
            group.prepared.add(source)
        else:
            group.refused = True
        if group.waiting:
            return
        self.creating = None
        if group.refused:
            for rank in group.prepared:
                deliver(self.network, self.peers, rank, wire(messages.ReturnBundles, group_id))
            self.pending.insert(0, group)
            self.waiting = True  # the refusing node's next load report brings a retry
            return
        if group.created_at is None:
            group.created_at = time.time()
        for rank, bundles in _by_rank(group, group.lost).items():
            self.network.global_scheduler.add_resources(rank,
                                                        group_resources(group_id, bundles)[1])
            deliver(self.network, self.peers, rank, wire(messages.CommitBundles, group_id))
        group.state = CREATED
        group.lost = None
        for source, spec, deps, arg_bytes, hops in self.parked.pop(group_id, ()):
            self.network.on_forward(source, spec, deps, spec.options["scheduling_strategy"],
                                    arg_bytes, hops)
        self.try_next()

    # ------------------------------------------------------------------ a lost rank
    def node_died(self, dead: int) -> None:
        """Rank 0, under ULFM (node_failures.py), once the global scheduler dropped the
        rank: the bundles that were there are placed again, before any group not yet
        created (as Ray); their group is RESCHEDULING meanwhile, and what is forwarded
        into those bundles is parked until then. A prepare in flight there fails."""
        creating = self.creating
        if creating is not None and dead in (creating.waiting | creating.prepared):
            creating.prepared.discard(dead)
            if dead in creating.waiting:
                self.on_bundles_prepared(dead, creating.group_id, False)
            else:
                creating.refused = True  # rolled back when the others have answered
        for group in self.groups.values():
            if group.state not in (CREATED, RESCHEDULING) or dead not in group.nodes:
                continue
            lost = {i for i, rank in enumerate(group.nodes) if rank == dead}
            group.lost = sorted(lost | set(group.lost or ()))
            if group.state == CREATED:
                group.state = RESCHEDULING
                self.pending.insert(0, group)
            log.warning("placement group %s: bundles %s were on the lost rank %d; placing "
                        "them again", group.group_id.hex(), sorted(lost), dead)
        self.try_next()

    def choose_again(self, group: _Group, free: dict) -> list | None:
        """Nodes for a RESCHEDULING group: its placed bundles stay; the lost ones go
        where the strategy allows beside them (STRICT_SPREAD: not on their nodes)."""
        placed = {group.nodes[i] for i in group.placed_bundles()}
        view = free
        if group.strategy == "STRICT_SPREAD":
            view = {rank: left for rank, left in free.items() if rank not in placed}
        elif group.strategy == "STRICT_PACK" and placed:
            view = {rank: left for rank, left in free.items() if rank in placed}
        chosen = choose_nodes([group.bundles[i] for i in group.lost], group.strategy, view)
        if chosen is None:
            return None
        nodes = list(group.nodes)
        for index, rank in zip(group.lost, chosen):
            nodes[index] = rank
        return nodes

    # ------------------------------------------------------------------ tasks forwarded
    def hold(self, source: int, spec, deps, strategy: InGroup, arg_bytes, hops) -> bool:
        """Rank 0, a task or actor forwarded into a group: True when it is parked (the
        group is not created yet) or refused (removed); False: place it now."""
        group = self.groups.get(strategy.group_id)
        if group is not None and (group.state == CREATED or (
                group.state == RESCHEDULING and _still_placed(group, strategy.index))):
            return False
        if group is not None and group.state == REMOVED:
            self.refuse(strategy.group_id, source, spec, deps, arg_bytes, hops)
        else:  # pending, or its CreateGroup has not arrived yet (it came from another node)
            self.parked.setdefault(strategy.group_id, []).append(
                (source, spec, deps, arg_bytes, hops))
        return True

    def refuse(self, group_id: bytes, source, spec, deps, arg_bytes, hops) -> None:
        """A task or actor of a removed group: the task fails; the actor goes to its
        owner, which learns of the removal right after and fails it there."""
        if spec.kind == ACTOR_CREATION:
            owner = ids.owner_rank(spec.actor_id)
            deliver(self.network, self.peers, owner, wire(messages.RunActor, spec, deps, hops))
            deliver(self.network, self.peers, owner, wire(messages.GroupRemoved, group_id))
            return
        self.router.task_failed_remotely(spec, removed_error(spec, group_id))


class Bundles:
    """Every node: the bundles reserved here, and this node's end of removals and queries."""

    HANDLES = {messages.PrepareBundles: "on_prepare_bundles",
               messages.CommitBundles: "on_commit_bundles",
               messages.ReturnBundles: "on_return_bundles",
               messages.GroupRemoved: "on_group_removed", messages.GroupRows: "on_group_rows"}

    def __init__(self, rank: int, node, network, actors, canceller, scheduler, peers) -> None:
        self.rank = rank
        self.node = node                  # its tasks, workers, task failures
        self.network = network
        self.actors = actors
        self.canceller = canceller
        self.scheduler = scheduler
        self.peers = peers
        self.prepared: dict = {}          # group id -> [(index, demand)] reserved, not committed
        self.committed: dict = {}         # group id -> (taken, named) of its bundles here
        self.removed = network.link.removed_groups  # (submit fails a task into one)
        self.asks: dict = {}              # request id -> answer(rows)
        self.gpus: dict = {}              # group id -> {index: [reserved ids, free ids]}
        self._request_ids = itertools.count(1)

    # ------------------------------------------------------------------ this node's processes
    def create(self, group_id: bytes, bundles: list, strategy: str, name: str,
               detached: bool) -> None:
        deliver(self.network, self.peers, 0,
                wire(messages.CreateGroup, group_id, bundles, strategy, name, detached))

    def remove(self, group_id: bytes) -> None:
        deliver(self.network, self.peers, 0, wire(messages.RemoveGroup, group_id))

    def rows(self, group_id, name, answer) -> None:
        request_id = next(self._request_ids)
        self.asks[request_id] = answer
        deliver(self.network, self.peers, 0, wire(messages.GroupQuery, request_id, group_id,
                                                  name))

    def on_group_rows(self, source: int, request_id: int, rows: list) -> None:
        answer = self.asks.pop(request_id, None)
        if answer is not None:
            answer(rows)

    # ------------------------------------------------------------------ two phases
    def on_prepare_bundles(self, source: int, group_id: bytes, bundles: list) -> None:
        taken = group_resources(group_id, bundles)[0]
        ok = group_id not in self.removed and self.scheduler.fits(taken)
        if ok:
            self.scheduler.acquire(taken)
            self.prepared[group_id] = bundles
            self.reserve_gpus(group_id, bundles)
        deliver(self.network, self.peers, source,
                wire(messages.BundlesPrepared, group_id, ok))

    def on_commit_bundles(self, source: int, group_id: bytes) -> None:
        bundles = self.prepared.pop(group_id, None)
        if bundles is None:
            return
        taken, named = group_resources(group_id, bundles)
        held = self.committed.get(group_id)
        # (A bundle placed again after a lost rank joins the group's others here.)
        self.committed[group_id] = (taken, named) if held is None else \
            (_sum([held[0], taken]), _sum([held[1], named]))
        self.scheduler.add_resources(named)
        self.node._run_actions(self.scheduler.reschedule())  # tasks queued for them

    def on_return_bundles(self, source: int, group_id: bytes) -> None:
        bundles = self.prepared.pop(group_id, None)
        if bundles is not None:
            self.return_gpus(group_id, [index for index, _ in bundles])
            self.scheduler.release(group_resources(group_id, bundles)[0])
            self.node._run_actions(self.scheduler.reschedule())

    # ------------------------------------------------------------------ GPU ids
    def reserve_gpus(self, group_id: bytes, bundles: list) -> None:
        reserved = {}
        for index, demand in bundles:
            ids = take_gpu_ids(self.node.free_gpus, demand.get("GPU", 0), whole=True)
            if ids:
                reserved[index] = [ids, list(ids)]
        if reserved:
            self.gpus.setdefault(group_id, {}).update(reserved)

    def return_gpus(self, group_id: bytes, indexes=None) -> None:
        """The ids the group's bundles here reserved (`indexes`: those bundles only) go
        back to the node; what its killed tasks still hold comes back here, not twice."""
        reserved = self.gpus.get(group_id)
        if not reserved:
            return
        free = self.node.free_gpus
        for index in list(reserved) if indexes is None else indexes:
            ids, _ = reserved.pop(index, ((), None))
            free.extend(i for i in ids if i not in free)
        free.sort()
        if not reserved:
            del self.gpus[group_id]

    def take_gpus(self, group: InGroup, demand: dict) -> tuple:
        """The ids for a task or actor of `group` asking `demand` (renamed into the
        group's resources): from its bundle's, or the first bundle here with room."""
        count = demand.get(group_resource("GPU", group.group_id.hex()), 0)
        reserved = self.gpus.get(group.group_id)
        if not count or not reserved:
            return ()
        need = max(1, int(-(-count // 1)))
        for index in ([group.index] if group.index >= 0 else sorted(reserved)):
            free = reserved[index][1] if index in reserved else ()
            if len(free) >= need:
                return take_gpu_ids(free, count)
        return ()

    def release_gpus(self, group: InGroup, demand: dict, ids: tuple) -> None:
        if demand.get(group_resource("GPU", group.group_id.hex()), 0) < 1:
            return  # a fraction: the ids were shared, not taken
        for reserved, free in self.gpus.get(group.group_id, {}).values():
            if ids[0] in reserved:
                free.extend(ids)
                free.sort()
                return

    # ------------------------------------------------------------------ removal
    def on_group_removed(self, source: int, group_id: bytes) -> None:
        self.removed.add(group_id)
        self.fail_tasks(group_id)
        self.end_actors(group_id)
        self.on_return_bundles(source, group_id)
        self.return_gpus(group_id)
        held = self.committed.pop(group_id, None)
        if held is not None:
            taken, named = held
            self.scheduler.remove_resources(named)
            self.scheduler.release(taken)
            self.node._run_actions(self.scheduler.reschedule())

    def fail_tasks(self, group_id: bytes) -> None:
        node = self.node
        for record in [r for r in node.tasks.values() if _in(r.spec, group_id)]:
            error = removed_error(record.spec, group_id)
            if record.state == WAITING:
                self.canceller._drop_dependency_waiters(record)
                node._fail_task(record, error)
            elif record.state == QUEUED:
                self.scheduler.cancel(record.spec.task_id)
                node._fail_task(record, error)
            elif record.state == RUNNING and record.worker is not None:
                record.retries_left = 0  # its worker dies now: WorkerCrashedError
                node.processes.kill(record.worker, "the removal of its placement group")

    def end_actors(self, group_id: bytes) -> None:
        for actor in [a for a in self.actors.values() if _in(a.spec, group_id)]:
            if actor.state == A_PENDING and actor.worker is None:
                self.actors.actor_dead(actor, exceptions.ActorUnschedulableError(
                    f"The actor {actor.spec.name} cannot be scheduled: its placement group "
                    f"{group_id.hex()} was removed."))
            else:
                self.actors.kill_actor(actor.actor_id, no_restart=True)


def take_gpu_ids(free: list, count: float, whole: bool = False) -> tuple:
    """Ids for `count` GPUs from the sorted `free` ids: whole GPUs are taken out of it;
    a fraction of one names an id it shares with others (left in `free`), unless
    `whole` (a bundle reserves the id of its fraction)."""
    if not count:
        return ()
    need = max(1, int(-(-count // 1)))
    taken = tuple(free[:need])
    if count >= 1 or whole:
        del free[:need]
    return taken


def group_of(spec) -> InGroup | None:
    options = spec.options
    strategy = options.get("scheduling_strategy") if options else None
    return strategy if type(strategy) is InGroup else None


def removed_error(spec, group_id: bytes) -> exceptions.TaskUnschedulableError:
    return exceptions.TaskUnschedulableError(
        f"The task {spec.name} cannot be scheduled: its placement group {group_id.hex()} "
        "was removed.")


def _in(spec, group_id: bytes) -> bool:
    group = group_of(spec)
    return group is not None and group.group_id == group_id


def _still_placed(group: _Group, index: int) -> bool:
    """Whether a RESCHEDULING group's bundle `index` (-1: any of them) is on a node."""
    placed = group.placed_bundles()
    return index in placed if index >= 0 else bool(placed)


def _by_rank(group: _Group, indexes=None) -> dict:
    """rank -> [(index, demand)] of the group's bundles there (`indexes`: those only)."""
    by_rank: dict = {}
    for index in range(len(group.bundles)) if indexes is None else indexes:
        by_rank.setdefault(group.nodes[index], []).append((index, group.bundles[index]))
    return by_rank


# ---------------------------------------------------------------- choosing nodes
def choose_nodes(bundles: list, strategy: str, free: dict) -> list | None:
    """A rank for each bundle, by the strategy, within `free` (rank -> resources), or
    None when they cannot all fit. PACK: as few nodes as possible (one if it can);
    SPREAD: as many as possible; STRICT_PACK: one node; STRICT_SPREAD: all different."""
    ranks = sorted(free)
    if strategy in ("PACK", "STRICT_PACK"):
        whole = _sum(bundles)
        for rank in ranks:
            if _fits(free[rank], whole):
                return [rank] * len(bundles)
        if strategy == "STRICT_PACK":
            return None
        return _greedy(bundles, ranks, free, prefer_used=True)
    if strategy == "STRICT_SPREAD":
        return _distinct(bundles, ranks, {rank: dict(free[rank]) for rank in ranks}, 0, [])
    return _greedy(bundles, ranks, free, prefer_used=False)


def _greedy(bundles, ranks, free, prefer_used: bool):
    left = {rank: dict(free[rank]) for rank in ranks}
    count = {rank: 0 for rank in ranks}
    chosen = []
    for bundle in bundles:
        fitting = [rank for rank in ranks if _fits(left[rank], bundle)]
        if not fitting:
            return None
        # PACK: the node already holding most of the group; SPREAD: the fewest.
        rank = max(fitting, key=lambda r: count[r]) if prefer_used else \
            min(fitting, key=lambda r: count[r])
        _take(left[rank], bundle)
        count[rank] += 1
        chosen.append(rank)
    return chosen


def _distinct(bundles, ranks, left, index, chosen):
    """Each bundle on a node of its own (a small backtracking search: groups are small)."""
    if index == len(bundles):
        return list(chosen)
    for rank in ranks:
        if rank in chosen or not _fits(left[rank], bundles[index]):
            continue
        chosen.append(rank)
        found = _distinct(bundles, ranks, left, index + 1, chosen)
        if found is not None:
            return found
        chosen.pop()
    return None


def _sum(bundles) -> dict:
    total: dict = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            total[name] = total.get(name, 0.0) + amount
    return total


def _fits(available: dict, demand: dict) -> bool:
    return all(amount <= available.get(name, 0.0) + 1e-9 for name, amount in demand.items())


def _take(available: dict, demand: dict) -> None:
    for name, amount in demand.items():
        available[name] = available.get(name, 0.0) - amount
