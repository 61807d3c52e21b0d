"""hpcray.util.multiprocessing.Pool (ray.util.multiprocessing.Pool): Python's Pool API on
actors. Each method, the errors a call raises, the close/terminate/join life cycle, the
initializer and maxtasksperchild, and a pool whose actors spread over a job's nodes (here
when the suite runs as a job of several ranks; always through the 3-rank program at the
end)."""

import functools
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import time

import pytest

import hpcray
from hpcray.exceptions import RayActorError
from hpcray.util.multiprocessing import Pool
from tests.multinode.test_multinode import run_mpi


def square(x):
    return x * x


def add(a, b=0, *, c=0):
    return a + b + c


def fail_on(bad, x):
    if x == bad:
        raise KeyError(f"bad item {x}")
    return x


def pid_and_node(_=None):
    return os.getpid(), hpcray.get_runtime_context().get_node_id()


def wait_for_file(path, value=None):
    # The test creates the file when it wants the call to end; the deadline only stops a
    # broken test from hanging.
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle this exception")


def raise_unpicklable(_):
    raise Unpicklable("local only")


INITIALIZED = []


def remember(path, tag):
    INITIALIZED.append(tag)
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def initialized(_=None):
    return list(INITIALIZED)


def ranks() -> int:
    return len(hpcray.nodes())


# ---------------------------------------------------------------- map, apply, imap
def test_map_starmap_apply(ray_shared):
    with Pool(2) as pool:
        assert pool.map(square, range(10)) == [x * x for x in range(10)]
        assert pool.map(square, (x for x in range(5)), chunksize=2) == [0, 1, 4, 9, 16]
        assert pool.map(square, []) == []
        assert pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        assert pool.apply(add, (1, 2)) == 3
        assert pool.apply(add, (1,), {"b": 2, "c": 3}) == 6
        assert pool.apply(add, (1,), kwargs={"c": 5}) == 6  # Ray's keyword
        assert pool.apply(functools.partial(add, 10), (1,)) == 11
        assert pool.apply(lambda: "lambda") == "lambda"


def test_processes_default_to_the_cluster_cpus(ray_shared):
    with Pool() as pool:
        assert repr(pool).endswith(f"pool_size={int(hpcray.cluster_resources()['CPU'])}>")


def test_apply_async_and_callbacks(ray_shared):
    with Pool(2) as pool:
        got = []
        result = pool.apply_async(add, (2, 3), callback=got.append)
        assert result.get(timeout=60) == 5
        assert got == [5]  # the callback ran before get() returned, as in Python
        assert result.ready() and result.successful()
        result = pool.map_async(square, range(4), callback=got.append)
        result.wait()
        assert result.ready() and got[-1] == [0, 1, 4, 9]
        assert pool.starmap_async(add, [(1, 1)], chunksize=1).get() == [2]
        errors = []
        result = pool.map_async(functools.partial(fail_on, 2), range(4), chunksize=1,
                                callback=got.append, error_callback=errors.append)
        with pytest.raises(KeyError, match="bad item 2"):
            result.get(timeout=60)
        assert not result.successful() and len(got) == 2
        assert isinstance(errors[0], KeyError)


def test_get_timeout_and_not_ready(ray_shared, tmp_path):
    release = tmp_path / "release"
    with Pool(1) as pool:
        result = pool.apply_async(wait_for_file, (str(release), "done"))
        with pytest.raises(multiprocessing.TimeoutError):
            result.get(timeout=0.1)
        assert not result.ready()
        with pytest.raises(ValueError, match="not ready"):
            result.successful()
        release.touch()
        assert result.get(timeout=60) == "done"


def test_a_failed_call_raises_its_own_exception_with_the_remote_traceback(ray_shared):
    with Pool(2) as pool:
        with pytest.raises(KeyError) as info:
            pool.map(functools.partial(fail_on, 7), range(10))
        assert not isinstance(info.value, hpcray.exceptions.RayError)
        assert isinstance(info.value.__cause__, multiprocessing.pool.RemoteTraceback)
        assert "fail_on" in str(info.value.__cause__)
        with pytest.raises(ZeroDivisionError):
            pool.apply(divmod, (1, 0))
        with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="local only"):
            pool.apply(raise_unpicklable, (1,))
        assert pool.map(square, [3]) == [9]  # the actors are fine


