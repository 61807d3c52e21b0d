"""Actors: state, ordering, concurrency, handles, names, failures, restarts, ActorPool."""

import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

import hpcray
from hpcray.exceptions import ActorDiedError, RayActorError, RayTaskError
from hpcray.util import ActorPool
from hpcray.util.state import list_tasks


def _wait_until(predicate, deadline_s: float = 30.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true; a generous deadline is only a deadlock guard."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@hpcray.remote
class Counter:
    def __init__(self, start=0, step=1):
        self.value = start
        self.step = step

    def incr(self):
        self.value += self.step
        return self.value

    def get(self):
        return self.value

    def pid(self):
        return os.getpid()

    def die(self):
        os._exit(1)


# ---------------------------------------------------------------- basics
@pytest.mark.timeout(60)
def test_constructor_args_and_state(ray_shared):
    c = Counter.remote(10, step=5)
    assert hpcray.get(c.get.remote()) == 10
    assert hpcray.get([c.incr.remote() for _ in range(3)]) == [15, 20, 25]
    assert hpcray.get(c.get.remote()) == 25


@pytest.mark.timeout(60)
def test_constructor_args_as_object_refs(ray_shared):
    start = hpcray.put(7)
    c = Counter.remote(start, step=hpcray.put(3))
    assert hpcray.get(c.incr.remote()) == 10


@pytest.mark.timeout(60)
def test_calls_from_one_caller_run_in_submission_order(ray_shared):
    @hpcray.remote
    class Log:
        def __init__(self):
            self.items = []

        def append(self, x):
            self.items.append(x)

        def read(self):
            return self.items

    log = Log.remote()
    for i in range(500):
        log.append.remote(i)
    assert hpcray.get(log.read.remote()) == list(range(500))


@hpcray.remote
class Busy:
    """One call at a time: while `hold` waits, the calls after it wait at the node."""

    def __init__(self):
        self.seen = []

    def hold(self, path):
        while not os.path.exists(path):
            time.sleep(0.01)
        return os.getpid()

    def note(self, i):
        self.seen.append(i)
        return i

    def notes(self):
        return self.seen

    def die_once(self, marker, gate="/"):
        self.hold(gate)
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return "survived"


@pytest.mark.timeout(90)
def test_calls_behind_a_busy_call_keep_their_order_and_a_cancel(ray_shared, tmp_path):
    gate = tmp_path / "gate"
    a = Busy.remote()
    hpcray.get(a.notes.remote())
    held = a.hold.remote(str(gate))
    notes = [a.note.remote(i) for i in range(300)]
    hpcray.cancel(notes[50])  # never sent to the process: it never runs
    gate.write_text("")
    hpcray.get(held)
    with pytest.raises(hpcray.exceptions.TaskCancelledError):
        hpcray.get(notes[50], timeout=30)
    kept = [i for i in range(300) if i != 50]
    assert [hpcray.get(notes[i], timeout=30) for i in kept] == kept
    assert hpcray.get(a.notes.remote()) == kept


@pytest.mark.timeout(90)
@pytest.mark.parametrize("retries", [0, -1])
def test_calls_behind_a_call_that_kills_the_actor_count_as_sent(ray_shared, tmp_path, retries):
    """As in Ray, where every call is sent to the actor at once: when its process dies,
    the calls submitted before fail without retries, and run on the restarted actor with."""
    a = Busy.options(max_restarts=1, max_task_retries=retries).remote()
    first_pid = hpcray.get(a.hold.remote("/"))
    gate = tmp_path / "gate"
    died = a.die_once.remote(str(tmp_path / "died"), str(gate))
    after = [a.note.remote(i) for i in range(20)]  # all submitted before it dies
    # ... and on its node before it dies (the driver hands its submissions to the node's
    # thread): a call that reached the node after the death went to the restarted actor
    # (1 run in ~10 failed). The node lists a call once it has it.
    submitted = {ref.task_id().hex() for ref in after}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(submitted & {
            task.task_id for task in list_tasks(filters=[("name", "=", "Busy.note")],
                                                limit=10_000)}) < 20:
        time.sleep(0.02)
    gate.write_text("")
    if retries == 0:
        with pytest.raises(RayActorError):
            hpcray.get(died, timeout=30)
        for ref in after:
            with pytest.raises(RayActorError):
                hpcray.get(ref, timeout=30)
        assert hpcray.get(a.notes.remote(), timeout=30) == []
    else:
        assert hpcray.get(died, timeout=30) == "survived"
        assert hpcray.get(after, timeout=30) == list(range(20))
        assert hpcray.get(a.notes.remote(), timeout=30) == list(range(20))
    assert hpcray.get(a.hold.remote("/"), timeout=30) != first_pid  # restarted


@pytest.mark.timeout(60)
def test_method_num_returns_decorator_and_options(ray_shared):
    @hpcray.remote
    class Splitter:
        @hpcray.method(num_returns=2)
        def two(self, x):
            return x, x * 2

        def pair(self, x):
            return x + 1, x + 2

    s = Splitter.remote()
    a, b = s.two.remote(3)
    assert hpcray.get([a, b]) == [3, 6]
    refs = s.pair.options(num_returns=2).remote(10)
    assert isinstance(refs, list) and len(refs) == 2
    assert hpcray.get(refs) == [11, 12]
    # Without the option, the tuple is one value.
    assert hpcray.get(s.pair.remote(0)) == (1, 2)



@pytest.mark.timeout(60)
def test_typed_actor_bare_method_decorator_and_generic_annotations(ray_shared):
    # Ray's actors page: `@ray.method` bare, `ray.remote(Class)`, and the annotations
    # ActorClass[C], ActorProxy[C], ray.ObjectRef[int] evaluated at run time.
    from hpcray.actor import ActorClass, ActorHandle, ActorProxy

    class Typed:
        def __init__(self):
            self.value = 0

        @hpcray.method
        def increment(self) -> int:
            self.value += 1
            return self.value

    TypedActor: ActorClass[Typed] = hpcray.remote(Typed)
    typed: ActorProxy[Typed] = TypedActor.remote()
    ref: hpcray.ObjectRef[int] = typed.increment.remote()
    assert hpcray.get(ref) == 1
    # Annotations of local variables are not evaluated: at a module's top level they are.
    assert ActorClass[Typed].__origin__ is ActorClass
    assert ActorHandle[Typed].__origin__ is ActorHandle
    assert ActorProxy[Typed] is not None and hpcray.ObjectRef[int].__origin__ is hpcray.ObjectRef
    with pytest.raises(TypeError):
        hpcray.method(lambda self: 0, num_returns=2)

# ---------------------------------------------------------------- concurrency
@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["anywhere", "rank1"])
@pytest.mark.parametrize("kind", ["async", "threaded", "serial"])
def test_call_waiting_for_its_argument_holds_back_only_a_serial_actor(ray_shared, kind,
                                                                      where):
    # Ray's page "Actor Task Execution Order": an async or threaded actor runs a later
    # call whose arguments are ready before an earlier one still waiting for its own; a
    # serial actor runs them in submission order. "rank1": the actor on another node
    # than its caller's (as 3 ranks), where the caller's node holds the calls back.
    @hpcray.remote
    def delayed(value):
        time.sleep(1)
        return value

    class Adder:
        def __init__(self):
            self.value = 0

        def add(self, addition):
            self.value += addition
            return self.value

    class AsyncAdder(Adder):
        async def add(self, addition):
            self.value += addition
            return self.value

    cls, options = {"async": (AsyncAdder, {}), "threaded": (Adder, {"max_concurrency": 2}),
                    "serial": (Adder, {})}[kind]
    if where == "rank1":
        options = dict(options, scheduling_strategy=_on_rank(1))
    adder = hpcray.remote(cls).options(**options).remote()
    hpcray.get(adder.add.remote(0))  # placed: its node is known before the calls
    first = adder.add.remote(delayed.remote(1))
    second = adder.add.remote(2)
    expected = [3, 2] if kind != "serial" else [1, 3]
    assert hpcray.get([first, second]) == expected


