"""Actor concurrency groups (Ray's page "Limiting Concurrency Per-Method with Concurrency
Groups"): each group runs at most its size of calls at once, in its own threads (a
threaded actor) or its own event loop thread (an async actor); a full or blocked group
holds up no other; methods without a group are in the default group, of the actor's
max_concurrency; a sync actor keeps each group's calls in submission order, not across
groups.

Each call of `Gate.enter` counts itself running in the group it names and then waits
for a token that the test hands out one at a time (`release`); the test waits, through
the actor's "control" group, until the counts it expects are reached (`until`). So a
group's limit shows as the most calls seen running at once (`peak`), never by timing.
"rank1": the actor on another node than its caller's (as 3 ranks; one node: anywhere).
"""

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import hpcray
from hpcray.exceptions import GetTimeoutError, RayActorError
from tests.test_actors import _on_rank

GROUPS = {"io": 2, "compute": 4, "control": 4}
WAIT_S = 60  # a deadlock guard only: every wait ends when its condition holds


class _Counts:
    """What the calls of each group did, behind one condition variable."""

    def __init__(self):
        self.cond = threading.Condition()
        self.running: dict = {}
        self.peak: dict = {}
        self.started: dict = {}
        self.finished: dict = {}
        self.tokens: dict = {}
        self.threads: dict = {}

    def enter(self, label):
        with self.cond:
            self.running[label] = self.running.get(label, 0) + 1
            self.started[label] = self.started.get(label, 0) + 1
            self.peak[label] = max(self.peak.get(label, 0), self.running[label])
            self.threads.setdefault(label, set()).add(threading.current_thread().name)
            self.cond.notify_all()
            if not self.cond.wait_for(lambda: self.tokens.get(label, 0) > 0, WAIT_S):
                raise TimeoutError(f"no token for {label}")
            self.tokens[label] -= 1
            self.running[label] -= 1
            self.finished[label] = self.finished.get(label, 0) + 1
            self.cond.notify_all()

    def release(self, label, n):
        with self.cond:
            self.tokens[label] = self.tokens.get(label, 0) + n
            self.cond.notify_all()

    def until(self, label, running=None, finished=None):
        def reached():
            # (at least: a group over its limit fails the test's checks at once)
            return ((running is None or self.running.get(label, 0) >= running)
                    and (finished is None or self.finished.get(label, 0) >= finished))
        with self.cond:
            if not self.cond.wait_for(reached, WAIT_S):
                raise TimeoutError(f"{label}: {self.snapshot(label)}")
            return self.snapshot(label)

    def snapshot(self, label):
        return {"running": self.running.get(label, 0), "peak": self.peak.get(label, 0),
                "started": self.started.get(label, 0),
                "finished": self.finished.get(label, 0),
                "threads": sorted(self.threads.get(label, ()))}


@hpcray.remote(concurrency_groups=GROUPS)
class ThreadedGate:
    def __init__(self):
        self.counts = _Counts()

    def enter(self, label):  # the default group
        self.counts.enter(label)
        return label

    @hpcray.method(concurrency_group="io")
    def enter_io(self, label):
        self.counts.enter(label)
        return label

    @hpcray.method(concurrency_group="control")
    def release(self, label, n=1):
        self.counts.release(label, n)

    @hpcray.method(concurrency_group="control")
    def until(self, label, running=None, finished=None):
        return self.counts.until(label, running, finished)

    @hpcray.method(concurrency_group="control")
    def pid(self):
        return os.getpid()

    def die(self):
        os._exit(1)


