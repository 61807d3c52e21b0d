"""A job drained by a signal on one node (`python app.py`): runtime/drain.py. The
mpiexec cases are in tests/multinode/test_signals.py."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import hpcray
from hpcray.config import drain_signals

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

APP = textwrap.dedent("""
    import os, sys, time
    import hpcray as ray

    here = sys.argv[1]
    ray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024)

    @ray.remote
    def step(i, here=here):
        open(os.path.join(here, "started", str(os.getpid()) + "-" + str(i)), "w").close()
        while not os.path.exists(os.path.join(here, "release")):
            time.sleep(0.01)
        return i

    ray.util.on_drain(lambda signum: open(os.path.join(here, "callback"), "w").close())
    refs = [step.remote(i) for i in range(6)]
    while len(os.listdir(os.path.join(here, "started"))) < 2:
        time.sleep(0.01)
    print("RUNNING", ray.context.driver_node.store_name, flush=True)
    try:
        ray.get(refs)
    finally:
        print("finally ran", ray.util.draining(), flush=True)
""")


def _start(tmp_path, env=None):
    (tmp_path / "started").mkdir()
    app = tmp_path / "app.py"
    app.write_text(APP)
    proc = subprocess.Popen([sys.executable, str(app), str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))
    line = proc.stdout.readline()
    assert line.startswith("RUNNING"), proc.communicate()
    return proc, line.split()[1], psutil.Process(proc.pid).children(recursive=True)


def _end(proc, store, children):
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the driver did not end: {err}")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(c.is_running() and c.status() != "zombie"
                                              for c in children):
        time.sleep(0.05)
    assert not [c.pid for c in children if c.is_running() and c.status() != "zombie"]
    assert not os.path.exists("/dev/shm/" + store.lstrip("/"))
    return proc.returncode, out, err


@pytest.mark.timeout(90)
def test_usr1_on_one_node_lets_running_tasks_finish_then_ends_the_program(tmp_path):
    proc, store, children = _start(tmp_path)
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while not (tmp_path / "callback").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    (tmp_path / "release").touch()
    code, out, err = _end(proc, store, children)
    assert code == 0, err
    assert "finally ran True" in out
    assert "hpcray: drained in" in err, err
    assert len(os.listdir(tmp_path / "started")) == 2  # the 4 waiting never started


@pytest.mark.timeout(90)
def test_no_drain_signal_leaves_usr1_alone(tmp_path):
    # HPCRAY_DRAIN_SIGNALS=none: SIGUSR1 keeps its default action (the process ends).
    proc, store, children = _start(tmp_path, {"HPCRAY_DRAIN_SIGNALS": "none"})
    proc.send_signal(signal.SIGUSR1)
    try:
        assert proc.wait(timeout=60) == -signal.SIGUSR1
    finally:
        proc.kill()
        proc.communicate()
    # The fork server, left without its driver, ends the workers and removes the store.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and os.path.exists("/dev/shm/" + store.lstrip("/")):
        time.sleep(0.05)
    assert not os.path.exists("/dev/shm/" + store.lstrip("/"))


def test_drain_signals_are_read_from_the_environment():
    assert drain_signals({}) == [signal.SIGUSR1]
    assert drain_signals({"HPCRAY_DRAIN_SIGNALS": "usr1, SIGTERM"}) == [signal.SIGUSR1,
                                                                        signal.SIGTERM]
    assert drain_signals({"HPCRAY_DRAIN_SIGNALS": "none"}) == []
    with pytest.raises(ValueError, match="'HUP2' is not a signal"):
        drain_signals({"HPCRAY_DRAIN_SIGNALS": "HUP2"})
    with pytest.raises(ValueError, match="cannot drain"):
        drain_signals({"HPCRAY_DRAIN_SIGNALS": "INT"})
    with pytest.raises(TypeError):
        hpcray.util.on_drain("not a function")
