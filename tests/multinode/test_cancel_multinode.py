"""`cancel` across nodes under `mpiexec -n 3`: tasks forwarded to another rank (on their
way there, queued, running, with children on a third rank), refs owned by another node,
actors hosted elsewhere. Tasks say they run by creating files; every wait has a bound."""

import psutil
import pytest

from tests.multinode.test_multinode import run_mpi

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(300)]

PRELUDE = """
import asyncio, os, time
import hpcray as ray
from hpcray.exceptions import TaskCancelledError, RayTaskError
from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

SCRATCH = {scratch!r}
ray.init(num_cpus=1)
node_of = {{n["rank"]: n["NodeID"] for n in ray.nodes()}}

def on(rank):
    return NodeAffinitySchedulingStrategy(node_of[rank], soft=False)

def path(name):
    return os.path.join(SCRATCH, name)

def touch(name, text="x"):
    scratch = f"{{path(name)}}.{{os.getpid()}}.tmp"
    with open(scratch, "w") as f:
        f.write(text)
    os.replace(scratch, path(name))

def wait_for(name, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path(name)):
        assert time.monotonic() < deadline, name + " never appeared"
        time.sleep(0.01)

def expect_cancelled(ref, timeout=60):
    try:
        value = ray.get(ref, timeout=timeout)
    except TaskCancelledError as exc:
        return exc
    raise AssertionError(f"a cancelled task returned {{value!r}}")

@ray.remote(num_cpus=0)
class Signal:
    def __init__(self):
        self.event = asyncio.Event()
    async def wait(self):
        await self.event.wait()
    async def send(self):
        self.event.set()

@ray.remote
def sleeper(name, seconds=10e6):
    touch(name, str(os.getpid()))
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        touch(name + "-interrupted")
        raise
    return "slept"

@ray.remote
def child(refs, name):
    touch(name)
    try:
        value = ray.get(refs[0])
    except KeyboardInterrupt:
        touch(name + "-interrupted")
        raise
    touch(name + "-done")
    return value

@ray.remote
def pid_of():
    return os.getpid()

worker_pids = set()
"""

EPILOGUE = """
for rank in (0, 1, 2):
    worker_pids.update(ray.get([pid_of.options(scheduling_strategy=on(rank)).remote()
                                for _ in range(2)], timeout=60))
with open(path("pids"), "w") as f:
    f.write(" ".join(str(p) for p in worker_pids))
ray.shutdown()
print("OK")
"""


def run_case(tmp_path, body):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = run_mpi(tmp_path, 3, PRELUDE.format(scratch=str(scratch)) + body + EPILOGUE,
                  timeout=240)
    assert "OK" in out, out
    pids = [int(p) for p in (scratch / "pids").read_text().split()]
    alive = []
    for pid in pids:  # every worker of every rank is gone with the job
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    assert not alive, f"workers left behind: {alive}"
    return out


