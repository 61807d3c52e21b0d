"""CPU that an idle multi-rank hpcray job costs: every process of the job, while it waits.

    python benchmarks/idle_cost.py                     # mpiexec -n 4, 3 runs, 5 s windows
    python benchmarks/idle_cost.py --ranks 2 --window 10 --runs 5

Each run is one `mpiexec -n RANKS python -m hpcray benchmarks/idle_cost.py --driver ...`
job (under a timeout). Its driver starts every node (`init()`: each rank's CPUs as the
runtime finds them, unless `--num-cpus`), runs `--tasks` tasks spread over the nodes
(SPREAD) and one call on an actor per node, so that every node has started workers and an
actor and has moved messages, then sleeps. Meanwhile this harness waits `--settle`
seconds and measures, over `--window` seconds, the CPU time of every process of the job:
mpiexec, its Hydra proxies, each rank (node manager; rank 0 also the sleeping driver),
each rank's forkserver, workers and actors. A process counts when it is in mpiexec's
process tree or carries the job's tag in its environment.

CPU time is read two ways: nanoseconds from /proc/PID/task/*/schedstat (every thread;
a thread that ends within the window loses its share) and clock ticks from psutil
(10 ms each, so 0.2% of a core over 5 s is one tick). "wakeups/s" is how many times the
job's threads were put on a CPU per second (schedstat's third field), which shows a
polling loop even when each wakeup is cheap.

The aim is under 5% of ONE core for the whole job, summed over every process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import _mpirun  # noqa: E402

psutil = _common.psutil
AIM_PERCENT = 5.0
STORE_BYTES = 256 * 1024**2


def driver(args) -> int:
    import hpcray as ray

    kwargs = {"object_store_memory": STORE_BYTES}
    if args.num_cpus:
        kwargs["num_cpus"] = args.num_cpus
    ray.init(**kwargs)
    nodes = ray.nodes()

    @ray.remote
    def where():
        return ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=0)
    class Pinger:
        def ping(self):
            return ray.get_runtime_context().get_node_id()

    ran_on = set(ray.get([where.options(scheduling_strategy="SPREAD").remote()
                          for _ in range(args.tasks)]))
    actors = [Pinger.options(scheduling_strategy="SPREAD").remote() for _ in nodes]
    actor_nodes = set(ray.get([a.ping.remote() for a in actors]))
    with open(args.marker + ".tmp", "w") as f:
        json.dump({"nodes": len(nodes), "task_nodes": len(ran_on),
                   "actor_nodes": len(actor_nodes),
                   "cpus": ray.cluster_resources().get("CPU")}, f)
    os.replace(args.marker + ".tmp", args.marker)
    time.sleep(args.sleep)
    # What the idle costs in latency: a task pinned to each other rank, one after the
    # other (each rank still idle when its turn comes), then warm calls to rank 1.
    from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def round_trip(node) -> float:
        start = time.perf_counter()
        ray.get(where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node["NodeID"], soft=False)).remote())
        return time.perf_counter() - start

    others = [n for n in nodes if n["rank"] != 0]
    after_idle = [round_trip(node) for node in others]
    warm = [round_trip(others[0]) for _ in range(20)] if others else []
    with open(args.marker + ".latency", "w") as f:
        json.dump({"after_idle_ms": [1e3 * t for t in after_idle],
                   "warm_ms": [1e3 * t for t in warm]}, f)
    del actors
    ray.shutdown()
    return 0


# --------------------------------------------------------------------------- measuring


def _thread_stats(pid: int) -> tuple[int, int]:
    """(ns on CPU, times scheduled) summed over the live threads of pid."""
    ns = slices = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run_ns, _wait_ns, count = f.read().split()[:3]
            ns += int(run_ns)
            slices += int(count)
        except (OSError, ValueError):
            pass
    return ns, slices


def _roles(after: dict) -> dict:
    """pid -> role, from the process tree: mpiexec -> proxy -> rank -> forkserver -> worker
    (workers are forked by the forkserver, so their command lines look alike)."""
    by_pid = {key[0]: s for key, s in after.items()}
    roles = {}
    for pid, s in by_pid.items():
        if s["name"].startswith(("mpiexec", "hydra")):
            roles[pid] = "mpiexec + proxies"
    def rank_role(s):
        return ("rank 0 (node manager + driver)" if s["pmi_rank"] == "0"
                else "ranks > 0 (node managers)")
    guardians = set()
    for pid, s in by_pid.items():  # the launcher's child: the rank's guardian (or the rank)
        if roles.get(s["ppid"]) == "mpiexec + proxies" and pid not in roles:
            roles[pid] = rank_role(s)
            if s["name"] == "hpcray-guard":
                guardians.add(pid)
    for pid, s in by_pid.items():  # under a guardian: the rank itself
        if s["ppid"] in guardians:
            roles[pid] = rank_role(s)
    for pid, s in by_pid.items():
        if pid not in roles and s["ppid"] not in guardians and \
                roles.get(s["ppid"], "").startswith("rank"):
            roles[pid] = "forkservers"
    for pid in by_pid:
        roles.setdefault(pid, "workers and actors")
    return roles


def job_processes(root_pid: int, tag: str) -> dict:
    found = {}
    try:
        root = psutil.Process(root_pid)
        for p in [root, *root.children(recursive=True)]:
            found[p.pid] = p
    except psutil.Error:
        pass
    for p in _mpirun.tagged_processes(tag):
        found.setdefault(p.pid, p)
    return found


def snapshot(procs: dict) -> dict:
    state = {}
    for pid, p in procs.items():
        try:
            times = p.cpu_times()
            ns, slices = _thread_stats(pid)
            state[(pid, p.create_time())] = {
                "ticks_s": times.user + times.system, "ns": ns, "slices": slices,
                "cmd": " ".join(p.cmdline()), "threads": p.num_threads(),
                "name": p.name(), "ppid": p.ppid(),
                "pmi_rank": p.environ().get("PMI_RANK")}
        except psutil.Error:
            pass
    return state


def measure(proc, tag, marker, args, out: dict) -> None:
    """Runs beside the job (run_job's on_start): wait for the driver to go idle, measure."""
    deadline = time.monotonic() + args.timeout
    while not os.path.exists(marker):
        if proc.poll() is not None or time.monotonic() > deadline:
            out["error"] = "the driver never reached its idle phase"
            return
        time.sleep(0.05)
    with open(marker) as f:
        out["driver"] = json.load(f)
    time.sleep(args.settle)
    procs = job_processes(proc.pid, tag)
    before = snapshot(procs)
    start = time.perf_counter()
    time.sleep(args.window)
    wall = time.perf_counter() - start
    procs.update(job_processes(proc.pid, tag))
    after = snapshot(procs)

    role_of = _roles(after)
    roles: dict = {}
    total_ns = total_ticks = total_slices = 0
    top = []
    for key, s in after.items():
        b = before.get(key, {"ns": 0, "ticks_s": 0.0, "slices": 0})
        d_ns, d_ticks, d_slices = s["ns"] - b["ns"], s["ticks_s"] - b["ticks_s"], \
            s["slices"] - b["slices"]
        role = role_of[key[0]]
        r = roles.setdefault(role, {"processes": 0, "ns": 0, "slices": 0})
        r["processes"] += 1
        r["ns"] += d_ns
        r["slices"] += d_slices
        total_ns += d_ns
        total_ticks += d_ticks
        total_slices += d_slices
        top.append((d_ns, key[0], role, s["threads"], s["cmd"][:90]))
    top.sort(reverse=True)
    out.update({
        "wall_s": wall,
        "percent": 100 * total_ns / 1e9 / wall,
        "percent_ticks": 100 * total_ticks / wall,
        "wakeups_per_s": total_slices / wall,
        "processes": len(after),
        "died_during_window": len(set(before) - set(after)),
        "roles": {k: {"processes": v["processes"],
                      "percent": 100 * v["ns"] / 1e9 / wall,
                      "wakeups_per_s": v["slices"] / wall} for k, v in roles.items()},
        "top": [{"pid": pid, "percent": 100 * ns / 1e9 / wall, "role": role,
                 "threads": threads, "cmd": cmd}
                for ns, pid, role, threads, cmd in top[:8]],
    })


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=0,
                        help="CPUs per rank (default: what the runtime detects)")
    parser.add_argument("--tasks", type=int, default=40, help="tasks run before going idle")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120, help="seconds per mpiexec job")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--marker", help=argparse.SUPPRESS)
    parser.add_argument("--sleep", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.driver:
        return driver(args)
    if psutil is None:
        raise SystemExit("psutil is needed: pip install -e .[bench]")

    state = _mpirun.machine_state()
    results, problems = [], []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="hpcray-idle-") as tmp:
            marker = os.path.join(tmp, "idle")
            out: dict = {}
            sleep = args.settle + args.window + 2.0
            argv_ = [str(Path(__file__).resolve()), "--driver", "--marker", marker,
                     "--sleep", str(sleep), "--tasks", str(args.tasks),
                     "--num-cpus", str(args.num_cpus)]
            job = _mpirun.run_job(args.ranks, argv_, timeout_s=args.timeout,
                                  on_start=lambda p, t, m=marker, o=out: measure(p, t, m, args, o))
            for p in job.problems():
                problems.append(f"run {i + 1}: {p}")
                _mpirun.log(problems[-1])
            if os.path.exists(marker + ".latency"):
                with open(marker + ".latency") as f:
                    out.update(json.load(f))
            if "percent" in out:
                results.append(out)
                _mpirun.log(f"run {i + 1}: {out['percent']:.2f}% of a core "
                            f"({out['percent_ticks']:.1f}% by ticks), "
                            f"{out['wakeups_per_s']:,.0f} wakeups/s, "
                            f"{out['processes']} processes")
            else:
                problems.append(f"run {i + 1}: {out.get('error', 'no measurement')}")
                _mpirun.log(problems[-1] + "\n" + job.output[-3000:])

    print(f"# idle cost: mpiexec -n {args.ranks}, init(num_cpus="
          f"{args.num_cpus or 'detected'}), {args.tasks} tasks + 1 actor per node, then "
          f"{args.settle:g} s settle and a {args.window:g} s window; at start: {state}; "
          f"at end: load {os.getloadavg()[0]:.2f}")
    if not results:
        print("no run measured")
        for p in problems:
            print("PROBLEM", p)
        return 1
    first = results[0]["driver"]
    print(f"# {first['nodes']} nodes, {first['cpus']:g} CPUs in all; tasks ran on "
          f"{first['task_nodes']} nodes, actors on {first['actor_nodes']}")
    median = statistics.median(r["percent"] for r in results)
    rows = []
    order = ["mpiexec + proxies", "rank 0 (node manager + driver)",
             "ranks > 0 (node managers)", "forkservers", "workers and actors"]
    seen = {k for r in results for k in r["roles"]}
    for role in [o for o in order if o in seen]:
        per = [r["roles"].get(role, {"percent": 0.0, "processes": 0, "wakeups_per_s": 0})
               for r in results]
        rows.append([role, str(per[0]["processes"]),
                     f"{statistics.median(x['percent'] for x in per):.2f}",
                     f"{statistics.median(x['wakeups_per_s'] for x in per):,.0f}"])
    rows.append(["**whole job**", str(results[0]["processes"]), f"**{median:.2f}**",
                 f"{statistics.median(r['wakeups_per_s'] for r in results):,.0f}"])
    print(_common.markdown_table(["processes", "count", "% of one core (median)",
                                  "wakeups/s"], rows))
    after_idle = [t for r in results for t in r.get("after_idle_ms", ())]
    warm = [t for r in results for t in r.get("warm_ms", ())]
    if after_idle and warm:
        print(f"\nlatency: a task pinned to an idle rank (the first after "
              f"{args.settle + args.window + 2:g} s of idle), round trip: median "
              f"{statistics.median(after_idle):.1f} ms, max {max(after_idle):.1f} ms "
              f"({len(after_idle)} calls); warm, to rank 1: median "
              f"{statistics.median(warm):.1f} ms")
    print("\nper run: " + ", ".join(
        f"{r['percent']:.2f}% ({r['percent_ticks']:.1f}% by ticks)" for r in results))
    verdict = "meets" if median < AIM_PERCENT else "MISSES"
    print(f"aim: under {AIM_PERCENT:g}% of one core for the whole job: {verdict} "
          f"({median:.2f}%)")
    for p in problems:
        print("PROBLEM", p)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine_at_start": state, "runs": results, "problems": problems},
                      f, indent=2)
    return 0 if (median < AIM_PERCENT and not problems) else 1


if __name__ == "__main__":
    sys.exit(main())
