"""Generator tasks across nodes (hpcray/runtime/generators.py), for real under mpiexec:
items yielded on ranks 1 and 2 reach their owner as they are yielded (TaskItem), and no
copy outlives its last reference on any node.

Streaming is proved by file handshakes: the task waits for a file the driver writes only
after it got the previous item, so items held back until the task ends would hang the
test instead of passing it. Freeing is waited for under deadlines, never on a sleep.
"""

import pytest

from tests.multinode.test_references import run

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(200)]

HELPERS = """
    import os, struct

    def wait_for_file(path, seconds=60):
        deadline = time.monotonic() + seconds
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise TimeoutError(path)
            time.sleep(0.01)

    def item_hex(gen, index):
        return (gen.task_id() + struct.pack(">I", index + 2)).hex()

    def nothing_left():
        from hpcray import context
        nm = context.driver_node
        gc.collect()
        ray.put(0)
        with nm.lock:
            return not nm.generators.streams and not nm.tasks
"""


def test_items_made_on_other_ranks_stream_to_the_driver(tmp_path):
    run(tmp_path, 3, HELPERS + f"""
    folder = {str(tmp_path)!r}

    @ray.remote
    def handshake(tag, n):
        for i in range(n):
            # small items travel inline, large ones stay in this node's store
            yield np.full(4 if i % 2 else 300_000, i)
            wait_for_file(os.path.join(folder, f"{{tag}}-got{{i}}"))

    @ray.remote
    def first_and_length(array):
        return int(array[0]), len(array)

    for rank in (1, 2):
        gen = handshake.options(scheduling_strategy=at(rank)).remote(f"r{{rank}}", 4)
        for i in range(4):
            ref = next(gen)
            value = ray.get(ref)
            assert value[0] == i and len(value) == (4 if i % 2 else 300_000)
            open(os.path.join(folder, f"r{{rank}}-got{{i}}"), "w").close()
            # an item is an ordinary ref: an argument of a task on the third rank
            other = first_and_length.options(scheduling_strategy=at(3 - rank)).remote(ref)
            assert ray.get(other) == (i, len(value))
        try:
            next(gen)
            raise AssertionError("no StopIteration")
        except StopIteration:
            pass
    print("STREAMED")
    """)


def test_errors_dynamic_generators_and_actors_on_other_ranks(tmp_path):
    run(tmp_path, 3, HELPERS + """
    @ray.remote
    def fails_after_two():
        yield 1
        yield 2
        raise ValueError("boom")

    refs = list(fails_after_two.options(scheduling_strategy=at(2)).remote())
    assert len(refs) == 3 and ray.get(refs[:2]) == [1, 2]
    try:
        ray.get(refs[2])
        raise AssertionError("no error")
    except ValueError as error:
        assert "boom" in str(error)

    @ray.remote(num_returns="dynamic")
    def split(n):
        for i in range(n):
            yield np.full(200_000, i)

    @ray.remote
    def total(generator):
        return sum(int(ray.get(ref)[0]) for ref in generator)

    dynamic_ref = split.options(scheduling_strategy=at(1)).remote(4)
    assert [ray.get(r)[0] for r in ray.get(dynamic_ref)] == [0, 1, 2, 3]
    assert ray.get(total.options(scheduling_strategy=at(2)).remote(dynamic_ref)) == 6

    @ray.remote
    class Counter:
        def count(self, n):
            yield from range(n)

        async def acount(self, n):
            for i in range(n):
                yield i

    actor = Counter.options(scheduling_strategy=at(1)).remote()
    assert [ray.get(r) for r in actor.count.remote(3)] == [0, 1, 2]

    # A task on rank 2 consumes a generator that runs on rank 1: rank 2's node owns it.
    @ray.remote
    def numbers(n):
        for i in range(n):
            yield np.full(200_000, i)

    @ray.remote
    def consume(n):
        gen = numbers.options(scheduling_strategy=at(1)).remote(n)
        return [int(ray.get(ref)[0]) for ref in gen]

    assert ray.get(consume.options(scheduling_strategy=at(2)).remote(3)) == [0, 1, 2]
    del refs, dynamic_ref, actor
    wait_until("the driver's node has no stream or task left", nothing_left)
    print("DONE")
    """)