def test_imap_and_imap_unordered(ray_shared, tmp_path):
    with Pool(2) as pool:
        assert list(pool.imap(square, range(7))) == [x * x for x in range(7)]
        assert list(pool.imap(square, iter(range(7)), chunksize=3)) == [x * x for x in range(7)]
        assert sorted(pool.imap_unordered(square, range(7), chunksize=2)) == \
            sorted(x * x for x in range(7))
        assert list(pool.imap(square, [])) == []
        # A call that raised raises at its place; the iteration goes on.
        results = pool.imap(functools.partial(fail_on, 2), range(4))
        assert next(results) == 0 and next(results) == 1
        with pytest.raises(KeyError):
            next(results)
        assert list(results) == [3]
        # next(timeout)
        release = tmp_path / "release"
        results = pool.imap(functools.partial(wait_for_file, str(release)), range(2))
        with pytest.raises(multiprocessing.TimeoutError):
            results.next(timeout=0.1)
        release.touch()
        assert list(results) == [0, 1]


def test_imap_reads_its_input_lazily(ray_shared):
    taken = []

    def numbers():
        for i in range(10**6):
            taken.append(i)
            yield i

    with Pool(2) as pool:
        results = pool.imap(square, numbers())
        assert [next(results) for _ in range(3)] == [0, 1, 4]
        assert len(taken) < 100  # a window of chunks, not the million


# ---------------------------------------------------------------- life cycle
def test_calls_after_close_raise_value_error(ray_shared):
    pool = Pool(1)
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    pool.close()
    for call in (lambda: pool.map(square, [1]), lambda: pool.apply(square, (1,)),
                 lambda: pool.apply_async(square, (1,)), lambda: pool.map_async(square, [1]),
                 lambda: pool.starmap(add, [(1, 2)]), lambda: pool.imap(square, [1]),
                 lambda: pool.imap_unordered(square, [1]), lambda: pool.__enter__()):
        with pytest.raises(ValueError, match="Pool not running"):
            call()
    pool.join()


def test_close_lets_outstanding_work_finish(ray_shared, tmp_path):
    release = tmp_path / "release"
    pool = Pool(2)
    pid = pool.apply(os.getpid)
    waiting = pool.apply_async(wait_for_file, (str(release), "finished"))
    mapped = pool.map_async(square, range(20), chunksize=1)
    streamed = pool.imap(square, range(50))  # 2 chunks per actor sent so far
    pool.close()
    release.touch()
    pool.join()
    assert waiting.get(timeout=0) == "finished"
    assert mapped.get(timeout=0) == [x * x for x in range(20)]
    assert list(streamed) == [x * x for x in range(50)]
    assert _gone(pid)


def test_terminate_fails_pending_work_and_ends_the_actors(ray_shared, tmp_path):
    pool = Pool(1)
    pid = pool.apply(os.getpid)
    stuck = pool.apply_async(wait_for_file, (str(tmp_path / "never"),))
    queued = [pool.apply_async(square, (i,)) for i in range(4)]  # some in the backlog
    pool.terminate()
    pool.join()
    for result in [stuck, *queued]:
        with pytest.raises(RayActorError):
            result.get(timeout=60)
    assert _gone(pid)
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(square, [1])


def test_context_manager_terminates(ray_shared):
    with Pool(1) as pool:
        pid = pool.apply(os.getpid)
    with pytest.raises(ValueError):
        pool.apply(os.getpid)
    assert _gone(pid)


def test_a_pool_cannot_be_pickled(ray_shared):
    with Pool(1) as pool, pytest.raises(NotImplementedError):
        pickle.dumps(pool)


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 1"):
        Pool(0)
    with pytest.raises(ValueError, match="maxtasksperchild"):
        Pool(1, maxtasksperchild=0)
    with pytest.raises(TypeError, match="initializer"):
        Pool(1, initializer=3)


