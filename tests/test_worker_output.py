"""What tasks and actors print reaches the driver's stdout/stderr, prefixed as Ray does.

Each case runs a driver script in a subprocess and reads what it wrote.
"""

import os
import re
import subprocess
import sys
import textwrap

import psutil
import pytest

import hpcray

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
    assert f"(hello pid={pid}) hello" in _lines(out)
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
    assert f"(complain pid={pid}) something went wrong" in _lines(err)
    assert "something went wrong" not in out


@pytest.mark.timeout(60)
def test_each_line_is_named_by_the_task_that_wrote_it(tmp_path):
    # As Ray: (f pid=N). One worker runs three tasks in turn; the node reads its pipe at its
    # own pace, so only the worker can say which task wrote a line.
    out, err = _run(tmp_path, '''
        hpcray.init(num_cpus=1)

        @hpcray.remote
        def first(last):
            print("one")
            print("unended", end="")  # the next task ends this line
            print("to stderr", file=sys.stderr)
            return os.getpid()

        @hpcray.remote
        def second():
            print(" and ended")
            print("two")
            return os.getpid()

        pids = {hpcray.get(first.remote(False)), hpcray.get(second.remote()),
                hpcray.get(second.options(name="renamed").remote())}
        hpcray.shutdown()
        print("PIDS=" + ",".join(map(str, pids)))
    ''')
    (pid,) = map(int, re.search(r"^PIDS=([\d,]+)$", out, re.M).group(1).split(","))
    lines = [line for line in _lines(out) if line.startswith("(")]
    assert lines == [f"(first pid={pid}) one", f"(first pid={pid}) unended and ended",
                     f"(second pid={pid}) two", f"(renamed pid={pid})  and ended",
                     f"(renamed pid={pid}) two"], out
    assert f"(first pid={pid}) to stderr" in _lines(err)
    assert ":task_name:" not in out + err


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
def test_actor_prefix_is_its_repr_once_constructed(tmp_path):
    # Ray's actor-repr.py: a class that defines __repr__ names its actor's lines by the
    # instance's repr, taken once its constructor ran; what the constructor printed, and
    # a class without __repr__, keep the class name. A restarted actor's constructor
    # prints under the class name again.
    out, _ = _run(tmp_path, '''
        hpcray.init(num_cpus=2)

        @hpcray.remote(max_restarts=1, max_task_retries=0)
        class Tagged:
            def __init__(self, index):
                print(f"constructing {index}")
                self.index = index

            def __repr__(self):
                return f"Tagged(index={self.index})"

            def hello(self):
                print(f"hello from {self.index}")
                return os.getpid()

            def die(self):
                os._exit(1)

        @hpcray.remote
        class Plain:
            def hello(self):
                print("plain hello")
                return os.getpid()

        a, b, p = Tagged.remote(1), Tagged.remote(2), Plain.remote()
        pa, pb, pp = hpcray.get([a.hello.remote(), b.hello.remote(), p.hello.remote()])
        try:
            hpcray.get(a.die.remote())
        except hpcray.exceptions.RayActorError:
            pass
        pa2 = hpcray.get(a.hello.remote())
        hpcray.shutdown()
        print(f"PIDS={pa},{pb},{pp},{pa2}")
    ''')
    pa, pb, pp, pa2 = map(int, re.search(r"^PIDS=(\d+),(\d+),(\d+),(\d+)$", out, re.M).groups())
    lines = _lines(out)
    assert f"(Tagged pid={pa}) constructing 1" in lines, out
    assert f"(Tagged(index=1) pid={pa}) hello from 1" in lines, out
    assert f"(Tagged(index=2) pid={pb}) hello from 2" in lines, out
    assert f"(Plain pid={pp}) plain hello" in lines, out
    assert pa2 != pa
    assert f"(Tagged pid={pa2}) constructing 1" in lines, out
    assert f"(Tagged(index=1) pid={pa2}) hello from 1" in lines, out


@pytest.mark.multinode
@pytest.mark.timeout(200)
def test_actor_repr_prefix_on_another_rank(tmp_path):
    from tests.multinode.test_multinode import run_mpi
    out = run_mpi(tmp_path, 3, """
        import os
        import hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        @ray.remote
        class Tagged:
            def __init__(self, index):
                self.index = index
            def __repr__(self):
                return f"Tagged(index={self.index})"
            def hello(self):
                print(f"hello from {self.index}", flush=True)
                return os.getpid()
        far = Tagged.options(scheduling_strategy=On(ids[1], soft=False)).remote(7)
        pid = ray.get(far.hello.remote())
        ray.shutdown()
        print(f"PID={pid}")
    """)
    pid = int(re.search(r"^PID=(\d+)$", out, re.M).group(1))
    assert f"(Tagged(index=7) pid={pid}, rank=1) hello from 7" in _lines(out), out


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
        mine = [line for line in lines if line.startswith(f"(chatty pid={pid}) {tag} line ")]
        assert mine == [f"(chatty pid={pid}) {tag} line {i} " + "x" * 200 for i in range(300)]


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
    assert f"(outer pid={outer_pid}) from outer" in lines
    assert f"(inner pid={inner_pid}) from inner" in lines


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


@pytest.mark.timeout(60)
def test_a_worker_is_titled_by_what_it_runs(ray_start):
    """Ray's process titles (its miscellaneous page asserts, in a task named special_f,
    `psutil.Process().cmdline()[0] == "ray::special_f"`): the task or actor method while
    it runs, `ray::IDLE` or the actor's class between calls; the fork server's arguments
    stay after the title, so ps still tells hpcray's workers."""

    @hpcray.remote
    def title():
        return psutil.Process().cmdline()[0], os.getpid()

    @hpcray.remote
    class Titled:
        def title(self):
            return psutil.Process().cmdline()[0], os.getpid()

    # A task's default name is its function's qualified name, as in its log lines.
    assert hpcray.get(title.remote())[0] == \
        "ray::test_a_worker_is_titled_by_what_it_runs.<locals>.title"
    name, pid = hpcray.get(title.options(name="special_f").remote())
    assert name == "ray::special_f"
    assert psutil.Process(pid).cmdline()[:3] == ["ray::IDLE", "-m", "hpcray.runtime.forkserver"]
    actor = Titled.remote()
    name, pid = hpcray.get(actor.title.remote())
    assert name == "ray::Titled.title"
    assert psutil.Process(pid).cmdline()[0] == "ray::Titled"
    assert hpcray.get(actor.title.options(name="custom").remote())[0] == "ray::custom"


def test_a_worker_flushes_its_streams_after_a_task_only_when_used():
    """task_output.TaskNamedStream: a worker flushes after each task only what a task
    may have left in the stream's buffer: written through it, or reached around it (its
    `.buffer`); a task that printed nothing costs no flush."""
    import io

    from hpcray.runtime.task_output import CurrentTask, TaskNamedStream

    class Counted(io.TextIOWrapper):
        flushes = 0

        def flush(self):
            Counted.flushes += 1
            super().flush()

    raw = io.BytesIO()
    stream = TaskNamedStream(Counted(raw, encoding="utf-8"), CurrentTask())
    stream.flush_if_written()
    assert Counted.flushes == 0
    stream.write("a line\n")
    assert raw.getvalue() == b""                 # still in the text buffer
    stream.flush_if_written()
    assert raw.getvalue() == b"a line\n" and Counted.flushes == 1
    stream.flush_if_written()
    assert Counted.flushes == 1
    stream.buffer.write(b"around it\n")          # the binary buffer under the text layer
    stream.flush_if_written()
    assert raw.getvalue() == b"a line\naround it\n" and Counted.flushes == 2
