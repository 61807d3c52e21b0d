"""Shared fixtures: a fresh single-node runtime per test (ray_start) or one that the tests
of a module share while each leaves it idle (ray_shared), and leak checks."""

import gc
import os
import shutil
import tempfile
import time

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


class _SharedRuntime:
    """One runtime for the tests of a module that ask for `ray_shared`: started by the
    first, kept while each test leaves it as it found it, else shut down (the next test
    starts a fresh one). init and shutdown cost 0.2-0.5 s a test (a fork server per
    node); most tests only need a runtime that is idle."""

    def __init__(self):
        self.before = None

    def start(self):
        if self.before is not None and not hpcray.is_initialized():
            self._check_leaks()  # a test shut it down itself
        if self.before is None:
            self.before = hpcray_segments()
            hpcray.init(num_cpus=2, num_gpus=0, object_store_memory=256 * 1024 * 1024)

    def stop(self):
        if hpcray.is_initialized() and self.before is not None:
            hpcray.shutdown()
        self._check_leaks()

    def _check_leaks(self):
        if self.before is not None:
            leaked = hpcray_segments() - self.before
            self.before = None
            assert not leaked, f"shared-memory segments left behind: {leaked}"

    def idle(self, seconds: float = 0.5) -> bool:
        """Whether, within `seconds`, the runtime is as a fresh one: no actor alive, no
        task pending or running, no placement group, no object stored, every resource
        free (what the test left may take a moment to go; a named actor stays). True if
        it was shut down. A wrong "no" only costs a restart."""
        from hpcray.util.state import list_actors, list_placement_groups, object_store_stats
        if not hpcray.is_initialized():
            return True
        client = hpcray.context.get_client()
        deadline = time.monotonic() + seconds
        while True:
            gc.collect()
            if (hpcray.available_resources() == hpcray.cluster_resources()
                    and not any(row[2] not in ("FINISHED", "FAILED")
                                for row in client.list_state("tasks"))
                    and all(actor.state == "DEAD" for actor in list_actors(limit=10**6))
                    and all(group.state == "REMOVED"
                            for group in list_placement_groups(limit=10**6))
                    and object_store_stats()["cluster"]["num_objects"] == 0):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)


_shared = _SharedRuntime()


@pytest.fixture(autouse=True)
def _shared_runtime_is_for_ray_shared(request):
    """Any other test (ray_start, an init of its own) starts without it."""
    if "ray_shared" not in request.fixturenames:
        _shared.stop()
    yield


@pytest.fixture(scope="module", autouse=True)
def _shared_runtime_ends_with_its_module():
    yield
    _shared.stop()


@pytest.fixture
def ray_shared():
    """As ray_start, but the runtime may be the one the module's previous test used,
    left idle (_SharedRuntime); a test that leaves anything behind ends it."""
    _shared.start()
    yield hpcray
    try:
        idle = _shared.idle()
    except Exception:  # noqa: BLE001 - a runtime the test broke: a fresh one next
        idle = False
    if not idle:
        _shared.stop()


@pytest.fixture
def ray_start_custom(request):
    """hpcray with the init() keyword arguments given by indirect parametrization."""
    hpcray.init(**request.param)
    try:
        yield hpcray
    finally:
        hpcray.shutdown()
