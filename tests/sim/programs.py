"""Random Ray programs for the simulated cluster, written against the real API.

Every value is `("v", tag, pad, refs)`: a tag the driver knows, padding that decides
whether it travels inline or through a store, and refs it holds. Tasks check the tags
of the values they get, so a lost or wrong object fails where it is read.
"""

from __future__ import annotations

import gc
import itertools
import random

import hpcray as ray
from hpcray.exceptions import TaskCancelledError
from hpcray.util.placement_group import placement_group, remove_placement_group
from hpcray.util.scheduling_strategies import (NodeAffinitySchedulingStrategy,
                                               PlacementGroupSchedulingStrategy)

SMALL, LARGE = 16, 2000   # bytes of padding: inline, and through the store (threshold 300)


def value(tag, pad_bytes, refs=()):
    return ("v", tag, b"p" * pad_bytes, list(refs))


def check_value(got, tag) -> None:
    if not (isinstance(got, tuple) and got[0] == "v" and got[1] == tag):
        raise AssertionError(f"expected the value tagged {tag}, got {str(got)[:200]}")


@ray.remote(max_retries=0)
def make(tag, pad_bytes, refs):
    """A value holding `refs` (refs passed inside a list stay refs: borrowed here)."""
    return value(tag, pad_bytes, refs)


@ray.remote(max_retries=0)
def read(tag, got, got_tag, by_value):
    """A top-level ref argument arrives as its value; `by_value` arrives as it was sent."""
    check_value(got, got_tag)
    return value(tag, SMALL if len(by_value) < 100 else LARGE, [])


@ray.remote(max_retries=0)
def nest(tag, children, pad_bytes, spread):
    """Submit children (large arguments by value), get them, return their refs."""
    strategy = "SPREAD" if spread else "DEFAULT"
    refs = [make.options(scheduling_strategy=strategy).remote(tag * 100 + i, pad_bytes, [])
            for i in range(children)]
    for i, got in enumerate(ray.get(refs)):
        check_value(got, tag * 100 + i)
    big = [read.options(scheduling_strategy=strategy).remote(tag * 100 + 50 + i, refs[i],
                                                             tag * 100 + i, b"x" * pad_bytes)
           for i in range(children)]
    for i, got in enumerate(ray.get(big)):
        check_value(got, tag * 100 + 50 + i)
    return value(tag, pad_bytes, refs)


@ray.remote(max_retries=0)
def produce(tag, pads, refs):
    """A generator task: its items (holding `refs`, or a ref made here) stream to the
    owner as they are yielded."""
    for i, pad_bytes in enumerate(pads):
        inner = refs if i % 2 == 0 else [ray.put(value(-i, pad_bytes))]
        yield value(tag * 100 + i, pad_bytes, inner)


@ray.remote(max_retries=0)
def split(depth, items):
    """Quick-sort-like recursion: two children per level, halves passed by value."""
    if depth == 0 or len(items) < 4:
        return sorted(items)
    half = len(items) // 2
    left = split.remote(depth - 1, items[:half])
    right = split.remote(depth - 1, items[half:])
    return sorted(ray.get(left) + ray.get(right))


@ray.remote(num_cpus=0, max_restarts=0)
class Keeper:
    """An actor that keeps refs it was given and hands them back."""

    def __init__(self):
        self.kept = []

    def keep(self, refs):
        self.kept.extend(refs)
        return len(self.kept)

    def give(self, tag):
        return value(tag, SMALL, self.kept)

    def drop(self):
        self.kept = []
        return 0


@ray.remote(max_retries=0)
def hand_to(keeper, refs):
    """A task that calls an actor whose handle it was given."""
    return ray.get(keeper.keep.remote(refs))


@ray.remote(num_cpus=0.25)
class Child:
    def one(self):
        return 1


@ray.remote(num_cpus=0.25)
class Parent:
    """An actor that creates actors and waits for them (the 3-rank hang of issue 8)."""

    def __init__(self, children):
        self.children = [Child.remote() for _ in range(children)]

    def total(self):
        return sum(ray.get([c.one.remote() for c in self.children]))


