"""Shared fixtures: a fresh single-node runtime per test, and leak checks."""

import os
import shutil
import tempfile

import pytest

import hpcray

# Every job the tests start (in this process and the mpiexec jobs and drivers they run as
# subprocesses, which inherit it) writes its logs here, not to ./hpcray-logs in the repo.
# A test that reads logs sets its own folder.
if not os.environ.get("HPCRAY_LOG_DIR"):
    _LOG_DIR = tempfile.mkdtemp(prefix="hpcray-test-logs-")
    os.environ["HPCRAY_LOG_DIR"] = _LOG_DIR

    def pytest_unconfigure(config):
        shutil.rmtree(_LOG_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Under `mpirun -n N python -m hpcray -m pytest`, init() joins N nodes: a test that
    asserts one node's totals has nothing to check there."""
    from hpcray.runtime import launch
    if not launch.in_world() or launch.world().size == 1:
        return
    skip = pytest.mark.skip(reason="asserts one node's totals; this suite runs as a job of "
                                   f"{launch.world().size} ranks")
    for item in items:
        if "one_node" in item.keywords:
            item.add_marker(skip)


def hpcray_segments() -> set:
    """This process's store segments (other jobs may run on the machine meanwhile)."""
    prefix = f"hpcray-{os.getpid()}-"
    try:
        return {name for name in os.listdir("/dev/shm") if name.startswith(prefix)}
    except FileNotFoundError:
        return set()


@pytest.fixture
def ray_start():
    """hpcray on 2 CPUs and no GPU (whatever the machine has); shut down after the
    test, and no segment may remain."""
    before = hpcray_segments()
    hpcray.init(num_cpus=2, num_gpus=0, object_store_memory=256 * 1024 * 1024)
    try:
        yield hpcray
    finally:
        hpcray.shutdown()
    leaked = hpcray_segments() - before
    assert not leaked, f"shared-memory segments left behind: {leaked}"


@pytest.fixture
def ray_start_custom(request):
    """hpcray with the init() keyword arguments given by indirect parametrization."""
    hpcray.init(**request.param)
    try:
        yield hpcray
    finally:
        hpcray.shutdown()
