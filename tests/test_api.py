"""The task API against the real runtime: Ray's semantics, errors at the call site."""

import collections
import gc
import os
import re
import sys
import threading
import time

import psutil
import pytest

import hpcray
from hpcray import exceptions, resources

pytestmark = pytest.mark.timeout(60)


@hpcray.remote
def identity(x):
    return x


@hpcray.remote
def add(a, b):
    return a + b


def test_calls_before_init_are_clear_errors(monkeypatch):
    # Ray's implicit init is off here (tests/test_implicit_init.py has it on).
    monkeypatch.setenv("RAY_ENABLE_AUTO_CONNECT", "0")
    assert not hpcray.is_initialized()
    with pytest.raises(hpcray.exceptions.RayError, match="init"):
        identity.remote(1)
    with pytest.raises(hpcray.exceptions.RayError, match="init"):
        hpcray.put(1)
    with pytest.raises(hpcray.exceptions.RayError, match="init"):
        hpcray.get_runtime_context()


@pytest.mark.parametrize("chosen", [None, 0.01])
def test_the_node_thread_gets_the_gil_sooner_unless_the_program_chose(chosen):
    # The driver's thread and its node's thread share the GIL: init shortens Python's
    # switch interval (runtime/node_manager.py) while it runs, and only the default.
    default = sys.getswitchinterval()
    if chosen is not None:
        sys.setswitchinterval(chosen)
    try:
        hpcray.init(num_cpus=1)
        try:
            during = sys.getswitchinterval()
        finally:
            hpcray.shutdown()
        assert during == pytest.approx(0.0002 if chosen is None else chosen)
        assert sys.getswitchinterval() == pytest.approx(default if chosen is None else chosen)
    finally:
        sys.setswitchinterval(default)



@pytest.mark.parametrize("chosen", [None, 500])
def test_the_driver_collects_young_objects_less_often_unless_the_program_chose(chosen):
    # Each queued task holds objects the cyclic GC tracks: init raises the first
    # generation's threshold while the node runs in the driver (node_manager.py), and
    # only from Python's default; shutdown puts back what was there.
    default = gc.get_threshold()
    if chosen is not None:
        gc.set_threshold(chosen, *default[1:])
    try:
        hpcray.init(num_cpus=1)
        try:
            during = gc.get_threshold()
        finally:
            hpcray.shutdown()
        assert during[0] == (10_000 if chosen is None else chosen)
        assert during[1:] == default[1:]
        assert gc.get_threshold()[0] == (default[0] if chosen is None else chosen)
    finally:
        gc.set_threshold(*default)

def test_remote_function_cannot_be_called_directly(ray_shared):
    with pytest.raises(TypeError, match=r"identity.remote\(\)"):
        identity(1)


def test_task_results_and_dependencies(ray_shared):
    assert hpcray.is_initialized()
    assert hpcray.get(identity.remote(5)) == 5
    chain = identity.remote(0)
    for _ in range(20):
        chain = add.remote(chain, 1)
    assert hpcray.get(chain) == 20
    assert hpcray.get([add.remote(i, i) for i in range(50)]) == [2 * i for i in range(50)]
    assert hpcray.get(add.remote(a=identity.remote(2), b=3)) == 5


def test_top_level_refs_resolved_nested_refs_passed_as_refs(ray_shared):
    ref = hpcray.put(41)

    @hpcray.remote
    def inspect(top, nested):
        inner = nested["r"]
        return type(top).__name__, isinstance(inner, hpcray.ObjectRef), hpcray.get(inner) + 1

    assert hpcray.get(inspect.remote(ref, {"r": ref})) == ("int", True, 42)


def test_num_returns(ray_shared):
    @hpcray.remote(num_returns=3)
    def three():
        return 1, 2, 3

    a, b, c = three.remote()
    assert hpcray.get([a, b, c]) == [1, 2, 3]
    x, y = identity.options(num_returns=2).remote((7, 8))
    assert hpcray.get(y) == 8

    @hpcray.remote(num_returns=2)
    def wrong():
        return 1

    first, _ = wrong.remote()
    with pytest.raises(ValueError, match="num_returns"):
        hpcray.get(first)


def test_nested_tasks_do_not_deadlock_when_every_worker_blocks(ray_shared):
    @hpcray.remote
    def tree(depth):
        if depth == 0:
            return 1
        return sum(hpcray.get([tree.remote(depth - 1) for _ in range(2)]))

    # 2 CPUs, 15 tasks all blocked in get at some point: blocked workers lend their CPU.
    assert hpcray.get(tree.remote(3)) == 8