@hpcray.remote(concurrency_groups=GROUPS)
class AsyncGate:
    def __init__(self):
        self.counts = _Counts()
        # (asyncio.to_thread's default pool has too few threads for all the waits)
        self.waits = ThreadPoolExecutor(64)

    def _in_thread(self, *args):
        return asyncio.get_running_loop().run_in_executor(self.waits, *args)

    async def enter(self, label):  # the default group
        # Waits in a thread: its group's loop runs the group's other calls meanwhile.
        await self._in_thread(self.counts.enter, label)
        return threading.current_thread().name

    @hpcray.method(concurrency_group="io")
    async def enter_io(self, label):
        await self._in_thread(self.counts.enter, label)
        return threading.current_thread().name

    @hpcray.method(concurrency_group="io")
    def block_io_loop(self, label):
        # A sync method of an async actor runs in its group's loop and blocks it.
        self.counts.enter(label)
        return threading.current_thread().name

    @hpcray.method(concurrency_group="control")
    async def release(self, label, n=1):
        self.counts.release(label, n)

    @hpcray.method(concurrency_group="control")
    async def until(self, label, running=None, finished=None):
        return await self._in_thread(self.counts.until, label, running, finished)

    @hpcray.method(concurrency_group="control")
    async def pid(self):
        return os.getpid()

    async def loop_thread(self):
        return threading.current_thread().name

    @hpcray.method(concurrency_group="io")
    async def io_loop_thread(self):
        return threading.current_thread().name

    def die(self):
        os._exit(1)


KINDS = {"threaded": ThreadedGate, "async": AsyncGate}


def _make(kind, where, **options):
    if where == "rank1":
        options["scheduling_strategy"] = _on_rank(1)
    return KINDS[kind].options(**options).remote()


def _check_limit(gate, call, label, size, extra=3):
    """`size + extra` calls of `call` (one group's): at most `size` run at once, and each
    token handed out lets exactly one more start."""
    refs = [call.remote(label) for _ in range(size + extra)]
    state = hpcray.get(gate.until.remote(label, running=size), timeout=WAIT_S)
    assert state["started"] == state["running"] == size, state
    for k in range(1, extra + 1):
        hpcray.get(gate.release.remote(label, 1))
        state = hpcray.get(gate.until.remote(label, running=size, finished=k), timeout=WAIT_S)
        assert state["started"] == size + k and state["running"] == size, state
    hpcray.get(gate.release.remote(label, size))
    hpcray.get(refs, timeout=WAIT_S)
    state = hpcray.get(gate.until.remote(label, running=0, finished=size + extra))
    assert state["peak"] == size, state
    return state


# ---------------------------------------------------------------- limits
@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["anywhere", "rank1"])
@pytest.mark.parametrize("kind", ["threaded", "async"])
def test_each_group_limit_holds(ray_shared, kind, where):
    gate = _make(kind, where)
    # @method(concurrency_group="io"): 2 at once
    state = _check_limit(gate, gate.enter_io, "io", 2)
    if kind == "threaded":  # its own pool of 2 threads
        assert len(state["threads"]) <= 2 and all("-io_" in t for t in state["threads"])
    # .options(concurrency_group=...) per call: the io method in "compute", 4 at once
    _check_limit(gate, gate.enter_io.options(concurrency_group="compute"), "compute", 4)
    # .options() without a group: the method's own
    _check_limit(gate, gate.enter_io.options(), "io-again", 2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["anywhere", "rank1"])
@pytest.mark.parametrize("kind", ["threaded", "async"])
def test_default_group_is_max_concurrency(ray_shared, kind, where):
    # Ray's defaults: 1 for a threaded (sync) actor, 1000 for an async one.
    gate = _make(kind, where)
    if kind == "threaded":
        _check_limit(gate, gate.enter, "default", 1)
    else:
        n = 12  # all at once: well within 1000
        refs = [gate.enter.remote("default") for _ in range(n)]
        hpcray.get(gate.until.remote("default", running=n), timeout=WAIT_S)
        hpcray.get(gate.release.remote("default", n))
        hpcray.get(refs, timeout=WAIT_S)
    sized = _make(kind, where, max_concurrency=3)
    _check_limit(sized, sized.enter, "default", 3)
    _check_limit(sized, sized.enter_io, "io", 2)  # the groups keep their sizes


