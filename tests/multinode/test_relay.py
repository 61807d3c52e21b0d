"""One large object read by a task on every rank (runtime/relay.py), for real: its holder
sends it to `relay_fanout` ranks and the copies (or the ranks receiving them, chunk by
chunk) send it on. On one machine this cannot be faster (every copy is a memory copy);
what this checks is that every task gets the same bytes and the holder sent fewer
copies than there were pullers. The algorithm under many orders and a node's death is
tested in the simulation (tests/sim, --workload relay). Ranks of one host copy from each
other's stores instead (host_stores.py), so these jobs pull over MPI, as between hosts."""

import pytest

from tests.multinode.test_multinode import run_mpi

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(200)]


def test_every_rank_gets_the_same_large_array(tmp_path):
    # A chain (fanout 1): rank 0 sends one copy of each object, the others are relayed,
    # the second and third from a rank still receiving it (3 chunks of 8 MiB).
    out = run_mpi(tmp_path, 4, """
        import hashlib, numpy as np, hpcray as ray
        from hpcray import context
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        nodes = {n["rank"]: n["NodeID"] for n in ray.nodes()}

        @ray.remote
        def digest(weights, rank):
            assert ray.get_runtime_context().get_node_id() == nodes[rank]
            return rank, hashlib.sha1(weights.tobytes()).hexdigest(), weights.nbytes

        @ray.remote
        def make(n):
            return np.arange(n, dtype=np.float64)[::-1] * 3.0

        weights = np.arange(3 << 20, dtype=np.float64) * 1.5       # 24 MiB, on rank 0
        expected = hashlib.sha1(weights.tobytes()).hexdigest()
        ref = ray.put(weights)
        made = make.options(scheduling_strategy=On(nodes[2], soft=False)).remote(3 << 20)
        made_digest = hashlib.sha1(ray.get(made).tobytes()).hexdigest()  # rank 0 has it now
        for obj, want in ((ref, expected), (made, made_digest)):
            got = ray.get([digest.options(scheduling_strategy=On(nodes[r], soft=False))
                           .remote(obj, r) for r in range(4)])
            assert sorted(g[0] for g in got) == [0, 1, 2, 3], got
            assert all(g[1] == want and g[2] == 24 << 20 for g in got), got
        counters = {p["rank"]: p["counters"] for p in context.get_client().list_state("timeline")}
        sent = {r: c.get("bytes_sent", 0) // (24 << 20) for r, c in counters.items()}
        relayed = sum(c.get("relayed", 0) for c in counters.values())
        print("COPIES SENT", sent, "RELAYED", relayed, "ASKED",
              {r: c.get("relays_asked", 0) for r, c in counters.items()})
        # ref: rank 0 holds it, 1-3 pull it: rank 0 sends 1, 2 are relayed. made: rank
        # 0 pulled a copy (the driver's get) and names it to 1 and 3 (rank 2 made it):
        # rank 0 sends 1, 1 is relayed.
        assert sent[0] <= 2 and relayed >= 2, counters
        ray.shutdown()
        print("OK")
    """, env={"HPCRAY_RELAY_FANOUT": "1", "HPCRAY_HOST_READS": "0"})
    assert "OK" in out