def random_workload(sim) -> None:
    """The driver: 8-20 random operations with pauses between them, then every held
    value is read back and checked, and everything is dropped."""
    rng = random.Random(sim.seed * 7919 + 1)
    ranks = len(sim.nodes)
    node_ids = [node.node_id.hex() for node in sim.nodes]
    tags = itertools.count(1)
    held: dict = {}        # ObjectRef -> tag
    cancelled: dict = {}   # ObjectRef -> tag, of a task cancelled (it may have ended first)
    keepers: list = []

    def strategy():
        choice = rng.random()
        if choice < 0.3:
            return "SPREAD"
        if choice < 0.6:
            return NodeAffinitySchedulingStrategy(node_ids[rng.randrange(ranks)], soft=False)
        return "DEFAULT"

    def some_refs(most=3):
        refs = list(held)
        return rng.sample(refs, min(len(refs), rng.randint(0, most)))

    def pad():
        return rng.choice((SMALL, LARGE))

    def op_put():
        tag = next(tags)
        held[ray.put(value(tag, pad(), some_refs()))] = tag

    def op_make():
        tag = next(tags)
        held[make.options(scheduling_strategy=strategy()).remote(tag, pad(), some_refs())] = tag

    def op_read():
        if not held:
            return
        ref = rng.choice(list(held))
        tag = next(tags)
        by_value = b"b" * pad()
        held[read.options(scheduling_strategy=strategy()).remote(tag, ref, held[ref],
                                                                 by_value)] = tag

    def op_nest():
        tag = next(tags)
        held[nest.options(scheduling_strategy=strategy()).remote(
            tag, rng.randint(1, 3), pad(), rng.random() < 0.5)] = tag

    def op_split():
        items = [rng.randrange(1000) for _ in range(rng.choice((8, 200)))]
        assert ray.get(split.options(scheduling_strategy=strategy()).remote(2, items)) == \
            sorted(items)

    def op_keeper():
        if not keepers or rng.random() < 0.4:
            keepers.append(Keeper.options(scheduling_strategy=strategy()).remote())
        keeper = rng.choice(keepers)
        if rng.random() < 0.5:
            ray.get(keeper.keep.remote(some_refs()))
        else:
            ray.get(hand_to.options(scheduling_strategy=strategy()).remote(keeper, some_refs()))

    def op_give():
        if not keepers:
            return
        keeper = rng.choice(keepers)
        tag = next(tags)
        ref = keeper.give.remote(tag)
        got = ray.get(ref)
        check_value(got, tag)
        for inner in got[3]:
            if inner in held:
                check_value(ray.get(inner), held[inner])
        if rng.random() < 0.5:
            ray.get(keeper.drop.remote())
        if rng.random() < 0.3:
            keepers.remove(keeper)

    def op_drop():
        for ref in some_refs(2):
            del held[ref]

    def op_get():
        for ref in some_refs(3):
            got = ray.get(ref)
            check_value(got, held[ref])
            for inner in got[3]:
                if inner in held:
                    check_value(ray.get(inner), held[inner])

    def op_cancel():
        """Cancel a task (or an actor call) at once or after a pause: its get raises
        TaskCancelledError, or gives its value if it ended before the cancel."""
        tag = next(tags)
        choice = rng.random()
        if choice < 0.4:
            ref = make.options(scheduling_strategy=strategy()).remote(tag, pad(), some_refs())
        elif choice < 0.8 or not keepers:
            ref = nest.options(scheduling_strategy=strategy()).remote(
                tag, rng.randint(1, 3), pad(), rng.random() < 0.5)
        else:
            tag = None  # a count, not a value
            ref = rng.choice(keepers).keep.remote(some_refs())
        if rng.random() < 0.5:
            sim.pause()
        # force=True kills the task's worker (not for actor calls: a ValueError, as Ray)
        ray.cancel(ref, recursive=rng.random() < 0.7, force=tag is not None and force_cancel())
        cancelled[ref] = tag

    def force_cancel() -> bool:
        return rng.random() < 0.3

    def check_cancelled(ref, tag):
        try:
            got = ray.get(ref)
        except TaskCancelledError:
            return
        if tag is not None:
            check_value(got, tag)

    def op_generator():
        tag = next(tags)
        pads = [pad() for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.3:
            items = list(ray.get(produce.options(
                scheduling_strategy=strategy(), num_returns="dynamic").remote(
                    tag, pads, some_refs())))
        else:
            gen = produce.options(scheduling_strategy=strategy()).remote(tag, pads, some_refs())
            taking = rng.randint(0, len(pads) + 1)
            items = [ref for _, ref in zip(range(taking), gen)]  # a consumer may stop early
            del gen
        for i, ref in enumerate(items):
            if rng.random() < 0.5:
                held[ref] = tag * 100 + i  # an item is an ordinary ref
            else:
                got = ray.get(ref)
                check_value(got, tag * 100 + i)
                if i % 2:  # a ref the task put, lent to the owner with the item
                    check_value(ray.get(got[3][0]), -i)

    def op_kill():
        """kill() of an actor at once (no node may know its host yet) or after a call: a
        call after the kill fails, or answers if it reached the actor first."""
        restart = rng.random() < 0.4  # kill(no_restart=False): it comes back once
        actor = Keeper.options(scheduling_strategy=strategy(),
                               max_restarts=1 if restart else 0).remote()
        if rng.random() < 0.5:
            assert ray.get(actor.drop.remote()) == 0
        ray.kill(actor, no_restart=not restart)
        try:
            assert ray.get(actor.drop.remote()) == 0
        except ray.exceptions.RayActorError:
            pass
        if restart:  # restarted by now, or restarting: this call waits for it
            assert ray.get(actor.drop.remote()) == 0

    def op_parents():
        parents = [Parent.remote(3) for _ in range(2)]
        assert ray.get([p.total.remote() for p in parents]) == [3, 3]

    def op_group():
        """A placement group of half-CPU bundles, tasks in each bundle, then removed
        (two phases across nodes; its resources come back)."""
        strategy = rng.choice(("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"))
        count = rng.randint(1, 2 if strategy == "STRICT_PACK" else ranks)  # nodes of 1 CPU
        group = placement_group([{"CPU": 0.5}] * count, strategy=strategy)
        inside = {}
        for _ in range(rng.randint(1, 3)):
            tag = next(tags)
            inside[make.options(num_cpus=0.5, scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, rng.randrange(-1, count))).remote(tag, pad(), some_refs())] = tag
        ray.get(group.ready())
        for ref, tag in inside.items():
            check_value(ray.get(ref), tag)
        remove_placement_group(group)

    operations = [op_put, op_make, op_make, op_read, op_nest, op_split, op_keeper,
                  op_give, op_drop, op_drop, op_get, op_get, op_cancel,
                  op_generator, op_group, op_kill]
    if rng.random() < 0.15:
        operations.append(op_parents)
    for _ in range(rng.randint(8, 20)):
        rng.choice(operations)()
        sim.pause()
    for ref, tag in list(held.items()):
        check_value(ray.get(ref), tag)
    for ref, tag in list(cancelled.items()):
        check_cancelled(ref, tag)
    held.clear()
    cancelled.clear()
    keepers.clear()
    gc.collect()