def test_exceptions_are_instances_of_the_users_class(ray_shared):
    class MyError(Exception):
        pass

    @hpcray.remote
    def fail():
        raise MyError("boom")

    ref = fail.remote()
    with pytest.raises(MyError) as info:
        hpcray.get(ref)
    assert isinstance(info.value, exceptions.RayTaskError)
    assert "boom" in str(info.value)
    # An error flows through a chain of dependent tasks unchanged.
    with pytest.raises(MyError):
        hpcray.get(add.remote(identity.remote(ref), 1))


def test_get_timeout_and_wait(ray_shared):
    @hpcray.remote
    def sleepy(seconds):
        time.sleep(seconds)
        return seconds

    slow = sleepy.remote(30)
    with pytest.raises(exceptions.GetTimeoutError):
        hpcray.get(slow, timeout=0.1)
    with pytest.raises(TimeoutError):  # GetTimeoutError is a TimeoutError too
        hpcray.get([slow], timeout=0)
    fast = identity.remote(1)
    ready, not_ready = hpcray.wait([slow, fast], num_returns=1, timeout=20)
    assert ready == [fast] and not_ready == [slow]
    ready, not_ready = hpcray.wait([slow, fast], num_returns=2, timeout=0.1)
    assert ready == [fast] and not_ready == [slow]
    hpcray.cancel(slow, force=True)


def test_wait_many_refs_keeps_order(ray_shared):
    refs = [identity.remote(i) for i in range(200)]
    ready, not_ready = hpcray.wait(refs, num_returns=200)
    assert ready == refs and not_ready == []
    ready, _ = hpcray.wait(refs, num_returns=5)
    assert len(ready) == 5


def test_bad_arguments_are_clear_errors(ray_shared):
    with pytest.raises(TypeError, match="ObjectRef"):
        hpcray.get(5)
    with pytest.raises(TypeError, match="ObjectRef"):
        hpcray.get([identity.remote(1), 5])
    with pytest.raises(ValueError, match="duplicate"):
        ref = identity.remote(1)
        hpcray.wait([ref, ref])
    with pytest.raises(ValueError, match="num_returns"):
        hpcray.wait([identity.remote(1)], num_returns=2)
    with pytest.raises(TypeError, match="serialize"):
        identity.remote(threading.Lock())
    with pytest.raises(ValueError, match="Invalid option"):
        identity.options(num_cpu=1)
    with pytest.raises(ValueError, match="num_cpus"):
        identity.options(num_cpus=-1)
    # The runtime keeps working after each of these.
    assert hpcray.get(identity.remote("still fine")) == "still fine"


def test_unpicklable_function_is_a_clear_error(ray_shared):
    lock = threading.Lock()

    @hpcray.remote
    def uses_lock():
        return lock.locked()

    with pytest.raises(TypeError, match="serialize"):
        uses_lock.remote()
    assert hpcray.get(identity.remote(1)) == 1


def test_infeasible_requests_stay_pending_as_in_ray(ray_shared):
    # As Ray: a ref comes back and the task waits (tests/test_infeasible.py has the rest).
    refs = [identity.options(num_cpus=3).remote(1), identity.options(num_gpus=1).remote(1),
            identity.options(resources={"special": 1}).remote(1)]
    assert hpcray.wait(refs, num_returns=3, timeout=0.1)[0] == []
    assert hpcray.get(identity.remote(2)) == 2
    for ref in refs:
        hpcray.cancel(ref)
        with pytest.raises(exceptions.TaskCancelledError):
            hpcray.get(ref, timeout=30)


def test_two_cpu_task_runs_alone(ray_shared, tmp_path):
    @hpcray.remote
    def record(name, seconds):
        start = time.monotonic()
        time.sleep(seconds)
        return hpcray.get_runtime_context().get_node_id(), start, time.monotonic()

    big = record.options(num_cpus=2).remote("big", 0.5)
    smalls = [record.remote(f"small{i}", 0.2) for i in range(3)]
    intervals = hpcray.get([big] + smalls)
    big_node, big_start, big_end = intervals[0]
    for node, start, end in intervals[1:]:
        # alone on its node (as a job of several ranks, another node may run the others)
        assert node != big_node or end <= big_start or start >= big_end, \
            "a task overlapped the 2-CPU task"