def test_cancel_tasks_on_other_nodes_in_every_state(tmp_path):
    run_case(tmp_path, """
# Cancel right after .remote(), 20 in a row, each task forwarded to rank 1 or 2: the
# cancel goes through rank 0 behind the task, whatever it is doing by then.
@ray.remote
def slow(i):
    time.sleep(1)
    return i
for i in range(20):
    ref = slow.options(scheduling_strategy=on(1 + i % 2)).remote(i)
    ray.cancel(ref)
    expect_cancelled(ref)
print("20 in a row cancelled")

# Running on rank 1: interrupted (a KeyboardInterrupt in the task).
ref = sleeper.options(scheduling_strategy=on(1)).remote("running")
wait_for("running")
ray.cancel(ref)
error = expect_cancelled(ref)
assert isinstance(error, RayTaskError), type(error)
wait_for("running-interrupted")

# Queued on rank 2 behind a task that holds its one CPU: it never runs.
signal = Signal.remote()
@ray.remote
def blocker(refs):
    touch("blocker")
    return ray.get(refs[0])
held = blocker.options(scheduling_strategy=on(2)).remote([signal.wait.remote()])
wait_for("blocker")
queued = sleeper.options(scheduling_strategy=on(2)).remote("queued-ran", 0)
ray.cancel(queued)
expect_cancelled(queued)
ray.get(signal.send.remote(), timeout=60)
assert ray.get(held, timeout=60) is None
assert ray.get(sleeper.options(scheduling_strategy=on(2)).remote("after", 0), timeout=60) == "slept"
assert not os.path.exists(path("queued-ran"))

# force=True on rank 2: its worker is killed, the task is not retried, rank 2 goes on.
@ray.remote(max_retries=3)
def counted(name):
    touch(name + "-" + str(time.monotonic_ns()))
    touch(name, str(os.getpid()))
    time.sleep(10e6)
ref = counted.options(scheduling_strategy=on(2)).remote("forced")
wait_for("forced")
pid = int(open(path("forced")).read())
ray.cancel(ref, force=True)
expect_cancelled(ref)
after = sleeper.options(scheduling_strategy=on(2)).remote("after2", 0)
assert ray.get(after, timeout=60) == "slept"
assert len([n for n in os.listdir(SCRATCH) if n.startswith("forced-")]) == 1
deadline = time.monotonic() + 30
while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split(") ")[-1][0] != "Z":
    assert time.monotonic() < deadline, "the worker was not killed"
    time.sleep(0.01)

# A finished task stays finished.
done = sleeper.options(scheduling_strategy=on(1)).remote("done", 0)
assert ray.get(done, timeout=60) == "slept"
ray.cancel(done)
assert ray.get(done, timeout=60) == "slept"
print("states OK")
""")


def test_recursive_cancel_and_refs_owned_elsewhere(tmp_path):
    run_case(tmp_path, """
# A parent on rank 1 whose child runs on rank 2: a recursive cancel reaches the child.
signal = Signal.remote()
@ray.remote
def parent(refs, name):
    return ray.get(child.options(scheduling_strategy=on(2)).remote(refs, name))
ref = parent.options(scheduling_strategy=on(1)).remote([signal.wait.remote()], "child")
wait_for("child")
ray.cancel(ref)
expect_cancelled(ref)
wait_for("child-interrupted")

# Not recursive: the child goes on, and ends when its argument comes.
ref = parent.options(scheduling_strategy=on(1)).remote([signal.wait.remote()], "child2")
wait_for("child2")
ray.cancel(ref, recursive=False)
expect_cancelled(ref)
ray.get(signal.send.remote(), timeout=60)
wait_for("child2-done")
assert not os.path.exists(path("child2-interrupted"))

# A task on rank 2 cancels a task the driver owns, running on rank 1.
victim = sleeper.options(scheduling_strategy=on(1)).remote("victim")
wait_for("victim")
@ray.remote
def canceller(refs):
    ray.cancel(refs[0])
    return "sent"
assert ray.get(canceller.options(scheduling_strategy=on(2)).remote([victim]), timeout=60) == "sent"
expect_cancelled(victim)

# The driver cancels a task that a task on rank 1 owns (running on rank 2).
@ray.remote
def owner():
    return [sleeper.options(scheduling_strategy=on(2)).remote("owned-elsewhere")]
inner = ray.get(owner.options(scheduling_strategy=on(1)).remote(), timeout=60)[0]
wait_for("owned-elsewhere")
ray.cancel(inner)
expect_cancelled(inner)
print("recursive OK")
""")


