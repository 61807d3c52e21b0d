"""A one-node job's transport (LoopbackTransport) answers what the event loop asks of
MpiTransport: a wait shorter than a millisecond (a timer due) read `expecting`, which it
lacked, and ended the node's thread (seen in Ray's pattern_tree_of_tasks.py on one node)."""

import pytest

import hpcray
from hpcray.runtime.loopback import LoopbackTransport
from hpcray.runtime.transport import MpiTransport

pytestmark = pytest.mark.timeout(60)


def test_loopback_has_the_properties_the_event_loop_reads():
    for name in ("expecting", "poll_slowly", "needs_polling", "busy"):
        assert hasattr(MpiTransport, name)
        assert getattr(LoopbackTransport(), name) is False


@pytest.mark.one_node  # under mpiexec -n 3 the transport is MPI's
def test_a_sub_millisecond_wait_on_one_node():
    hpcray.init(num_cpus=1)
    try:
        node = hpcray.context.driver_node
        assert isinstance(node.transport, LoopbackTransport)
        # No AttributeError; what it returns is whatever is due meanwhile (a worker of
        # the pool saying hello), so only its type is certain.
        assert isinstance(node._wait_for_events(0.0005), list)
        assert hpcray.get(hpcray.put(1)) == 1
    finally:
        hpcray.shutdown()
