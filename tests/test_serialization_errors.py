"""Everything a driver ships goes through cloudpickle, and what cannot travel fails the
task that needed it, never the worker.

Each case is a real driver script run as a subprocess (its classes live in its
`__main__`, which workers have not got), on one node and under `mpiexec -n 3` with a
task on every rank. A "ghost" module, imported by the driver and then deleted from
disk, gives things that pickle by reference in the driver and cannot load anywhere else.
"""

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from tests.multinode.test_multinode import MPIEXEC, run_mpi

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = '''
import os, shutil, sys, tempfile, threading
import numpy as np
import hpcray as ray
from hpcray import exceptions
from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On

ray.init(num_cpus=1)
ranks = {n["rank"]: n["NodeID"] for n in ray.nodes()}
print("ranks", len(ranks), flush=True)

# A module only the driver can import: gone from disk once imported.
ghost_dir = tempfile.mkdtemp()
with open(os.path.join(ghost_dir, "ghost_module.py"), "w") as f:
    f.write("class GhostError(Exception):\\n    pass\\n"
            "class GhostArg:\\n    pass\\n"
            "class GhostActor:\\n    def ping(self):\\n        return 1\\n"
            "def ghost_function():\\n    return 1\\n")
sys.path.insert(0, ghost_dir)
import ghost_module
sys.path.remove(ghost_dir)
shutil.rmtree(ghost_dir)


class RandomError(Exception):
    """Defined in the driver's script: workers get it by value through cloudpickle."""


def expect(exc_type, ref, *phrases):
    try:
        value = ray.get(ref, timeout=60)
    except exc_type as exc:
        text = str(exc)
        for phrase in phrases:
            assert phrase in text, (phrase, text)
        return exc
    raise AssertionError(f"expected {exc_type.__name__}, got the value {value!r}")


@ray.remote
def flaky(counter):
    n = ray.get(counter.bump.remote())
    if n < 3:
        raise RandomError(f"attempt {n}")
    return n, os.getpid()


@ray.remote
class Counter:
    def __init__(self):
        self.n = 0
    def bump(self):
        self.n += 1
        return self.n


@ray.remote
class Echo:
    def echo(self, x):
        return x


@ray.remote
def pid(*args):
    return os.getpid()


@ray.remote
def returns_a_lock():
    return threading.Lock()


@ray.remote
def raises_random():
    raise RandomError("from the task")


for rank, node_id in sorted(ranks.items()):
    on = On(node_id, soft=False)
    # retry_exceptions with a class of the driver's script, from @remote and .options().
    counter = Counter.options(scheduling_strategy=on).remote()
    n, _ = ray.get(flaky.options(scheduling_strategy=on, max_retries=3,
                                 retry_exceptions=[RandomError]).remote(counter), timeout=60)
    assert n == 3, n
    counter = Counter.remote()
    expect(RandomError, flaky.options(scheduling_strategy=on, max_retries=3,
                                      retry_exceptions=[KeyError]).remote(counter),
           "attempt 1")
    actor = Echo.options(scheduling_strategy=on).remote()
    assert ray.get(actor.echo.options(retry_exceptions=[RandomError]).remote(2), timeout=60) == 2
    expect(RandomError, raises_random.options(scheduling_strategy=on).remote(), "from the task")

    # What the worker cannot deserialize is the task's error, reported by the worker
    # (a worker that died would give WorkerCrashedError).
    expect(ModuleNotFoundError,
           pid.options(scheduling_strategy=on).remote(ghost_module.GhostArg()),
           "Could not deserialize the arguments of task __main__.pid", "ghost_module")
    big = [np.zeros(300_000), ghost_module.GhostArg()]  # large: the arguments go by the store
    expect(ModuleNotFoundError, pid.options(scheduling_strategy=on).remote(*big),
           "Could not deserialize the arguments of task __main__.pid")
    stored = ray.put(ghost_module.GhostArg())
    expect(ModuleNotFoundError, pid.options(scheduling_strategy=on).remote(stored),
           "Could not deserialize the argument", "an ObjectRef's value")
    expect(ModuleNotFoundError,
           pid.options(scheduling_strategy=on, retry_exceptions=[ghost_module.GhostError],
                       max_retries=2).remote(),
           "Could not deserialize the retry_exceptions option of task __main__.pid")
    expect(ModuleNotFoundError,
           ray.remote(ghost_module.ghost_function).options(scheduling_strategy=on).remote(),
           "Could not deserialize the function of task ghost_module.ghost_function")
    ghost_actor = ray.remote(ghost_module.GhostActor).options(scheduling_strategy=on).remote()
    expect(exceptions.RayActorError, ghost_actor.ping.remote(),
           "Could not deserialize the actor class of actor GhostActor")
    expect(TypeError, returns_a_lock.options(scheduling_strategy=on).remote(),
           "Could not serialize the return value", "of task __main__.returns_a_lock",
           "cannot pickle")

    # An argument that cannot be pickled fails at the call site; nothing else breaks.
    try:
        pid.options(scheduling_strategy=on).remote(threading.Lock())
    except TypeError as exc:
        assert "Could not serialize the argument <unlocked _thread.lock" in str(exc), exc
        assert "__main__.pid" in str(exc), exc
    else:
        raise AssertionError("an unpicklable argument was accepted")
    assert ray.get(pid.options(scheduling_strategy=on).remote(1), timeout=60) > 0
    print("rank", rank, "ok", flush=True)

ray.shutdown()
print("OK", flush=True)
'''