# ---------------------------------------------------------------- independence
@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["anywhere", "rank1"])
@pytest.mark.parametrize("kind", ["threaded", "async"])
def test_a_full_group_blocks_no_other(ray_shared, kind, where):
    gate = _make(kind, where)
    io = [gate.enter_io.remote("io") for _ in range(4)]  # 2 run, 2 wait for room
    hpcray.get(gate.until.remote("io", running=2), timeout=WAIT_S)
    default = gate.enter.remote("default")
    compute = [gate.enter_io.options(concurrency_group="compute").remote("compute")
               for _ in range(4)]
    hpcray.get(gate.until.remote("compute", running=4), timeout=WAIT_S)
    hpcray.get(gate.until.remote("default", running=1), timeout=WAIT_S)
    hpcray.get(gate.release.remote("compute", 4))
    hpcray.get(gate.release.remote("default", 1))
    hpcray.get(compute + [default], timeout=WAIT_S)
    ready, _ = hpcray.wait(io, num_returns=len(io), timeout=0)
    assert ready == []  # none was given a token
    hpcray.get(gate.release.remote("io", 4))
    hpcray.get(io, timeout=WAIT_S)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["anywhere", "rank1"])
def test_async_groups_have_their_own_event_loop(ray_shared, where):
    gate = _make("async", where)
    default = hpcray.get(gate.loop_thread.remote())
    io = hpcray.get(gate.io_loop_thread.remote())
    compute = hpcray.get(gate.loop_thread.options(concurrency_group="compute").remote())
    assert len({default, io, compute}) == 3, (default, io, compute)
    # A sync method blocks its group's loop: that group's async calls wait, the others
    # do not.
    blocker = gate.block_io_loop.remote("blocker")
    hpcray.get(gate.until.remote("blocker", running=1), timeout=WAIT_S)
    behind = gate.io_loop_thread.remote()
    assert hpcray.get(gate.loop_thread.remote(), timeout=WAIT_S) == default
    assert hpcray.get(gate.loop_thread.options(concurrency_group="compute").remote(),
                      timeout=WAIT_S) == compute
    with pytest.raises(GetTimeoutError):
        hpcray.get(behind, timeout=0)  # its loop is still blocked
    hpcray.get(gate.release.remote("blocker"))
    assert hpcray.get([blocker, behind], timeout=WAIT_S) == [io, io]


# ---------------------------------------------------------------- restarts
@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["anywhere", "rank1"])
@pytest.mark.parametrize("kind", ["threaded", "async"])
def test_groups_survive_a_restart(ray_shared, kind, where):
    gate = _make(kind, where, max_restarts=1)
    before = hpcray.get(gate.pid.remote())
    with pytest.raises(RayActorError):  # (then no call is in flight as it dies)
        hpcray.get(gate.die.remote(), timeout=WAIT_S)
    after = hpcray.get(gate.pid.remote(), timeout=WAIT_S)
    assert after != before
    _check_limit(gate, gate.enter_io, "io", 2)
    _check_limit(gate, gate.enter_io.options(concurrency_group="compute"), "compute", 4)


# ---------------------------------------------------------------- errors
def test_a_call_to_a_group_the_actor_lacks_is_refused(ray_shared):
    gate = ThreadedGate.remote()
    # Ray's actor process dies of a failed check; here the call is refused where it is
    # made, and the actor lives on.
    with pytest.raises(ValueError, match="no concurrency group 'nope'"):
        gate.enter.options(concurrency_group="nope")
    with pytest.raises(TypeError):
        gate.enter.options(concurrency_group=1)

    @hpcray.remote
    class Plain:
        def f(self):
            return 1

    plain = Plain.remote()
    with pytest.raises(ValueError, match="no concurrency group 'io'"):
        plain.f.options(concurrency_group="io")
    # None or "": the method's own group, as in Ray
    assert hpcray.get(plain.f.options(concurrency_group=None).remote()) == 1
    assert hpcray.get(plain.f.options(concurrency_group="").remote()) == 1
    assert hpcray.get(gate.pid.remote()) > 0


def _actor(groups, method_group="io"):
    class Actor:
        @hpcray.method(concurrency_group=method_group)
        def f(self):
            return threading.current_thread().name

    return hpcray.remote(concurrency_groups=groups)(Actor)


