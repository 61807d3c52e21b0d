"""Generator tasks on one node (hpcray/runtime/generators.py): streaming (Ray's default
for a generator function), num_returns="dynamic", num_returns=N, actor methods, wait,
retries, and that no item outlives its last reference.

Streaming is proved by handshakes through files: the task waits for a file the driver
writes only after it got an earlier item, so a runtime that delivered items at the end
of the task would hang (and time out) instead of passing.
"""

import asyncio
import gc
import os
import time

import numpy as np
import pytest

import hpcray
from hpcray import context

pytestmark = pytest.mark.timeout(90)


def wait_for_file(path: str, seconds: float = 60) -> None:
    """In a task: block until `path` exists (the driver's side of a handshake)."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)


def wait_until(what: str, check, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out waiting until " + what
        time.sleep(0.02)
        hpcray.put(0)  # a call: the node applies the driver's released refs


def node():
    return context.driver_node


def store_objects() -> int:
    return node().store.stats()["num_objects"]


def nothing_left() -> bool:
    gc.collect()
    hpcray.put(0)
    nm = node()
    with nm.lock:
        return not nm.generators.streams and store_objects() == 0 and not nm.tasks


def test_a_generator_function_returns_an_object_ref_generator(ray_shared):
    @hpcray.remote
    def numbers(n):
        for i in range(n):
            yield i * 10

    gen = numbers.remote(4)
    assert isinstance(gen, hpcray.ObjectRefGenerator)
    from hpcray._raylet import ObjectRefGenerator
    assert ObjectRefGenerator is hpcray.ObjectRefGenerator
    refs = list(gen)
    assert all(isinstance(r, hpcray.ObjectRef) for r in refs)
    assert hpcray.get(refs) == [0, 10, 20, 30]
    with pytest.raises(StopIteration):
        next(gen)
    assert gen.is_finished()
    explicit = numbers.options(num_returns="streaming").remote(2)
    assert [hpcray.get(r) for r in explicit] == [0, 10]
    del gen, refs, explicit
    wait_until("every item is freed", nothing_left)


def test_items_arrive_while_the_task_still_runs(ray_shared, tmp_path):
    @hpcray.remote
    def handshake(folder):
        for i in range(3):
            yield i
            wait_for_file(os.path.join(folder, f"got{i}"))  # the driver has item i

    gen = handshake.remote(str(tmp_path))
    for i in range(3):
        assert hpcray.get(next(gen)) == i
        (tmp_path / f"got{i}").touch()
    with pytest.raises(StopIteration):
        next(gen)


def test_an_error_comes_after_the_items_yielded_before_it(ray_shared):
    @hpcray.remote
    def fails_after_two():
        yield "a"
        yield "b"
        raise ValueError("boom")

    gen = fails_after_two.remote()
    a, b, error_ref = next(gen), next(gen), next(gen)
    assert hpcray.get([a, b]) == ["a", "b"]
    with pytest.raises(ValueError, match="boom"):
        hpcray.get(error_ref)
    with pytest.raises(StopIteration):
        next(gen)
    with pytest.raises(ValueError, match="boom"):
        hpcray.get(gen.completed())


def test_an_endless_generator_whose_consumer_stops(ray_shared, tmp_path):
    # Three large items reach the node, the consumer takes one and drops the generator
    # while the task still runs: the two it did not take are freed at once, and what
    # the task yields afterwards is freed as it comes.
    @hpcray.remote
    def endless(folder):
        i = 0
        while True:
            yield np.full(200_000, i)
            i += 1
            if i == 3:
                wait_for_file(os.path.join(folder, "dropped"))
            if os.path.exists(os.path.join(folder, "stop")):
                return

    gen = endless.remote(str(tmp_path))
    wait_until("three items are in the store", lambda: store_objects() == 3)
    first = next(gen)
    del gen
    wait_until("the two items not taken are freed", lambda: store_objects() == 1)
    (tmp_path / "dropped").touch()
    (tmp_path / "stop").touch()
    wait_until("the task ends", lambda: not node().tasks and not node().generators.streams)
    assert store_objects() == 1
    assert hpcray.get(first)[0] == 0
    del first
    wait_until("every item is freed", nothing_left)


def test_cancel_a_generator(ray_shared):
    @hpcray.remote
    def endless():
        i = 0
        while True:
            yield i
            i += 1
            time.sleep(0.01)

    gen = endless.remote()
    assert hpcray.get(next(gen)) == 0
    hpcray.cancel(gen)
    with pytest.raises(hpcray.exceptions.TaskCancelledError):
        for ref in gen:  # what was yielded before, then the cancellation
            hpcray.get(ref)
    del gen, ref
    wait_until("every item is freed", nothing_left)


def test_wait_on_generators_and_refs(ray_shared, tmp_path):
    @hpcray.remote
    def gated(folder):
        wait_for_file(os.path.join(folder, "go"))
        yield 1
        wait_for_file(os.path.join(folder, "go2"))
        yield 2

    @hpcray.remote
    def plain():
        return "plain"

    gen = gated.remote(str(tmp_path))
    ready, unready = hpcray.wait([gen], timeout=0)
    assert ready == [] and unready == [gen]
    (tmp_path / "go").touch()
    ready, unready = hpcray.wait([gen])
    assert ready == [gen] and unready == []
    assert hpcray.get(next(gen)) == 1
    ref = plain.remote()
    ready, unready = hpcray.wait([gen, ref], num_returns=1)
    assert ready == [ref] and unready == [gen]
    (tmp_path / "go2").touch()
    ready, _ = hpcray.wait([gen, ref], num_returns=2)
    assert ready == [gen, ref]
    assert hpcray.get(next(gen)) == 2
    ready, _ = hpcray.wait([gen], timeout=30)  # ended: next raises StopIteration at once
    assert ready == [gen]
    with pytest.raises(StopIteration):
        next(gen)


def test_async_for_over_a_generator(ray_shared):
    @hpcray.remote
    def numbers():
        yield from range(3)

    async def consume():
        return [await ref async for ref in numbers.remote()]

    assert asyncio.run(consume()) == [0, 1, 2]


def test_actor_generator_methods(ray_shared):
    @hpcray.remote
    class Plain:
        def count(self, n):
            yield from range(n)

    @hpcray.remote
    class Async:
        async def count(self, n):
            for i in range(n):
                await asyncio.sleep(0)
                yield i

    @hpcray.remote(max_concurrency=3)
    class Threaded:
        def count(self, n):
            yield from range(n)

    for cls in (Plain, Async, Threaded):
        actor = cls.remote()
        gen = actor.count.remote(3)
        assert isinstance(gen, hpcray.ObjectRefGenerator)
        assert [hpcray.get(r) for r in gen] == [0, 1, 2]
        dynamic = hpcray.get(actor.count.options(num_returns="dynamic").remote(2))
        assert [hpcray.get(r) for r in dynamic] == [0, 1]
        assert hpcray.get(actor.count.options(num_returns=2).remote(2)) == [0, 1]
    del actor, gen, dynamic
    wait_until("every item is freed", nothing_left)


def test_a_task_consumes_a_generator(ray_shared):
    @hpcray.remote
    def numbers(n):
        for i in range(n):
            yield np.full(100_000, i)  # large: in the store

    @hpcray.remote
    def total(n):
        return sum(int(hpcray.get(ref)[0]) for ref in numbers.remote(n))

    assert hpcray.get(total.remote(5)) == 10
    wait_until("every item is freed", nothing_left)


def test_generator_refs_can_be_passed_but_not_the_generator(ray_shared):
    @hpcray.remote
    def numbers():
        yield from range(3)

    @hpcray.remote
    def double(x):
        return 2 * x

    gen = numbers.remote()
    assert hpcray.get([double.remote(ref) for ref in gen]) == [0, 2, 4]
    with pytest.raises(TypeError, match="ObjectRefGenerator cannot be serialized"):
        double.remote(numbers.remote())


def test_dynamic_generators(ray_shared):
    @hpcray.remote(num_returns="dynamic")
    def split(array, size):
        while len(array):
            yield array[:size]
            array = array[size:]

    @hpcray.remote
    def count(generator):
        return sum(len(hpcray.get(ref)) for ref in generator)

    dynamic_ref = split.remote(np.zeros(250_000), 100_000)
    generator = hpcray.get(dynamic_ref)
    assert isinstance(generator, hpcray.DynamicObjectRefGenerator)
    assert [len(hpcray.get(r)) for r in generator] == [100_000, 100_000, 50_000]
    assert hpcray.get(count.remote(dynamic_ref)) == 250_000
    assert hpcray.get(count.remote(generator)) == 250_000
    del dynamic_ref, generator
    wait_until("every item is freed", nothing_left)

    @hpcray.remote(num_returns="dynamic")
    def fails():
        yield 1
        raise ValueError("late")

    first, last = hpcray.get(fails.remote())  # Ray: the error is the last ref
    assert hpcray.get(first) == 1
    with pytest.raises(ValueError, match="late"):
        hpcray.get(last)


def test_num_returns_n_with_a_generator(ray_shared):
    @hpcray.remote
    def two_then_error():
        yield 0
        yield 1
        raise ValueError("after two")

    r1, r2, r3, r4 = two_then_error.options(num_returns=4).remote()
    assert hpcray.get([r1, r2]) == [0, 1]
    for ref in (r3, r4):
        with pytest.raises(ValueError, match="after two"):
            hpcray.get(ref)
    a, b = two_then_error.options(num_returns=2).remote()  # Ray only logs the late error
    assert hpcray.get([a, b]) == [0, 1]
    with pytest.raises(ValueError, match="yielded more values"):
        hpcray.get(two_then_error.options(num_returns=1).remote())


def test_a_retried_generator_does_not_repeat_its_items(ray_shared, tmp_path):
    # The first run dies after two items; the re-run skips what the first reported.
    marker = str(tmp_path / "died")

    @hpcray.remote(max_retries=1)
    def dies_once(marker):
        for i in range(4):
            yield i
            if i == 1 and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)

    assert [hpcray.get(r) for r in dies_once.remote(marker)] == [0, 1, 2, 3]
    assert os.path.exists(marker)

    @hpcray.remote(max_retries=0)
    def dies(marker):
        yield 0
        os._exit(1)

    refs = list(dies.remote(marker))
    assert hpcray.get(refs[0]) == 0
    with pytest.raises(hpcray.exceptions.WorkerCrashedError):
        hpcray.get(refs[1])
    del refs
    wait_until("every item is freed", nothing_left)


def test_a_generator_object_returned_as_a_value_is_a_clear_error(ray_shared):
    def numbers():
        yield 1

    @hpcray.remote
    def returns_a_generator():
        return numbers()

    with pytest.raises(TypeError, match="returned a generator object"):
        hpcray.get(returns_a_generator.remote())


def test_cancel_a_generator_with_num_returns(ray_shared, tmp_path):
    # A num_returns=N generator runs its body after the call returned: still cancellable.
    @hpcray.remote(num_returns=2)
    def stuck(folder):
        yield 1
        open(os.path.join(folder, "running"), "w").close()
        time.sleep(10e6)
        yield 2

    first, second = stuck.remote(str(tmp_path))
    wait_until("it runs", lambda: (tmp_path / "running").exists())
    hpcray.cancel(first)
    for ref in (first, second):
        with pytest.raises(hpcray.exceptions.TaskCancelledError):
            hpcray.get(ref, timeout=60)


# ------------------------------------------------------------------ backpressure
# Ray's `_generator_backpressure_num_objects=N`: a streaming generator pauses while N of
# its items are not taken by its consumer. The generator checks this itself: before it
# makes item i, the consumer must have asked for at least i + 1 - N items (it writes
# asked-j before its next() for item j), else it writes a violation file. That check
# cannot fail where backpressure holds, whatever the load.

def _backpressured(folder: str, limit: int, n: int):
    def body():
        for i in range(n):
            asked = sum(1 for name in os.listdir(folder) if name.startswith("asked-"))
            if asked < i + 1 - limit:
                open(os.path.join(folder, f"violation-{i}-asked-{asked}"), "w").close()
            open(os.path.join(folder, f"made-{i}"), "w").close()
            yield i
    return body


def _consume(gen, folder: str, limit: int, n: int) -> None:
    wait_for_file(os.path.join(folder, f"made-{limit - 1}"))
    time.sleep(0.5)  # a generator without backpressure would make more meanwhile
    for i in range(n):
        open(os.path.join(folder, f"asked-{i}"), "w").close()
        assert hpcray.get(next(gen), timeout=30) == i
    with pytest.raises(StopIteration):
        next(gen)
    assert not [name for name in os.listdir(folder) if name.startswith("violation")]


@pytest.mark.parametrize("where", ["task", "actor", "async actor", "method option"])
def test_backpressure_pauses_the_generator_until_its_items_are_taken(ray_shared, tmp_path,
                                                                     where):
    folder, limit, n = str(tmp_path), 2, 8
    body = _backpressured(folder, limit, n)
    if where == "task":
        gen = hpcray.remote(_generator_backpressure_num_objects=limit)(body).remote()
    elif where == "async actor":
        @hpcray.remote
        class AsyncMaker:
            @hpcray.method(_generator_backpressure_num_objects=limit)
            async def make(self):
                for value in body():
                    await asyncio.sleep(0)
                    yield value
        gen = AsyncMaker.remote().make.remote()
    else:
        @hpcray.remote
        class Maker:
            @hpcray.method(_generator_backpressure_num_objects=limit if where == "actor"
                           else None)
            def make(self):
                yield from body()
        method = Maker.remote().make
        if where == "method option":
            method = method.options(_generator_backpressure_num_objects=limit)
        gen = method.remote()
    _consume(gen, folder, limit, n)


def test_a_dropped_backpressured_generator_runs_to_its_end(ray_shared, tmp_path):
    # Ray: deleting the generator ends the backpressure (nothing will take the items).
    folder = str(tmp_path)
    gen = hpcray.remote(_generator_backpressure_num_objects=1)(
        _backpressured(folder, 1, 5)).remote()
    open(os.path.join(folder, "asked-0"), "w").close()
    assert hpcray.get(next(gen), timeout=30) == 0
    del gen
    gc.collect()
    hpcray.put(0)  # the driver's dropped refs reach its node with its next call
    wait_for_file(os.path.join(folder, "made-4"), 30)
    wait_until("nothing is left", nothing_left)


def test_a_paused_generator_task_can_be_cancelled(ray_shared, tmp_path):
    closed = tmp_path / "closed"

    @hpcray.remote(_generator_backpressure_num_objects=1)
    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:  # paused after a yield: the cancel ends the task, which closes it
            open(closed, "w").close()

    gen = endless.remote()
    assert hpcray.get(next(gen), timeout=30) == 0
    hpcray.cancel(gen)
    with pytest.raises(hpcray.exceptions.TaskCancelledError):
        for ref in gen:
            hpcray.get(ref, timeout=30)
    wait_for_file(str(closed), 30)


def test_backpressure_option_is_checked_as_ray_does(ray_shared):
    with pytest.raises(ValueError, match="=0 is not allowed"):
        @hpcray.remote(_generator_backpressure_num_objects=0)
        def zero():
            yield 1
    with pytest.raises(ValueError, match="int"):
        @hpcray.remote(_generator_backpressure_num_objects="2")
        def text():
            yield 1

    @hpcray.remote(_generator_backpressure_num_objects=-1)  # -1: no limit, as in Ray
    def three():
        yield from range(3)

    gen = three.remote()
    hpcray.get(gen.completed(), timeout=30)  # it ran to its end with nothing taken
    assert [hpcray.get(ref) for ref in gen] == [0, 1, 2]


# Ray's actor option `_actor_generator_backpressure_num_objects=N`: all the streaming
# generator methods running on the actor share one budget of N items not taken. Each
# generator checks it before making an item: the items made by all of them, less those
# the consumer asked for (it writes asked-<key>-<j> before taking item j of <key>), must
# be fewer than N (else a violation file); and its method's own limit, if it has one,
# holds for its own items. Neither check can fail where the budgets hold, whatever the
# load.

def _count(folder: str, prefix: str) -> int:
    return sum(1 for name in os.listdir(folder) if name.startswith(prefix))


def _shared(folder: str, key: str, n: int, actor_limit: int, method_limit):
    for i in range(n):
        made, asked = _count(folder, "made-"), _count(folder, "asked-")
        if made - asked >= actor_limit:
            open(os.path.join(folder, f"violation-{key}{i}-made-{made}-asked-{asked}"),
                 "w").close()
        if method_limit is not None and \
                _count(folder, f"made-{key}") - _count(folder, f"asked-{key}") >= method_limit:
            open(os.path.join(folder, f"violation-{key}{i}-own-limit"), "w").close()
        open(os.path.join(folder, f"made-{key}-{i}"), "w").close()
        yield i


def _on_another_rank():
    """Rank 1's node in a job of several ranks (the driver is on rank 0), else None."""
    from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    nodes = sorted((node["rank"], node["NodeID"]) for node in hpcray.nodes())
    return NodeAffinitySchedulingStrategy(nodes[1][1], soft=False) if len(nodes) > 1 else None


