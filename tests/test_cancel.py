"""`cancel` on one node, in every state a task or actor call can be in (Ray's rules:
python/ray/tests/test_cancel.py and test_actor_cancel.py in ray-project/ray).

No test relies on timing: a task says it runs by creating a file, tasks wait on a
Signal actor the test sets, and every wait has a bound.
"""

import asyncio
import os
import time

import psutil
import pytest

import hpcray as ray
from hpcray.exceptions import GetTimeoutError, RayTaskError, TaskCancelledError

pytestmark = pytest.mark.timeout(120)


@ray.remote(num_cpus=0)
class Signal:
    def __init__(self):
        self.event = asyncio.Event()

    async def wait(self):
        await self.event.wait()

    async def send(self):
        self.event.set()


def wait_for_file(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def touch(path, text="x"):
    """Make `path` whole at once: whoever sees it can read it."""
    scratch = f"{path}.{os.getpid()}.{time.monotonic_ns()}"
    with open(scratch, "w") as f:
        f.write(text)
    os.replace(scratch, path)


@ray.remote
def run_and_mark(path):
    touch(path)
    return "ran"


@ray.remote
def sleep_forever(started, interrupted=None):
    touch(started)
    try:
        time.sleep(10e6)
    except KeyboardInterrupt:
        if interrupted is not None:
            touch(interrupted)
        raise
    return "woke"


@ray.remote
def wait_on(ref_list):
    return ray.get(ref_list[0])


def test_cancel_right_after_remote_20_in_a_row(ray_shared, tmp_path):
    """Each task is sent to a warm worker at once, so the cancel finds it on its way
    there, starting, or running: never done (it would sleep for a second)."""
    @ray.remote
    def slow(i, seconds=1):
        time.sleep(seconds)
        return i

    assert ray.get([slow.options(name="warm").remote(i, 0) for i in range(2)]) == [0, 1]
    for i in range(20):
        ref = slow.remote(i)
        ray.cancel(ref)
        with pytest.raises(TaskCancelledError):
            ray.get(ref, timeout=30)
    assert ray.get(slow.remote(99, 0), timeout=30) == 99


def test_cancel_right_after_remote_of_an_instant_task(ray_shared):
    """An instant task may end before the cancel comes (then it is a finished task,
    whose value stays, as in Ray); it never hangs nor fails otherwise."""
    @ray.remote
    def fast(i):
        return i

    assert ray.get([fast.remote(i) for i in range(8)]) == list(range(8))
    for i in range(50):
        ref = fast.remote(i)
        ray.cancel(ref)
        try:
            assert ray.get(ref, timeout=30) == i
        except TaskCancelledError:
            pass
    assert ray.get(fast.remote(99), timeout=30) == 99


def test_cancel_right_after_remote_of_a_slow_task_does_not_run_to_the_end(ray_shared,
                                                                       tmp_path):
    refs = []
    for i in range(10):
        ref = sleep_forever.remote(str(tmp_path / f"s{i}"))
        ray.cancel(ref)
        refs.append(ref)
    for ref in refs:
        with pytest.raises(TaskCancelledError):
            ray.get(ref, timeout=30)


def test_cancel_queued_task_never_runs(ray_shared, tmp_path):
    signal = Signal.remote()
    blockers = [wait_on.remote([signal.wait.remote()]) for _ in range(2)]  # both CPUs
    ready, _ = ray.wait(blockers, timeout=0.5)
    assert not ready
    marker = tmp_path / "queued-ran"
    queued = run_and_mark.remote(str(marker))
    ray.cancel(queued)
    with pytest.raises(TaskCancelledError):
        ray.get(queued, timeout=30)
    ray.get(signal.send.remote())
    assert ray.get(blockers, timeout=30) == [None, None]
    assert ray.get(run_and_mark.remote(str(tmp_path / "after")), timeout=30) == "ran"
    assert not marker.exists()


def test_cancel_task_waiting_for_its_argument_and_its_dependents(ray_shared, tmp_path):
    signal = Signal.remote()
    first = wait_on.remote([signal.wait.remote()])
    marker = tmp_path / "dependent-ran"

    @ray.remote
    def use(value, path):
        touch(path)
        return value

    second = use.remote(first, str(marker))
    third = use.remote(second, str(marker))
    ray.cancel(second)
    for ref in (second, third):
        with pytest.raises(TaskCancelledError):
            ray.get(ref, timeout=30)
    with pytest.raises(GetTimeoutError):
        ray.get(first, timeout=0.1)  # what it waited on goes on
    ray.get(signal.send.remote())
    assert ray.get(first, timeout=30) is None
    assert not marker.exists()


def test_cancel_running_task_interrupts_it(ray_shared, tmp_path):
    started, interrupted = tmp_path / "started", tmp_path / "interrupted"
    ref = sleep_forever.remote(str(started), str(interrupted))
    wait_for_file(started)
    ray.cancel(ref)
    with pytest.raises(TaskCancelledError) as info:
        ray.get(ref, timeout=30)
    assert isinstance(info.value, RayTaskError)  # interrupted while running, as in Ray
    assert interrupted.exists()  # a KeyboardInterrupt inside the task
    assert ray.get(run_and_mark.remote(str(tmp_path / "after")), timeout=30) == "ran"


def test_a_task_that_catches_the_interrupt_still_returns_no_value(ray_shared, tmp_path):
    started = tmp_path / "started"

    @ray.remote
    def stubborn(path):
        touch(path)
        try:
            time.sleep(10e6)
        except KeyboardInterrupt:
            return ray.get_runtime_context().is_canceled()
        return "slept"

    ref = stubborn.remote(str(started))
    wait_for_file(started)
    ray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)


