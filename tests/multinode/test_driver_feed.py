"""The driver's submissions in a job of several nodes (driver_feed.py).

There the driver queues each task for its node's thread instead of taking the node's lock:
the tests check that rank 0's own workers run their part of a burst, and that what the
driver does right after submitting (dropping refs, cancelling, getting) sees every task
it queued, in order.
"""

import pytest

from tests.multinode.test_multinode import run_mpi

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(200)]


def test_a_burst_from_the_driver_runs_on_rank_zero_too(tmp_path):
    # Before: the driver held rank 0's node thread off while it submitted, so rank 0's
    # worker ran ~5% of a burst over 4 ranks. Placement now splits the burst by queue
    # lengths, rank 0's own included. How big rank 0's share is depends on the machine's
    # load (12-16% at load 15-20 here): benchmarks/load_balance.py measures it; the test
    # asserts only that every rank, rank 0 too, ran part of the burst.
    out = run_mpi(tmp_path, 4, """
        import collections, hpcray as ray
        ray.init(num_cpus=1)
        rank_of = {n["NodeID"]: n["rank"] for n in ray.nodes()}
        @ray.remote
        def where():
            return ray.get_runtime_context().get_node_id()
        ray.get([where.remote() for _ in range(40)])
        counts = collections.Counter(rank_of[w] for w in ray.get(
            [where.remote() for _ in range(8000)]))
        print("COUNTS", sorted(counts.items()))
        assert sorted(counts) == [0, 1, 2, 3] and sum(counts.values()) == 8000, counts
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out


def test_refs_dropped_behind_queued_submissions(tmp_path):
    # The driver drops its refs while the tasks that take them may still be queued: the
    # objects must outlive those submissions.
    out = run_mpi(tmp_path, 3, """
        import gc, numpy as np, hpcray as ray
        ray.init(num_cpus=1)
        @ray.remote
        def total(a):
            return float(a.sum())
        @ray.remote
        def make(n):
            return np.ones(n)
        for round_ in range(3):
            big = ray.put(np.ones(200_000))          # in the store
            made = make.remote(100_000)              # owned here, made anywhere
            refs = [total.remote(big) for _ in range(300)]
            refs += [total.remote(made) for _ in range(300)]
            del big, made
            gc.collect()
            values = ray.get(refs)
            assert values == [200_000.0] * 300 + [100_000.0] * 300, set(values)
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out


def test_cancel_and_wait_right_after_a_burst(tmp_path):
    out = run_mpi(tmp_path, 2, """
        import time, hpcray as ray
        from hpcray.exceptions import TaskCancelledError
        ray.init(num_cpus=1)
        @ray.remote
        def nap(s):
            time.sleep(s)
            return s
        refs = [nap.remote(0.001) for _ in range(500)]
        last = nap.remote(30)           # queued behind the burst, maybe not submitted yet
        ray.cancel(last)
        try:
            ray.get(last, timeout=60)
        except TaskCancelledError:
            pass
        else:
            raise AssertionError("the cancelled task ran")
        ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=60)
        assert len(ready) == len(refs) and not not_ready
        assert ray.get(refs) == [0.001] * 500
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out
