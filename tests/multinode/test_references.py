"""Reference counting across nodes (hpcray/runtime/borrowing.py), for real under mpiexec.

Each driver asks the nodes' stores which objects they still hold (a task pinned to the
node lists its store) and waits, under a deadline, for what must be freed to go: the
runtime frees asynchronously, so the tests wait on the condition, never on a sleep.
"""

import pytest

from tests.multinode.test_multinode import run_mpi

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(200)]

PRELUDE = """
    import gc, time, numpy as np, hpcray as ray
    from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
    ray.init(num_cpus=1, object_store_memory=STORE)
    ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}

    def at(rank):
        return On(ids[rank], soft=False)

    @ray.remote
    def stored(wanted):
        # {hex id: pins} of the wanted objects this node's store holds
        from hpcray import context
        store = context.get_client().store
        held = {oid.hex(): pins for oid, _size, _state, pins in store.objects()}
        return {h: held[h] for h in wanted if h in held}

    def holds(rank, *hex_ids):
        return ray.get(stored.options(scheduling_strategy=at(rank)).remote(list(hex_ids)))

    def wait_until(what, check, seconds=60):
        deadline = time.monotonic() + seconds
        while not check():
            assert time.monotonic() < deadline, "timed out waiting until " + what
            time.sleep(0.02)
"""


def run(tmp_path, ranks, body, store_mb=80):
    script = PRELUDE.replace("STORE", str(store_mb << 20)) + body + """
    ray.shutdown()
    print("OK")
    """
    out = run_mpi(tmp_path, ranks, script)
    assert "OK" in out, out
    return out


def test_remote_results_are_freed_where_they_were_made(tmp_path):
    # 60 results of 8 MiB made on node 1 in an 80 MiB store: without freeing the primary
    # copies the store fills after 9 and the next task fails with ObjectStoreFullError.
    run(tmp_path, 2, """
    @ray.remote
    def make(i):
        return np.full(1 << 20, i, dtype=np.int64)
    last = None
    for i in range(60):
        ref = make.options(scheduling_strategy=at(1)).remote(i)
        assert ray.get(ref)[7] == i
        last = ref.hex()
        del ref
    gc.collect()
    wait_until("node 1 deletes the last result", lambda: not holds(1, last))
    wait_until("node 0 deletes its copy", lambda: not holds(0, last))
    """)


def test_argument_copies_are_freed_with_the_object(tmp_path):
    run(tmp_path, 3, """
    @ray.remote
    def total(a):
        return int(a.sum())
    for i in range(30):
        x = ray.put(np.ones(1 << 20, dtype=np.int64))
        h = x.hex()
        assert ray.get([total.options(scheduling_strategy=at(r)).remote(x)
                        for r in (1, 2)]) == [1 << 20] * 2
        del x
    gc.collect()
    wait_until("the owner frees the last put", lambda: not holds(0, h))
    for rank in (1, 2):
        wait_until(f"node {rank} drops its pulled copy", lambda: not holds(rank, h))
    """)


def test_a_borrower_keeps_the_object_alive(tmp_path):
    run(tmp_path, 3, """
    @ray.remote
    class Keeper:
        def keep(self, refs):
            self.refs = refs
            return len(refs)
        def total(self):
            return int(ray.get(self.refs[0]).sum())
        def drop(self):
            self.refs = None
            gc.collect()
            return True
    keeper = Keeper.options(scheduling_strategy=at(2)).remote()
    x = ray.put(np.ones(1 << 20, dtype=np.int64))
    h = x.hex()
    assert ray.get(keeper.keep.remote([x])) == 1   # a nested ref: the actor holds it
    del x
    gc.collect()
    for _ in range(3):  # the driver's ref is gone; the owner must keep it for the actor
        assert ray.get(keeper.total.remote()) == 1 << 20
    assert holds(0, h), "the owner freed an object that node 2 still holds"
    assert ray.get(keeper.drop.remote())
    wait_until("the owner frees it once the actor lets go", lambda: not holds(0, h))
    """)


def test_refs_through_two_nodes_and_back(tmp_path):
    # The driver's ref goes to a task on node 1, which hands it to a task on node 2;
    # both return it inside their results. It must survive every hand-over, then go.
    run(tmp_path, 3, """
    @ray.remote
    def inner(refs):
        return [refs[0], int(ray.get(refs[0]).sum())]

    @ray.remote
    def outer(refs):
        ref, total = ray.get(inner.options(scheduling_strategy=at(2)).remote(refs))
        return [ref, total, int(ray.get(ref).sum())]

    x = ray.put(np.full(1 << 20, 3, dtype=np.int64))
    h = x.hex()
    result = ray.get(outer.options(scheduling_strategy=at(1)).remote([x]))
    del x
    gc.collect()
    assert result[1:] == [3 << 20, 3 << 20]
    assert int(ray.get(result[0]).sum()) == 3 << 20   # the returned ref still works
    assert holds(0, h)
    del result
    gc.collect()
    wait_until("the owner frees it after the round trip", lambda: not holds(0, h))
    """)


def test_refs_made_on_another_node_inside_a_result(tmp_path):
    run(tmp_path, 2, """
    @ray.remote
    def make_refs():
        return [ray.put(np.full(1 << 20, k, dtype=np.int64)) for k in range(3)]
    refs = ray.get(make_refs.options(scheduling_strategy=at(1)).remote())
    hs = [r.hex() for r in refs]
    assert [int(ray.get(r)[0]) for r in refs] == [0, 1, 2]
    assert len(holds(1, *hs)) == 3, "node 1 freed puts that the driver holds"
    del refs
    gc.collect()
    wait_until("node 1 frees its puts", lambda: not holds(1, *hs))
    """)


def test_refs_inside_a_value_that_leaves_its_node(tmp_path):
    # [x] stored as a value and passed (as a value) to other nodes: x must live while a
    # node holds the list, and be freed once none does (it was kept for good before).
    run(tmp_path, 3, """
    @ray.remote
    def read_inner(values):
        return int(ray.get(values[0]).sum())

    @ray.remote
    class Keeper:
        def keep(self, values):
            self.values = values
            return True
        def total(self):
            return int(ray.get(self.values[0]).sum())
        def drop(self):
            self.values = None
            gc.collect()
            return True

    x = ray.put(np.ones(1 << 20, dtype=np.int64))
    hx = x.hex()
    v = ray.put([x])
    del x
    assert ray.get(read_inner.options(scheduling_strategy=at(1)).remote(v)) == 1 << 20
    keeper = Keeper.options(scheduling_strategy=at(2)).remote()
    assert ray.get(keeper.keep.remote(v))
    del v
    gc.collect()
    assert ray.get(keeper.total.remote()) == 1 << 20
    assert holds(0, hx), "freed while node 2 holds the list"
    assert ray.get(keeper.drop.remote())
    wait_until("the owner frees x once no node holds the list", lambda: not holds(0, hx))
    """)
