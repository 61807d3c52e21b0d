"""Progress while a job runs: hpcray.util.progress / as_completed (util/progress_bar.py)
and HPCRAY_STATUS_INTERVAL's status line (runtime/status.py).

Each case runs a real driver in a subprocess. What it shows depends on time, so the
tests never race it: a task waits for a file that the test (or the driver) creates only
after it has read the line it waits for.
"""

import fcntl
import importlib.util
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time

import pytest

import hpcray

from tests.multinode.test_multinode import MPIEXEC, segment_leaks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GATED = '''
import os, sys, time
import hpcray

@hpcray.remote
def gated(i, gate):
    if gate:
        while not os.path.exists(gate):
            time.sleep(0.01)
    return i * i
'''


_started: list = []


@pytest.fixture(autouse=True)
def _no_driver_left():
    """A test that fails while reading leaves no driver running."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _start(tmp_path, body: str, env=None, stderr=subprocess.PIPE, argv=None):
    script = tmp_path / "driver.py"
    script.write_text(GATED + textwrap.dedent(body))
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    full_env = dict(os.environ, PYTHONPATH=path, **(env or {}))
    proc = subprocess.Popen(argv or [sys.executable, str(script)], cwd=str(tmp_path),
                            env=full_env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            start_new_session=True)
    _started.append(proc)
    return proc


def _read_until(stream, pattern: str, seen: list, timeout: float = 60.0) -> str:
    """Read lines of `stream` into `seen` until one matches `pattern`; that line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line.rstrip("\n"))
        if re.search(pattern, line):
            return line
    pytest.fail(f"no line matching {pattern!r}; read:\n" + "\n".join(seen))


