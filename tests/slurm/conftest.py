"""The slurm marker, registered here so these tests run under --strict-markers before
pyproject.toml lists it (registering it twice is harmless), and the one cluster that the
tests of this folder share (started once, ~1 s; stopped at the end)."""

import pytest
from localslurm import LocalCluster, mpich_segments


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: tests that start a one-machine Slurm (slurm/local-cluster.sh)"
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = LocalCluster()
    try:
        cluster.start()
        yield cluster
        # Every job's Epilog removes what MPICH left in /dev/shm: none may remain.
        cluster.wait_until_no_jobs()
        left = mpich_segments(cluster.state_dir)
    finally:
        cluster.stop()
    assert not left, f"MPICH segments of this cluster's jobs left in /dev/shm: {left}"