@pytest.mark.parametrize("how", ["decorator", "options", "async", "with a method limit"])
def test_an_actor_wide_backpressure_budget_is_shared_by_its_generators(ray_shared, tmp_path,
                                                                       how):
    folder, limit, n = str(tmp_path), 3, 6
    method_limit = 2 if how == "with a method limit" else None

    class Maker:
        @hpcray.method(_generator_backpressure_num_objects=method_limit or -1)
        def make(self, key):
            yield from _shared(folder, key, n, limit, method_limit)

    class AsyncMaker:
        async def make(self, key):
            for value in _shared(folder, key, n, limit, None):
                await asyncio.sleep(0)
                yield value

    where = {"scheduling_strategy": _on_another_rank()}
    if how == "options":
        maker = hpcray.remote(max_concurrency=2)(Maker).options(
            _actor_generator_backpressure_num_objects=limit, **where).remote()
    else:
        cls = AsyncMaker if how == "async" else Maker
        maker = hpcray.remote(max_concurrency=2, _actor_generator_backpressure_num_objects=limit)(
            cls).options(**where).remote()
    first = maker.make.remote("a")
    wait_until("it pauses", lambda: _count(folder, "made-") >= (method_limit or limit))
    time.sleep(0.5)  # without the budget, the first would make more meanwhile
    second = maker.make.remote("b")
    time.sleep(0.5)  # and the second would start (a budget of its own)
    got = {"a": [], "b": []}
    pending = {"a": first, "b": second}
    while pending:  # take from whichever has an item ready (any order could wait forever)
        ready, _ = hpcray.wait(list(pending.values()), num_returns=1, timeout=60)
        assert ready, f"no item came; got {got}"
        key = next(k for k, gen in pending.items() if gen is ready[0])
        open(os.path.join(folder, f"asked-{key}-{len(got[key])}"), "w").close()
        try:
            got[key].append(hpcray.get(next(pending[key]), timeout=30))
        except StopIteration:
            del pending[key]
    assert got == {"a": list(range(n)), "b": list(range(n))}
    assert not [name for name in os.listdir(folder) if name.startswith("violation")]


