"""Actor handles counted across nodes (hpcray/runtime/borrowing.py), under mpiexec.

An unnamed, non-detached actor ends once no node holds a handle to it, wherever it was
placed, and not a moment before. Whether its process still runs is asked of a task
pinned to the actor's node; what must end is awaited under a deadline, never a sleep.
"""

import pytest

from tests.multinode.test_multinode import run_mpi

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(200)]

PRELUDE = """
    import gc, os, threading, time, hpcray as ray
    from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
    ray.init(num_cpus=2)
    ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
    TOTAL_CPUS = ray.cluster_resources()["CPU"]

    def at(rank):
        return On(ids[rank], soft=False)

    @ray.remote(num_cpus=0)
    def running(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ")[-1][0] != "Z"
        except OSError:
            return False

    def alive(rank, pid):
        return ray.get(running.options(scheduling_strategy=at(rank)).remote(pid))

    def wait_until(what, check, seconds=30):
        deadline = time.monotonic() + seconds
        while not check():
            assert time.monotonic() < deadline, "timed out waiting until " + what
            time.sleep(0.02)

    @ray.remote(num_cpus=1)
    class Counter:
        def __init__(self):
            self.n = 0
        def pid(self):
            return os.getpid()
        def incr(self):
            self.n += 1
            return self.n

    @ray.remote(num_cpus=0, max_concurrency=2)
    class Gate:  # holds a call back until opened
        def __init__(self):
            self.event = threading.Event()
        def wait(self):
            return self.event.wait(60)
        def open(self):
            self.event.set()
"""


def run(tmp_path, ranks, body):
    out = run_mpi(tmp_path, ranks, PRELUDE + body + """
    ray.shutdown()
    print("OK")
    """)
    assert "OK" in out, out
    return out


def test_an_actor_placed_on_another_node_ends_when_the_driver_drops_it(tmp_path):
    run(tmp_path, 3, """
    counter = Counter.options(scheduling_strategy=at(2)).remote()
    named = Counter.options(scheduling_strategy=at(2), name="kept").remote()
    pid, named_pid = ray.get([counter.pid.remote(), named.pid.remote()])
    assert ray.get(counter.incr.remote()) == 1
    wait_until("both actors hold their CPU",
               lambda: ray.available_resources().get("CPU", 0) == TOTAL_CPUS - 2)
    del counter, named
    gc.collect()
    wait_until("the actor's process exits", lambda: not alive(2, pid))
    wait_until("its CPU is free again",
               lambda: ray.available_resources().get("CPU", 0) == TOTAL_CPUS - 1)
    assert alive(2, named_pid), "a named actor ended by scope"
    assert ray.get(ray.get_actor("kept").incr.remote()) == 1
    """)


@pytest.mark.parametrize("host", [0, 2])
def test_an_actor_kept_by_another_actor_lives_until_that_actor_drops_it(tmp_path, host):
    run(tmp_path, 3, f"""
    @ray.remote
    class Keeper:
        def keep(self, handle):
            self.handle = handle
            return True
        def call(self):
            return ray.get(self.handle.incr.remote())
        def drop(self):
            self.handle = None
            gc.collect()
            return True

    @ray.remote
    def hand_over(keeper, handle):
        return ray.get(keeper.keep.remote(handle))

    counter = Counter.options(scheduling_strategy=at({host})).remote()
    keeper = Keeper.options(scheduling_strategy=at(1)).remote()
    pid = ray.get(counter.pid.remote())
    assert ray.get(hand_over.options(scheduling_strategy=at(1)).remote(keeper, counter))
    del counter
    gc.collect()
    for i in range(3):   # the driver's handle is gone: node 1's actor still holds one
        assert ray.get(keeper.call.remote()) == i + 1
    assert alive({host}, pid), "the actor ended while another actor held its handle"
    assert ray.get(keeper.drop.remote())
    wait_until("the actor ends once its last holder lets go", lambda: not alive({host}, pid))
    """)


