"""Many nodes for real: `mpiexec -n N python -m hpcray script.py` as a subprocess.

Each test writes a driver script that asserts what it checks and prints a line the
test looks for; a deadlock fails by the subprocess timeout instead of hanging CI.
"""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(200)]

MPIEXEC = Path(sys.executable).with_name("mpiexec")


def segment_leaks(before: set) -> set:
    """New hpcray segments whose creating process is gone."""
    leaked = set()
    for name in os.listdir("/dev/shm"):
        match = re.match(r"hpcray-(\d+)-", name)
        if name in before or not match:
            continue
        if not os.path.exists(f"/proc/{match.group(1)}"):
            leaked.add(name)
    return leaked


def run_mpi(tmp_path, ranks, script, env=None, timeout=150, expect_code=0, rank_env=None):
    """`rank_env`: a dict of variables per rank, each set for that rank only (Hydra's
    per-executable `-env`)."""
    path = tmp_path / "driver.py"
    path.write_text(textwrap.dedent(script))
    before = set(os.listdir("/dev/shm"))
    full_env = dict(os.environ, **(env or {}))
    program = [sys.executable, "-m", "hpcray", str(path)]
    command = [str(MPIEXEC), "-n", str(ranks), *program]
    if rank_env is not None:
        assert len(rank_env) == ranks
        command = [str(MPIEXEC)]
        for rank, variables in enumerate(rank_env):
            command += [":"] if rank else []
            command += ["-n", "1"]
            for name, value in variables.items():
                command += ["-env", name, str(value)]
            command += program
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=full_env, cwd=str(tmp_path), start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"mpiexec -n {ranks} timed out; output:\n{output}")
    assert proc.returncode == expect_code, output
    assert not segment_leaks(before), f"segments left: {segment_leaks(before)}"
    return output