def test_a_task_interrupted_once_can_still_call_get_to_clean_up(ray_shared, tmp_path):
    signal = Signal.remote()
    started, cleaned = tmp_path / "started", tmp_path / "cleaned"

    @ray.remote
    def helper():
        return "helped"

    @ray.remote
    def careful(ref_list, path, done):
        touch(path)
        try:
            ray.get(ref_list[0])
        except KeyboardInterrupt:
            touch(done, ray.get(helper.remote(), timeout=30))
            raise

    ref = careful.remote([signal.wait.remote()], str(started), str(cleaned))
    wait_for_file(started)
    ray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)
    assert cleaned.read_text() == "helped"
    ray.get(signal.send.remote())


def test_cancel_task_blocked_in_get(ray_shared, tmp_path):
    signal = Signal.remote()
    started = tmp_path / "started"

    @ray.remote
    def blocked(ref_list, path):
        touch(path)
        return ray.get(ref_list[0])

    ref = blocked.remote([signal.wait.remote()], str(started))
    wait_for_file(started)
    ray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)
    ray.get(signal.send.remote())


def test_force_cancel_kills_the_worker_and_a_new_one_takes_its_place(ray_shared, tmp_path):
    started = tmp_path / "started"

    @ray.remote
    def pid_and_sleep(path):
        touch(path, str(os.getpid()))
        time.sleep(10e6)

    ref = pid_and_sleep.remote(str(started))
    wait_for_file(started)
    pid = int(started.read_text())
    ray.cancel(ref, force=True)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)
    deadline = time.monotonic() + 30  # its socket closes a moment before it is a zombie
    while not gone(pid):
        assert time.monotonic() < deadline, "the worker was not killed"
        time.sleep(0.01)
    node = ray.context.driver_node
    deadline = time.monotonic() + 30
    while sum(1 for w in node.workers.values() if w.alive and w.actor_id is None) < 2:
        assert time.monotonic() < deadline, "no worker replaced the killed one"
        time.sleep(0.01)

    @ray.remote
    def pid():
        return os.getpid()

    assert pid not in ray.get([pid.remote() for _ in range(4)], timeout=30)


@pytest.mark.parametrize("force", [False, True])
def test_cancelled_task_is_never_retried(ray_shared, tmp_path, force):
    runs = tmp_path / "runs"

    @ray.remote(max_retries=3, retry_exceptions=True)
    def counted(path):
        touch(f"{path}-{os.getpid()}-{time.monotonic_ns()}")
        touch(path)
        time.sleep(10e6)

    ref = counted.remote(str(runs))
    wait_for_file(runs)
    ray.cancel(ref, force=force)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)
    ray.get(run_and_mark.remote(str(tmp_path / "after")), timeout=30)  # the node went on
    assert len(list(tmp_path.glob("runs-*"))) == 1