def test_a_task_on_the_actors_node_does_not_end_it(tmp_path):
    # Node 1 hosts the actor; a task there takes its handle and lets it go. The driver on
    # node 0 (the owner) still holds one, so the actor must go on.
    run(tmp_path, 2, """
    @ray.remote
    def use(handle):
        return ray.get(handle.incr.remote())

    counter = Counter.options(scheduling_strategy=at(1)).remote()
    pid = ray.get(counter.pid.remote())
    for i in range(3):
        assert ray.get(use.options(scheduling_strategy=at(1)).remote(counter)) == i + 1
    gc.collect()
    assert ray.get(counter.incr.remote()) == 4
    assert alive(1, pid)
    del counter
    gc.collect()
    wait_until("the actor ends with the driver's handle", lambda: not alive(1, pid))
    """)


@pytest.mark.parametrize("host", [1, 2])
def test_a_handle_returned_from_another_node_keeps_working(tmp_path, host):
    # A task on node 1 creates the actor (so node 1 owns it), hosted on `host`, and
    # returns its handle inside a list; the task's own handle dies with the task.
    run(tmp_path, 3, f"""
    @ray.remote
    def make():
        counter = Counter.options(scheduling_strategy=at({host})).remote()
        return [counter, ray.get(counter.pid.remote())]

    counter, pid = ray.get(make.options(scheduling_strategy=at(1)).remote())
    gc.collect()
    for i in range(3):
        assert ray.get(counter.incr.remote()) == i + 1
    assert alive({host}, pid)
    del counter
    gc.collect()
    wait_until("the actor ends with the driver's handle", lambda: not alive({host}, pid))
    """)


def test_a_pending_task_holds_the_handle_in_its_arguments(tmp_path):
    # The task waits on its first argument while the driver drops its handle: the
    # task's arguments still hold the actor, on node 0 and then on node 1.
    run(tmp_path, 3, """
    @ray.remote
    def use(opened, handles):
        return opened, ray.get(handles[0].incr.remote())

    gate = Gate.remote()
    counter = Counter.options(scheduling_strategy=at(2)).remote()
    pid = ray.get(counter.pid.remote())
    result = use.options(scheduling_strategy=at(1)).remote(gate.wait.remote(), [counter])
    del counter
    gc.collect()
    assert alive(2, pid)
    gate.open.remote()
    assert ray.get(result) == (True, 1)
    wait_until("the actor ends with the task", lambda: not alive(2, pid))
    """)



def test_calls_made_before_a_remote_actors_arguments_exist_reach_it(tmp_path):
    # The creator queues calls while the constructor's argument is pending, then hands
    # the actor to node 2: the calls go with it, and the actor still ends by scope.
    run(tmp_path, 3, """
    @ray.remote(num_cpus=1)
    class Holder:
        def __init__(self, value):
            self.value = value
        def get(self):
            return self.value, os.getpid()

    gate = Gate.remote()
    holder = Holder.options(scheduling_strategy=at(2)).remote(gate.wait.remote())
    first = holder.get.remote()
    gate.open.remote()
    value, pid = ray.get(first, timeout=30)
    assert value is True
    del holder
    gc.collect()
    wait_until("the actor ends", lambda: not alive(2, pid))
    """)


def test_calls_reach_an_actor_the_global_scheduler_placed_back_on_its_creator(tmp_path):
    # Node 1 creates SPREAD actors: rank 0 places some of them back on node 1, which
    # had queued their first calls for another node meanwhile.
    run(tmp_path, 2, """
    @ray.remote(num_cpus=0)
    class Where:
        def node(self):
            return ray.get_runtime_context().get_node_id()

    @ray.remote
    def make():
        handles = [Where.options(scheduling_strategy="SPREAD").remote() for _ in range(4)]
        return ray.get([h.node.remote() for h in handles], timeout=30)

    nodes = ray.get(make.options(scheduling_strategy=at(1)).remote())
    assert ids[1] in nodes, nodes
    """)