def test_tasks_spread_over_every_node(tmp_path):
    out = run_mpi(tmp_path, 4, """
        import collections, hpcray as ray
        ray.init(num_cpus=1)
        assert len(ray.nodes()) == 4 and ray.cluster_resources()["CPU"] == 4
        @ray.remote
        def where(i):
            return ray.get_runtime_context().get_node_id()
        counts = collections.Counter(ray.get([where.remote(i) for i in range(400)]))
        print("COUNTS", sorted(counts.values()))
        assert len(counts) == 4, counts
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out


def test_objects_move_between_nodes(tmp_path):
    out = run_mpi(tmp_path, 3, """
        import numpy as np, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        @ray.remote
        def make(n):
            return np.arange(n, dtype=np.int64)
        @ray.remote
        def total(a):
            return int(a.sum()), ray.get_runtime_context().get_node_id()
        big = make.options(scheduling_strategy=On(ids[2], soft=False)).remote(3_000_000)
        assert ray.get(big)[-1] == 2_999_999                      # node 2 -> driver
        s, node = ray.get(total.options(scheduling_strategy=On(ids[1], soft=False)).remote(big))
        assert s == sum(range(3_000_000)) and node == ids[1]       # node 2 -> node 1
        small = ray.put({"k": 1})
        assert ray.get(total.options(scheduling_strategy=On(ids[2], soft=False)).remote(
            ray.put(np.ones(10))))[0] == 10
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out


def test_one_get_of_many_objects_from_other_nodes(tmp_path):
    # Batched pulls: one get of 2,500 objects held by two other nodes (put by an actor
    # there: owned there too; or results of tasks run there: owned by the driver),
    # large and small mixed, some pulled already. Every value comes back whole, and a
    # task on node 1 gets the objects node 2 holds in one get as well.
    out = run_mpi(tmp_path, 3, """
        import numpy as np, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1, object_store_memory=600 << 20)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        @ray.remote(num_cpus=0)
        class Maker:
            def puts(self, n):
                return [ray.put(np.full(150_000 if i % 3 else 1000, i % 251, np.uint8))
                        for i in range(n)]
        @ray.remote
        def make(i):
            return np.full(120_000 + i, i % 251, np.uint8)
        @ray.remote
        def check(refs):
            values = ray.get(refs)
            return all(v[0] == i % 251 for i, v in enumerate(values))
        on = {r: On(ids[r], soft=False) for r in (1, 2)}
        held = ray.get(Maker.options(scheduling_strategy=on[2]).remote().puts.remote(2000))
        made = [make.options(scheduling_strategy=on[1]).remote(i) for i in range(500)]
        ray.wait(made, num_returns=len(made), fetch_local=False)
        ray.get(held[:10])                       # some are here already
        values = ray.get(held + made)
        assert len(values) == 2500
        for i, v in enumerate(values[:2000]):
            assert v[0] == v[-1] == i % 251 and len(v) == (150_000 if i % 3 else 1000), i
        for i, v in enumerate(values[2000:]):
            assert v[0] == v[-1] == i % 251 and len(v) == 120_000 + i, i
        del values
        assert ray.get(check.options(scheduling_strategy=on[1]).remote(held))
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out


def test_an_idle_rank_polls_mpi_less_often_the_longer_it_idles(tmp_path):
    # After a second of idle a node polls MPI every 25 ms, not every 10 ms: rank 1's
    # threads are put on a CPU fewer than 60 times a second (at 10 ms: ~100). A loaded
    # machine only delays wake-ups, so it makes fewer of them, never more. Then the
    # first task sent to it still runs.
    out = run_mpi(tmp_path, 2, """
        import glob, os, time, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        rank1 = [n["NodeID"] for n in ray.nodes() if n["rank"] == 1][0]
        @ray.remote
        def f():
            return 1
        @ray.remote
        def forkserver_pid():
            return os.getppid()  # a worker's parent is its node's fork server
        def rank_1_pid():
            forkserver = ray.get(forkserver_pid.options(
                scheduling_strategy=On(rank1, soft=False)).remote())
            with open(f"/proc/{forkserver}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as fh:
                assert b"PMI_RANK=1" in fh.read().split(b"\\0")
            return pid
        def switches(pid):
            total = 0
            for status in glob.glob(f"/proc/{pid}/task/*/status"):
                with open(status) as fh:
                    total += sum(int(line.split()[1]) for line in fh
                                 if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")))
            return total
        pid = rank_1_pid()
        # rank 1's node runs its event loop in its main thread: its short polls end on
        # time (cluster.precise_sleeps), not up to Linux's default 50 us late
        with open(f"/proc/{pid}/timerslack_ns") as fh:
            assert int(fh.read()) == 1000
        time.sleep(1.5)
        before, start = switches(pid), time.monotonic()
        time.sleep(3)
        rate = (switches(pid) - before) / (time.monotonic() - start)
        assert rate < 60, rate
        assert ray.get(f.options(scheduling_strategy=On(rank1, soft=False)).remote()) == 1
        ray.shutdown()
        print("OK", rate)
    """)
    assert "OK" in out


def traced_gets(tmp_path, sizes: tuple, host_reads: bool) -> list:
    """Gets on rank 0 of arrays of `sizes` made on rank 1, each after it exists, traced
    (HPCRAY_TRACE_HOPS): every stamp of the job, (ns, rank, what) in time order."""
    hops = tmp_path / "hops"
    hops.mkdir()
    run_mpi(tmp_path, 2, f"""
        import numpy as np, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        ids = {{n["rank"]: n["NodeID"] for n in ray.nodes()}}
        @ray.remote
        def make(n):
            return np.ones(n, np.uint8)
        for size in {sizes!r}:
            ref = make.options(scheduling_strategy=On(ids[1], soft=False)).remote(size)
            ray.wait([ref], fetch_local=False)
            assert ray.get(ref).nbytes == size
        ray.shutdown()
    """, env={"HPCRAY_TRACE_HOPS": str(hops), "HPCRAY_HOST_READS": str(int(host_reads))})
    return sorted((int(ns), int(rank), what) for path in hops.glob("hops-*.txt")
                  for ns, rank, what in (line.split() for line in path.read_text().splitlines()))


def test_a_remote_get_traced_hop_by_hop(tmp_path):
    # HPCRAY_TRACE_HOPS (runtime/hops.py) stamps each step of a get along its path;
    # benchmarks/remote_get.py --hops reads them. Over MPI (as between hosts), every get
    # of an object on rank 1 goes the one way: Pull sent, taken in and served by rank 1,
    # received into rank 0's store, made ready, the driver woken.
    stamps = traced_gets(tmp_path, (1 << 20, 1 << 20, 8 << 20), host_reads=False)
    # Rank 0's stamps come in program order. Rank 1's serve.start falls between the Pull
    # being made and its bytes arriving, but not necessarily after pull.sent: rank 0 stamps
    # that once its send returns, and rank 1 may be serving by then. Likewise rank 1
    # stamps serve.posted after its Isend, when rank 0 may already hold the bytes.
    driver = ["get.start", "pull.create", "pull.created", "pull.sent", "recv.complete",
              "pull.done", "pull.ready", "get.woken", "get.end"]
    starts = [i for i, (_, rank, what) in enumerate(stamps) if what == "get.start"]
    assert len(starts) == 3, stamps
    for begin, end in zip(starts, starts[1:] + [len(stamps)]):
        one_get = [(rank, what) for _, rank, what in stamps[begin:end]]
        seen = [what for rank, what in one_get if rank == 0 and what in driver]
        assert seen[:len(driver)] == driver, one_get
        served = one_get.index((1, "serve.start"))
        created, received = one_get.index((0, "pull.created")), one_get.index((0, "recv.complete"))
        assert created < served < received, one_get
        assert (1, "serve.posted") in one_get, one_get


def test_locality_puts_a_task_where_its_argument_is(tmp_path):
    out = run_mpi(tmp_path, 4, """
        import numpy as np, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        @ray.remote
        def make():
            return np.zeros(20 * 1024 * 1024 // 8)
        @ray.remote
        def where(a):
            return ray.get_runtime_context().get_node_id()
        big = make.options(scheduling_strategy=On(ids[2], soft=False)).remote()
        ray.wait([big], fetch_local=False)   # made on node 2, not copied to the driver
        placed = ray.get([where.remote(big) for _ in range(3)])
        assert placed == [ids[2]] * 3, placed
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out


def test_custom_resource_of_one_rank_and_infeasible_requests(tmp_path):
    out = run_mpi(tmp_path, 4, """
        import hpcray as ray
        from hpcray.exceptions import TaskCancelledError
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        assert ray.cluster_resources()["special"] == 1
        @ray.remote(resources={"special": 1})
        def special():
            return ray.get_runtime_context().get_node_id()
        assert set(ray.get([special.remote() for _ in range(4)])) == {ids[3]}
        for bad in ({"num_cpus": 2}, {"resources": {"special": 2}}, {"num_gpus": 1}):
            ref = special.options(**bad).remote()  # pending, as in Ray
            assert ray.wait([ref], timeout=0.1)[0] == [], bad
            ray.cancel(ref)
            try:
                ray.get(ref, timeout=30)
            except TaskCancelledError:
                pass
            else:
                raise AssertionError(f"{bad} ran")
        ray.shutdown()
        print("OK")
    """, env={"HPCRAY_RESOURCES_RANK_3": '{"special": 1}'})
    assert "OK" in out


def test_spread_and_node_affinity(tmp_path):
    out = run_mpi(tmp_path, 3, """
        import hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=2)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        @ray.remote
        def where():
            return ray.get_runtime_context().get_node_id()
        spread = ray.get([where.options(scheduling_strategy="SPREAD").remote()
                          for _ in range(9)])
        assert set(spread) == set(ids.values()), spread
        assert ray.get(where.options(scheduling_strategy=On(ids[1], soft=False)).remote()) \\
            == ids[1]
        @ray.remote
        class Where:
            def node(self):
                return ray.get_runtime_context().get_node_id()
        actors = [Where.options(scheduling_strategy="SPREAD").remote() for _ in range(3)]
        assert set(ray.get([a.node.remote() for a in actors])) == set(ids.values())
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out


def test_actors_across_nodes(tmp_path):
    out = run_mpi(tmp_path, 3, """
        import hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        @ray.remote
        class Counter:
            def __init__(self):
                self.values = []
            def add(self, v):
                self.values.append(v)
                return len(self.values)
            def read(self):
                return self.values
            def node(self):
                return ray.get_runtime_context().get_node_id()
        counter = Counter.options(scheduling_strategy=On(ids[1], soft=False)).remote()
        assert ray.get(counter.node.remote()) == ids[1]
        refs = [counter.add.remote(i) for i in range(200)]
        assert ray.get(refs) == list(range(1, 201))
        assert ray.get(counter.read.remote()) == list(range(200))    # in order
        @ray.remote
        def use(c, k):
            return ray.get(c.add.remote(k)), ray.get_runtime_context().get_node_id()
        n, node = ray.get(use.options(scheduling_strategy=On(ids[2], soft=False)).remote(
            counter, 7))
        assert n == 201 and node == ids[2]
        @ray.remote
        def fail():
            raise KeyError("far away")
        try:
            ray.get(fail.options(scheduling_strategy=On(ids[2], soft=False)).remote())
        except KeyError:
            pass
        else:
            raise AssertionError("no error")
        ray.kill(counter)
        try:
            ray.get(counter.read.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            pass
        else:
            raise AssertionError("killed actor answered")
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out


def test_init_shutdown_init_and_gcs_shards(tmp_path):
    out = run_mpi(tmp_path, 2, """
        import hpcray as ray
        for shards in (1, 2):
            ray.init(num_cpus=1, gcs_shards=shards)
            @ray.remote
            def f(x):
                return x * 2
            assert ray.get([f.remote(i) for i in range(50)]) == [2 * i for i in range(50)]
            ray.shutdown()
        print("OK")
    """)
    assert "OK" in out


def test_uncaught_driver_exception_ends_every_rank(tmp_path):
    out = run_mpi(tmp_path, 3, """
        import hpcray as ray
        ray.init(num_cpus=1)
        raise RuntimeError("driver failed on purpose")
    """, expect_code=1, timeout=60)
    assert "driver failed on purpose" in out


def test_a_node_that_cannot_start_ends_the_job_cleanly(tmp_path):
    # Rank 2's node fails to start (a malformed resource list of its own); rank 1's had
    # started and waited for the job: it got Exit instead and crashed on it (an
    # AttributeError traceback), found when a suite ran while a file was being edited.
    out = run_mpi(tmp_path, 3, """
        import hpcray as ray
        ray.init(num_cpus=1)
        print("NOT REACHED")
    """, expect_code=1, timeout=60, env={"HPCRAY_RESOURCES_RANK_2": "[1]"})
    assert "could not start node 2" in out and "must be a JSON object" in out
    assert "NOT REACHED" not in out
    assert "AttributeError" not in out and out.count("Traceback") == 1, out


def test_nested_tasks_across_nodes(tmp_path):
    out = run_mpi(tmp_path, 3, """
        import hpcray as ray
        ray.init(num_cpus=1)
        @ray.remote
        def tree(depth):
            if depth == 0:
                return 1
            return sum(ray.get([tree.remote(depth - 1) for _ in range(2)]))
        assert ray.get(tree.remote(4)) == 16
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out


@pytest.mark.parametrize("gcs_shards", [1, 2])
def test_named_actors_across_nodes(tmp_path, gcs_shards):
    out = run_mpi(tmp_path, 3, """
        import os, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        @ray.remote
        class Counter:
            def __init__(self):
                self.n = 0
            def add(self, k):
                self.n += k
                return self.n, ray.get_runtime_context().get_node_id()
        c = Counter.options(name="counter", scheduling_strategy=On(ids[2], soft=False)).remote()
        assert ray.get(c.add.remote(1)) == (1, ids[2])
        try:
            Counter.options(name="counter").remote()
        except ValueError as e:
            assert "already exists" in str(e)
        else:
            raise AssertionError("a second actor took a live actor's name")
        @ray.remote
        def bump_by_name(k):  # looks the actor up from another node
            return ray.get(ray.get_actor("counter").add.remote(k))[0]
        where = On(ids[1], soft=False)
        assert ray.get(bump_by_name.options(scheduling_strategy=where).remote(10)) == 11
        @ray.remote
        def name_taken_elsewhere():
            try:
                Counter.options(name="counter").remote()
            except ValueError:
                return "taken"
            return "created"
        assert ray.get(name_taken_elsewhere.options(scheduling_strategy=where).remote()) == "taken"
        same = Counter.options(name="counter", get_if_exists=True).remote()
        assert ray.get(same.add.remote(100))[0] == 111
        ray.kill(c)
        import time
        deadline = time.monotonic() + 30
        while True:  # the name is free again once the host reports the death
            try:
                ray.get_actor("counter")
            except ValueError:
                break
            assert time.monotonic() < deadline, "name still taken after kill"
            time.sleep(0.05)
        again = Counter.options(name="counter").remote()
        assert ray.get(again.add.remote(5))[0] == 5
        ray.shutdown()
        print("OK")
    """, env={"HPCRAY_GCS_SHARDS": str(gcs_shards)})
    assert "OK" in out


def test_sigterm_to_an_init_driver_ends_the_job(tmp_path):
    # A script that calls init() itself under mpiexec (no `python -m hpcray`): SIGTERM to
    # rank 0 shuts it down, ends the other ranks and leaves without MPI_Finalize.
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import os, time, hpcray as ray
        ray.init(num_cpus=1)
        @ray.remote
        def where():
            return ray.get_runtime_context().get_node_id()
        assert len(set(ray.get([where.remote() for _ in range(60)]))) >= 2
        with open("/proc/self/maps") as maps:  # MPICH's segment, if it made one
            mpi_segments = {l.split()[-1] for l in maps if "/dev/shm/mpich_shm_" in l}
        with open("segments", "w") as f:
            f.write(" ".join(mpi_segments))
        with open("pid.tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename("pid.tmp", "pid")
        time.sleep(600)
    """))
    before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen([str(MPIEXEC), "-n", "3", sys.executable, str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(tmp_path), start_new_session=True)
    try:
        pid_file = tmp_path / "pid"
        for _ in range(1200):  # up to 60 s for the job to start
            if pid_file.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert pid_file.exists(), proc.communicate()[0]
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the job did not end after SIGTERM:\n{proc.communicate()[0]}")
    assert proc.returncode != 0, output
    assert not segment_leaks(before), f"segments left: {segment_leaks(before)}"
    # Rank 0 left without MPI_Finalize, which is where MPICH removes its own segment.
    mpi_left = [p for p in (tmp_path / "segments").read_text().split() if os.path.exists(p)]
    assert not mpi_left, f"MPI segments left: {mpi_left}"


def test_gcs_actor_table_follows_every_actor(tmp_path):
    # The hosting node records each actor in the GCS: placed (node), ALIVE, RESTARTING
    # with its count, DEAD; functions exported on any node are in the functions table.
    # Read back from the driver's node with the GCS client.
    out = run_mpi(tmp_path, 3, """
        import os, signal, threading, time, hpcray as ray
        from hpcray import context
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1, gcs_shards=2)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        node = context.driver_node

        def record(actor_id, op="get_actor"):
            answered = threading.Event()
            box = []
            def got(info):
                box.append(info)
                answered.set()
            with node.lock:
                node.gcs.request(op, actor_id, callback=got)
            assert answered.wait(30)
            return box[0]

        def wait_for(actor_id, check):
            deadline = time.monotonic() + 30
            while not check(record(actor_id)):
                assert time.monotonic() < deadline, record(actor_id)
                time.sleep(0.02)

        @ray.remote(max_restarts=1, max_task_retries=1)  # a call sent as it dies reruns
        class A:
            def pid(self):
                return os.getpid()
        a = A.options(scheduling_strategy=On(ids[2], soft=False)).remote()
        pid = ray.get(a.pid.remote())
        actor_id = a._actor_id
        wait_for(actor_id, lambda r: r is not None and r.state == "ALIVE" and r.node == 2)
        assert record(actor_id).class_name == "A"
        os.kill(pid, signal.SIGKILL)  # same machine: rank 2's actor process
        assert ray.get(a.pid.remote()) != pid
        wait_for(actor_id, lambda r: r.restarts == 1 and r.state == "ALIVE")
        ray.kill(a)
        wait_for(actor_id, lambda r: r.state == "DEAD")
        assert record(A._class_id, "get_function") is not None  # the functions table
        @ray.remote
        def made_on_node_1():
            @ray.remote
            def inner():
                return 7
            return inner._function_id, ray.get(inner.remote())
        on_1 = made_on_node_1.options(scheduling_strategy=On(ids[1], soft=False))
        fid, seven = ray.get(on_1.remote())
        assert seven == 7 and record(fid, "get_function") is not None
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out


@pytest.mark.parametrize("shards", [1, 2])
def test_tasks_table_follows_tasks_on_every_node(tmp_path, shards):
    out = run_mpi(tmp_path, 3, f"""
        import os, time, hpcray as ray
        from hpcray.util.state import list_tasks
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        ray.init(num_cpus=2, gcs_shards={shards})
        nodes = {{n["rank"]: n["NodeID"] for n in ray.nodes()}}
        on = lambda rank: NodeAffinitySchedulingStrategy(nodes[rank], soft=False)
        go = os.path.abspath("go")

        def wait_for(predicate, what):
            deadline = time.monotonic() + 60
            while not predicate():
                assert time.monotonic() < deadline, (what, list_tasks())
                time.sleep(0.02)

        @ray.remote
        def hold(path):
            while not os.path.exists(path):
                time.sleep(0.01)
            return ray.get_runtime_context().get_node_id()

        @ray.remote
        def outer():  # submits from rank 1, so rank 1 owns "inner"
            return ray.get(hold.options(name="inner", scheduling_strategy=on(2)).remote(go))

        held = [hold.options(name=f"hold{{r}}", scheduling_strategy=on(r)).remote(go)
                for r in (1, 2)]
        top = outer.options(name="outer", scheduling_strategy=on(1)).remote()
        rows = lambda: {{t.name: t for t in list_tasks()}}

        def all_running(count):  # one snapshot: the table may change between two reads
            now = rows()
            return len(now) == count and {{t.state for t in now.values()}} == {{"RUNNING"}}

        wait_for(lambda: all_running(4), "four RUNNING")
        where = {{name: (t.node_id, t.owner_node_id) for name, t in rows().items()}}
        assert where == {{"hold1": (nodes[1], nodes[0]), "hold2": (nodes[2], nodes[0]),
                         "outer": (nodes[1], nodes[0]), "inner": (nodes[2], nodes[1])}}, where
        open(go, "w").close()
        assert ray.get(held + [top]) == [nodes[1], nodes[2], nodes[2]]
        # inner's only ref died in outer: its lineage went with it, and the table still
        # shows it (as Ray keeps finished tasks), with outer as its parent.
        wait_for(lambda: {{n: t.state for n, t in rows().items()}} ==
                 {{"hold1": "FINISHED", "hold2": "FINISHED", "outer": "FINISHED",
                  "inner": "FINISHED"}}, "FINISHED")
        assert rows()["inner"].parent_task_id == top.task_id().hex()
        del held, top
        time.sleep(0.3)  # freed returns end the lineage; what the table shows stays
        assert {{t.state for t in list_tasks()}} == {{"FINISHED"}}, list_tasks()
        print("TASKS-TABLE-OK")
    """)
    assert "TASKS-TABLE-OK" in out



@pytest.mark.parametrize("shards", [1, 2])
def test_state_api_across_ranks(tmp_path, shards):
    """list_tasks (actor calls, a failed task, detail), list_actors, list_nodes,
    list_objects and summarize_tasks of a 3-rank job, asked from the driver and from a
    task on another rank; eventually consistent, so each is polled with a deadline."""
    out = run_mpi(tmp_path, 3, f"""
        import os, time, hpcray as ray
        from hpcray.util.state import (list_actors, list_nodes, list_objects, list_tasks,
                                       summarize_tasks)
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        ray.init(num_cpus=2, gcs_shards={shards})
        nodes = {{n["rank"]: n["NodeID"] for n in ray.nodes()}}
        on = lambda rank: NodeAffinitySchedulingStrategy(nodes[rank], soft=False)

        def wait_for(predicate, what):
            deadline = time.monotonic() + 60
            while True:
                value = predicate()
                if value:
                    return value
                assert time.monotonic() < deadline, (what, list_tasks(detail=True))
                time.sleep(0.05)

        @ray.remote
        class Keeper:
            def __init__(self):
                self.kept = None
            def pid(self):
                return os.getpid()
            def keep(self, refs):
                self.kept = refs[0]
                return True

        @ray.remote
        def fails():
            raise KeyError("no")

        @ray.remote
        def call_from_rank1(keeper):
            return ray.get(keeper.pid.remote())

        @ray.remote
        def look():
            return sorted(a.state for a in list_actors()), len(list_nodes())

        keeper = Keeper.options(name="keeper", scheduling_strategy=on(2)).remote()
        pid = ray.get(keeper.pid.remote())
        assert ray.get(call_from_rank1.options(scheduling_strategy=on(1)).remote(keeper)) == pid
        failed = fails.options(name="fails", scheduling_strategy=on(1)).remote()
        try:
            ray.get(failed)
        except KeyError:
            pass
        big = ray.put(b"x" * 300_000)
        assert ray.get(keeper.keep.remote([big]))

        def ended():
            rows = list_tasks(detail=True)
            # RUNNING (where, which worker) comes from the node that ran a task, the end
            # from its owner: wait for both.
            return rows if len(rows) == 6 and all(
                t.state in ("FINISHED", "FAILED") and t.node_id is not None
                for t in rows) else None
        rows = wait_for(ended, "six ended tasks, each with where it ran")
        by_type = {{}}
        for t in rows:
            by_type.setdefault(t.type, []).append(t)
        assert len(by_type["ACTOR_TASK"]) == 3 and len(by_type["ACTOR_CREATION_TASK"]) == 1
        for t in by_type["ACTOR_TASK"] + by_type["ACTOR_CREATION_TASK"]:
            assert (t.node_id, t.worker_pid, t.actor_id, t.state) == \
                (nodes[2], pid, keeper._actor_id.hex(), "FINISHED"), t
        owners = sorted(t.owner_node_id for t in by_type["ACTOR_TASK"])
        assert owners == sorted([nodes[0], nodes[0], nodes[1]]), owners
        [failing] = [t for t in rows if t.name == "fails"]
        assert (failing.state, failing.error_type, failing.node_id) == \
            ("FAILED", "TASK_EXECUTION_EXCEPTION", nodes[1]), failing
        assert all(t.start_time_ms <= t.end_time_ms for t in rows)
        summary = summarize_tasks()["cluster"]
        assert (summary["total_tasks"], summary["total_actor_tasks"],
                summary["total_actor_scheduled"]) == (2, 3, 1), summary

        [actor] = wait_for(lambda: [a for a in list_actors() if a.state == "ALIVE"], "ALIVE")
        assert (actor.name, actor.node_id, actor.pid) == ("keeper", nodes[2], pid), actor
        listed = list_nodes()
        assert [(n.rank, n.node_id, n.state, n.is_head_node) for n in listed] == \
            [(0, nodes[0], "ALIVE", True), (1, nodes[1], "ALIVE", False),
             (2, nodes[2], "ALIVE", False)], listed

        refs = lambda: {{(o.node_id, o.type, o.pid, o.owner_node_id)
                        for o in list_objects(filters=[("object_id", "=", big.hex())])}}
        wait_for(lambda: refs() == {{(nodes[0], "DRIVER", os.getpid(), nodes[0]),
                                    (nodes[2], "WORKER", pid, nodes[0])}},
                 "the driver's and the actor's references")
        assert ray.get(look.options(scheduling_strategy=on(1)).remote()) == (["ALIVE"], 3)

        ray.kill(keeper)
        wait_for(lambda: [a.state for a in list_actors()] == ["DEAD"], "DEAD")
        wait_for(lambda: {{o.node_id for o in list_objects()}} == {{nodes[0]}},
                 "the actor's references gone")
        print("STATE-API-OK")
    """)
    assert "STATE-API-OK" in out


def test_workers_summaries_and_logs_across_ranks(tmp_path):
    """list_workers, summarize_actors/objects, list_logs and get_log of a 3-rank job,
    asked from the driver and from a task on rank 1: every rank's workers, an actor on
    rank 2 read back by its id, a worker on rank 1 by node and pid."""
    out = run_mpi(tmp_path, 3, """
        import os, time, hpcray as ray
        from hpcray.util.state import (get_log, list_logs, list_workers, summarize_actors,
                                       summarize_objects)
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        ray.init(num_cpus=1)
        nodes = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        on = lambda rank: NodeAffinitySchedulingStrategy(nodes[rank], soft=False)

        def wait_for(predicate, what):
            deadline = time.monotonic() + 60
            while True:
                value = predicate()
                if value:
                    return value
                assert time.monotonic() < deadline, what
                time.sleep(0.05)

        @ray.remote
        class Speaker:
            def say(self, text):
                print(text)
                return os.getpid()

        @ray.remote
        def talk():
            print("rank 1 speaking")
            return os.getpid()

        @ray.remote
        def look(actor_id):
            return (sorted({w.node_id for w in list_workers()}),
                    list(get_log(actor_id=actor_id)))

        speaker = Speaker.options(scheduling_strategy=on(2)).remote()
        actor_pid = ray.get(speaker.say.remote("rank 2 speaking"))
        pid = ray.get(talk.options(scheduling_strategy=on(1)).remote())
        workers = list_workers(limit=1000)
        assert {w.node_id for w in workers} == set(nodes.values()), workers
        [actor_worker] = [w for w in workers if w.pid == actor_pid and w.node_id == nodes[2]]
        assert actor_worker.is_alive and actor_worker.worker_type == "WORKER"
        assert len([w for w in workers if w.worker_type == "DRIVER"]) == 1
        assert summarize_actors()["cluster"]["summary"]["Speaker"]["state_counts"] == \\
            {"ALIVE": 1}
        ref = ray.put(b"x" * 300_000)
        assert summarize_objects()["cluster"]["total_objects"] == 1
        actor_id = speaker._actor_id.hex()
        wait_for(lambda: list(get_log(actor_id=actor_id)) == ["rank 2 speaking"], "rank 2")
        wait_for(lambda: list(get_log(node_id=nodes[1], pid=pid)) == ["rank 1 speaking"],
                 "rank 1")
        node_ids, lines = ray.get(look.options(scheduling_strategy=on(1)).remote(actor_id))
        assert node_ids == sorted(nodes.values()) and lines == ["rank 2 speaking"]
        assert list_logs(node_id=nodes[2])["node"] == ["node-2.log"]
        assert f"node-1-worker-{pid}.out" in list_logs()["worker"]
        ray.shutdown()
        print("OK")
    """, env={"HPCRAY_LOG_DIR": str(tmp_path / "logs")})
    assert "OK" in out


def test_driver_sys_path_reaches_every_node(tmp_path):
    """A module the driver imports from a folder it put on sys.path at run time (as
    pytest does with test folders) imports in workers on every rank, as in Ray, for
    tasks and actors, workers started before and after."""
    mods = tmp_path / "late_folder"
    mods.mkdir()
    (mods / "late_module_xyz.py").write_text(textwrap.dedent("""
        def double(x):
            return 2 * x

        class Counter:
            def __init__(self):
                self.n = 0

            def add(self, k):
                self.n += k
                return self.n
    """))
    out = run_mpi(tmp_path, 3, f"""
        import sys, hpcray as ray
        ray.init(num_cpus=1)
        @ray.remote
        def warm(i):
            return i
        ray.get([warm.options(scheduling_strategy="SPREAD").remote(i) for i in range(6)])
        sys.path.insert(0, {str(mods)!r})   # after the workers started
        import late_module_xyz
        @ray.remote
        def run(i):
            return late_module_xyz.double(i), ray.get_runtime_context().get_node_id()
        results = ray.get([run.options(scheduling_strategy="SPREAD").remote(i)
                           for i in range(12)])
        assert [r[0] for r in results] == [2 * i for i in range(12)], results
        print("NODES", len({{r[1] for r in results}}))
        Counter = ray.remote(late_module_xyz.Counter)
        counters = [Counter.options(scheduling_strategy="SPREAD").remote() for _ in range(3)]
        assert ray.get([c.add.remote(5) for c in counters]) == [5, 5, 5]
        print("OK")
    """)
    assert "OK" in out and "NODES 3" in out, out


def test_a_subprocess_of_a_rank_starts_its_own_runtime(tmp_path):
    """A Python program started as a subprocess of the driver or of a task, that uses
    hpcray itself, inherits the launcher's PMI variables but is no rank: it starts a
    runtime of its own (one node) instead of dying in MPI start-up."""
    out = run_mpi(tmp_path, 2, """
        import subprocess, sys, hpcray as ray
        ray.init(num_cpus=1)
        code = ("import hpcray as ray; ray.init(num_cpus=1); "
                "print('CHILD', ray.get(ray.put(5)), len(ray.nodes())); ray.shutdown()")
        def child():
            run = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                 text=True, timeout=90)
            return run.returncode, run.stdout + run.stderr
        @ray.remote
        def in_task():
            return child(), ray.get_runtime_context().get_node_id()
        assert child()[0] == 0 and "CHILD 5 1" in child()[1], child()
        results = ray.get([in_task.options(scheduling_strategy="SPREAD").remote()
                           for _ in range(2)])
        assert len({node for _, node in results}) == 2, results
        for (code_, output), _ in results:
            assert code_ == 0 and "CHILD 5 1" in output, output
        print("OK")
    """)
    assert "OK" in out, out
