"""`get` of an object made on another rank, against raw MPI moving the same bytes.

    python benchmarks/remote_get.py                          # 1Mi..256Mi, CMA on and off
    python benchmarks/remote_get.py --sizes 1Mi,8Mi,64Mi,1Gi --rounds 3 --repeat 20
    python benchmarks/remote_get.py --cma on --hops          # + where a 1 MiB get's time goes
    python benchmarks/remote_get.py --sizes 1Mi --hop-jobs 8 --repeat 100 --compare TREE
                                   # only the steps: 8 traced jobs here and of TREE, interleaved
    python benchmarks/remote_get.py --ray-python /work/rayvenv/bin/python   # + Ray's column
    /work/rayvenv/bin/python benchmarks/remote_get.py --ray  # Ray alone (2 raylets)

What it measures, for each size and each CMA setting (MPICH's `MPIR_CVAR_CH4_CMA_ENABLE`,
off as on clusters that forbid ptrace):

- hpcray: `mpiexec -n 2 python -m hpcray` runs a task pinned to rank 1 that returns a
  numpy array of the size (its bytes stay in rank 1's store); once the driver on rank 0
  knows it exists (`wait(fetch_local=False)`), its `get` is timed. Two paths (`--paths`):
  `host`, the default on one host, copies the object out of rank 1's store
  (runtime/host_stores.py); `mpi` (HPCRAY_HOST_READS=0), the path between hosts: the
  Pull to rank 1, the transfer over MPI into rank 0's store. Then the wake-up of the
  driver, the decode.
- raw MPI: `mpiexec -n 2 python` (no hpcray runtime), one mpi4py `Send` / `Recv` of the
  same bytes between warm numpy buffers, timed on the receiver from a barrier
  (transfer_bandwidth.time_raw); the same with 2 ms of idle before each (as a get
  follows a task's round trip); and between two mapped /dev/shm files (4 KiB tmpfs
  pages, as the object store's). `ratio` is always against the first, warm one.
- Ray (`--ray-python PATH` or `--ray` under Ray's interpreter): the same program on
  `ray.cluster_utils.Cluster` with a head and one more raylet, the task pinned with
  NodeAffinitySchedulingStrategy.

Each job is started `--rounds` times, hpcray and raw interleaved, each giving the median
of `--repeat` (after one warm-up); the table shows the median of the rounds. `ratio` =
raw (numpy) time / hpcray time: 1 is MPI's speed. `--hops` also runs the MPI path's job with
HPCRAY_TRACE_HOPS (hpcray/runtime/hops.py) and prints the median time between the
stamps along a get of the first size (the driver's get, the Pull, the holder serving
it, the transfer's end, the objects made ready, the driver woken).
"""

from __future__ import annotations

import argparse
import glob
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import parse_size  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

_RESULT = "RESULT "
# The stamps of one get, in the order they happen (hops.py names them): (rank, what).
HOPS = [(0, "get.start"), (0, "pull.create"), (0, "pull.created"), (0, "pull.sent"),
        (1, "msg.matched"), (1, "serve.start"), (1, "serve.posted"),
        (0, "recv.complete"), (0, "pull.done"), (0, "pull.ready"), (0, "get.woken"),
        (0, "get.end")]
# The same for a copy from the holder's store (the host path): all in the driver's
# process, whose own thread copies (host_stores.defer_copies); rank 1 does nothing.
HOST_HOPS = [(0, "get.start"), (0, "pull.create"), (0, "pull.created"), (0, "host.taken"),
             (0, "get.registered"), (0, "host.copied"), (0, "get.end")]
HOPS_OF_PATH = {"mpi": HOPS, "host": HOST_HOPS}


def fmt_size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def store_bytes(sizes: list[int]) -> int:
    """Room for the object, its pulled copy and the previous one not yet freed."""
    return max(512 << 20, 3 * max(sizes) + (64 << 20))


# ---------------------------------------------------------------------------- in a job
def time_gets(ray, strategy, sizes: list[int], repeat: int) -> dict:
    """{size: [seconds of each get]} of arrays made by a task pinned by `strategy`."""
    import numpy as np

    @ray.remote(num_cpus=1)
    def make(nbytes: int):
        return np.ones(nbytes, dtype=np.uint8)

    on_other = make.options(scheduling_strategy=strategy)
    results = {}
    for nbytes in sizes:
        times = []
        for i in range(repeat + 1):  # the first one warms up
            ref = on_other.remote(nbytes)
            ray.wait([ref], fetch_local=False)
            start = time.perf_counter()
            value = ray.get(ref)
            elapsed = time.perf_counter() - start
            if value.nbytes != nbytes or value[-1] != 1:
                raise SystemExit(f"{nbytes} B arrived wrong")
            if i:
                times.append(elapsed)
            del value, ref
        results[nbytes] = times
    return results


