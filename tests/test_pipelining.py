"""A short task sent to a busy worker to run after its current one (pipelining,
_scheduler.pyx), and what must still hold when that worker's task is cancelled, blocks
in `get` or dies.

One node with one CPU, so the second task can only wait behind the first; both
functions ran once before (a function is pipelined once its last run was short:
HPCRAY_PIPELINE_TASK_MS, set huge here so that the warm-up counts however loaded the
machine is). The test looks into the driver's node to see the task pipelined before it
acts; the running task waits for a file, never for a timer.
"""

import os
import signal
import time

import pytest

import hpcray as ray
from hpcray import context
from hpcray.exceptions import TaskCancelledError, WorkerCrashedError

pytestmark = [pytest.mark.timeout(120), pytest.mark.one_node]


@pytest.fixture
def one_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("HPCRAY_PIPELINE_TASK_MS", "1e9")
    ray.init(num_cpus=1, num_gpus=0, object_store_memory=128 * 1024 * 1024)
    try:
        ray.get([hold.remote(None), short.remote(0)])  # each function ran once
        yield tmp_path
    finally:
        ray.shutdown()


@ray.remote(max_retries=0)
def hold(path, die=False):
    """Runs until `path` exists (None: returns at once); `die`: then kills its worker."""
    while path is not None and not os.path.exists(path):
        time.sleep(0.005)
    if die:
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


@ray.remote(max_retries=0)
def short(value):
    return value, os.getpid()


@ray.remote
def get_from(box, path):
    """Once `path` exists (None: at once), blocks in get: for the ref the box holds, then
    for that ref's value."""
    while path is not None and not os.path.exists(path):
        time.sleep(0.005)
    (ref,) = ray.get(box.take.remote())
    return ray.get(ref)


@ray.remote(num_cpus=0)
class Box:
    def __init__(self):
        self.refs = None

    def put(self, refs):
        self.refs = refs

    def take(self):
        while self.refs is None:
            time.sleep(0.005)
        return self.refs


def pipelined_ids(timeout=30.0) -> set:
    """The tasks the driver's node has pipelined to a busy worker, once there is one."""
    node = context.client.nm
    deadline = time.monotonic() + timeout
    while True:
        with node.lock:
            pipelined = {task_key for waiting in node.scheduler.pipelined.values()
                         for task_key, _ in waiting}
        if pipelined or time.monotonic() > deadline:
            return pipelined
        time.sleep(0.005)


def task_id(ref) -> bytes:
    return ref.binary()[:16]


def test_a_short_task_waits_in_the_busy_worker_and_runs_there_next(one_cpu):
    release = one_cpu / "release"
    first = hold.remote(str(release))
    second = short.remote(7)
    assert pipelined_ids() == {task_id(second)}
    release.touch()
    pid = ray.get(first)
    assert ray.get(second) == (7, pid)


def test_several_short_tasks_wait_in_the_busy_worker_and_run_there_in_order(one_cpu):
    # HPCRAY_PIPELINE_DEPTH (4 by default): the fifth waits in the node's queue.
    release = one_cpu / "release"
    first = hold.remote(str(release))
    shorts = [short.remote(i) for i in range(5)]
    deadline = time.monotonic() + 30
    while len(pipelined_ids()) < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert pipelined_ids() == {task_id(ref) for ref in shorts[:4]}
    release.touch()
    pid = ray.get(first)
    assert ray.get(shorts) == [(i, pid) for i in range(5)]


def test_a_task_of_unknown_length_is_not_pipelined(one_cpu):
    @ray.remote
    def never_ran():
        return os.getpid()

    release = one_cpu / "release"
    first = hold.remote(str(release))
    second = never_ran.remote()
    assert pipelined_ids(timeout=0.5) == set()
    release.touch()
    assert ray.get(first) and ray.get(second)


@pytest.mark.parametrize("force", [False, True])
def test_cancelling_the_pipelined_task_leaves_the_running_one(one_cpu, force):
    release = one_cpu / "release"
    first = hold.remote(str(release))
    second = short.remote(1)
    assert pipelined_ids() == {task_id(second)}
    ray.cancel(second, force=force)  # force: not a kill, which would end `first`
    release.touch()
    pid = ray.get(first)
    with pytest.raises(TaskCancelledError):
        ray.get(second)
    assert ray.get(short.remote(2)) == (2, pid)  # the same worker goes on


def test_a_worker_that_dies_gives_its_pipelined_tasks_to_the_next_one(one_cpu):
    release = one_cpu / "release"
    first = hold.remote(str(release), die=True)
    # max_retries=0: they never ran, so they are not retried
    shorts = [short.remote(i) for i in range(3)]
    deadline = time.monotonic() + 30
    while len(pipelined_ids()) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert pipelined_ids() == {task_id(ref) for ref in shorts}
    release.touch()
    with pytest.raises(WorkerCrashedError):
        ray.get(first)
    got = ray.get(shorts)
    assert [value for value, _ in got] == [0, 1, 2]
    assert len({pid for _, pid in got}) == 1 and got[0][1] != os.getpid()


def test_a_task_blocked_in_get_gives_back_the_task_pipelined_to_it(one_cpu):
    # Without the give-back this deadlocks: `waiter` waits for `second`'s value, and
    # `second` waits in waiter's worker until waiter ends.
    warm = Box.remote()
    warm.put.remote([short.remote(0)])
    ray.get(get_from.remote(warm, None))  # get_from has run once
    release, box = one_cpu / "release", Box.remote()
    waiter = get_from.remote(box, str(release))
    before = short.remote(4)
    second = short.remote(5)  # behind `before`: both are given back
    deadline = time.monotonic() + 30
    while len(pipelined_ids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert pipelined_ids() == {task_id(before), task_id(second)}
    box.put.remote([second])
    release.touch()
    assert ray.get(waiter, timeout=60)[0] == 5
    assert ray.get(before)[0] == 4