def _finish(proc, timeout: float = 60.0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out + (err or "")
    return out, err or ""


@pytest.mark.timeout(120)
def test_progress_prints_plain_lines_when_not_a_terminal(tmp_path):
    gate = tmp_path / "gate"
    proc = _start(tmp_path, f'''
        refs = [gated.remote(i, None) for i in range(5)] + [gated.remote(5, {str(gate)!r})]
        print(hpcray.util.progress(refs, desc="squares", interval=0.1))
        hpcray.shutdown()
    ''')
    seen: list = []
    _read_until(proc.stderr, r"^squares: 5/6 done, [\d.]+ s$", seen)
    gate.touch()  # only now can the last one finish
    out, err = _finish(proc)
    assert out.strip() == "[0, 1, 4, 9, 16, 25]"
    lines = seen + err.splitlines()
    counts = [int(m.group(1)) for m in map(re.compile(r"^squares: (\d)/6 done").match, lines)
              if m]
    assert counts == sorted(counts) and counts[-1] == 6, lines
    assert lines[-1].startswith("squares: 6/6 done")


@pytest.mark.timeout(120)
def test_as_completed_yields_each_ref_when_it_is_ready(tmp_path):
    gate = tmp_path / "gate"
    proc = _start(tmp_path, f'''
        slow = gated.remote(1, {str(gate)!r})
        quick = gated.remote(2, None)
        order = []
        for ref in hpcray.util.as_completed([slow, quick], desc="two", interval=60):
            order.append(hpcray.get(ref))
            open({str(gate)!r}, "w").close()  # the slow one may finish now, not before
        print(order)
        hpcray.shutdown()
    ''')
    out, err = _finish(proc)
    assert out.strip() == "[4, 1]"
    assert err.splitlines()[-1].startswith("two: 2/2 done")


@pytest.mark.timeout(120)
def test_progress_raises_the_first_error_as_get(tmp_path):
    proc = _start(tmp_path, '''
        @hpcray.remote
        def fails():
            raise KeyError("no")
        try:
            hpcray.util.progress([gated.remote(1, None), fails.remote()], interval=60)
        except KeyError:
            print("RAISED")
        print(hpcray.util.progress(gated.remote(3, None)))
        hpcray.shutdown()
    ''')
    out, err = _finish(proc)
    assert out.split() == ["RAISED", "9"]
    assert "progress: 2/2 done" in err


def _run_on_a_terminal(tmp_path, body: str, env=None) -> str:
    """Run a driver whose stderr is a pseudo-terminal; what it wrote there."""
    ours, theirs = pty.openpty()
    # 100 columns, 30 rows: a fresh pseudo-terminal has none, and tqdm draws to its width.
    fcntl.ioctl(theirs, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = _start(tmp_path, body, env=env, stderr=theirs)
    os.close(theirs)
    chunks = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        ready, _, _ = select.select([ours], [], [], 1.0)
        if ready:
            try:
                data = os.read(ours, 65536)
            except OSError:  # the other side closed
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(ours)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.timeout(120)
def test_progress_draws_a_tqdm_bar_on_a_terminal(tmp_path):
    if importlib.util.find_spec("tqdm") is None:
        pytest.skip("tqdm is not installed (pip install tqdm, or the test extra)")
    shown = _run_on_a_terminal(tmp_path, '''
        print(hpcray.util.progress([gated.remote(i, None) for i in range(3)], desc="bar"))
        hpcray.shutdown()
    ''')
    assert re.search(r"bar: 100%\|[^|]*\| 3/3", shown), shown
    assert "done," not in shown  # no plain lines


@pytest.mark.timeout(120)
def test_progress_without_tqdm_prints_plain_lines_on_a_terminal(tmp_path):
    shown = _run_on_a_terminal(tmp_path, '''
        sys.modules["tqdm"] = None  # as if it were not installed: importing it fails
        print(hpcray.util.progress([gated.remote(i, None) for i in range(3)], desc="plain"))
        hpcray.shutdown()
    ''')
    assert re.search(r"plain: 3/3 done, [\d.]+ s", shown), shown


@pytest.mark.timeout(120)
def test_status_line_every_interval(tmp_path):
    gate, end = tmp_path / "gate", tmp_path / "end"
    proc = _start(tmp_path, f'''
        hpcray.init(num_cpus=1)
        done = hpcray.get(gated.remote(0, None))
        refs = [gated.remote(i, {str(gate)!r}) for i in range(1, 4)]
        print(hpcray.get(refs))
        while not os.path.exists({str(end)!r}):  # until the test saw the last line
            time.sleep(0.01)
        hpcray.shutdown()
    ''', env={"HPCRAY_STATUS_INTERVAL": "0.2"})
    seen: list = []
    line = _read_until(proc.stderr, r"tasks 1 done, 1 running, 2 queued", seen)
    assert re.match(r"^hpcray status \+[\d.]+s: tasks 1 done, 1 running, 2 queued \| CPU 1/1 "
                    r"\| store [\d.]+ \w?B of [\d.]+ \w+ \| moved 0 B, 0 pulls$", line), line
    gate.touch()
    _read_until(proc.stderr, r"tasks 4 done, 0 running, 0 queued \| CPU 0/1", seen)
    end.touch()
    out, _ = _finish(proc)
    assert out.strip() == "[1, 4, 9]"


def test_no_status_thread_when_unset(ray_start):
    assert not os.environ.get("HPCRAY_STATUS_INTERVAL")
    assert not [t for t in threading.enumerate() if t.name == "hpcray-status"]
    assert hpcray.util.progress([hpcray.put(1)]) == [1]


@pytest.mark.multinode
@pytest.mark.timeout(200)
def test_status_line_of_a_three_rank_job(tmp_path):
    gate = tmp_path / "gate"
    script = tmp_path / "driver.py"
    before = set(os.listdir("/dev/shm"))
    proc = _start(tmp_path, f'''
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        hpcray.init(num_cpus=1)
        ids = {{n["rank"]: n["NodeID"] for n in hpcray.nodes()}}
        refs = [gated.options(scheduling_strategy=On(ids[rank], soft=False)).remote(rank,
                {str(gate)!r}) for rank in (1, 2)]
        print(hpcray.get(refs))
        hpcray.shutdown()
    ''', env={"HPCRAY_STATUS_INTERVAL": "0.2"},
        argv=[str(MPIEXEC), "-n", "3", sys.executable, "-m", "hpcray", str(script)])
    seen: list = []
    line = _read_until(proc.stderr, r"node 1: 1/1 CPU.*node 2: 1/1 CPU", seen, timeout=120)
    assert "tasks 0 done, 2 running" in line and "node 0: 0/1 CPU" in line, line
    gate.touch()
    out, _ = _finish(proc, timeout=120)
    assert out.strip() == "[1, 4]"
    assert not segment_leaks(before)
