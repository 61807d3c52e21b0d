"""What tasks and actors print reaches the driver's stdout/stderr, prefixed as Ray does.

Each case runs a driver script in a subprocess and reads what it wrote.
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = textwrap.dedent('''
    import os, sys
    import hpcray
''')


def _run(tmp_path, body: str, timeout: float = 45.0):
    script = tmp_path / "driver.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"driver failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout, proc.stderr


def _lines(text: str) -> list:
    return text.splitlines()


@pytest.mark.timeout(60)
def test_task_print_reaches_driver_stdout(tmp_path):
    out, err = _run(tmp_path, '''
        hpcray.init(num_cpus=2)

        @hpcray.remote
        def hello():
            print("hello")
            return os.getpid()

        pid = hpcray.get(hello.remote())
        hpcray.shutdown()
        print(f"WORKER={pid}")
    ''')
    pid = int(re.search(r"^WORKER=(\d+)$", out, re.M).group(1))
    assert f"(pid={pid}) hello" in _lines(out)
    assert "hello" not in err


@pytest.mark.timeout(60)
def test_task_stderr_reaches_driver_stderr(tmp_path):
    out, err = _run(tmp_path, '''
        hpcray.init(num_cpus=2)

        @hpcray.remote
        def complain():
            print("something went wrong", file=sys.stderr)
            return os.getpid()

        pid = hpcray.get(complain.remote())
        hpcray.shutdown()
        print(f"WORKER={pid}")
    ''')
    pid = int(re.search(r"^WORKER=(\d+)$", out, re.M).group(1))
    assert f"(pid={pid}) something went wrong" in _lines(err)
    assert "something went wrong" not in out


@pytest.mark.timeout(60)
def test_actor_print_prefixed_with_class_name(tmp_path):
    out, err = _run(tmp_path, '''
        hpcray.init(num_cpus=2)

        @hpcray.remote
        class Counter:
            def __init__(self):
                print("constructed")
                self.n = 0

            def incr(self):
                self.n += 1
                print(f"count is {self.n}")
                print(f"warn {self.n}", file=sys.stderr)
                return os.getpid()

        c = Counter.remote()
        hpcray.get(c.incr.remote())
        pid = hpcray.get(c.incr.remote())
        hpcray.shutdown()
        print(f"ACTOR={pid}")
    ''')
    pid = int(re.search(r"^ACTOR=(\d+)$", out, re.M).group(1))
    lines = _lines(out)
    assert f"(Counter pid={pid}) constructed" in lines
    assert f"(Counter pid={pid}) count is 1" in lines
    assert f"(Counter pid={pid}) count is 2" in lines
    assert lines.index(f"(Counter pid={pid}) count is 1") < \
        lines.index(f"(Counter pid={pid}) count is 2")
    assert f"(Counter pid={pid}) warn 2" in _lines(err)


@pytest.mark.timeout(60)
def test_many_lines_arrive_whole_and_in_order(tmp_path):
    out, _ = _run(tmp_path, '''
        hpcray.init(num_cpus=2)

        @hpcray.remote
        def chatty(tag):
            for i in range(300):
                print(f"{tag} line {i} " + "x" * 200)
            return os.getpid()

        pids = hpcray.get([chatty.remote("a"), chatty.remote("b")])
        hpcray.shutdown()
        print("PIDS=" + ",".join(map(str, pids)))
    ''')
    pids = [int(p) for p in re.search(r"^PIDS=([\d,]+)$", out, re.M).group(1).split(",")]
    lines = _lines(out)
    for tag, pid in zip("ab", pids):
        mine = [line for line in lines if line.startswith(f"(pid={pid}) {tag} line ")]
        assert mine == [f"(pid={pid}) {tag} line {i} " + "x" * 200 for i in range(300)]


@pytest.mark.timeout(60)
def test_output_of_nested_task_and_before_driver_exit(tmp_path):
    out, _ = _run(tmp_path, '''
        hpcray.init(num_cpus=2)

        @hpcray.remote
        def inner():
            print("from inner")
            return os.getpid()

        @hpcray.remote
        def outer():
            print("from outer")
            return os.getpid(), hpcray.get(inner.remote())

        outer_pid, inner_pid = hpcray.get(outer.remote())
        print(f"PIDS={outer_pid},{inner_pid}")
        # No explicit shutdown: the exit path must still deliver what was printed.
    ''')
    outer_pid, inner_pid = map(int, re.search(r"^PIDS=(\d+),(\d+)$", out, re.M).groups())
    lines = _lines(out)
    assert f"(pid={outer_pid}) from outer" in lines
    assert f"(pid={inner_pid}) from inner" in lines


@pytest.mark.timeout(60)
def test_log_to_driver_false_silences_workers(tmp_path):
    out, err = _run(tmp_path, '''
        hpcray.init(num_cpus=2, log_to_driver=False)

        @hpcray.remote
        def noisy():
            print("should not appear")
            print("nor this", file=sys.stderr)
            return 1

        assert hpcray.get(noisy.remote()) == 1
        hpcray.shutdown()
        print("DONE")
    ''')
    assert "DONE" in out
    assert "should not appear" not in out
    assert "nor this" not in err