@pytest.mark.timeout(60)
def test_async_actor_runs_calls_concurrently(ray_shared):
    n = 8

    @hpcray.remote
    class AsyncGate:
        def __init__(self):
            self.event = None
            self.arrived = 0

        async def wait_for_all(self, total):
            if self.event is None:
                self.event = asyncio.Event()
            self.arrived += 1
            if self.arrived == total:
                self.event.set()
            # Would never return if the calls ran one after another.
            await asyncio.wait_for(self.event.wait(), timeout=30)
            return self.arrived

    gate = AsyncGate.remote()
    refs = [gate.wait_for_all.remote(n) for _ in range(n)]
    assert hpcray.get(refs, timeout=45) == [n] * n


@pytest.mark.timeout(60)
def test_threaded_actor_runs_calls_concurrently(ray_shared):
    @hpcray.remote
    class Threaded:
        def __init__(self):
            self.barrier = threading.Barrier(4)

        def meet(self):
            # BrokenBarrierError (a failed call) if fewer than 4 calls run at once.
            self.barrier.wait(timeout=30)
            return threading.get_ident()

    t = Threaded.options(max_concurrency=4).remote()
    idents = hpcray.get([t.meet.remote() for _ in range(4)], timeout=45)
    assert len(set(idents)) == 4