@pytest.mark.parametrize("ray_start_custom", [{"num_cpus": 2, "resources": {"special": 1}}],
                         indirect=True)
@pytest.mark.one_node
def test_custom_resources_are_accounted(ray_start_custom):
    assert hpcray.cluster_resources()["special"] == 1

    @hpcray.remote(resources={"special": 1}, num_cpus=0)
    def exclusive(i):
        start = time.monotonic()
        time.sleep(0.2)
        return start, time.monotonic()

    spans = sorted(hpcray.get([exclusive.remote(i) for i in range(3)]))
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, "two tasks held the single 'special' resource at once"


@pytest.mark.one_node
def test_resources_and_nodes(ray_shared):
    total = hpcray.cluster_resources()
    assert total["CPU"] == 2
    assert hpcray.available_resources()["CPU"] == 2
    nodes = hpcray.nodes()
    assert len(nodes) == 1 and nodes[0]["Alive"] and nodes[0]["Resources"]["CPU"] == 2


def test_runtime_context(ray_shared):
    ctx = hpcray.get_runtime_context()
    assert ctx.get_task_id() is None and ctx.get_actor_id() is None

    @hpcray.remote
    def where():
        c = hpcray.get_runtime_context()
        return c.get_job_id(), c.get_node_id(), c.get_task_id(), os.getpid()

    job, node, task, pid = hpcray.get(where.remote())
    assert job == ctx.get_job_id() and node == ctx.get_node_id()
    assert task is not None and pid != os.getpid()
    assert hpcray.get_gpu_ids() == []


def test_cancel_queued_and_running_tasks(ray_shared):
    @hpcray.remote
    def sleepy():
        time.sleep(60)

    running = [sleepy.remote() for _ in range(2)]
    queued = sleepy.remote()
    hpcray.cancel(queued)
    with pytest.raises(exceptions.TaskCancelledError):
        hpcray.get(queued, timeout=20)
    for ref in running:
        hpcray.cancel(ref)
    for ref in running:
        with pytest.raises(exceptions.TaskCancelledError):
            hpcray.get(ref, timeout=20)
    forced = sleepy.remote()
    hpcray.wait([forced], timeout=0.5)
    hpcray.cancel(forced, force=True)
    with pytest.raises(exceptions.TaskCancelledError):
        hpcray.get(forced, timeout=20)
    assert hpcray.get(identity.remote(3)) == 3


def test_remote_function_with_options_in_decorator(ray_shared):
    @hpcray.remote(num_cpus=0.5, max_retries=0)
    def half():
        return "ok"

    assert hpcray.get(half.remote()) == "ok"
    assert hpcray.get(half.options(name="renamed").remote()) == "ok"


def test_shutdown_and_init_again():
    hpcray.init(num_cpus=1)
    assert hpcray.get(identity.remote(1)) == 1
    hpcray.shutdown()
    assert not hpcray.is_initialized()
    hpcray.init(num_cpus=1)
    assert hpcray.get(identity.remote(2)) == 2
    hpcray.shutdown()


@pytest.mark.one_node
def test_recursive_cancel_reaches_child_tasks(ray_shared, tmp_path):
    marker = tmp_path / "child_started"

    @hpcray.remote
    def child(path):
        open(path, "w").close()
        time.sleep(60)

    @hpcray.remote
    def parent(path):
        return hpcray.get(child.remote(path))

    ref = parent.remote(str(marker))
    while not marker.exists():
        time.sleep(0.01)
    hpcray.cancel(ref, recursive=True)
    with pytest.raises(exceptions.TaskCancelledError):
        hpcray.get(ref, timeout=30)
    # The child was cancelled too: both CPUs are free again for new work.
    assert hpcray.get([identity.remote(i) for i in range(4)], timeout=30) == [0, 1, 2, 3]
    deadline = time.monotonic() + 30
    while hpcray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hpcray.available_resources()["CPU"] == 2


def test_cancel_interrupts_a_task_blocked_in_get(ray_shared, tmp_path):
    marker = tmp_path / "child_started"

    @hpcray.remote
    def child(path):
        open(path, "w").close()
        time.sleep(60)

    @hpcray.remote
    def parent(path):
        ref = child.remote(path)
        try:
            hpcray.get(ref)
        finally:
            hpcray.cancel(ref, force=True)

    ref = parent.remote(str(marker))
    while not marker.exists():
        time.sleep(0.01)
    hpcray.cancel(ref, recursive=False)
    with pytest.raises(exceptions.TaskCancelledError):
        hpcray.get(ref, timeout=30)
    assert hpcray.get(identity.remote(1), timeout=30) == 1