def test_items_not_taken_are_freed_on_the_rank_that_made_them(tmp_path):
    # An endless generator on rank 2 yields large items (their primary copies stay on
    # rank 2); the driver takes one and drops the generator while it runs: the items it
    # did not take go from rank 2's store, the one it took stays until it is dropped.
    # The generator takes no CPU: rank 2 has one, and the probes (holds) run there while
    # it does (with it, they waited for its wait_for_file to time out, after the task).
    run(tmp_path, 3, HELPERS + f"""
    folder = {str(tmp_path)!r}

    @ray.remote(num_cpus=0)
    def endless():
        i = 0
        while not os.path.exists(os.path.join(folder, "stop")):
            yield np.full(300_000, i)
            i += 1
            if i == 3:
                wait_for_file(os.path.join(folder, "dropped"))
                open(os.path.join(folder, "resumed"), "w").close()

    gen = endless.options(scheduling_strategy=at(2)).remote()
    first = next(gen)
    assert ray.get(first)[0] == 0
    made = [item_hex(gen, i) for i in range(3)]
    wait_until("rank 2 holds the first three items", lambda: len(holds(2, *made)) == 3)
    del gen
    wait_until("the two not taken are freed on rank 2",
               lambda: sorted(holds(2, *made)) == [made[0]])
    open(os.path.join(folder, "dropped"), "w").close()
    open(os.path.join(folder, "stop"), "w").close()
    wait_until("the task ends", nothing_left)
    # it ran on until told to (not ended by wait_for_file's timeout)
    assert os.path.exists(os.path.join(folder, "resumed"))
    assert sorted(holds(2, *made)) == [made[0]]
    del first
    gc.collect()
    wait_until("the taken item is freed on rank 2", lambda: not holds(2, *made))
    wait_until("and on rank 0", lambda: not holds(0, *made))
    print("FREED")
    """)


def test_a_retried_generator_on_another_rank_does_not_repeat_items(tmp_path):
    run(tmp_path, 3, HELPERS + f"""
    marker = os.path.join({str(tmp_path)!r}, "died")

    @ray.remote(max_retries=1)
    def dies_once():
        for i in range(4):
            yield i
            if i == 1 and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)

    gen = dies_once.options(scheduling_strategy=at(1)).remote()
    assert [ray.get(r) for r in gen] == [0, 1, 2, 3]
    assert os.path.exists(marker)
    print("RETRIED")
    """)


def test_backpressure_across_ranks(tmp_path):
    # `_generator_backpressure_num_objects=N` with the generator on another rank than its
    # owner (GeneratorPaused / GeneratorResume): before it makes item i, the consumer
    # must have asked for i + 1 - N items (checked by the generator itself: a violation
    # file otherwise); a consumer on rank 1 owns a stream made on rank 2 too; dropping
    # the generator lets it run to its end.
    run(tmp_path, 3, HELPERS + f"""
    root = {str(tmp_path)!r}

    def backpressured(folder, limit, n):
        for i in range(n):
            asked = sum(1 for name in os.listdir(folder) if name.startswith("asked-"))
            if asked < i + 1 - limit:
                open(os.path.join(folder, f"violation-{{i}}-asked-{{asked}}"), "w").close()
            open(os.path.join(folder, f"made-{{i}}"), "w").close()
            yield i

    def consume(gen, folder, limit, n):
        wait_for_file(os.path.join(folder, f"made-{{limit - 1}}"))
        time.sleep(0.5)  # without backpressure it would make more meanwhile
        for i in range(n):
            open(os.path.join(folder, f"asked-{{i}}"), "w").close()
            assert ray.get(next(gen), timeout=60) == i
        assert not [f for f in os.listdir(folder) if f.startswith("violation")]
        return "consumed"

    task = ray.remote(_generator_backpressure_num_objects=2)(backpressured)

    @ray.remote
    class Maker:
        @ray.method(_generator_backpressure_num_objects=1)
        async def make(self, folder, n):
            for value in backpressured(folder, 1, n):
                yield value

    @ray.remote
    def consumer_elsewhere(folder):
        gen = task.options(scheduling_strategy=at(2)).remote(folder, 2, 6)
        return consume(gen, folder, 2, 6)

    def folder(name):
        path = os.path.join(root, name)
        os.mkdir(path)
        return path

    here = folder("driver")
    consume(task.options(scheduling_strategy=at(2)).remote(here, 2, 6), here, 2, 6)
    actor_folder = folder("actor")
    maker = Maker.options(scheduling_strategy=at(1)).remote()
    consume(maker.make.remote(actor_folder, 5), actor_folder, 1, 5)
    elsewhere = folder("elsewhere")
    assert ray.get(consumer_elsewhere.options(scheduling_strategy=at(1)).remote(elsewhere),
                   timeout=120) == "consumed"

    dropped = folder("dropped")
    gen = task.options(scheduling_strategy=at(1)).remote(dropped, 1, 5)
    open(os.path.join(dropped, "asked-0"), "w").close()
    assert ray.get(next(gen), timeout=60) == 0
    del gen
    gc.collect()
    ray.put(0)
    wait_for_file(os.path.join(dropped, "made-4"))
    wait_until("the dropped stream is gone", nothing_left)
    """)
