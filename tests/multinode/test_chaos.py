"""Chaos across ranks (issue 10): worker processes SIGKILLed at random on every node of an
`mpiexec -n 3` job while thousands of tasks run (with dependencies, nested tasks, large
values that move between nodes, and 24 actors with max_restarts and max_task_retries);
every result must be right, and nothing of the job may be left afterwards.

The killer is a thread of the driver, seeded: it picks a node (the one killed least so
far), lists that node's live workers with the state API (`list_workers`), and SIGKILLs
one at random, through a pidfd after checking that the process carries this job's tag
in its environment (a pid another process reused is never hit). Each round of work
includes tasks that wait for a gate on every node, opened only once the round's kills
are done, so kills land while work is in flight however slow the machine is: the test
asserts correctness and counts, never speed.
"""

import os
import time
import uuid
from pathlib import Path

import pytest

from benchmarks._mpirun import TAG_VARIABLE, tagged_processes
from tests.multinode.test_multinode import run_mpi

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(900)]

DRIVER = """
import collections, os, random, sys, threading, time
import numpy as np
import hpcray as ray
from hpcray.util.state import list_actors, list_workers
from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On

sys.path.insert(0, os.environ["CHAOS_BENCHMARKS"])
from _mpirun import TAG_VARIABLE, kill_tagged   # SIGKILL through a pidfd, if tagged

SEED, TAG = int(os.environ["CHAOS_SEED"]), os.environ[TAG_VARIABLE]
ROUNDS, KILLS_PER_NODE = int(os.environ["CHAOS_ROUNDS"]), int(os.environ["CHAOS_KILLS"])
ray.init(num_cpus=2)
ranks = {n["NodeID"]: n["rank"] for n in ray.nodes()}
ids = {rank: node_id for node_id, rank in ranks.items()}
here = os.getcwd()


class Killer(threading.Thread):
    def __init__(self, seed):
        super().__init__(daemon=True)
        self.rng = random.Random(seed)
        self.kills = collections.Counter()
        self.allowed = 0
        self.cond = threading.Condition()
        self.stopping = False
        self.error = None

    def allow(self, n):
        with self.cond:
            self.allowed += n
            self.cond.notify_all()

    def wait_idle(self):
        with self.cond:
            while self.error is None and sum(self.kills.values()) < self.allowed:
                self.cond.wait(1.0)
        if self.error is not None:
            raise self.error

    def run(self):
        try:
            while True:
                with self.cond:
                    while not self.stopping and sum(self.kills.values()) >= self.allowed:
                        self.cond.wait()
                    if self.stopping:
                        return
                time.sleep(self.rng.uniform(0.02, 0.2))
                rank = min(sorted(ids), key=lambda r: (self.kills[r], self.rng.random()))
                # Live workers only: ended ones stay listed, and would fill the limit.
                pids = sorted(w.pid for w in list_workers(
                                  filters=[("is_alive", "=", True)], limit=100_000)
                              if w.pid and w.worker_type == "WORKER"
                              and ranks.get(w.node_id) == rank)
                if pids and kill_tagged(self.rng.choice(pids), TAG):
                    with self.cond:
                        self.kills[rank] += 1
                        self.cond.notify_all()
        except BaseException as exc:
            with self.cond:
                self.error = exc
                self.cond.notify_all()


@ray.remote(max_retries=-1)
def square(x):
    time.sleep(0.003 * (x % 3))
    return x * x

@ray.remote(max_retries=-1)
def add(a, b):
    return a + b

@ray.remote(max_retries=-1)
def nested(x):
    return sum(ray.get([square.remote(x + k) for k in range(3)]))

@ray.remote(max_retries=-1)
def block(x):
    return np.full(32_768, x, dtype=np.int64)   # 256 KiB: the store, moved between nodes

@ray.remote(max_retries=-1)
def total(array):
    return int(array.sum())

@ray.remote(max_retries=-1)
def hold(x, gate):
    while not os.path.exists(gate):
        time.sleep(0.01)
    return -x

@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Scale:
    def __init__(self, k):
        self.k = k
    def mul(self, x):
        return self.k * x

def node_pid():
    with open(f"/proc/{os.getppid()}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])

# Every /dev/shm name the ranks map (hpcray's stores, MPICH's): none may outlive the job.
rank_pids = ray.get([ray.remote(node_pid).options(scheduling_strategy=On(ids[r], soft=False))
                     .remote() for r in sorted(ids)])
names = set()
for pid in rank_pids:
    with open(f"/proc/{pid}/maps") as maps:
        names |= {line.split()[-1] for line in maps if "/dev/shm/" in line}
with open("segments", "w") as f:
    f.write("\\n".join(sorted(names)))

actors = [Scale.options(scheduling_strategy=On(ids[i % 3], soft=True)).remote(i + 1)
          for i in range(24)]
killer = Killer(SEED)
killer.start()
tasks = 0
for r in range(ROUNDS):
    base = 1000 * r
    gate = os.path.join(here, f"gate-{r}")
    held = [hold.options(scheduling_strategy=On(ids[n], soft=False)).remote(base + n, gate)
            for n in sorted(ids) for _ in range(2)]
    squares = [square.remote(base + i) for i in range(400)]
    sums = [add.remote(squares[i], squares[i + 1]) for i in range(100)]
    trees = [nested.remote(base + i) for i in range(40)]
    blocks = [block.options(scheduling_strategy=On(ids[i % 3], soft=True)).remote(base + i)
              for i in range(20)]
    totals = [total.options(scheduling_strategy=On(ids[(i + 1) % 3], soft=True)).remote(b)
              for i, b in enumerate(blocks)]
    calls = [(a, i, a.mul.remote(squares[i] if i % 2 else base + i))
             for a in actors for i in range(6)]
    tasks += len(held) + 400 + 100 + 4 * 40 + 40 + len(calls)
    killer.allow(KILLS_PER_NODE * len(ids))
    killer.wait_idle()   # this round's kills are done, its gated tasks still wait
    open(gate, "w").close()
    assert ray.get(held, timeout=300) == [-(base + n) for n in sorted(ids) for _ in range(2)]
    assert ray.get(squares, timeout=300) == [(base + i) ** 2 for i in range(400)]
    assert ray.get(sums, timeout=300) == [(base + i) ** 2 + (base + i + 1) ** 2
                                          for i in range(100)]
    assert ray.get(trees, timeout=300) == [sum((base + i + k) ** 2 for k in range(3))
                                           for i in range(40)]
    assert ray.get(totals, timeout=300) == [32_768 * (base + i) for i in range(20)]
    for a, i, ref in calls:
        k = actors.index(a) + 1
        assert ray.get(ref, timeout=300) == k * ((base + i) ** 2 if i % 2 else base + i)
    print(f"round {r}: right; kills so far {dict(killer.kills)}", flush=True)
with killer.cond:
    killer.stopping = True
    killer.cond.notify_all()
killer.join()
restarts = sum(a.num_restarts or 0 for a in list_actors(detail=True))
print(f"TASKS {tasks} KILLS {sorted(killer.kills.items())} ACTOR_RESTARTS {restarts}",
      flush=True)
assert all(killer.kills[r] == ROUNDS * KILLS_PER_NODE for r in ids), killer.kills
ray.shutdown()
print("OK")
"""


@pytest.mark.parametrize("seed", [1, 2])
def test_random_worker_kills_on_every_node(tmp_path, seed):
    tag = uuid.uuid4().hex
    out = run_mpi(tmp_path, 3, DRIVER, timeout=800, env={
        "CHAOS_SEED": str(seed), TAG_VARIABLE: tag, "CHAOS_BENCHMARKS": str(BENCHMARKS),
        "CHAOS_ROUNDS": "4", "CHAOS_KILLS": "3"})
    assert "OK" in out, out
    print([line for line in out.splitlines() if line.startswith(("TASKS", "round"))])
    restarts = int(out.split("ACTOR_RESTARTS ")[1].split()[0])
    assert restarts >= 1, out  # actors were among the workers killed
    deadline = time.monotonic() + 30  # a guard, not a wait: mpiexec reaped its ranks
    while tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not tagged_processes(tag), f"processes of the job left: {tagged_processes(tag)}"
    names = (tmp_path / "segments").read_text().split()
    assert any("hpcray-" in name for name in names), names
    assert not [name for name in names if os.path.exists(name)], names