# ---------------------------------------------------------------- initializer, actors
def test_initializer_runs_once_per_actor(ray_shared, tmp_path):
    log = tmp_path / "init.log"
    with Pool(3, initializer=remember, initargs=(str(log), "ready")) as pool:
        seen = pool.map(initialized, range(12), chunksize=1)
        pids = {pid for pid, _ in pool.map(pid_and_node, range(12), chunksize=1)}
    assert seen == [["ready"]] * 12
    started = log.read_text().split()
    assert len(started) == 3 and set(map(int, started)) == pids


def test_maxtasksperchild_replaces_the_actor(ray_shared, tmp_path):
    log = tmp_path / "init.log"
    with Pool(1, initializer=remember, initargs=(str(log), "x"), maxtasksperchild=2) as pool:
        pids = [pid for pid, _ in pool.map(pid_and_node, range(6), chunksize=1)]
    assert len(set(pids)) == 3 and pids[0] == pids[1] != pids[2] == pids[3]
    assert len(log.read_text().split()) >= 3  # a 4th may have started


def test_an_initializer_that_raises_fails_the_pool(ray_shared):
    with pytest.raises(RayActorError):
        Pool(1, initializer=divmod, initargs=(1, 0))


def test_ray_remote_args_reach_the_actors(ray_shared):
    with Pool(2, ray_remote_args={"num_cpus": 1}) as pool:
        pool.map(square, range(4))
        assert hpcray.available_resources().get("CPU", 0) == \
            hpcray.cluster_resources()["CPU"] - 2


def test_the_work_lands_on_every_node(ray_shared):
    # On one node there is one; as a job of N ranks, the pool's actors spread over all N.
    processes = 2 * ranks()
    with Pool(processes) as pool:
        placed = pool.map(pid_and_node, range(4 * processes), chunksize=1)
    assert len({node for _, node in placed}) == ranks()
    assert len({pid for pid, _ in placed}) == processes


def _gone(pid: int, deadline_s: float = 30.0) -> bool:
    """Whether the process ended (the kill takes effect when its node gets to it)."""
    import psutil
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------- a script's own functions
# Functions of the driver's script reach the actors by value: what the initializer sets
# in the script's globals is seen by the functions mapped later (Ray's pool cannot).
PROGRAM = """
    import collections, multiprocessing, hpcray as ray
    from ray.util.multiprocessing import Pool

    def setup(offset):
        global OFFSET
        OFFSET = offset

    def shifted(x):
        return helper(x) + OFFSET

    def helper(x):
        return x * SCALE

    def where(_):
        return ray.get_runtime_context().get_node_id()

    SCALE = 2
    with Pool(initializer=setup, initargs=(100,)) as pool:
        print("shifted", pool.map(shifted, range(4)))
        SCALE = 3  # the driver's change is seen, as in Ray
        print("shifted", pool.map(shifted, range(4)))
        try:
            pool.apply(lambda: 1 / 0)
        except ZeroDivisionError:
            print("ZeroDivisionError")
        nodes = collections.Counter(pool.map(where, range(60), chunksize=1))
        print("nodes", len(nodes), "cpus", int(ray.cluster_resources()["CPU"]))
    print("OK")
"""


def _pythonpath() -> str:
    """The shim first, so that the program's `from ray.util...` is hpcray's."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.pathsep.join([os.path.join(here, "doc_programs", "shim"), os.path.dirname(here),
                            os.environ.get("PYTHONPATH", "")])


@pytest.mark.timeout(120)
def test_a_script_pool_on_one_node(tmp_path):
    (tmp_path / "driver.py").write_text(textwrap.dedent(PROGRAM))
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    proc = subprocess.run([sys.executable, "driver.py"], capture_output=True, text=True,
                          timeout=100, cwd=tmp_path, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "OK" in proc.stdout, out
    assert "shifted [100, 102, 104, 106]\nshifted [100, 103, 106, 109]" in out, out
    assert "ZeroDivisionError" in out and "nodes 1" in out, out


@pytest.mark.multinode
@pytest.mark.timeout(200)
def test_a_script_pool_on_three_ranks_uses_every_rank(tmp_path):
    out = run_mpi(tmp_path, 3, PROGRAM, env={"PYTHONPATH": _pythonpath()})
    assert "OK" in out and "shifted [100, 103, 106, 109]" in out, out
    assert "nodes 3" in out, out