def test_cancel_actor_calls_on_another_node(tmp_path):
    run_case(tmp_path, """
signal = Signal.remote()

@ray.remote
class Sync:
    def __init__(self):
        self.calls = []
    def block(self, refs):
        self.calls.append("block")
        return ray.get(refs[0])
    def record(self, name):
        self.calls.append(name)
        return name
    def poll(self, name):
        touch(name)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if ray.get_runtime_context().is_canceled():
                self.calls.append("saw cancel")
                return "stopped"
            time.sleep(0.01)
        return "never saw it"
    def calls_made(self):
        return self.calls

actor = Sync.options(scheduling_strategy=on(1)).remote()
blocked = actor.block.remote([signal.wait.remote()])
queued = [actor.record.remote(f"q{i}") for i in range(4)]
ray.cancel(queued[1])
ray.cancel(queued[3])
try:
    ray.cancel(queued[0], force=True)
    raise AssertionError("force=True on an actor call did not raise")
except ValueError:
    pass
ray.get(signal.send.remote(), timeout=60)
ray.get(blocked, timeout=60)
assert ray.get(queued[0], timeout=60) == "q0" and ray.get(queued[2], timeout=60) == "q2"
expect_cancelled(queued[1])
expect_cancelled(queued[3])
running = actor.poll.remote("polling")
wait_for("polling")
ray.cancel(running)
expect_cancelled(running)
assert ray.get(actor.calls_made.remote(), timeout=60) == ["block", "q0", "q2", "saw cancel"]

@ray.remote
class Async:
    def __init__(self):
        self.cancelled = False
    async def sleep(self, name):
        touch(name)
        try:
            await asyncio.sleep(10e6)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
    async def was_cancelled(self):
        return self.cancelled

sleeper_actor = Async.options(scheduling_strategy=on(2)).remote()
ref = sleeper_actor.sleep.remote("async")
wait_for("async")
ray.cancel(ref)
expect_cancelled(ref)
assert ray.get(sleeper_actor.was_cancelled.remote(), timeout=60)
print("actors OK")
""")


def test_recursive_cancel_of_actor_calls_across_nodes(tmp_path):
    run_case(tmp_path, """
# An actor on rank 1 whose calls each submit a task to rank 2 and call an actor on rank 0:
# a recursive cancel of one call (from the driver, which owns the call) reaches its own
# children on both other nodes and no other call's.
signal = Signal.remote()

@ray.remote(num_cpus=0)
class Waiter:
    def __init__(self):
        self.cancelled = []
    async def wait(self, refs, name):
        touch(name)
        try:
            return await refs[0]
        except asyncio.CancelledError:
            self.cancelled.append(name)
            raise
    async def cancelled_calls(self):
        return self.cancelled

waiter = Waiter.options(scheduling_strategy=on(0)).remote()

@ray.remote
class Spawner:
    def spawn(self, refs, name):
        task = child.options(scheduling_strategy=on(2)).remote(refs, name + "-task")
        call = waiter.wait.remote(refs, name + "-call")
        return ray.get([task, call])

for concurrency in (1, 3):
    spawner = Spawner.options(scheduling_strategy=on(1),
                              max_concurrency=concurrency).remote()
    victim = spawner.spawn.remote([signal.wait.remote()], f"v{concurrency}")
    wait_for(f"v{concurrency}-task")
    wait_for(f"v{concurrency}-call")
    bystander = None
    if concurrency > 1:
        bystander = spawner.spawn.remote([signal.wait.remote()], "b")
        wait_for("b-task")
        wait_for("b-call")
    ray.cancel(victim, recursive=True)
    expect_cancelled(victim)
    wait_for(f"v{concurrency}-task-interrupted")
    deadline = time.monotonic() + 60
    while f"v{concurrency}-call" not in ray.get(waiter.cancelled_calls.remote(), timeout=60):
        assert time.monotonic() < deadline, "the child actor call was not cancelled"
        time.sleep(0.05)
    if bystander is not None:
        ray.get(signal.send.remote(), timeout=60)
        assert ray.get(bystander, timeout=60) == [None, None]
        assert not os.path.exists(path("b-task-interrupted"))
        assert "b-call" not in ray.get(waiter.cancelled_calls.remote(), timeout=60)
print("recursive actor calls OK")
""")