# ---------------------------------------------------------------- handles
@pytest.mark.timeout(60)
def test_actor_handle_passed_to_task(ray_shared):
    c = Counter.remote()

    @hpcray.remote
    def bump(counter, times):
        return hpcray.get([counter.incr.remote() for _ in range(times)])[-1]

    assert hpcray.get(bump.remote(c, 5)) == 5
    assert hpcray.get(c.get.remote()) == 5


@pytest.mark.timeout(60)
def test_actor_handle_passed_to_actor(ray_shared):
    @hpcray.remote
    class Caller:
        def __init__(self, target):
            self.target = target

        def call(self, times):
            for _ in range(times):
                self.target.incr.remote()
            return hpcray.get(self.target.get.remote())

        def call_other(self, other):
            return hpcray.get(other.incr.remote())

    c = Counter.remote()
    caller = Caller.remote(c)
    assert hpcray.get(caller.call.remote(3)) == 3
    assert hpcray.get(caller.call_other.remote(c)) == 4
    assert hpcray.get(c.get.remote()) == 4


# ---------------------------------------------------------------- names
@pytest.mark.timeout(60)
def test_named_actor(ray_shared):
    c = Counter.options(name="x").remote(100)
    assert hpcray.get(c.incr.remote()) == 101
    same = hpcray.get_actor("x")
    assert hpcray.get(same.incr.remote()) == 102
    assert hpcray.get(c.get.remote()) == 102

    with pytest.raises(ValueError):
        Counter.options(name="x").remote()
    # The first actor is untouched by the failed duplicate.
    assert hpcray.get(hpcray.get_actor("x").get.remote()) == 102

    with pytest.raises(ValueError):
        hpcray.get_actor("no-such-actor")


@pytest.mark.timeout(60)
def test_get_actor_from_task(ray_shared):
    Counter.options(name="shared").remote(1)

    @hpcray.remote
    def use():
        return hpcray.get(hpcray.get_actor("shared").incr.remote())

    assert hpcray.get(use.remote()) == 2


