"""The fork server killed while the node runs (worker_processes.py, `_forkserver_died`).

Its workers die with it (their parent-death signal). Before, the node went on without a
fork server: every worker it asked for failed with a broken pipe inside the event loop,
and every task that needed one waited forever. Now another fork server takes its place:
the running task is retried, the actor restarts, new tasks run, and what the dead
workers had started is killed. One that keeps dying is not replaced for ever: the tasks
waiting for a worker then fail, saying why, and the runtime still shuts down cleanly.
"""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

import hpcray
from hpcray.exceptions import WorkerCrashedError


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def _kill_forkserver() -> int:
    processes = hpcray.context.driver_node.processes
    pid = processes.forkserver.pid
    os.kill(pid, signal.SIGKILL)
    assert _wait(lambda: processes.forkserver.pid != pid or processes.forkserver_gone), \
        "the node did not notice its fork server's death"
    return pid


@hpcray.remote
def plus_one(x):
    return x + 1


def test_a_killed_fork_server_is_replaced_and_the_work_goes_on(ray_start, tmp_path):
    @hpcray.remote(max_retries=1)
    def slow(marker):
        open(marker, "a").close()
        time.sleep(2 if os.path.exists(marker + ".again") else 600)
        open(marker + ".again", "a").close()  # the first run never gets here
        return os.getpid()

    @hpcray.remote(max_restarts=1, max_task_retries=1)
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self):
            self.n += 1
            return self.n

        def spawn(self):
            return subprocess.Popen(["sleep", "600"]).pid

    counter = Counter.remote()
    assert hpcray.get([counter.add.remote() for _ in range(3)], timeout=30) == [1, 2, 3]
    child = hpcray.get(counter.spawn.remote(), timeout=30)
    marker = str(tmp_path / "started")
    running = slow.remote(marker)
    assert _wait(lambda: os.path.exists(marker)), "the task never started"
    open(marker + ".again", "a").close()  # its retry sleeps briefly
    first_worker = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        old = _kill_forkserver()
        node = hpcray.context.driver_node
        assert node.processes.forkserver.pid != old and node.processes.forkserver_gone is None

        # The running task died with its worker: its retry runs on a new one.
        assert hpcray.get(running, timeout=60) not in first_worker
        # The actor restarted (its state is new), and what it had started is gone.
        assert hpcray.get(counter.add.remote(), timeout=60) == 1
        assert _wait(lambda: _gone(child)), "the dead actor's child outlived it"
        assert hpcray.get([plus_one.remote(i) for i in range(8)], timeout=60) == list(range(1, 9))
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_fork_server_that_keeps_dying_fails_the_waiting_tasks(ray_start):
    node = hpcray.context.driver_node
    deaths = node.processes._SERVER_DEATHS
    for _ in range(deaths - 1):
        _kill_forkserver()
        assert node.processes.forkserver_gone is None
        assert hpcray.get(plus_one.remote(1), timeout=60) == 2  # a new server forked it
    _kill_forkserver()
    assert node.processes.forkserver_gone is not None

    # No worker can start now: the task fails (it does not wait for ever), saying why.
    with pytest.raises(WorkerCrashedError, match="fork server died"):
        hpcray.get(plus_one.remote(1), timeout=60)
    with pytest.raises(WorkerCrashedError, match="fork server died"):
        hpcray.get(plus_one.remote(2), timeout=60)
    # ray_start's shutdown then checks that no segment is left behind.


def test_a_killed_fork_server_leaves_nothing_behind_a_killed_driver(tmp_path):
    """The replacement is the node's undertaker: SIGKILL the driver after the first fork
    server died, and no worker, fork server or store segment survives it."""
    script = tmp_path / "driver.py"
    script.write_text(
        "import json, os, signal, sys, time\n"
        "import hpcray\n"
        "hpcray.init(num_cpus=1)\n"
        "@hpcray.remote\n"
        "def pid():\n"
        "    return os.getpid()\n"
        "node = hpcray.context.driver_node\n"
        "first = node.processes.forkserver.pid\n"
        "os.kill(first, signal.SIGKILL)\n"
        "worker = hpcray.get(pid.remote(), timeout=60)\n"
        "print(json.dumps({'forkserver': node.processes.forkserver.pid, 'first': first,\n"
        "                  'worker': worker, 'store': node.store_name}), flush=True)\n"
        "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, "the driver printed nothing"
        info = json.loads(line)
        assert info["forkserver"] != info["first"]
        proc.kill()
        proc.wait(timeout=30)
        segment = os.path.join("/dev/shm", info["store"].lstrip("/"))
        assert _wait(lambda: _gone(info["forkserver"]) and _gone(info["worker"])), \
            "the fork server or its worker outlived the killed driver"
        assert _wait(lambda: not os.path.exists(segment)), "the store segment outlived it"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
