"""hpcray.util.queue against the real runtime, one node: Ray's Queue semantics from the
driver, tasks and actors (ray/python/ray/tests/test_queue.py is the model)."""

import asyncio
import queue as stdlib_queue
import time

import cloudpickle
import pytest

import hpcray
from hpcray import exceptions
from hpcray.util.queue import Empty, Full, Queue

pytestmark = pytest.mark.timeout(60)


@hpcray.remote
def get_one(q, timeout=None):
    return q.get(block=True, timeout=timeout)


@hpcray.remote
def put_one(q, item):
    q.put(item, block=True)
    return "put"


def test_empty_and_full_are_the_stdlib_exceptions():
    assert issubclass(Empty, stdlib_queue.Empty) and issubclass(Full, stdlib_queue.Full)
    assert hpcray.util.queue.Queue is Queue


def test_items_come_out_in_order_and_sizes_follow(ray_shared):
    q = Queue()
    assert q.empty() and not q.full() and q.qsize() == 0 and len(q) == 0
    for item in range(10):
        q.put(item)
        assert q.qsize() == item + 1
    assert q.size() == 10 and not q.empty() and not q.full()
    assert [q.get() for _ in range(10)] == list(range(10))
    assert q.empty()


def test_get_without_items_raises_empty(ray_shared):
    q = Queue()
    q.put("a")
    assert q.get(block=False) == "a"
    q.put("b")
    assert q.get(timeout=5) == "b"
    with pytest.raises(ValueError):
        q.get(timeout=-1)
    with pytest.raises(Empty):
        q.get_nowait()
    started = time.monotonic()
    with pytest.raises(stdlib_queue.Empty):  # Empty is a queue.Empty, as in Ray
        q.get(timeout=0.3)
    assert time.monotonic() - started >= 0.3


def test_put_into_a_full_queue_raises_full(ray_shared):
    q = Queue(maxsize=1)
    q.put(0, block=False)
    assert q.full()
    with pytest.raises(Full):
        q.put_nowait(1)
    with pytest.raises(ValueError):
        q.put(1, timeout=-1)
    started = time.monotonic()
    with pytest.raises(stdlib_queue.Full):
        q.put(1, timeout=0.3)
    assert time.monotonic() - started >= 0.3
    assert q.get() == 0 and q.empty()  # the refused items never went in


def test_a_task_blocked_in_get_waits_for_the_driver_put(ray_shared):
    q = Queue()
    waiting = get_one.remote(q)
    with pytest.raises(exceptions.GetTimeoutError):
        hpcray.get(waiting, timeout=0.5)
    with pytest.raises(Empty):  # the blocked get holds nothing back from the driver
        q.get_nowait()
    q.put("work")
    assert hpcray.get(waiting, timeout=20) == "work"


def test_a_task_blocked_in_put_waits_for_room(ray_shared):
    q = Queue(maxsize=1)
    q.put(1)
    waiting = put_one.remote(q, 2)
    with pytest.raises(exceptions.GetTimeoutError):
        hpcray.get(waiting, timeout=0.5)
    with pytest.raises(Full):
        q.put_nowait(3)
    assert q.get() == 1
    assert hpcray.get(waiting, timeout=20) == "put"
    assert q.get(timeout=5) == 2


def test_blocked_gets_do_not_block_other_callers(ray_shared):
    # Two tasks (every CPU of the fixture) and an actor wait in get at once; the queue
    # still answers the driver, and each waiter gets one item.
    q = Queue()

    @hpcray.remote
    class Consumer:
        def take(self, queue):
            return queue.get(timeout=30)

    consumer = Consumer.remote()
    waiting = [get_one.remote(q, 30), get_one.remote(q, 30), consumer.take.remote(q)]
    time.sleep(0.5)
    started = time.monotonic()
    assert q.qsize() == 0
    assert time.monotonic() - started < 5
    for item in ("x", "y", "z"):
        q.put(item)
    assert sorted(hpcray.get(waiting, timeout=30)) == ["x", "y", "z"]


