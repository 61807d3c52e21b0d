"""How often a node of a multi-node job polls MPI: the fast polls of a node that expects
a Pull (Network.expect_pull), on a Network over a transport that never has a message."""

import time

from hpcray.runtime import cluster
from hpcray.runtime.cluster import ClusterLink, Network


class _QuietTransport:
    """An MPI transport with nothing in flight and nothing arriving."""

    needs_polling = True
    busy = False
    expecting = False
    has_messages = False
    fault_tolerant = False

    def __init__(self) -> None:
        self.rank, self.size = 1, 2
        self.dead: set = set()
        self.sent: list = []

    def poll(self):
        return []

    def progress(self):
        return []

    def send(self, dest, message, channel="control") -> None:
        self.sent.append((dest, channel, message))


class _IdleScheduler:
    available: dict = {"CPU": 1.0}
    num_waiting = 0


def _network(woken_by_peers: bool = False) -> Network:
    link = ClusterLink(_QuietTransport(), {})
    network = Network(1, link, _IdleScheduler(), {"CPU": 1.0}, wake=lambda: None)
    network.woken_by_peers = woken_by_peers
    network.hot_sleep = cluster._WOKEN_HOT_SLEEP if woken_by_peers else cluster._HOT_SLEEP
    return network


def _quiet_poll(network: Network) -> float:
    """One pass with nothing arriving, the last message long ago: the next sleep."""
    network.link.last_activity = time.monotonic() - 10 * cluster._HOT_WINDOW
    network.poll_cluster()
    return network.cluster_poll_timeout()


def test_a_node_expecting_a_pull_polls_fast_until_it_comes():
    network = _network()
    assert _quiet_poll(network) > cluster._PULL_EXPECTED_SLEEP
    network.expect_pull()
    for _ in range(3):  # every pass of the window, not just the first
        assert _quiet_poll(network) == cluster._PULL_EXPECTED_SLEEP
    network.link.pull_came()
    assert _quiet_poll(network) > cluster._PULL_EXPECTED_SLEEP


def test_the_fast_polls_end_with_their_window():
    network = _network()
    network.expect_pull()
    assert _quiet_poll(network) == cluster._PULL_EXPECTED_SLEEP
    network.link.pull_expected_until = time.monotonic() - 1e-3  # the window has passed
    assert _quiet_poll(network) > cluster._PULL_EXPECTED_SLEEP
    assert network.link.pulls_missed == 1


def test_windows_without_a_pull_stop_the_fast_polls_until_one_comes():
    network = _network()
    for _ in range(cluster._PULL_EXPECTED_MISSES):
        network.expect_pull()
        network.link.pull_expected_until = time.monotonic() - 1e-3
        _quiet_poll(network)
    network.expect_pull()  # results nobody pulls: no fast polls for them any more
    assert _quiet_poll(network) > cluster._PULL_EXPECTED_SLEEP
    network.link.pull_came()  # a Pull again: the next result is expected to be pulled
    network.expect_pull()
    assert _quiet_poll(network) == cluster._PULL_EXPECTED_SLEEP


def test_a_node_its_peers_wake_does_not_poll_fast_for_a_pull():
    network = _network(woken_by_peers=True)
    network.expect_pull()
    assert _quiet_poll(network) >= cluster._WOKEN_HOT_SLEEP
