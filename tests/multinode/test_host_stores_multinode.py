"""Ranks of one host copy objects from each other's stores (runtime/host_stores.py), for
real: `mpiexec -n 3` on this machine, the holders never asked over MPI; the same job
with HPCRAY_HOST_READS=0 moves the same bytes over MPI, as between hosts."""

import pytest

from tests.multinode.test_multinode import run_mpi, traced_gets

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(200)]

JOB = """
    import hashlib, numpy as np, hpcray as ray
    from hpcray import context
    from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
    ray.init(num_cpus=1)
    nodes = {n["rank"]: n["NodeID"] for n in ray.nodes()}
    MiB = 1 << 20

    @ray.remote
    def make(n, seed):
        return np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8)

    @ray.remote
    def digest(*arrays):
        return [hashlib.sha1(a.tobytes()).hexdigest() for a in arrays]

    def on(rank):
        return On(nodes[rank], soft=False)

    # 200 KB (copied at once), 3 MiB, 24 MiB (on the copy thread), made on ranks 1 and 2
    sizes = [200_000, 3 * MiB, 24 * MiB]
    refs = [make.options(scheduling_strategy=on(1 + i % 2)).remote(n, i)
            for i, n in enumerate(sizes * 2)]
    ray.wait(refs, num_returns=len(refs), fetch_local=False)
    want = [hashlib.sha1(np.random.default_rng(i).integers(0, 255, n, dtype=np.uint8)
                         .tobytes()).hexdigest() for i, n in enumerate(sizes * 2)]
    got = [hashlib.sha1(a.tobytes()).hexdigest() for a in ray.get(refs)]   # on rank 0
    assert got == want
    assert ray.get(digest.options(scheduling_strategy=on(1)).remote(*refs)) == want
    assert ray.get(digest.options(scheduling_strategy=on(2)).remote(*refs)) == want
    # many small objects in one get: one batch
    many = [make.options(scheduling_strategy=on(1)).remote(150_000, 100 + i)
            for i in range(60)]
    ray.wait(many, num_returns=len(many), fetch_local=False)
    assert all(a.nbytes == 150_000 for a in ray.get(many))
    # the driver's gets were copied by its own thread, none on rank 0's copy thread
    assert context.get_client().nm.host_stores.copier is None
    # a get with a timeout leaves its copies to the copy thread (the wait may end first)
    big = make.options(scheduling_strategy=on(1)).remote(24 * MiB, 7)
    ray.wait([big], fetch_local=False)
    assert ray.get(big, timeout=60).nbytes == 24 * MiB
    counters = {p["rank"]: p["counters"] for p in context.get_client().list_state("timeline")}
    print("SENT", {r: c.get("bytes_sent", 0) for r, c in counters.items()})
    print("COPIED", {r: c.get("bytes_copied_on_host", 0) for r, c in counters.items()})
    print("PULLED", {r: c.get("bytes_pulled", 0) for r, c in counters.items()})
    ray.shutdown()
    print("OK")
"""


def counts(out: str, name: str) -> dict:
    line = next(line for line in out.splitlines() if line.startswith(name + " "))
    return eval(line.split(" ", 1)[1])  # noqa: S307 - the job's own dict


def test_the_other_ranks_of_this_host_are_read_in_place_of_a_pull(tmp_path):
    out = run_mpi(tmp_path, 3, JOB)
    assert "OK" in out, out
    sent, copied, pulled = counts(out, "SENT"), counts(out, "COPIED"), counts(out, "PULLED")
    assert sum(sent.values()) == 0, out          # no holder was asked for bytes
    assert copied == pulled and copied[0] >= 2 * (200_000 + 27 * (1 << 20)) + 60 * 150_000
    assert copied[1] > 0 and copied[2] > 0, out  # the tasks' arguments too


def test_without_host_reads_the_same_job_moves_its_bytes_over_mpi(tmp_path):
    out = run_mpi(tmp_path, 3, JOB, env={"HPCRAY_HOST_READS": "0"})
    assert "OK" in out, out
    sent, copied, pulled = counts(out, "SENT"), counts(out, "COPIED"), counts(out, "PULLED")
    assert sum(copied.values()) == 0, out
    assert sum(sent.values()) == sum(pulled.values()) > 0, out


def test_a_host_read_is_traced_and_its_holder_does_nothing(tmp_path):
    stamps = traced_gets(tmp_path, (1 << 20, 16 << 20), host_reads=True)
    starts = [i for i, (_, rank, what) in enumerate(stamps) if what == "get.start"]
    assert len(starts) == 2, stamps
    for begin, end in zip(starts, starts[1:] + [len(stamps)]):
        one_get = [(rank, what) for _, rank, what in stamps[begin:end]]
        mine = [what for rank, what in one_get if rank == 0]
        assert mine[:4] == ["get.start", "pull.create", "pull.created", "host.taken"], one_get
        assert mine.index("host.copied") < mine.index("get.end"), one_get
        assert "pull.sent" not in mine and (1, "serve.start") not in one_get, one_get