def test_batches_go_in_whole_or_not_at_all(ray_shared):
    q = Queue(1)
    with pytest.raises(Full):
        q.put_nowait_batch([1, 2])
    assert q.empty()
    with pytest.raises(Empty):
        q.get_nowait_batch(1)
    with pytest.raises(TypeError):
        q.put_nowait_batch(5)
    with pytest.raises(ValueError):
        q.get_nowait_batch(-1)
    big = Queue(100)
    big.put_nowait_batch(range(100))
    with pytest.raises(Empty):
        big.get_nowait_batch(101)
    assert big.qsize() == 100
    assert big.get_nowait_batch(100) == list(range(100))


def test_async_put_and_get_from_the_driver(ray_shared):
    q = Queue(1)

    async def main():
        await q.put_async(0, block=False)
        assert await q.get_async() == 0
        await q.put_async(1, timeout=1)
        assert await q.get_async(block=False) == 1
        with pytest.raises(ValueError):
            await q.get_async(timeout=-1)
        with pytest.raises(Empty):
            await q.get_async(block=False)
        with pytest.raises(Empty):
            await q.get_async(timeout=0.2)
        await q.put_async(2)
        with pytest.raises(Full):
            await q.put_async(3, block=False)
        with pytest.raises(Full):
            await q.put_async(3, timeout=0.2)
        return await q.get_async()

    assert asyncio.run(main()) == 2


def test_async_actor_consumes_with_get_async(ray_shared):
    q = Queue()

    @hpcray.remote
    class AsyncConsumer:
        async def drain(self, queue, n):
            return [await queue.get_async(timeout=30) for _ in range(n)]

    consumer = AsyncConsumer.remote()
    ref = consumer.drain.remote(q, 3)
    for item in range(3):
        q.put(item)
    assert hpcray.get(ref, timeout=30) == [0, 1, 2]


def test_queue_passed_to_actors_and_tasks_is_one_queue(ray_shared):
    q = Queue()

    @hpcray.remote
    class Producer:
        def __init__(self, queue):
            self.queue = queue

        def produce(self, items):
            for item in items:
                self.queue.put(item)
            return len(items)

    producer = Producer.remote(q)
    assert hpcray.get(producer.produce.remote(["a", "b", "c"])) == 3
    assert hpcray.get(get_one.remote(q)) == "a"
    assert [q.get(), q.get()] == ["b", "c"]
    # A Queue pickles as its actor handle: a copy shares the items.
    copy = cloudpickle.loads(cloudpickle.dumps(q))
    assert copy.actor == q.actor and copy.maxsize == q.maxsize
    copy.put("shared")
    assert q.get(timeout=5) == "shared"


def test_queue_made_inside_a_task(ray_shared):
    @hpcray.remote
    def make_and_fill():
        inner = Queue()
        inner.put_nowait_batch([1, 2, 3])
        return inner

    inner = hpcray.get(make_and_fill.remote())
    assert inner.get_nowait_batch(3) == [1, 2, 3]


def test_shutdown_ends_the_actor(ray_shared):
    for force in (False, True):
        q = Queue()
        actor = q.actor
        q.put(1)
        q.shutdown(force=force)
        assert q.actor is None
        with pytest.raises(exceptions.RayActorError):
            hpcray.get(actor.empty.remote(), timeout=20)


@pytest.mark.one_node
def test_queue_holds_no_cpu_unless_asked(ray_shared):
    assert hpcray.available_resources()["CPU"] == 2
    q = Queue()
    q.put(1)
    assert hpcray.available_resources()["CPU"] == 2
    q.shutdown()
    q = Queue(actor_options={"num_cpus": 1})
    q.put(1)  # the actor runs: it holds its CPU now
    assert hpcray.available_resources()["CPU"] == 1
    q.shutdown()
    deadline = time.monotonic() + 20
    while hpcray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hpcray.available_resources()["CPU"] == 2