def test_max_calls_replaces_the_worker_after_that_many_runs(ray_shared):
    @hpcray.remote(max_calls=2)
    def pid_twice():
        return os.getpid()

    @hpcray.remote
    def pid_forever():
        return os.getpid()

    runs = collections.Counter(hpcray.get(pid_twice.remote()) for _ in range(6))
    assert max(runs.values()) <= 2 and len(runs) >= 3, runs
    # A function without max_calls keeps its worker.
    assert len({hpcray.get(pid_forever.remote()) for _ in range(4)}) <= 2
    with pytest.raises(ValueError, match="max_calls"):
        pid_twice.options(max_calls=3)
    with pytest.raises(ValueError, match="max_calls"):
        hpcray.remote(max_calls=-1)(lambda: None)


def test_gpu_tasks_get_a_fresh_worker_and_cpu_tasks_see_no_gpu():
    # Ray's max_calls default for a task with GPUs is 1: its CUDA state leaves with its
    # process. Where NVML detects no GPU (CI), the variable carries the asserted index.
    detected = resources.detect_gpus()
    expected = detected[0].uuid if detected else "0"
    hpcray.init(num_cpus=2, num_gpus=1)
    try:
        @hpcray.remote(num_gpus=1)
        def gpu_task():
            return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"), hpcray.get_gpu_ids()

        runs = [hpcray.get(gpu_task.remote()) for _ in range(3)]
        assert len({pid for pid, _, _ in runs}) == 3, runs
        assert all(visible == expected and ids == [0] for _, visible, ids in runs), runs
    finally:
        hpcray.shutdown()


def test_store_sizes_that_cannot_work_are_refused_saying_why(monkeypatch):
    """Too small (under Ray's 75 MiB) or larger than /dev/shm's free space: a ValueError
    naming the argument and the bound, and nothing started; a good size still works."""
    def nothing_started():
        deadline = time.monotonic() + 30  # a process that is exiting may not be reaped yet
        while psutil.Process().children(recursive=True):
            assert time.monotonic() < deadline, psutil.Process().children(recursive=True)
            time.sleep(0.05)
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"hpcray-{os.getpid()}-")]
        assert not hpcray.is_initialized()

    with pytest.raises(ValueError, match=r"object_store_memory=10 is too small: the minimum "
                                         r"is 78643200 bytes \(75 MiB\)"):
        hpcray.init(num_cpus=1, object_store_memory=10)
    nothing_started()
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    with pytest.raises(ValueError) as info:
        hpcray.init(num_cpus=1, object_store_memory=10**15)
    message = str(info.value)
    assert "object_store_memory=1000000000000000 bytes" in message
    assert "does not fit in /dev/shm" in message
    free_said = int(re.search(r"which has (\d+) bytes", message).group(1))
    assert abs(free_said - free) < 2**30, (free_said, free)  # other jobs write there too
    nothing_started()
    monkeypatch.setenv("HPCRAY_OBJECT_STORE_MEMORY", "1000")
    with pytest.raises(ValueError, match="HPCRAY_OBJECT_STORE_MEMORY"):
        hpcray.init(num_cpus=1)
    nothing_started()
    monkeypatch.delenv("HPCRAY_OBJECT_STORE_MEMORY")
    hpcray.init(num_cpus=1, object_store_memory=75 * 1024 * 1024)
    try:
        assert hpcray.get(hpcray.put(1)) == 1
    finally:
        hpcray.shutdown()


@pytest.mark.timeout(60)
def test_init_rejects_unknown_keywords_as_ray():
    """init(num_cpu=1) (a typo) is an error naming the keyword, as in Ray, and starts
    nothing; Ray's own keywords that mean nothing here are accepted."""
    with pytest.raises(RuntimeError, match="Unknown keyword argument.*num_cpu, object_store_mem"):
        hpcray.init(num_cpu=1, object_store_mem=1)
    assert not hpcray.is_initialized()
    hpcray.init(num_cpus=1, namespace="ns", include_dashboard=False, configure_logging=False,
                _temp_dir="/tmp/unused")
    try:
        assert hpcray.get(hpcray.put(7)) == 7
    finally:
        hpcray.shutdown()