def test_cancel_finished_task_is_a_no_op(ray_shared):
    @ray.remote
    def value():
        return 7

    ref = value.remote()
    assert ray.get(ref, timeout=30) == 7
    ray.cancel(ref)
    ray.cancel(ref, force=True)
    assert ray.get(ref, timeout=30) == 7


@pytest.mark.parametrize("recursive", [True, False])
def test_recursive_cancel_reaches_the_children(ray_shared, tmp_path, recursive):
    signal = Signal.remote()
    child_started, child_interrupted = tmp_path / "child", tmp_path / "child-interrupted"

    @ray.remote
    def child(ref_list, started, interrupted):
        touch(started)
        try:
            value = ray.get(ref_list[0])
        except KeyboardInterrupt:  # as in Ray
            touch(interrupted)
            raise
        touch(started + "-done")
        return value

    @ray.remote
    def parent(ref_list, started, interrupted):
        return ray.get(child.remote(ref_list, started, interrupted))

    ref = parent.remote([signal.wait.remote()], str(child_started), str(child_interrupted))
    wait_for_file(child_started)
    ray.cancel(ref, recursive=recursive)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)
    if recursive:
        wait_for_file(child_interrupted)
    ray.get(signal.send.remote())
    if not recursive:  # the child went on, and ended when its argument came
        wait_for_file(str(child_started) + "-done")
        assert not child_interrupted.exists()


def test_a_task_cancels_a_ref_it_was_given(ray_shared, tmp_path):
    started = tmp_path / "started"
    victim = sleep_forever.remote(str(started))
    wait_for_file(started)

    @ray.remote
    def canceller(ref_list):
        ray.cancel(ref_list[0])
        return "done"

    assert ray.get(canceller.remote([victim]), timeout=30) == "done"
    with pytest.raises(TaskCancelledError):
        ray.get(victim, timeout=30)


# ---------------------------------------------------------------------------- actors
def test_force_cancel_of_an_actor_call_raises_value_error(ray_shared):
    @ray.remote
    class A:
        async def hang(self):
            await asyncio.sleep(10e6)

    a = A.remote()
    ref = a.hang.remote()
    with pytest.raises(ValueError, match="force=True is not supported"):
        ray.cancel(ref, force=True)

    @ray.remote
    def from_a_task(handle):
        ref = handle.hang.remote()
        try:
            ray.cancel(ref, force=True)
        except ValueError as exc:
            return str(exc)
        finally:
            ray.cancel(ref)

    assert "not supported" in ray.get(from_a_task.remote(a), timeout=30)
    ray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)


def test_cancel_queued_call_of_a_sync_actor_never_runs(ray_shared, tmp_path):
    signal = Signal.remote()

    @ray.remote
    class Worker:
        def __init__(self):
            self.calls = []

        def block(self, ref_list):
            self.calls.append("block")
            return ray.get(ref_list[0])

        def record(self, name):
            self.calls.append(name)
            return name

        def calls_made(self):
            return self.calls

    actor = Worker.remote()
    blocked = actor.block.remote([signal.wait.remote()])
    queued = [actor.record.remote(f"q{i}") for i in range(5)]
    for ref in queued[1::2]:
        ray.cancel(ref)
    ray.get(signal.send.remote())
    ray.get(blocked, timeout=30)
    for i, ref in enumerate(queued):
        if i % 2:
            with pytest.raises(TaskCancelledError):
                ray.get(ref, timeout=30)
        else:
            assert ray.get(ref, timeout=30) == f"q{i}"
    assert ray.get(actor.calls_made.remote(), timeout=30) == ["block", "q0", "q2", "q4"]


def test_cancel_actor_call_waiting_for_its_argument(ray_shared):
    signal = Signal.remote()

    @ray.remote
    class A:
        def f(self, value):
            return value

    a = A.remote()
    ref = a.f.remote(wait_on.remote([signal.wait.remote()]))
    ray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)
    ray.get(signal.send.remote())
    assert ray.get(a.f.remote(3), timeout=30) == 3