@ray.remote(max_retries=-1)
def step(tag, pad_bytes, previous, previous_tag):
    """One link of a chain: checks the link before it (a top-level ref argument)."""
    if previous is not None:
        check_value(previous, previous_tag)
    return value(tag, pad_bytes, [])


@ray.remote(max_retries=-1)
def read_inside(refs, tag):
    """Reads a value it borrows (a ref inside a list)."""
    check_value(ray.get(refs[0]), tag)
    return value(-tag, SMALL, [])


@ray.remote(max_restarts=-1)
class Echo:
    def echo(self, tag):
        return value(tag, SMALL, [])


def failure_workload(sim) -> None:
    """The driver while a node dies (Simulation(kill=True)): tasks that may run there,
    chains of stored values made there (rebuilt from lineage when lost), chains of which
    only the last link is held (the others freed, rebuilt from pinned lineage), values
    read on other nodes, an actor that restarts, and placement groups whose bundles
    there are placed again; every result is checked."""
    rng = random.Random(sim.seed * 7919 + 2)
    ranks = len(sim.nodes)
    node_ids = [node.node_id.hex() for node in sim.nodes]
    tags = itertools.count(1)
    actors_made = itertools.count()
    held: dict = {}

    def anywhere():
        return NodeAffinitySchedulingStrategy(node_ids[rng.randrange(ranks)], soft=True)

    def chain(links: int, hold_each: bool):
        previous, previous_tag = None, None
        for _ in range(links):
            tag = next(tags)
            previous = step.options(scheduling_strategy=anywhere()).remote(
                tag, rng.choice((SMALL, LARGE)), previous, previous_tag)
            previous_tag = tag
            if hold_each:
                held[previous] = tag
        held[previous] = previous_tag

    def op_chain():
        chain(rng.randint(1, 4), True)

    def op_long_chain():
        """A chain whose links the driver drops as it goes: only the last is held, so
        rebuilding it (its node died) re-runs links freed long ago, from pinned lineage."""
        chain(rng.randint(3, 10), False)

    def op_pile():
        """Several stored values made on one node (a small store spills some to disk:
        its folder is cleaned up by its host's other node if it dies)."""
        where = anywhere()
        for _ in range(rng.randint(2, 6)):
            tag = next(tags)
            held[step.options(scheduling_strategy=where).remote(tag, LARGE, None, None)] = tag

    def op_read_elsewhere():
        if held:
            ref = rng.choice(list(held))
            got = read_inside.options(scheduling_strategy=anywhere()).remote([ref], held[ref])
            held[got] = -held[ref]

    def op_actor():
        # Every other actor retries its calls (max_task_retries=-1): a call sent to a
        # node that died then runs on the restarted actor, never raises. (A counter, not
        # the rng: the schedules of the seeds stay as they were.)
        retried = next(actors_made) % 2 == 1
        actor = Echo.options(scheduling_strategy=anywhere(),
                             max_task_retries=-1 if retried else 0).remote()
        for _ in range(2):
            tag = next(tags)
            try:
                check_value(ray.get(actor.echo.remote(tag)), tag)
            except ray.exceptions.RayActorError:
                assert sim.killed is not None and not retried  # as Ray: the call may have run
            sim.pause()

    def op_group():
        """A group of half-CPU bundles with tasks in them: bundles on a node that dies
        are placed again on survivors (at most ranks - 1 bundles, so they fit), and the
        tasks that ran there run again in them."""
        strategy = rng.choice(("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"))
        count = rng.randint(1, 2 if strategy == "STRICT_PACK" else ranks - 1)
        group = placement_group([{"CPU": 0.5}] * count, strategy=strategy)
        inside = {}
        for _ in range(rng.randint(1, 3)):
            tag = next(tags)
            inside[step.options(num_cpus=0.5, scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, rng.randrange(-1, count))).remote(tag, rng.choice((SMALL, LARGE)),
                                                         None, None)] = tag
            sim.pause()
        for ref, tag in inside.items():
            check_value(ray.get(ref), tag)
        remove_placement_group(group)

    operations = [op_chain, op_chain, op_long_chain, op_pile, op_read_elsewhere,
                  op_actor, op_group]
    for _ in range(rng.randint(6, 14)):
        rng.choice(operations)()
        sim.pause()
    for ref, tag in list(held.items()):
        check_value(ray.get(ref), tag)
    held.clear()
    gc.collect()