def test_the_actor_wide_budget_counts_an_ended_generator_until_its_items_go(ray_shared,
                                                                             tmp_path):
    # As Ray: a generator that ended holds the budget with its items not taken yet; a
    # consumer that drops its generator frees them.
    folder = str(tmp_path)

    @hpcray.remote(max_concurrency=2, _actor_generator_backpressure_num_objects=3)
    class Maker:
        def make(self, key, n):
            yield from _shared(folder, key, n, 100, None)  # (no check: counted below)

    maker = Maker.options(scheduling_strategy=_on_another_rank()).remote()
    short = maker.make.remote("a", 2)
    hpcray.get(short.completed(), timeout=30)  # ended, its 2 items not taken
    longer = maker.make.remote("b", 4)
    wait_until("the budget's last slot is used", lambda: _count(folder, "made-b") >= 1)
    time.sleep(0.5)  # it would make more meanwhile if the ended one had freed its items
    assert _count(folder, "made-b") == 1
    del short
    gc.collect()
    hpcray.put(0)  # the driver's dropped refs reach its node with its next call
    assert [hpcray.get(ref, timeout=30) for ref in longer] == [0, 1, 2, 3]


def test_actor_backpressure_options_are_checked_as_ray_does(ray_shared):
    with pytest.raises(ValueError, match="must be > 0"):
        @hpcray.remote(_actor_generator_backpressure_num_objects=0)
        class Zero:
            pass
    with pytest.raises(ValueError, match="_generator_backpressure_num_objects"):
        @hpcray.remote(_generator_backpressure_num_objects=2)  # Ray: a task option only
        class TaskOption:
            pass

    @hpcray.remote(_actor_generator_backpressure_num_objects=-1)  # -1: no limit
    class Free:
        def make(self):
            yield from range(3)

    gen = Free.remote().make.remote()
    hpcray.get(gen.completed(), timeout=30)  # it ran to its end with nothing taken
    assert [hpcray.get(ref) for ref in gen] == [0, 1, 2]