# ---------------------------------------------------------------- death
def _wait_for_file(path: str, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


@hpcray.remote
class Gated:
    """Blocks on a file written by the test, so calls are surely queued or in flight."""

    def __init__(self, gate=None, fail=False):
        if gate is not None:
            _wait_for_file(gate)
        if fail:
            raise RuntimeError("constructor failed")
        self.n = 0

    def wait_gate(self, gate):
        _wait_for_file(gate)
        return "opened"

    def incr(self):
        self.n += 1
        return self.n

    def die(self):
        os._exit(1)


@pytest.mark.timeout(60)
def test_kill_fails_inflight_and_queued_calls(ray_shared, tmp_path):
    gate = str(tmp_path / "gate")
    a = Gated.remote()
    assert hpcray.get(a.incr.remote()) == 1
    inflight = a.wait_gate.remote(gate)  # blocks until the gate opens, which it never does
    queued = a.incr.remote()
    hpcray.kill(a)
    with pytest.raises(RayActorError):
        hpcray.get(inflight, timeout=30)
    with pytest.raises(RayActorError):
        hpcray.get(queued, timeout=30)
    # The runtime keeps working.
    assert hpcray.get(Counter.remote(5).get.remote()) == 5


@pytest.mark.timeout(60)
def test_constructor_raises(ray_shared, tmp_path):
    gate = str(tmp_path / "gate")
    b = Gated.remote(gate, fail=True)
    refs = [b.incr.remote(), b.incr.remote()]  # queued: the constructor is still waiting
    open(gate, "w").close()
    for ref in refs:
        with pytest.raises(RayActorError) as info:
            hpcray.get(ref, timeout=30)
        assert isinstance(info.value, ActorDiedError)
    assert "constructor failed" in str(info.value)


@pytest.mark.timeout(60)
def test_actor_process_dies_restarts_with_max_restarts(ray_shared):
    c = Counter.options(max_restarts=1).remote(5)
    assert hpcray.get(c.incr.remote()) == 6
    first_pid = hpcray.get(c.pid.remote())
    with pytest.raises(RayActorError):
        hpcray.get(c.die.remote(), timeout=30)
    # The constructor ran again: state is back at 5.
    assert hpcray.get(c.get.remote(), timeout=30) == 5
    assert hpcray.get(c.incr.remote()) == 6
    assert hpcray.get(c.pid.remote()) != first_pid


@pytest.mark.timeout(60)
def test_calls_after_kill_with_restart_run_on_the_restarted_actor(ray_shared):
    # kill(no_restart=False): the host sees the process die only some time after its
    # SIGKILL; calls sent meanwhile wait for the restart instead of dying with it.
    counter = Counter.options(max_restarts=1).remote(10)
    first_pid = hpcray.get(counter.pid.remote())
    hpcray.kill(counter, no_restart=False)
    refs = [counter.incr.remote() for _ in range(3)]
    assert hpcray.get(refs, timeout=60) == [11, 12, 13]  # a fresh constructor: 10 again
    assert hpcray.get(counter.pid.remote()) != first_pid
    hpcray.kill(counter)


def test_actor_process_dies_without_restarts(ray_shared, tmp_path):
    gate = str(tmp_path / "gate")
    c = Gated.options(max_restarts=0).remote()
    assert hpcray.get(c.incr.remote()) == 1
    blocked = c.wait_gate.remote(gate)
    dying = c.die.remote()      # queued behind the blocked call
    after = c.incr.remote()     # queued behind the call that kills the process
    open(gate, "w").close()
    assert hpcray.get(blocked, timeout=30) == "opened"
    with pytest.raises(RayActorError):
        hpcray.get(dying, timeout=30)
    with pytest.raises(RayActorError):
        hpcray.get(after, timeout=30)


@pytest.mark.timeout(60)
def test_restart_exhausted_after_second_death(ray_shared):
    c = Gated.options(max_restarts=1).remote()
    with pytest.raises(RayActorError):
        hpcray.get(c.die.remote(), timeout=30)
    assert hpcray.get(c.incr.remote(), timeout=30) == 1
    dying = c.die.remote()
    after = c.incr.remote()
    with pytest.raises(RayActorError):
        hpcray.get(dying, timeout=30)
    with pytest.raises(RayActorError):
        hpcray.get(after, timeout=30)


def _make_dead_actor(how: str, tmp_path):
    """An actor that the node manager surely knows to be dead when this returns."""
    if how == "kill":
        a = Gated.options(num_cpus=1).remote()
        assert hpcray.get(a.incr.remote()) == 1
        hpcray.kill(a)
        # Its CPU comes back only once the node manager has marked it dead.
        assert _wait_until(lambda: hpcray.available_resources().get("CPU", 0) == 2)
    elif how == "constructor":
        gate = str(tmp_path / "gate")
        a = Gated.remote(gate, fail=True)
        first = a.incr.remote()
        open(gate, "w").close()
        with pytest.raises(RayActorError):
            hpcray.get(first, timeout=30)
    elif how == "exit":
        a = Gated.options(max_restarts=0).remote()
        with pytest.raises(RayActorError):
            hpcray.get(a.die.remote(), timeout=30)
    else:  # restarts used up
        a = Gated.options(max_restarts=1).remote()
        for _ in range(2):
            with pytest.raises(RayActorError):
                hpcray.get(a.die.remote(), timeout=30)
    return a


@pytest.mark.one_node
@pytest.mark.parametrize("how", ["kill", "constructor", "exit", "restarts_exhausted"])
@pytest.mark.timeout(60)
def test_call_on_dead_actor_raises_actor_error(ray_shared, tmp_path, how):
    a = _make_dead_actor(how, tmp_path)
    with pytest.raises(RayActorError):
        hpcray.get(a.incr.remote(), timeout=30)
    with pytest.raises(RayActorError):
        hpcray.get(a.incr.remote(), timeout=30)


@pytest.mark.timeout(60)
def test_max_task_retries_retries_the_call_that_killed_the_actor(ray_shared, tmp_path):
    marker = str(tmp_path / "died-once")

    @hpcray.remote
    class Fragile:
        def __init__(self):
            self.calls = 0

        def risky(self, path):
            self.calls += 1
            if not os.path.exists(path):
                with open(path, "w") as f:
                    f.write(str(os.getpid()))
                os._exit(1)
            return ("ok", self.calls, os.getpid())

    a = Fragile.options(max_restarts=1, max_task_retries=1).remote()
    status, calls, pid = hpcray.get(a.risky.remote(marker), timeout=45)
    assert status == "ok"
    assert calls == 1  # ran on a fresh instance: the constructor ran again
    with open(marker) as f:
        assert int(f.read()) != pid
    assert hpcray.get(a.risky.remote(marker)) == ("ok", 2, pid)


@hpcray.remote
class Gate:
    """Each call says it started (a file), then waits for the gate file."""

    def __init__(self, folder):
        self.folder = folder

    def pid(self):
        return os.getpid()

    def call(self, i):
        open(os.path.join(self.folder, f"started-{i}-{os.getpid()}"), "w").close()
        while not os.path.exists(os.path.join(self.folder, "gate")):
            time.sleep(0.01)
        return i, os.getpid()

    @hpcray.method(max_task_retries=-1)
    def call_retried(self, i):
        return self.call(i)


def _kill_with_calls_in_flight(actor, folder, calls: int, method: str = "call",
                               options: dict | None = None):
    """Send `calls` calls, SIGKILL the actor's process while the first runs (the others
    wait in its process), open the gate -> (old pid, each call's pid or exception)."""
    pid = hpcray.get(actor.pid.remote(), timeout=60)
    target = getattr(actor, method)
    if options:
        target = target.options(**options)
    refs = [target.remote(i) for i in range(calls)]
    assert _wait_until(lambda: any(n.startswith("started-0-") for n in os.listdir(folder)), 60)
    os.kill(pid, signal.SIGKILL)
    open(os.path.join(folder, "gate"), "w").close()
    results = []
    for i, ref in enumerate(refs):
        try:
            index, ran_in = hpcray.get(ref, timeout=60)
            assert index == i
            results.append(ran_in)
        except RayActorError as exc:
            results.append(exc)
    return pid, results


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["actor", "call_options", "method_decorator"])
def test_calls_in_flight_are_retried_after_a_restart(ray_shared, tmp_path, how):
    """Ray's at-least-once actor calls: the calls the actor's process had (running or
    waiting in it) when it was SIGKILLed run again on the restarted actor, within
    max_task_retries (-1: no limit), whichever of the actor's option, the call's
    .options() or @method sets it."""
    folder = str(tmp_path)
    if how == "actor":
        actor = Gate.options(max_restarts=1, max_task_retries=-1).remote(folder)
        pid, results = _kill_with_calls_in_flight(actor, folder, 5)
    elif how == "call_options":
        actor = Gate.options(max_restarts=1).remote(folder)
        pid, results = _kill_with_calls_in_flight(actor, folder, 5,
                                                  options={"max_task_retries": 2})
    else:
        actor = Gate.options(max_restarts=1).remote(folder)
        pid, results = _kill_with_calls_in_flight(actor, folder, 5, "call_retried")
    assert all(isinstance(ran_in, int) for ran_in in results), results
    assert pid not in results and len(set(results)) == 1  # all on the restarted process
    assert hpcray.get(actor.call.remote(9), timeout=60)[1] == results[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["default", "call_options"])