@ray.remote(max_retries=-1)
def make_weights(tag):
    """The object every node reads, made by a task (rebuilt if its node dies)."""
    return value(tag, LARGE, [])


@ray.remote(max_retries=-1)
def take(tag, weights, weights_tag):
    """A task that needs the object every node reads (a top-level argument)."""
    check_value(weights, weights_tag)
    return value(tag, SMALL, [])


@ray.remote(max_retries=-1)
def take_inside(tag, boxed, weights_tag):
    """The same, got by the task itself (a ref inside a list: Watch, then a pull)."""
    check_value(ray.get(boxed[0]), weights_tag)
    return value(tag, SMALL, [])


def relay_workload(sim) -> None:
    """One large object read on every node at about the same time (relay.py): put by the
    driver or made by a task on a random node, then a task on each node (in a random
    order, some twice) reads it; the driver may drop its ref while they run."""
    rng = random.Random(sim.seed * 7919 + 3)
    ranks = len(sim.nodes)
    node_ids = [node.node_id.hex() for node in sim.nodes]
    tags = itertools.count(1)
    weights_tag = next(tags)
    if rng.random() < 0.5:
        weights = ray.put(value(weights_tag, LARGE))
    else:
        weights = make_weights.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_ids[rng.randrange(ranks)], soft=True)).remote(weights_tag)
        ray.wait([weights], fetch_local=False)
    object_id = weights.binary()
    readers = list(range(ranks)) + rng.sample(range(ranks), rng.randint(0, ranks // 4))
    rng.shuffle(readers)
    results = {}
    for rank in readers:
        tag = next(tags)
        where = NodeAffinitySchedulingStrategy(node_ids[rank], soft=True)
        if rng.random() < 0.7:
            results[take.options(scheduling_strategy=where).remote(
                tag, weights, weights_tag)] = tag
        else:
            results[take_inside.options(scheduling_strategy=where).remote(
                tag, [weights], weights_tag)] = tag
        if rng.random() < 0.1:
            sim.pause()
    if rng.random() < 0.3:
        weights = None
    for ref, tag in results.items():
        check_value(ray.get(ref), tag)
        entry = sim.nodes[0].objects.get(object_id)  # the driver's node owns it
        if entry is not None and sim.relay_object is None:
            sim.relay_object = (entry.primary_at if entry.primary_at is not None else 0,
                                entry.size)
    weights = None
    results.clear()
    gc.collect()


@ray.remote(max_retries=0)
def where_it_ran():
    return ray.get_runtime_context().get_node_id()


@ray.remote(max_retries=0)
def submit_here(count):
    """Submit `count` no-op tasks from this node and get them: (this node, where each ran)."""
    return (ray.get_runtime_context().get_node_id(),
            ray.get([where_it_ran.remote() for _ in range(count)]))


def submitters_workload(sim) -> None:
    """The bottom-up scheduler's locality (task_router.py, SpillPolicy): a submitter
    pinned on each node submits no-op tasks there and gets them, every node as loaded as
    the others, so they should run where they were submitted; then one submitter alone,
    whose node is then the only loaded one, so they should spread. Records in
    `sim.submitted` (alone?, tasks, tasks that ran where submitted)."""
    rng = random.Random(sim.seed * 31 + 5)
    node_ids = [node.node_id.hex() for node in sim.nodes]
    count = 30

    def on(node_id):
        return submit_here.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id, soft=False))

    for here, ran in ray.get([on(node_id).remote(count) for node_id in node_ids]):
        sim.submitted.append((False, count, ran.count(here)))
    here, ran = ray.get(on(node_ids[rng.randrange(len(node_ids))]).remote(count))
    sim.submitted.append((True, count, ran.count(here)))


