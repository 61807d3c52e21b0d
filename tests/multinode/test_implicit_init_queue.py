"""Implicit init and hpcray.util.queue across 3 ranks: programs that never call init(),
under `python -m hpcray` and as a plain script under mpiexec."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.multinode.test_multinode import MPIEXEC, run_mpi, segment_leaks

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(200)]

# Consumers on ranks 1 and 2, a producer actor on rank 2, the driver on rank 0: every
# item put once comes out once, whichever node asks.
QUEUE_PROGRAM = """
    import time
    import hpcray as ray
    from hpcray.util.queue import Queue
    On = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy
    assert not ray.is_initialized()
    q = Queue(maxsize=4)
    assert ray.is_initialized()
    nodes = {n["rank"]: n["NodeID"] for n in ray.nodes()}
    assert sorted(nodes) == [0, 1, 2], nodes

    @ray.remote
    def consume(q, n):
        return ray.get_runtime_context().get_node_id(), [q.get(timeout=60) for _ in range(n)]

    @ray.remote
    class Producer:
        def run(self, q, items):
            for item in items:
                q.put(item, timeout=60)  # maxsize 4: waits for the consumers
            return ray.get_runtime_context().get_node_id()

    refs = [consume.options(scheduling_strategy=On(nodes[r], soft=False)).remote(q, 6)
            for r in (1, 2)]
    producer = Producer.options(scheduling_strategy=On(nodes[2], soft=False)).remote()
    assert ray.get(producer.run.remote(q, list(range(10))), timeout=90) == nodes[2]
    # Up to 4 of the 10 may still wait for the consumers: room for 2 first.
    deadline = time.monotonic() + 60
    while q.qsize() > 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    q.put_nowait_batch([10, 11])
    got = ray.get(refs, timeout=90)
    assert [node for node, _ in got] == [nodes[1], nodes[2]], got
    assert sorted(sum((items for _, items in got), [])) == list(range(12)), got
    assert q.empty()
    print("OK")
"""


def test_queue_across_nodes_without_init_under_the_launcher(tmp_path):
    out = run_mpi(tmp_path, 3, QUEUE_PROGRAM)
    assert "OK" in out


def test_queue_across_nodes_without_init_as_a_plain_script(tmp_path):
    # `mpiexec -n 3 python app.py`: every rank runs the script up to its first API call;
    # there ranks > 0 become nodes (as at an explicit init()) and rank 0 goes on.
    path = tmp_path / "app.py"
    path.write_text(textwrap.dedent(QUEUE_PROGRAM))
    before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen([str(MPIEXEC), "-n", "3", sys.executable, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(tmp_path), start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"mpiexec -n 3 timed out; output:\n{proc.communicate()[0]}")
    assert proc.returncode == 0, output
    assert output.count("OK") == 1, output  # rank 0 only ran the rest of the script
    assert not segment_leaks(before), f"segments left: {segment_leaks(before)}"