def test_calls_in_flight_fail_without_task_retries(ray_shared, tmp_path, how):
    """max_task_retries=0 (the default, or a call's .options() over the actor's -1):
    at-most-once; the calls in flight raise RayActorError, and the restarted actor
    takes new calls."""
    folder = str(tmp_path)
    if how == "default":
        actor = Gate.options(max_restarts=1).remote(folder)
        pid, results = _kill_with_calls_in_flight(actor, folder, 3)
    else:
        actor = Gate.options(max_restarts=1, max_task_retries=-1).remote(folder)
        pid, results = _kill_with_calls_in_flight(actor, folder, 3,
                                                  options={"max_task_retries": 0})
    assert all(isinstance(error, RayActorError) for error in results), results
    assert hpcray.get(actor.call.remote(9), timeout=60)[1] != pid


@pytest.mark.timeout(60)
def test_method_raises_actor_survives(ray_shared):
    @hpcray.remote
    class Picky:
        def __init__(self):
            self.n = 0

        def check(self, x):
            self.n += 1
            if x < 0:
                raise ValueError(f"negative: {x}")
            return x

        def count(self):
            return self.n

    p = Picky.remote()
    assert hpcray.get(p.check.remote(1)) == 1
    with pytest.raises(ValueError) as info:
        hpcray.get(p.check.remote(-1))
    assert isinstance(info.value, RayTaskError)
    assert "negative: -1" in str(info.value)
    with pytest.raises(RayTaskError):
        hpcray.get(p.check.remote(-2))
    assert hpcray.get(p.check.remote(2)) == 2
    assert hpcray.get(p.count.remote()) == 4