def hpcray_job(sizes: list[int], repeat: int) -> None:
    import hpcray as ray
    from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(num_cpus=1, object_store_memory=store_bytes(sizes))
    ranks = {node["rank"]: node["NodeID"] for node in ray.nodes()}
    if len(ranks) < 2:
        raise SystemExit("run it on 2 ranks: mpiexec -n 2 python -m hpcray " + __file__)
    results = time_gets(ray, NodeAffinitySchedulingStrategy(ranks[1], soft=False), sizes,
                        repeat)
    ray.shutdown()
    print(_RESULT + json.dumps({"hpcray": results}), flush=True)


def ray_job(sizes: list[int], repeat: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    store = store_bytes(sizes)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": store, "include_dashboard": False})
    other = cluster.add_node(num_cpus=1, object_store_memory=store)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        strategy = NodeAffinitySchedulingStrategy(other.node_id, soft=False)
        return time_gets(ray, strategy, sizes, repeat)
    finally:
        ray.shutdown()
        cluster.shutdown()


def _shm_buffer(nbytes: int):
    """A mapped /dev/shm file of `nbytes`, touched (4 KiB tmpfs pages, as the store's)."""
    import numpy as np
    fd, path = tempfile.mkstemp(prefix="remote-get-raw-", dir="/dev/shm")
    try:
        os.ftruncate(fd, nbytes)
        mapping = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
        os.unlink(path)
    array = np.frombuffer(mapping, dtype=np.uint8)
    array[:] = 1
    return array


def raw_job(sizes: list[int], repeat: int) -> None:
    """Rank 0 sends, rank 1 receives and times (from a barrier to the last byte in)."""
    import numpy as np
    from mpi4py import MPI

    from transfer_bandwidth import time_raw

    comm = MPI.COMM_WORLD
    if comm.size != 2:
        raise SystemExit("run it on 2 ranks")
    results: dict = {"numpy": {}, "idle": {}, "shm": {}}
    for nbytes in sizes:
        for kind in ("numpy", "idle", "shm"):
            buffer = _shm_buffer(nbytes) if kind == "shm" else np.ones(nbytes, np.uint8)
            times = []
            for _ in range(repeat + 1):
                if kind == "idle":
                    time.sleep(_IDLE_FIRST)
                times.append(time_raw(comm, buffer, buffer))
            results[kind][nbytes] = times[1:]
            del buffer
    if comm.rank == 1:
        print(_RESULT + json.dumps(results), flush=True)


# ---------------------------------------------------------------------------- the hops
def traced_gets(folder: str, hops: list = HOPS) -> list:
    """Each complete get traced into `folder`: {(rank, what): ns} of `hops`."""
    stamps = []
    for path in glob.glob(os.path.join(folder, "hops-*.txt")):
        pid = path.rsplit("-", 1)[1]
        with open(path) as lines:
            for line in lines:
                ns, rank, what = line.split()
                stamps.append((int(ns), int(rank), what, pid))
    stamps.sort()
    gets, current, drivers = [], None, set()
    for ns, rank, what, pid in stamps:
        if what == "get.start" and rank == 0:
            current = {} if pid in drivers else None  # (each job's first get warms up)
            drivers.add(pid)
        if current is not None:
            current.setdefault((rank, what), ns)
            if what == "get.end":
                gets.append(current)
                current = None
    return [g for g in gets if all(hop in g for hop in hops)]


def hops_table(folder: str) -> str:
    """The median time between consecutive HOPS of each get traced into `folder`."""
    gets = traced_gets(folder)
    if not gets:
        return "(no complete get traced)"
    rows = ["| from | to | median µs |", "| --- | --- | --- |"]
    for before, after in zip(HOPS, HOPS[1:]):
        median = statistics.median((g[after] - g[before]) / 1e3 for g in gets)
        rows.append(f"| rank {before[0]} {before[1]} | rank {after[0]} {after[1]} | "
                    f"{median:.1f} |")
    total = statistics.median((g[HOPS[-1]] - g[HOPS[0]]) / 1e3 for g in gets)
    rows.append(f"| **get.start** | **get.end** | **{total:.1f}** ({len(gets)} gets) |")
    return "\n".join(rows)


def hop_medians(gets: list, hops: list = HOPS) -> list:
    """The median µs of each step between consecutive `hops`, then of the whole get."""
    steps = [statistics.median((g[after] - g[before]) / 1e3 for g in gets)
             for before, after in zip(hops, hops[1:])]
    return steps + [statistics.median((g[hops[-1]] - g[hops[0]]) / 1e3 for g in gets)]


def compare_hops(args) -> str:
    """`--hop-jobs N --compare TREE`: N traced jobs of this tree and of TREE, interleaved;
    per step the median over the jobs of each job's median (one job's figures swing with
    where its threads land on a busy host, so many jobs say more than many gets). The
    first of `--paths` is traced (default: mpi): over MPI (HOPS) or copied on the host
    (HOST_HOPS)."""
    import shutil

    import _mpirun
    trees = [str(_mpirun.REPO_ROOT)] + ([os.path.abspath(args.compare)] if args.compare
                                        else [])
    size, cma = args.sizes.split(",")[0], args.cma.split(",")[0]
    path = (args.paths or "mpi").split(",")[0]
    hops = HOPS_OF_PATH[path]
    per_tree = {tree: [] for tree in trees}   # [(step medians, get times)] per job
    for _ in range(args.hop_jobs):
        for tree in trees:
            folder = tempfile.mkdtemp(prefix="remote-get-hops-")
            env = {**_mpirun.cma_env(cma), "HPCRAY_TRACE_HOPS": folder, **_PATHS[path]}
            argv = [os.path.join(tree, "benchmarks", "remote_get.py"), "--job", "hpcray",
                    "--sizes", size, "--repeat", str(args.repeat)]
            job = _mpirun.run_job(2, argv, args.timeout, env=env, root=tree)
            gets = traced_gets(folder, hops)
            shutil.rmtree(folder, ignore_errors=True)
            if not job.clean or not gets:
                _mpirun.log(f"PROBLEM {tree}: {'; '.join(job.problems())}")
                continue
            times = next(iter(_result(job.output)["hpcray"].values()))
            per_tree[tree].append((hop_medians(gets, hops), statistics.median(times)))
    names = ["this tree"] + [f"{os.path.basename(t)} (--compare)" for t in trees[1:]]
    rows = [f"# {fmt_size(parse_size(size))}, CMA {cma}, {path} path: median over jobs of "
            f"each job's median of {args.repeat} gets; jobs per tree: "
            + ", ".join(str(len(per_tree[t])) for t in trees),
            "| from | to | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(trees)]

    def cell(tree, index):
        jobs = per_tree[tree]
        return f"{statistics.median(j[0][index] for j in jobs):.0f}" if jobs else "-"
    for i, (before, after) in enumerate(zip(hops, hops[1:])):
        rows.append(f"| rank {before[0]} {before[1]} | rank {after[0]} {after[1]} | "
                    + " | ".join(cell(t, i) for t in trees) + " |")
    rows.append("| **get.start** | **get.end** | "
                + " | ".join(cell(t, len(hops) - 1) for t in trees) + " |")
    rows.append("| get (ms, as the job timed it) | | " + " | ".join(
        f"{statistics.median(j[1] for j in per_tree[t]) * 1e3:.3f}" if per_tree[t] else "-"
        for t in trees) + " |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------- outside
# Raw MPI's "idle" column: each transfer after this long with nothing to do, as each
# timed get comes after a task's round trip. On this VM that alone makes 8 MiB ~1.5x
# slower (0.47 -> 0.68 ms; 5 ms: 0.89 ms): caches and idle cores, not MPI.
_IDLE_FIRST = 0.002
# The two ways a get's bytes come from another rank of the same host.
_PATHS = {"host": {"HPCRAY_HOST_READS": "1"}, "mpi": {"HPCRAY_HOST_READS": "0"}}


def _result(output: str) -> dict:
    for line in output.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    raise RuntimeError("no result in the job's output:\n" + output[-3000:])


def _run(kind: str, args, cma: str, env_extra: dict | None = None) -> dict:
    import subprocess

    import _mpirun
    env = {**_mpirun.cma_env(cma), **(env_extra or {})}
    argv = [__file__, "--job", kind, "--sizes", args.sizes, "--repeat", str(args.repeat)]
    if kind == "hpcray":
        job = _mpirun.run_job(2, argv, args.timeout, env=env)
    else:  # plain MPI: no hpcray runtime in the job
        command = [_mpirun.mpiexec_path(), "-n", "2", sys.executable, *argv]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                              env=dict(os.environ, **env))
        job = _mpirun.JobResult(command, proc.returncode, time.perf_counter() - start,
                                proc.stdout + proc.stderr)
    if not job.clean:
        _mpirun.log(f"PROBLEM {kind} CMA {cma}: {'; '.join(job.problems())}\n"
                    f"{job.output[-2000:]}")
        return {}
    return _result(job.output)


def _median_of_rounds(rounds: list, key) -> float | None:
    medians = [statistics.median(r[key]) for r in rounds if r and key in r]
    return statistics.median(medians) if medians else None


def outer(args) -> int:
    import _mpirun
    if args.hop_jobs:
        load_before = os.getloadavg()[0]
        table = compare_hops(args)
        print(f"# load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
        print(table)
        return 0
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    settings = args.cma.split(",")
    paths = (args.paths or "host,mpi").split(",")
    load_before = os.getloadavg()
    hpcray_runs = {(cma, path): [] for cma in settings for path in paths}
    raw_runs = {cma: [] for cma in settings}
    for round_ in range(args.rounds):
        for cma in settings:
            result = _run("raw", args, cma)
            raw_runs[cma].append({kk: {int(k): v for k, v in d.items()}
                                  for kk, d in result.items()})
            for path in paths:
                result = _run("hpcray", args, cma, _PATHS[path]).get("hpcray", {})
                hpcray_runs[cma, path].append({int(k): v for k, v in result.items()})
            _mpirun.log(f"round {round_ + 1} CMA {cma} done (load {os.getloadavg()[0]:.1f})")
    ray_times = {}
    if args.ray_python:
        import subprocess
        proc = subprocess.run([args.ray_python, __file__, "--ray", "--sizes", args.sizes,
                               "--repeat", str(args.repeat), "--json-only"],
                              capture_output=True, text=True, timeout=args.timeout)
        try:
            ray_times = {int(k): v for k, v in _result(proc.stdout)["ray"].items()}
        except (RuntimeError, KeyError) as exc:
            _mpirun.log(f"PROBLEM Ray: {exc}\n{proc.stderr[-2000:]}")
    load_after = os.getloadavg()

    print(f"# remote get, 2 ranks on one host; median of {args.rounds} rounds x median of "
          f"{args.repeat} gets; {_mpirun.machine_state()}")
    print(f"# load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    header = ["size", "CMA", "raw MPI (numpy)", "raw, 2 ms idle first", "raw MPI (/dev/shm)"]
    for path in paths:
        header += [f"hpcray get ({path})", "ratio", "GB/s"]
    if ray_times:
        header.append("Ray get")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for nbytes in sizes:
        for cma in settings:
            raw = _median_of_rounds([r.get("numpy", {}) for r in raw_runs[cma]], nbytes)
            idle = _median_of_rounds([r.get("idle", {}) for r in raw_runs[cma]], nbytes)
            shm = _median_of_rounds([r.get("shm", {}) for r in raw_runs[cma]], nbytes)
            cells = [fmt_size(nbytes), cma, _ms(raw), _ms(idle), _ms(shm)]
            for path in paths:
                ours = _median_of_rounds(hpcray_runs[cma, path], nbytes)
                cells += [_ms(ours), f"{raw / ours:.2f}" if ours and raw else "-",
                          f"{nbytes / ours / 1e9:.2f}" if ours else "-"]
            if ray_times:
                cells.append(_ms(statistics.median(ray_times[nbytes]))
                             if cma == settings[0] and nbytes in ray_times else "")
            print("| " + " | ".join(cells) + " |")
    if args.hops:
        folder = tempfile.mkdtemp(prefix="remote-get-hops-")
        hop_args = argparse.Namespace(**{**vars(args), "sizes": args.sizes.split(",")[0]})
        _run("hpcray", hop_args, settings[0], {"HPCRAY_TRACE_HOPS": folder, **_PATHS["mpi"]})
        print(f"\n# where a {fmt_size(sizes[0])} get's time goes over MPI (CMA {settings[0]}, "
              f"HPCRAY_TRACE_HOPS, load {os.getloadavg()[0]:.1f})")
        print(hops_table(folder))
    return 0


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1Mi,8Mi,64Mi,256Mi")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cma", default="on,off", help="on, off or on,off")
    parser.add_argument("--paths", help="host (copied from the holder's store), mpi, or "
                        "both (the default; with --hop-jobs, the first given, else mpi)")
    parser.add_argument("--hops", action="store_true", help="also trace where a get goes")
    parser.add_argument("--hop-jobs", type=int, default=0, metavar="N",
                        help="only where a get goes: N traced jobs per tree, interleaved")
    parser.add_argument("--compare", metavar="TREE",
                        help="with --hop-jobs: another built checkout, its jobs between")
    parser.add_argument("--ray-python", help="also run Ray with this interpreter")
    parser.add_argument("--ray", action="store_true", help="run on Ray (two raylets)")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--job", choices=("hpcray", "raw"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.job == "hpcray":
        hpcray_job(sizes, args.repeat)
    elif args.job == "raw":
        raw_job(sizes, args.repeat)
    elif args.ray:
        results = ray_job(sizes, args.repeat)
        print(_RESULT + json.dumps({"ray": results}), flush=True)
        if not args.json_only:
            for nbytes, times in results.items():
                print(f"| {fmt_size(nbytes)} | Ray get {_ms(statistics.median(times))} |")
    else:
        return outer(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