@pytest.mark.parametrize("max_concurrency", [1, 4])
def test_running_sync_actor_call_sees_is_canceled(ray_shared, tmp_path, max_concurrency):
    started = tmp_path / "started"

    @ray.remote
    class Poller:
        def __init__(self):
            self.saw = None

        def run(self, path):
            touch(path)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if ray.get_runtime_context().is_canceled():
                    self.saw = "canceled"
                    return "stopped early"
                time.sleep(0.01)
            self.saw = "timeout"
            return "ran to the end"

        def what_it_saw(self):
            return self.saw

    actor = Poller.options(max_concurrency=max_concurrency).remote()
    ref = actor.run.remote(str(started))
    wait_for_file(started)
    ray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)
    assert ray.get(actor.what_it_saw.remote(), timeout=30) == "canceled"


def test_running_async_actor_call_is_cancelled(ray_shared, tmp_path):
    started = tmp_path / "started"

    @ray.remote
    class Sleeper:
        def __init__(self):
            self.cancelled = False

        async def sleep(self, path):
            touch(path)
            try:
                await asyncio.sleep(10e6)
            except asyncio.CancelledError:
                self.cancelled = True
                raise

        async def was_cancelled(self):
            return self.cancelled

        async def is_canceled_raises(self):
            try:
                ray.get_runtime_context().is_canceled()
            except RuntimeError:
                return True
            return False

    actor = Sleeper.remote()
    ref = actor.sleep.remote(str(started))
    wait_for_file(started)
    ray.cancel(ref)
    with pytest.raises(TaskCancelledError) as info:
        ray.get(ref, timeout=30)
    assert isinstance(info.value, RayTaskError)  # what Ray's own doc example catches
    assert ray.get(actor.was_cancelled.remote(), timeout=30)
    assert ray.get(actor.is_canceled_raises.remote(), timeout=30)


def test_is_canceled_in_the_driver_raises(ray_shared):
    with pytest.raises(RuntimeError):
        ray.get_runtime_context().is_canceled()

    @ray.remote
    def not_cancelled():
        return ray.get_runtime_context().is_canceled()

    assert ray.get(not_cancelled.remote(), timeout=30) is False


def test_cancelled_actor_call_is_not_retried_and_the_actor_lives_on(ray_shared, tmp_path):
    started = tmp_path / "started"

    @ray.remote(max_restarts=1, max_task_retries=2)
    class Counter:
        def __init__(self):
            self.n = 0

        def work(self, path):
            touch(path)
            while not ray.get_runtime_context().is_canceled():
                time.sleep(0.01)
            self.n += 1

        def count(self):
            return self.n

    actor = Counter.remote()
    ref = actor.work.remote(str(started))
    wait_for_file(started)
    ray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)
    assert ray.get(actor.count.remote(), timeout=30) == 1


# ------------------------------------------------ recursive cancel of actor calls
@ray.remote
def child_task(ref_list, started, interrupted):
    touch(started)
    try:
        value = ray.get(ref_list[0])
    except KeyboardInterrupt:  # a recursive cancel reached it
        touch(interrupted)
        raise
    return value


@ray.remote
class Spawner:
    """Each call submits a child task and waits for it (Ray's test_cancel_recursive_tree,
    with the actor's three execution models)."""

    def spawn(self, ref_list, started, interrupted):
        return ray.get(child_task.remote(ref_list, started, interrupted))


@ray.remote
class AsyncSpawner:
    async def spawn(self, ref_list, started, interrupted):
        return await child_task.remote(ref_list, started, interrupted)


@pytest.mark.parametrize("model", ["sync", "threaded", "async"])
def test_recursive_cancel_of_an_actor_call_reaches_only_its_children(ray_shared, tmp_path,
                                                                     model):
    # Two calls run at once where the actor allows it (threaded, async), each with a
    # child: cancelling one reaches its own child only, so the node must know which call
    # submitted which child (the worker names the call: worker.py _running_call).
    signal = Signal.remote()
    if model == "async":
        actor = AsyncSpawner.remote()
    else:
        actor = Spawner.options(max_concurrency=4 if model == "threaded" else 1).remote()
    paths = {name: str(tmp_path / name) for name in ("a", "a-int", "b", "b-int", "c", "c-int")}
    victim = actor.spawn.remote([signal.wait.remote()], paths["a"], paths["a-int"])
    wait_for_file(paths["a"])
    other = None
    if model != "sync":  # a second call running beside it
        other = actor.spawn.remote([signal.wait.remote()], paths["b"], paths["b-int"])
        wait_for_file(paths["b"])
    ray.cancel(victim, recursive=True)
    with pytest.raises(TaskCancelledError):
        ray.get(victim, timeout=30)
    wait_for_file(paths["a-int"])
    ray.get(signal.send.remote(), timeout=30)
    if other is not None:
        assert ray.get(other, timeout=30) is None  # Signal.wait returns None
        assert not os.path.exists(paths["b-int"])
    # Not recursive: the call is cancelled, its child runs to its end.
    signal2 = Signal.remote()
    victim = actor.spawn.remote([signal2.wait.remote()], paths["c"], paths["c-int"])
    wait_for_file(paths["c"])
    ray.cancel(victim, recursive=False)
    ray.get(signal2.send.remote(), timeout=30)
    with pytest.raises(TaskCancelledError):
        ray.get(victim, timeout=30)
    assert not os.path.exists(paths["c-int"])