# ---------------------------------------------------------------- ActorPool
@hpcray.remote
class Doubler:
    def double(self, x):
        return 2 * x

    def slow_double(self, x, gate_path):
        # The call for x == 0 waits for a file that the test writes later.
        if x == 0:
            deadline = time.monotonic() + 30
            while not os.path.exists(gate_path) and time.monotonic() < deadline:
                time.sleep(0.01)
        return 2 * x


@pytest.mark.timeout(60)
def test_actor_pool_map(ray_shared):
    pool = ActorPool([Doubler.remote(), Doubler.remote()])
    out = list(pool.map(lambda a, v: a.double.remote(v), range(10)))
    assert out == [2 * v for v in range(10)]
    # A second map on the same pool works.
    assert list(pool.map(lambda a, v: a.double.remote(v), [5, 6])) == [10, 12]


@pytest.mark.timeout(60)
def test_actor_pool_map_unordered(ray_shared, tmp_path):
    gate = str(tmp_path / "gate")
    pool = ActorPool([Doubler.remote(), Doubler.remote()])
    results = pool.map_unordered(lambda a, v: a.slow_double.remote(v, gate), [0, 1, 2, 3])
    seen = []
    for value in results:
        seen.append(value)
        if len(seen) == 3:
            # 0 is still blocked, so it cannot have come back yet; now release it.
            assert 0 not in seen
            open(gate, "w").close()
    assert sorted(seen) == [0, 2, 4, 6]
    assert seen[-1] == 0


@pytest.mark.timeout(60)
def test_actor_pool_submit_get_next_has_next_has_free(ray_shared):
    a1, a2 = Doubler.remote(), Doubler.remote()
    pool = ActorPool([a1, a2])
    assert not pool.has_next()
    assert pool.has_free()
    pool.submit(lambda a, v: a.double.remote(v), 1)
    assert pool.has_free()
    pool.submit(lambda a, v: a.double.remote(v), 2)
    assert not pool.has_free()
    pool.submit(lambda a, v: a.double.remote(v), 3)  # queued until an actor is free
    assert pool.has_next()
    assert pool.get_next() == 2
    assert pool.get_next() == 4
    assert pool.get_next() == 6
    assert not pool.has_next()
    assert pool.has_free()
    with pytest.raises(StopIteration):
        pool.get_next()


@pytest.mark.timeout(60)
def test_actor_pool_pop_idle_and_push(ray_shared):
    a1, a2 = Doubler.remote(), Doubler.remote()
    pool = ActorPool([a1])
    idle = pool.pop_idle()
    assert idle == a1
    assert pool.pop_idle() is None
    assert not pool.has_free()
    pool.push(a2)
    assert pool.has_free()
    with pytest.raises(ValueError):
        pool.push(a2)
    pool.push(idle)
    assert list(pool.map(lambda a, v: a.double.remote(v), [1, 2, 3])) == [2, 4, 6]


# ---------------------------------------------------------------- context, resources, scale
@pytest.mark.timeout(60)
def test_runtime_context_actor_id(ray_shared):
    @hpcray.remote
    class WhoAmI:
        def actor_id(self):
            return hpcray.get_runtime_context().get_actor_id()

    @hpcray.remote
    def task_actor_id():
        return hpcray.get_runtime_context().get_actor_id()

    a = WhoAmI.remote()
    b = WhoAmI.remote()
    id_a = hpcray.get(a.actor_id.remote())
    id_b = hpcray.get(b.actor_id.remote())
    assert isinstance(id_a, str) and id_a
    assert id_a == a._actor_id.hex()
    assert id_a != id_b
    assert hpcray.get_runtime_context().get_actor_id() is None
    assert hpcray.get(task_actor_id.remote()) is None


