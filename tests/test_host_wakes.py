"""HostWakes (runtime/host_wakes.py): nodes of one host waking each other's event loops.
Real sockets and a real epoll per node, as the event loop waits on them."""

import os
import socket

import pytest

from hpcray.runtime.host_wakes import HostWakes, wake_identity
from hpcray.runtime.worker_processes import EventSources

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def nodes():
    """Three nodes of one job: 0 and 1 wake each other; 2 has wake-ups turned off."""
    job = f"test-{os.getpid()}-{id(object())}"
    made = []
    for rank, enabled in ((0, True), (1, True), (2, False)):
        sources = EventSources(rank)
        made.append((HostWakes(rank, job, sources, enabled), sources))
    described = {rank: wakes.describe() for rank, (wakes, _) in enumerate(made)}
    for wakes, _ in made:
        wakes.set_peers(described)
    yield made
    for wakes, sources in made:
        wakes.close()
        sources.close()


def woken(sources: EventSources, timeout: float) -> bool:
    """Whether the node's epoll reports an event within `timeout`; handles it."""
    events = sources.epoll.poll(timeout)
    sources.dispatch(events)
    return bool(events)


def test_a_ring_wakes_the_peer_at_once_and_only_it(nodes):
    (zero, zero_sources), (one, one_sources), _ = nodes
    assert wake_identity()
    assert zero.can_wake(1) and one.can_wake(0)
    zero.ring(1)
    assert woken(one_sources, 5.0)
    assert not woken(one_sources, 0)          # drained: level-triggered epoll is quiet
    assert not woken(zero_sources, 0)         # the ringer itself was not woken
    assert zero.counters["wakes_sent"] == 1 and one.counters["wakes_received"] == 1


def test_a_node_without_wakes_is_polled_for_and_polls(nodes):
    (zero, _), (one, _), (two, two_sources) = nodes
    assert not zero.can_wake(2) and not one.can_wake(2)
    assert not two.can_wake(0) and two.sock is None
    zero.ring(2)                              # nothing to wake: no error, nothing sent
    two.ring(0)
    assert zero.counters["wakes_sent"] == 0 and two.counters["wakes_sent"] == 0
    assert not woken(two_sources, 0)
    # every other node of 0 and 1 must wake them for their polls to slow down: not so
    assert not zero.every_peer_wakes and not one.every_peer_wakes


def test_every_peer_wakes_when_all_share_the_host():
    job = f"test-all-{os.getpid()}"
    all_sources = [EventSources(rank) for rank in range(3)]
    made = [HostWakes(rank, job, all_sources[rank], True) for rank in range(3)]
    try:
        described = {rank: wakes.describe() for rank, wakes in enumerate(made)}
        described[2] = dict(described[2], wake_key="another host")
        for wakes in made:
            wakes.set_peers(described)
        assert made[0].can_wake(1) and not made[0].can_wake(2)
        assert not made[0].every_peer_wakes
        for wakes in made:
            wakes.set_peers({rank: described[rank] for rank in (0, 1)})
        assert made[0].every_peer_wakes and made[1].every_peer_wakes
    finally:
        for wakes, sources in zip(made, all_sources):
            wakes.close()
            sources.close()


def test_rings_never_block_and_one_drain_takes_them_all(nodes):
    (zero, _), (one, one_sources), _ = nodes
    for _ in range(20_000):                   # far beyond its small receive buffer
        zero.ring(1)
    assert zero.can_wake(1)                   # a full socket is a pending wake, not a loss
    assert woken(one_sources, 5.0)
    assert not woken(one_sources, 0)
    assert 0 < one.counters["wakes_received"] <= zero.counters["wakes_sent"]


def test_a_peer_gone_is_forgotten_on_the_first_failed_ring(nodes):
    (zero, _), (one, _), _ = nodes
    one.close()                               # its process ended: the name is free again
    zero.ring(1)
    assert not zero.can_wake(1)
    zero.ring(1)                              # and no more tries
    assert zero.counters["wakes_sent"] == 0


def test_names_are_per_job(nodes):
    """Another job's node 1 on the same host does not take this job's wake-ups."""
    (zero, _), (one, one_sources), _ = nodes
    other_sources = EventSources(1)
    other = HostWakes(1, f"other-{os.getpid()}", other_sources, True)
    try:
        assert other.address != one.address
        zero.ring(1)
        assert not woken(other_sources, 0.05)
        assert woken(one_sources, 5.0)
    finally:
        other.close()
        other_sources.close()


def test_the_name_is_taken_while_its_node_lives(nodes):
    (zero, _), _, _ = nodes
    again = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with pytest.raises(OSError):
        again.bind(zero.address)
    again.close()
