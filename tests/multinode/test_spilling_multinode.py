"""Spilling across nodes: `mpiexec -n 3`, every node's store 80 MiB, each holding three
times that; other ranks read the spilled objects (served from the spill files) and every
value comes back right; no spill folder is left after the job. Each test runs twice:
copying from the other stores of the host (host_stores.py) and over MPI, as between
hosts (HPCRAY_HOST_READS=0)."""

import os

import pytest

from tests.multinode.test_multinode import run_mpi

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(300)]

PATHS = pytest.mark.parametrize("host_reads", ["1", "0"], ids=["host-copy", "pulled"])


@PATHS
def test_spilled_objects_move_between_nodes(tmp_path, host_reads):
    spill = tmp_path / "spill"
    spill.mkdir()
    out = run_mpi(tmp_path, 3, """
        import os, sys, numpy as np, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        from hpcray.util.state import object_store_stats
        MiB = 1 << 20
        STORE, BLOCK = 80 * MiB, 8 * MiB
        COUNT = 3 * STORE // BLOCK
        ray.init(num_cpus=1, object_store_memory=STORE)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}

        def block(i):
            return np.full(BLOCK // 8, i, dtype=np.int64)

        @ray.remote
        def make(i):
            return block(1000 + i)

        @ray.remote
        def firsts(refs):  # pulls each from the node that holds it (spilled or not)
            return [int(ray.get(ref)[-1]) for ref in refs]

        # Puts on rank 0, three times its store: rank 2 reads them all.
        puts = [ray.put(block(i)) for i in range(COUNT)]
        on2 = On(ids[2], soft=False)
        assert ray.get(firsts.options(scheduling_strategy=on2).remote(puts)) == \\
            list(range(COUNT))
        # Results made on rank 1 (their primary copies stay there, three times its
        # store): the driver on rank 0 reads them all, and rank 2 as arguments.
        on1 = On(ids[1], soft=False)
        results = [make.options(scheduling_strategy=on1).remote(i) for i in range(COUNT)]
        for i, ref in enumerate(results):
            value = ray.get(ref)
            assert value[0] == 1000 + i and value.sum() == (1000 + i) * (BLOCK // 8)
            del value
        assert ray.get(firsts.options(scheduling_strategy=on2).remote(results)) == \\
            [1000 + i for i in range(COUNT)]
        for i, ref in enumerate(puts):  # and the driver's own, restored on rank 0
            assert ray.get(ref)[3] == i
        nodes = object_store_stats()["nodes"]
        for rank in (0, 1, 2):
            print("NODE", rank, {k: nodes[rank][k] for k in (
                "spilled_objects", "restored_objects", "served_from_disk", "files")})
        assert nodes[0]["spilled_objects"] > 0 and nodes[1]["spilled_objects"] > 0
        assert nodes[0]["served_from_disk"] + nodes[1]["served_from_disk"] > 0
        assert nodes[0]["restored_objects"] > 0
        print("FOLDERS", sorted(os.listdir(os.environ["HPCRAY_SPILL_DIR"])))
        ray.shutdown()
        print("OK")
    """, env={"HPCRAY_SPILL_DIR": str(spill), "HPCRAY_HOST_READS": host_reads}, timeout=280)
    assert "OK" in out, out
    folders = [line for line in out.splitlines() if line.startswith("FOLDERS")]
    assert folders and "-n0" in folders[0] and "-n1" in folders[0], out
    assert os.listdir(spill) == [], out  # every rank removed its folder


@PATHS
def test_queued_tasks_pull_more_arguments_than_the_store_holds(tmp_path, host_reads):
    """20 tasks queued on rank 0 (one CPU) each need an 8 MiB argument held on rank 1:
    160 MiB of pulls into an 80 MiB store. Those that find it full wait for the pulls in
    flight (whose copies can then be spilled), instead of failing with
    ObjectStoreFullError (seen under `mpiexec -n 3` in tests/test_spilling.py)."""
    out = run_mpi(tmp_path, 2, """
        import numpy as np, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        MiB = 1 << 20
        ray.init(num_cpus=1, object_store_memory=80 * MiB)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}

        @ray.remote
        def make(i):
            return np.full(MiB, i, dtype=np.int64)

        @ray.remote
        def last(value):
            return int(value[-1])

        made = [make.options(scheduling_strategy=On(ids[1], soft=False)).remote(i)
                for i in range(20)]
        ray.wait(made, num_returns=len(made), fetch_local=False)
        on0 = On(ids[0], soft=False)
        assert ray.get([last.options(scheduling_strategy=on0).remote(r) for r in made]) \\
            == list(range(20))
        ray.shutdown()
        print("OK")
    """, env={"HPCRAY_HOST_READS": host_reads}, timeout=200)
    assert "OK" in out, out


@PATHS
def test_a_pull_with_no_room_fails_that_get_and_the_next_get_pulls_again(tmp_path, host_reads):
    """The store of the driver's node is full of what the driver maps (nothing can be
    spilled), so a get of an object held on rank 1 finds no room: it raises
    ObjectStoreFullError. The error was the object's value on that node for good, so the
    get after the room came back raised it again; now that get pulls again."""
    out = run_mpi(tmp_path, 3, """
        import gc, numpy as np, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        MiB = 1 << 20
        ray.init(num_cpus=1, object_store_memory=80 * MiB)
        rank1 = [n["NodeID"] for n in ray.nodes() if n["rank"] == 1][0]

        @ray.remote
        def make():
            return np.ones(30 * MiB, dtype=np.uint8)

        ref = make.options(scheduling_strategy=On(rank1, soft=False)).remote()
        ray.wait([ref], fetch_local=False)
        held = [ray.get(ray.put(np.zeros(20 * MiB, dtype=np.uint8))) for _ in range(3)]
        try:
            ray.get(ref, timeout=60)
            print("GOT WHILE FULL")
        except ray.exceptions.ObjectStoreFullError:
            print("FULL")
        del held
        gc.collect()
        print("AGAIN", ray.get(ref, timeout=60).sum())
    """, env={"HPCRAY_HOST_READS": host_reads})
    assert "FULL" in out.splitlines(), out
    assert f"AGAIN {30 * 2**20}" in out.splitlines(), out