@ray.remote(num_cpus=1)
class CpuHolder:
    """Holds a CPU for as long as it lives."""

    def ping(self):
        return ray.get_runtime_context().get_node_id()


def held_cpus_workload(sim) -> None:
    """An actor holds every CPU of the cluster (the simulated nodes have one each), so
    tasks queue where they were submitted; the end of one actor (a random one) frees a
    CPU on its node, and every task must run there, one after another, while the other
    nodes stay full: a queued task does not wait for its own node while a CPU idles on
    another (cluster.offer_room). A deadlock fails the schedule."""
    rng = random.Random(sim.seed * 17 + 3)
    holders = [CpuHolder.remote() for _ in sim.nodes]
    held_on = ray.get([holder.ping.remote() for holder in holders])
    assert sorted(held_on) == sorted(node.node_id.hex() for node in sim.nodes), held_on
    refs = [where_it_ran.remote() for _ in range(rng.randrange(1, 4))]
    freed = rng.randrange(len(holders))
    ray.kill(holders[freed])
    assert set(ray.get(refs)) == {held_on[freed]}
    for holder in holders:
        ray.kill(holder)


def full_store_workload(sim) -> None:
    """Tasks queued on one node need more arguments, made on other nodes, than its store
    holds (run with a store of a few values): the pulls that find the store full wait
    for those in flight (their copies can then be spilled), and every task gets its own
    argument. Before 058f439 such a pull made its readers fail with
    ObjectStoreFullError."""
    rng = random.Random(sim.seed * 31 + 7)
    node_ids = [node.node_id.hex() for node in sim.nodes]
    count = rng.randrange(8, 16)
    made = [make.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node_ids[rng.randrange(1, len(node_ids))], soft=False)).remote(tag, LARGE, [])
        for tag in range(count)]
    ray.wait(made, num_returns=count, fetch_local=False)
    on_first = NodeAffinitySchedulingStrategy(node_ids[0], soft=False)
    reads = [read.options(scheduling_strategy=on_first).remote(100 + tag, ref, tag, b"")
             for tag, ref in enumerate(made)]
    for tag, ref in enumerate(reads):
        check_value(ray.get(ref), 100 + tag)
    made = reads = None
    gc.collect()