def test_driver_script_on_one_node(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ranks 1" in proc.stdout and proc.stdout.rstrip().endswith("OK"), proc.stdout
    assert "WorkerCrashedError" not in proc.stderr, proc.stderr


@pytest.mark.multinode
@pytest.mark.timeout(200)
def test_driver_script_on_three_ranks(tmp_path):
    if not MPIEXEC.exists():
        pytest.skip("no mpiexec")
    out = run_mpi(tmp_path, 3, textwrap.dedent(SCRIPT), timeout=180)
    assert "ranks 3" in out and "rank 2 ok" in out and out.rstrip().endswith("OK"), out
    assert "WorkerCrashedError" not in out, out


def test_a_remote_traceback_names_the_driver_scripts_file_and_line(tmp_path):
    # Functions of __main__ travel by value; cloudpickle >= 3.1 names their code
    # "<dynamic-code>", which would leave the traceback without file or source line.
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import hpcray as ray
        ray.init(num_cpus=1)
        @ray.remote
        def boom():
            raise ValueError("here")
        try:
            ray.get(boom.remote())
        except ValueError as error:
            print(error)
        ray.shutdown()
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=100, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f'File "{script}", line 6, in boom' in proc.stdout, proc.stdout
    assert 'raise ValueError("here")' in proc.stdout and "<dynamic-code>" not in proc.stdout


@pytest.mark.timeout(120)
def test_an_unpicklable_result_names_the_task_the_value_and_what_to_do(ray_start):
    @ray_start.remote(num_returns=2)
    def two():
        return 1, threading.Lock()

    @ray_start.remote
    def items():
        yield 1
        yield threading.Lock()

    @ray_start.remote
    class Keeper:
        def lock(self):
            return threading.Lock()

    first, second = two.remote()
    for ref in (first, second):  # one task's error: every return raises it
        with pytest.raises(TypeError) as error:
            ray_start.get(ref)
        text = str(error.value)
        assert "Could not serialize return value 1 (counting from 0, of 2) " \
               "<unlocked _thread.lock" in text, text
        assert "of task test_serialization_errors." in text and "<locals>.two:" in text
        assert "__reduce__" in text
    stream = items.remote()
    assert ray_start.get(next(stream)) == 1
    with pytest.raises(TypeError, match=r"Could not serialize item 1 .* of task "
                                        r"test_serialization_errors\..*items"):
        ray_start.get(next(stream))
    with pytest.raises(TypeError, match=r"Could not serialize the return value .*of task "
                                        r"Keeper.lock(.|\n)*keep locks, open files"):
        ray_start.get(Keeper.remote().lock.remote())


@pytest.mark.timeout(120)
def test_registered_serializers_and_inspect_serializability(ray_start, capsys):
    # Ray's serialization page: ray.util.register_serializer / deregister_serializer (a
    # class's serializer, per process) and ray.util.inspect_serializability.
    from hpcray.util import deregister_serializer, inspect_serializability, register_serializer

    class Locked:
        def __init__(self, x):
            self.x = x
            self.lock = threading.Lock()

    with pytest.raises(TypeError):
        ray_start.get(ray_start.put(Locked(1)))
    register_serializer(Locked, serializer=lambda a: a.x, deserializer=Locked)
    try:
        assert ray_start.get(ray_start.put(Locked(7))).x == 7
    finally:
        deregister_serializer(Locked)
    with pytest.raises(TypeError):
        ray_start.get(ray_start.put(Locked(1)))
    deregister_serializer(Locked)  # none registered: nothing happens

    class LockedError(Exception):
        def __init__(self, message, data):
            super().__init__(message)
            self.message, self.data = message, data
            self.lock = threading.Lock()

    def to_state(exc):
        return {"message": exc.message, "data": str(exc.data)}

    def from_state(state):
        return LockedError(state["message"], state["data"])

    @ray_start.remote
    def raises():
        register_serializer(LockedError, serializer=to_state, deserializer=from_state)
        raise LockedError("went wrong", {"complex": "data"})

    register_serializer(LockedError, serializer=to_state, deserializer=from_state)
    try:
        with pytest.raises(ray_start.exceptions.RayTaskError) as error:
            ray_start.get(raises.remote())
    finally:
        deregister_serializer(LockedError)
    cause = error.value.cause
    assert type(cause).__name__ == "LockedError" and cause.message == "went wrong"
    assert cause.data == "{'complex': 'data'}"

    lock = threading.Lock()

    def uses_lock():
        print(lock)

    ok, failures = inspect_serializability(uses_lock, name="uses_lock")
    assert not ok and [f.name for f in failures] == ["lock"]
    assert [f.obj for f in failures] == [lock]
    assert inspect_serializability(to_state) == (True, set())
    assert "Checking Serializability of" in capsys.readouterr().out