@pytest.mark.one_node
@pytest.mark.timeout(60)
def test_actor_with_two_cpus_holds_both(ray_shared):
    @hpcray.remote(num_cpus=2)
    class Big:
        def ping(self):
            return "pong"

    assert hpcray.available_resources().get("CPU", 0) == 2
    big = Big.remote()
    assert hpcray.get(big.ping.remote()) == "pong"
    assert hpcray.available_resources().get("CPU", 0) == 0
    hpcray.kill(big)
    assert _wait_until(lambda: hpcray.available_resources().get("CPU", 0) == 2)


@pytest.mark.timeout(60)
def test_task_waits_while_two_cpu_actors_hold_every_cpu(ray_shared):
    """One 2-CPU actor per 2 CPUs of the cluster (one per node under a 3-rank job): no CPU
    is left anywhere, so a task waits until one actor ends."""
    @hpcray.remote(num_cpus=2)
    class Big:
        def ping(self):
            return "pong"

    @hpcray.remote
    def task():
        return "ran"

    bigs = [Big.remote() for _ in range(int(hpcray.cluster_resources()["CPU"]) // 2)]
    assert hpcray.get([big.ping.remote() for big in bigs], timeout=30) == ["pong"] * len(bigs)
    ref = task.remote()
    ready, _ = hpcray.wait([ref], timeout=0.3)  # a warm worker runs it in milliseconds
    assert ready == []  # no CPU is free on any node: the task cannot have started
    hpcray.kill(bigs[-1])
    assert hpcray.get(ref, timeout=30) == "ran"
    for big in bigs[:-1]:
        hpcray.kill(big)


@pytest.mark.timeout(60)
def test_fifty_actors(ray_shared):
    actors = [Counter.remote(i) for i in range(50)]
    assert hpcray.get([a.incr.remote() for a in actors], timeout=50) == list(range(1, 51))


@pytest.mark.timeout(60)
def test_dropped_handle_ends_actor_process(ray_shared):
    c = Counter.remote()
    pid = hpcray.get(c.pid.remote())
    assert psutil.pid_exists(pid)
    del c
    gc.collect()
    assert _wait_until(lambda: _pid_gone(pid), deadline_s=15), f"actor pid {pid} still alive"


@pytest.mark.timeout(60)
def test_dropped_handle_runs_pending_calls_first(ray_shared, tmp_path):
    out = tmp_path / "done"

    @hpcray.remote
    class Writer:
        def write(self, path):
            time.sleep(0.2)
            with open(path, "w") as f:
                f.write("done")
            return os.getpid()

    w = Writer.remote()
    ref = w.write.remote(str(out))
    del w
    gc.collect()
    pid = hpcray.get(ref, timeout=30)
    assert out.read_text() == "done"
    assert _wait_until(lambda: _pid_gone(pid), deadline_s=30)


@pytest.mark.parametrize("ray_start_custom", [{"num_cpus": 1}], indirect=True)
def test_call_on_a_temporary_handle_runs(ray_start_custom):
    # `A.remote().f.remote()`: the handle is gone right after the call is made, also
    # while the actor still waits for a CPU; as in Ray the call runs, then the actor ends.
    ray = ray_start_custom

    @ray.remote(num_cpus=1)
    class Busy:
        def f(self):
            return "ran"

    assert ray.get(Busy.remote().f.remote()) == "ran"
    holder = Busy.remote()
    assert ray.get(holder.f.remote()) == "ran"   # holds the only CPU
    pending = Busy.remote().f.remote()           # its actor waits for that CPU
    del holder
    assert ray.get(pending, timeout=60) == "ran"


def test_sys_exit_in_an_actor_method_ends_the_actor_quietly(tmp_path):
    # As Ray: the actor's process ends, its callers get RayActorError, and no traceback
    # of hpcray's worker loop reaches the driver's output.
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import sys, hpcray as ray
        ray.init(num_cpus=1)
        @ray.remote
        class W:
            def crash(self):
                sys.exit(1)
            def ok(self):
                return 1
        w = W.remote()
        assert ray.get(w.ok.remote()) == 1
        try:
            ray.get(w.crash.remote())
        except ray.exceptions.RayActorError:
            print("ACTOR-ERROR")
        ray.shutdown()
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=100, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ACTOR-ERROR" in out, out
    assert "Traceback" not in out and "SystemExit" not in out, out


@hpcray.remote(max_restarts=-1)
class _Child:
    def ping(self):
        return "hello"


@hpcray.remote
class _Owner:
    def make(self, child_strategy=None):
        self.child = _Child.options(scheduling_strategy=child_strategy).remote()
        self.detached = _Child.options(name="survivor", lifetime="detached").remote()
        return self.child, self.detached, os.getpid()

    def ping_child(self):
        return hpcray.get(self.child.ping.remote())


@hpcray.remote
def _ping(child):
    return hpcray.get(child.ping.remote())


@hpcray.remote
def _make_child():
    child = _Child.remote()
    hpcray.get(child.ping.remote())
    return child


def _on_rank(rank: int):
    """On a job of several ranks, rank `rank`'s node (modulo their number); else None."""
    from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    nodes = sorted((node["rank"], node["NodeID"]) for node in hpcray.nodes())
    if len(nodes) == 1:
        return None
    return NodeAffinitySchedulingStrategy(nodes[rank % len(nodes)][1], soft=False)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["sigkill", "kill"])
@pytest.mark.parametrize("ranks", [(1, 2), (1, 0), (0, 1)], ids=["owner1-child2",
                                                                  "owner1-child0",
                                                                  "owner0-child1"])
def test_actors_die_with_the_process_that_created_them(ray_shared, how, ranks):
    """As Ray (doc_code/actor_creator_failure.py): an actor's owner is the process that
    created it; when that process dies (killed, or its actor killed with kill()), the
    actors it created die too, even with max_restarts=-1 and while others hold their
    handles; a detached actor lives on. A call made after the owner's death never runs,
    however soon after (runtime/owners.py): the first fails. Under mpiexec the owner and
    the child are on the ranks given (the driver on rank 0)."""
    owner_rank, child_rank = ranks
    if _on_rank(0) is None and ranks != (1, 2):
        pytest.skip("on one node every placement is the same")
    owner = _Owner.options(scheduling_strategy=_on_rank(owner_rank)).remote()
    child, detached, pid = hpcray.get(owner.make.remote(_on_rank(child_rank)))
    # While the owner lives, calls from anywhere run: the driver, a task, the owner.
    assert hpcray.get([child.ping.remote() for _ in range(20)]) == ["hello"] * 20
    assert hpcray.get(_ping.remote(child)) == "hello"
    assert hpcray.get(owner.ping_child.remote()) == "hello"
    if how == "sigkill":
        os.kill(pid, 9)
    else:
        hpcray.kill(owner)
    with pytest.raises(RayActorError, match="owner has died"):
        hpcray.get(child.ping.remote(), timeout=30)
    with pytest.raises(RayActorError, match="owner has died"):
        hpcray.get(_ping.remote(child), timeout=30)
    assert hpcray.get(detached.ping.remote(), timeout=30) == "hello"
    hpcray.kill(detached)


@pytest.mark.timeout(60)
def test_an_actor_made_by_a_task_outlives_the_task(ray_shared):
    """The task's process lives on after the task (a pool worker), so the actor does."""
    child = hpcray.get(_make_child.remote())
    assert hpcray.get([child.ping.remote() for _ in range(3)]) == ["hello"] * 3


_MANY_ACTORS = """
import resource, hpcray
print("soft before", resource.getrlimit(resource.RLIMIT_NOFILE)[0], flush=True)
hpcray.init(num_cpus=1)

@hpcray.remote(num_cpus=0)
class A:
    def ping(self):
        return 1

actors = [A.remote() for _ in range(120)]
print("pings", sum(hpcray.get([a.ping.remote() for a in actors], timeout=120)), flush=True)
"""


@pytest.mark.timeout(180)
def test_a_low_open_files_limit_does_not_cap_the_actors(tmp_path):
    """Each worker costs its node three descriptors: with the usual soft limit of 1024 a
    node stopped near 330 actors ("Too many open files" from `.remote()`). The node
    raises the soft limit to the hard one; here the soft limit is 256, and 120 actors
    (360 descriptors) all answer."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard limit here is {hard}")

    def low_soft_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    proc = subprocess.run([sys.executable, "-c", _MANY_ACTORS], cwd=tmp_path, text=True,
                          capture_output=True, timeout=170, preexec_fn=low_soft_limit)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["soft before 256", "pings 120"], \
        proc.stdout + proc.stderr