def test_recursive_cancel_goes_down_a_chain_of_actor_calls(ray_shared, tmp_path):
    # Ray's test_cancel_recursive_chain: each actor's call calls the next actor's and
    # awaits it; a recursive cancel of the first reaches every one down the chain.
    @ray.remote(num_cpus=0)
    class Link:
        def __init__(self, child=None):
            self.child = child
            self.child_ref = None

        async def run(self, ref_list, started):
            if self.child is None:
                touch(started)
                await ref_list[0]
                return "end"
            self.child_ref = self.child.run.remote(ref_list, started)
            return await self.child_ref

        async def child_refs(self):
            return [self.child_ref]

    for recursive in (True, False):
        signal = Signal.remote()
        started = tmp_path / f"started-{recursive}"
        chain = [Link.remote()]
        for _ in range(3):
            chain.append(Link.remote(chain[-1]))
        ref = chain[-1].run.remote([signal.wait.remote()], str(started))
        wait_for_file(started)
        ray.cancel(ref, recursive=recursive)
        ray.get(signal.send.remote(), timeout=30)
        with pytest.raises(TaskCancelledError):
            ray.get(ref, timeout=30)
        for link in chain[1:]:
            [child_ref] = ray.get(link.child_refs.remote(), timeout=30)
            if recursive:
                with pytest.raises(TaskCancelledError):
                    ray.get(child_ref, timeout=30)
            else:
                assert ray.get(child_ref, timeout=30) == "end"


def test_get_task_id_in_concurrent_async_calls(ray_shared):
    # Each call of an async actor sees its own id, also while another call runs.
    @ray.remote
    class Ids:
        async def task_id(self, ref_list):
            before = ray.get_runtime_context().get_task_id()
            await ref_list[0]
            return before, ray.get_runtime_context().get_task_id()

    signal = Signal.remote()
    actor = Ids.remote()
    refs = [actor.task_id.remote([signal.wait.remote()]) for _ in range(3)]
    ray.get(signal.send.remote(), timeout=30)
    for ref, (before, after) in zip(refs, ray.get(refs, timeout=30)):
        assert before == after == ref.task_id().hex()


# ---------------------------------------------------------------------------- leaks
def test_nothing_leaks_after_many_cancels(tmp_path):
    from tests.conftest import hpcray_segments

    before = hpcray_segments()
    ray.init(num_cpus=2, num_gpus=0, object_store_memory=128 * 1024 * 1024)
    try:
        @ray.remote
        def big(i):
            return bytes(1 << 20)  # a store object, dropped when cancelled

        refs = [big.remote(i) for i in range(30)]
        for ref in refs[::2]:
            ray.cancel(ref)
        for i, ref in enumerate(refs):
            try:
                assert len(ray.get(ref, timeout=30)) == 1 << 20
            except TaskCancelledError:
                assert i % 2 == 0
        started = tmp_path / "started"
        ref = sleep_forever.remote(str(started))
        wait_for_file(started)
        ray.cancel(ref, force=True)
        with pytest.raises(TaskCancelledError):
            ray.get(ref, timeout=30)
        del refs, ref
        node = ray.context.driver_node
        deadline = time.monotonic() + 30
        while node.store.objects():
            assert time.monotonic() < deadline, f"store holds {node.store.objects()}"
            ray.put(0)  # the driver's dropped refs reach its node with its next call
            time.sleep(0.01)
        children = psutil.Process().children(recursive=True)
    finally:
        ray.shutdown()
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"processes left behind: {alive}"
    assert hpcray_segments() - before == set()
