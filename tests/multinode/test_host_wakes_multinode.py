"""Ranks of one host wake each other when they send (runtime/host_wakes.py), for real:
`mpiexec -n 3` on this machine; with HPCRAY_HOST_WAKES=0, or HPCRAY_HOST_READS=0 (as
between hosts), the same job polls and rings nothing."""

import pytest

from tests.multinode.test_host_stores_multinode import counts
from tests.multinode.test_multinode import run_mpi

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(200)]

JOB = """
    import hpcray as ray
    from hpcray import context
    from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
    ray.init(num_cpus=1)
    nodes = {n["rank"]: n["NodeID"] for n in ray.nodes()}

    @ray.remote
    def square(x):
        return x * x

    @ray.remote
    class Relay:
        def __init__(self, nxt=None):
            self.nxt = nxt
        def pass_on(self, n):  # each hop a request and its reply between two ranks
            return n if self.nxt is None else ray.get(self.nxt.pass_on.remote(n + 1))

    assert sum(ray.get([square.options(scheduling_strategy="SPREAD").remote(i)
                        for i in range(600)])) == sum(i * i for i in range(600))
    last = Relay.options(scheduling_strategy=On(nodes[2], soft=False)).remote()
    first = Relay.options(scheduling_strategy=On(nodes[1], soft=False)).remote(last)
    assert [ray.get(first.pass_on.remote(i)) for i in range(50)] == [i + 1 for i in range(50)]
    counters = {p["rank"]: p["counters"] for p in context.get_client().list_state("timeline")}
    print("SENT", {r: c.get("wakes_sent", 0) for r, c in counters.items()})
    print("RECEIVED", {r: c.get("wakes_received", 0) for r, c in counters.items()})
    ray.shutdown()
    print("OK")
"""


def test_every_rank_wakes_the_others_and_is_woken(tmp_path):
    out = run_mpi(tmp_path, 3, JOB)
    assert "OK" in out, out
    sent, received = counts(out, "SENT"), counts(out, "RECEIVED")
    assert sorted(sent) == sorted(received) == [0, 1, 2], out
    assert all(sent[rank] > 0 and received[rank] > 0 for rank in range(3)), out


@pytest.mark.parametrize("off", ["HPCRAY_HOST_WAKES", "HPCRAY_HOST_READS"])
def test_turned_off_the_same_job_polls_and_rings_nothing(tmp_path, off):
    out = run_mpi(tmp_path, 3, JOB, env={off: "0"})
    assert "OK" in out, out
    assert sum(counts(out, "SENT").values()) == sum(counts(out, "RECEIVED").values()) == 0, out
