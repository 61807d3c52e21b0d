"""The three cross-node failures found by trying hpcray as a new user would (issue 8):
each a whole program under `mpiexec -n 3`, as the user ran it."""

import pytest

from tests.multinode.test_multinode import run_mpi

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(200)]


def test_large_argument_by_value_reaches_tasks_on_other_nodes(tmp_path):
    # The pickled arguments of a call (an 8 MB array passed by value) live in the
    # caller's store; a task placed on another node read its own store and raised
    # ObjectLostError. They are now the task's first dependency, pulled like any other.
    out = run_mpi(tmp_path, 3, """
        import numpy as np, hpcray as ray
        ray.init()
        @ray.remote
        def f(arr, i):
            return float(arr.sum()) + i, ray.get_runtime_context().get_node_id()
        large = np.ones(1_000_000)
        for strategy in ("DEFAULT", "SPREAD"):
            got = ray.get([f.options(scheduling_strategy=strategy).remote(large, i)
                           for i in range(10)])
            assert [v for v, _ in got] == [1e6 + i for i in range(10)], got
            print(strategy, "nodes", len({n for _, n in got}))
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out
    assert "SPREAD nodes 3" in out


def test_recursive_quicksort_across_nodes(tmp_path):
    out = run_mpi(tmp_path, 3, """
        import random, hpcray as ray
        ray.init()
        @ray.remote
        def quick_sort(values):
            if len(values) <= 20000:
                return sorted(values)
            pivot = values[0]
            lesser = quick_sort.remote([x for x in values if x < pivot])
            greater = quick_sort.remote([x for x in values if x > pivot])
            return ray.get(lesser) + [pivot] + ray.get(greater)
        random.seed(7)
        data = list({random.randint(0, 10**9) for _ in range(200000)})
        assert ray.get(quick_sort.remote(data)) == sorted(data)
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out


def test_actors_creating_actors_fill_the_cluster(tmp_path):
    # 2 + 6 actors of 0.25 CPU on 3 one-CPU nodes: they all stayed on the creating node
    # (feasible there, but with no room), and the parents waited for children that
    # could never start. An actor now stays only where its resources are free now.
    out = run_mpi(tmp_path, 3, """
        import hpcray as ray
        ray.init(num_cpus=1)
        @ray.remote(num_cpus=0.25)
        class Child:
            def val(self):
                return 1
        @ray.remote(num_cpus=0.25)
        class Parent:
            def __init__(self):
                self.children = [Child.remote() for _ in range(3)]
            def total(self):
                return sum(ray.get([c.val.remote() for c in self.children]))
        parents = [Parent.remote() for _ in range(2)]
        assert ray.get([p.total.remote() for p in parents], timeout=60) == [3, 3]
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out


def test_cancel_of_a_task_running_on_another_node(tmp_path):
    # Found reading the split node: the owner's broadcast of Cancel named a part the
    # node does not have. A task pinned to rank 1 sleeps; the driver cancels it.
    out = run_mpi(tmp_path, 2, """
        import time, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        rank1 = [n["NodeID"] for n in ray.nodes() if n["rank"] == 1][0]
        @ray.remote(max_retries=0)
        def sleeper():
            time.sleep(1000)
        ref = sleeper.options(scheduling_strategy=On(rank1, soft=False)).remote()
        ready, _ = ray.wait([ref], timeout=1.0)
        assert not ready
        ray.cancel(ref, force=True)
        try:
            ray.get(ref, timeout=60)
            raise AssertionError("a cancelled task returned a value")
        except ray.exceptions.TaskCancelledError:
            pass
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out