def test_bad_groups_fail_at_creation(ray_shared):
    # Raised at .remote(), as Ray raises its own there (Ray: AssertionError for an
    # undefined group, OverflowError for -1, a dead actor for 0).
    with pytest.raises(ValueError, match="does not define"):
        _actor({"compute": 1}).remote()
    with pytest.raises(ValueError, match="does not define"):
        _actor(None).remote()
    with pytest.raises(ValueError, match=">= 1"):
        _actor({"io": 0}).remote()
    with pytest.raises(ValueError, match=">= 1"):
        _actor({"io": -1}).remote()
    with pytest.raises(TypeError):
        _actor({"io": "2"}).remote()
    with pytest.raises(TypeError):
        _actor(["io"]).remote()
    with pytest.raises(TypeError):  # as Ray, at the decorator
        _actor("io")
    with pytest.raises(TypeError):
        hpcray.method(concurrency_group=1)
    with pytest.raises(ValueError, match="not supported in '.options\\(\\)'"):
        _actor({"io": 1}).options(concurrency_groups={"io": 2})
    # Ray takes a float size
    assert "io" in hpcray.get(_actor({"io": 2.0}).remote().f.remote())


def test_named_actor_handle_knows_the_groups(ray_shared):
    gate = ThreadedGate.options(name="cg-gate").remote()
    found = hpcray.get_actor("cg-gate")
    with pytest.raises(ValueError):
        found.enter.options(concurrency_group="nope")
    assert hpcray.get(found.pid.options(concurrency_group="compute").remote()) == \
        hpcray.get(gate.pid.remote())
    hpcray.kill(gate)


# ---------------------------------------------------------------- order
@hpcray.remote
class _Signal:
    def __init__(self):
        self.event = asyncio.Event()

    async def send(self):
        self.event.set()

    async def wait(self):
        await self.event.wait()


@hpcray.remote
def _held(signal, value):
    hpcray.get(signal.wait.remote())
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


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["anywhere", "rank1"])
@pytest.mark.parametrize("case, groups, expected", [
    ("sync-default", (None, None), "in order"),
    ("sync-io", ("io", "io"), "in order"),
    ("sync-one", ("one", "one"), "in order"),
    ("sync-default-then-io", (None, "io"), "out of order"),
    ("sync-io-then-default", ("io", None), "out of order"),
    ("threads-default", (None, None), "out of order"),
    ("async-default", (None, None), "out of order"),
    ("async-io", ("io", "io"), "out of order"),
])
def test_order_within_and_across_groups(ray_shared, case, groups, expected, where):
    # As Ray 2.60 (its "Actor Task Execution Order" page, with groups): a sync actor
    # (max_concurrency 1) runs each group's calls in submission order, even behind a call
    # still waiting for its argument, and the calls of different groups in no set order;
    # an async actor, or one of max_concurrency > 1, orders none.
    cls = AsyncAdder if case.startswith("async") else Adder
    options = {"max_concurrency": 2} if case.startswith("threads") else {}
    if where == "rank1":
        options["scheduling_strategy"] = _on_rank(1)
    adder = hpcray.remote(concurrency_groups={"io": 2, "one": 1})(cls).options(
        **options).remote()
    hpcray.get(adder.add.remote(0))  # placed: its node is known before the calls
    signal = _Signal.remote()
    first_group, second_group = groups
    first = adder.add.options(concurrency_group=first_group).remote(_held.remote(signal, 1))
    second = adder.add.options(concurrency_group=second_group).remote(2)
    if expected == "out of order":
        assert hpcray.get(second, timeout=WAIT_S) == 2  # while the first still waits
        hpcray.get(signal.send.remote())
        assert hpcray.get(first, timeout=WAIT_S) == 3
    else:
        ready, _ = hpcray.wait([second], timeout=0.5)
        assert ready == []  # behind the first (a broken order shows here, or below)
        hpcray.get(signal.send.remote())
        results = hpcray.get([first, second], timeout=WAIT_S)
        if groups == ("io", "io"):
            # Both leave at once, in order, for the group's 2 threads, whose race decides
            # which adds first (as Ray's thread pool per group): the order is the hold.
            assert results in ([1, 3], [3, 2]), results
        else:
            assert results == [1, 3]
