"""Where a kill() of an actor goes across nodes (actors.kill_route): it reaches the actor's
host when anyone on the way knows it, and never circulates. Before the rule, a node that
got a broadcast KillActor and knew no host broadcast it again, and so did every other such
node, for ever; two nodes that each thought the other hosted the actor passed it back and
forth for ever."""

import random

from hpcray.runtime.actors import KILL_HOPS, kill_route


def deliver(knowledge: dict, hosting, origin: int, nodes: int, rng) -> tuple[int, bool]:
    """One kill() on `origin`, its KillActors delivered in a random order. `knowledge`:
    the host each node thinks the actor is on (None: no idea). (messages sent, killed)."""
    in_flight = [(origin, 0)]
    sent, killed = 0, False
    while in_flight:
        node, hops = in_flight.pop(rng.randrange(len(in_flight)))
        if node == hosting:
            killed = True
            continue
        route = kill_route(knowledge[node], node, hops, True)
        if route == "send":
            in_flight.append((knowledge[node], hops + 1))
            sent += 1
        elif route == "broadcast":
            in_flight.extend((other, KILL_HOPS) for other in range(nodes) if other != node)
            sent += nodes - 1
        else:
            assert route == "drop"
        assert sent <= max(nodes - 1, KILL_HOPS)  # never more: no storm, no ping-pong
    return sent, killed


def test_a_kill_reaches_the_host_when_known_and_never_circulates():
    for seed in range(500):
        _one_cluster(random.Random(seed))


def _one_cluster(rng) -> None:
    nodes = rng.randint(2, 9)
    hosting = rng.choice([None, rng.randrange(nodes)])  # None: not placed anywhere yet
    knowledge = {n: rng.choice([None, rng.randrange(nodes)]) for n in range(nodes)}
    origin = rng.randrange(nodes)
    if origin == hosting:
        return  # the host kills it itself (no route)
    sent, killed = deliver(knowledge, hosting, origin, nodes, rng)
    # The host gets it when the origin knows nothing (broadcast) or a chain of what nodes
    # know leads there within KILL_HOPS sends.
    node, hops = origin, 0
    while node != hosting and knowledge[node] not in (None, node) and hops < KILL_HOPS:
        node, hops = knowledge[node], hops + 1
    expect = hosting is not None and (node == hosting or
                                      (hops == 0 and knowledge[origin] is None))
    assert killed == expect, (knowledge, hosting, origin)


def test_the_cases_by_name():
    assert kill_route(None, 0, 0, True) == "broadcast"   # asked here, no host known
    assert kill_route(None, 0, 0, False) == "unknown"    # a handle no node made
    assert kill_route(2, 0, 0, True) == "send"
    assert kill_route(2, 0, KILL_HOPS - 1, True) == "send"  # the actor may have moved
    assert kill_route(2, 0, KILL_HOPS, True) == "drop"      # a broadcast one stops here
    assert kill_route(None, 1, 1, True) == "drop"           # never broadcast again
    assert kill_route(0, 0, 0, True) == "drop"              # stale: thought to be here
