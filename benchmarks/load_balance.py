"""Load balance across nodes: one driver on rank 0 submits many tasks; which node ran each?

    python benchmarks/load_balance.py             # 4 ranks, 100k no-ops + 10k 1 ms tasks, 3 runs
    python benchmarks/load_balance.py --tasks 10000 --sleep-tasks 2000 --runs 1
    python benchmarks/load_balance.py --ranks 2 --num-cpus 2 --sleep-ms 5

Each run is one `mpiexec -n RANKS python -m hpcray benchmarks/load_balance.py --driver ...`
job (under a timeout; processes and /dev/shm segments left behind are reported). Its
driver, on rank 0, starts every node with `init(num_cpus=NUM_CPUS)`, warms every node's
workers up, then submits all the tasks at once (`[task.remote() for _ in range(n)]`) and
`get`s them; each task returns `get_runtime_context().get_node_id()`, whose first 4 bytes
are the rank. Reported: how many tasks each rank ran, the submit time, the total time
(first submit to last result) and tasks/s, the median over `--runs` jobs.

Two workloads: no-op tasks (the scheduler's own cost: where do tasks go when there is no
work to spread?) and tasks that sleep `--sleep-ms` (where spilling to other nodes pays:
a balanced run approaches RANKS × NUM_CPUS × 1000 / sleep_ms tasks/s).

Also reported: the CPU seconds the job's processes used in the timed window, per task
(rank 0's process: the driver and its node; the other ranks; the workers), which says
more than tasks/s on a machine shared with other jobs. `--compare TREE` runs every job
a second time against another built checkout (e.g. an older commit), interleaved (this
tree, then TREE, run after run), and prints both and the ratio of the medians.

What it is not: the paper's Figure 8a proper (that figure is locality-aware placement:
tasks go to where their argument is; tests/multinode checks that behaviour).
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

STORE_BYTES = 256 * 1024**2  # per rank; the tasks return 32-byte strings


# --------------------------------------------------------------------------- the driver


def driver(args) -> int:
    import hpcray as ray

    ray.init(num_cpus=args.num_cpus, object_store_memory=STORE_BYTES)
    rank_of = {n["NodeID"]: n["rank"] for n in ray.nodes()}
    sleep_s = args.sleep_ms / 1000.0

    @ray.remote
    def task(sleep_s):
        if sleep_s:
            time.sleep(sleep_s)
        return ray.get_runtime_context().get_node_id()

    # Warm-up: every node's workers started and the function exported everywhere.
    ray.get([task.remote(0.01) for _ in range(4 * len(rank_of) * args.num_cpus)])

    cpu_before = job_cpu_seconds()
    start = time.perf_counter()
    refs = [task.remote(sleep_s) for _ in range(args.tasks)]
    submitted = time.perf_counter()
    where = ray.get(refs)
    end = time.perf_counter()
    cpu_after = job_cpu_seconds()
    counts = {rank: 0 for rank in sorted(rank_of.values())}
    for node_id in where:
        counts[rank_of[node_id]] += 1
    result = {
        "ranks": len(rank_of),
        "num_cpus": args.num_cpus,
        "tasks": args.tasks,
        "sleep_ms": args.sleep_ms,
        "submit_s": submitted - start,
        "total_s": end - start,
        "tasks_per_s": args.tasks / (end - start),
        "per_rank": counts,
        "cpu_s": {group: sum(after - cpu_before.get(key, 0.0) for key, after in seconds.items())
                  for group, seconds in cpu_after.items()},
    }
    del refs, where
    ray.shutdown()
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


def job_cpu_seconds() -> dict:
    """{group: {(pid, start time): CPU seconds so far}} for this job's processes (they
    carry its tag): "rank 0" (this process: the driver and its node manager), "other
    ranks" (node managers, their guardians), "workers" (and the fork servers)."""
    import psutil
    groups: dict = {"rank 0": {}, "other ranks": {}, "workers": {}}
    me = os.getpid()
    for proc in _mpirun.tagged_processes(os.environ.get(_mpirun.TAG_VARIABLE, "-")) + \
            [psutil.Process(me)]:
        try:
            command = " ".join(proc.cmdline())
            times = proc.cpu_times()
            key = (proc.pid, proc.create_time())
        except psutil.Error:
            continue
        if proc.pid == me:
            group = "rank 0"
        elif "forkserver" in command:
            group = "workers"
        elif "-m hpcray" in command:
            group = "other ranks"
        else:
            continue  # mpiexec and its proxies
        groups[group][key] = times.user + times.system
    return groups


# --------------------------------------------------------------------------- the harness


def run_variant(args, tasks: int, sleep_ms: float) -> list[dict]:
    """One result per tree (this one, then `--compare`'s), their jobs interleaved."""
    trees = [None] + ([os.path.abspath(args.compare)] if args.compare else [])
    variants = [{"tree": tree or str(_mpirun.REPO_ROOT), "tasks": tasks, "sleep_ms": sleep_ms,
                 "runs": [], "problems": []} for tree in trees]
    script = str(Path(__file__).resolve())
    for i in range(args.runs):
        for tree, variant in zip(trees, variants):
            with tempfile.TemporaryDirectory(prefix="hpcray-lb-") as tmp:
                out = os.path.join(tmp, "result.json")
                argv = [script, "--driver", "--tasks", str(tasks), "--sleep-ms", str(sleep_ms),
                        "--num-cpus", str(args.num_cpus), "--out", out]
                job = _mpirun.run_job(args.ranks, argv, timeout_s=args.timeout, root=tree)
                name = f"run {i + 1}{'' if tree is None else ' (' + tree + ')'}"
                if os.path.exists(out):
                    with open(out) as f:
                        variant["runs"].append(json.load(f))
                    r = variant["runs"][-1]
                    r["load"] = os.getloadavg()[0]
                    _mpirun.log(f"  {name}: {tasks} tasks of {sleep_ms} ms: "
                                f"{r['total_s']:.2f} s, {r['tasks_per_s']:,.0f} tasks/s, "
                                f"per rank {list(r['per_rank'].values())}, load {r['load']:.1f}")
                else:
                    _mpirun.log(f"  {name}: no result")
                for p in job.problems():
                    variant["problems"].append(f"{name}: {p}")
                    _mpirun.log(f"  {name}: PROBLEM: {p}")
                if job.problems() and not os.path.exists(out):
                    _mpirun.log("  output tail:\n" + job.output[-3000:])
    return variants


def summarise(variant: dict, ranks: int, num_cpus: int) -> list[str]:
    runs = variant["runs"]
    if not runs:
        return [f"**{variant['tasks']} tasks, {variant['sleep_ms']} ms each: no run finished**"]
    header = ["rank", "tasks run (median)", "share", "per run"]
    rows = []
    for rank in sorted(runs[0]["per_rank"], key=int):
        per_run = [r["per_rank"][rank] for r in runs]
        med = statistics.median(per_run)
        rows.append([rank, _common.fmt_number(med), f"{100 * med / variant['tasks']:.1f}%",
                     " / ".join(str(v) for v in per_run)])
    total = statistics.median(r["total_s"] for r in runs)
    rate = statistics.median(r["tasks_per_s"] for r in runs)
    submit = statistics.median(r["submit_s"] for r in runs)
    lines = [
        f"{variant['tasks']:,} tasks of {variant['sleep_ms']:g} ms, {ranks} ranks × "
        f"{num_cpus} CPU, {len(runs)} runs, tree {variant['tree']}:",
        "",
        _common.markdown_table(header, rows),
        "",
        f"total {total:.2f} s (median; runs: "
        + ", ".join(f"{r['total_s']:.2f}" for r in runs)
        + f"), submit {submit:.2f} s, {rate:,.0f} tasks/s",
    ]
    if variant["sleep_ms"]:
        ideal = ranks * num_cpus * 1000 / variant["sleep_ms"]
        lines[-1] += f" (ideal with every CPU busy: {ideal:,.0f} tasks/s)"
    if all("cpu_s" in r for r in runs):
        lines.append("CPU per task (median µs): " + ", ".join(
            f"{group} {statistics.median(1e6 * r['cpu_s'][group] / r['tasks'] for r in runs):.0f}"
            for group in runs[0]["cpu_s"]) + "; load average during the runs: "
            + ", ".join(f"{r.get('load', 0):.1f}" for r in runs))
    for p in variant["problems"]:
        lines.append(f"PROBLEM {p}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=1, help="CPUs per rank (default 1)")
    parser.add_argument("--tasks", type=int, default=100_000, help="no-op tasks per run")
    parser.add_argument("--sleep-tasks", type=int, default=10_000,
                        help="tasks of the sleeping workload per run (0: skip it)")
    parser.add_argument("--sleep-ms", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mpiexec job")
    parser.add_argument("--json", metavar="PATH", help="write every run's figures here")
    parser.add_argument("--compare", metavar="TREE",
                        help="another built checkout, run interleaved with this one")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.driver:
        return driver(args)

    state = _mpirun.machine_state()
    workloads = []
    if args.tasks:
        _mpirun.log(f"{args.tasks} no-op tasks, {args.ranks} ranks, {args.runs} runs")
        workloads.append(run_variant(args, args.tasks, 0))
    if args.sleep_tasks:
        _mpirun.log(f"{args.sleep_tasks} tasks of {args.sleep_ms} ms, {args.ranks} ranks")
        workloads.append(run_variant(args, args.sleep_tasks, args.sleep_ms))
    print(f"# load balance: mpiexec -n {args.ranks}, init(num_cpus={args.num_cpus}); "
          f"at start: {state}; at end: load {os.getloadavg()[0]:.2f}")
    for variants in workloads:
        for variant in variants:
            print()
            print("\n".join(summarise(variant, args.ranks, args.num_cpus)))
        if len(variants) == 2 and variants[0]["runs"] and variants[1]["runs"]:
            rates = [statistics.median(r["tasks_per_s"] for r in v["runs"]) for v in variants]
            print(f"\ntasks/s, this tree / {variants[1]['tree']}: {rates[0] / rates[1]:.2f}x "
                  f"(medians {rates[0]:,.0f} / {rates[1]:,.0f})")
    variants = [variant for variants in workloads for variant in variants]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine_at_start": state, "variants": variants}, f, indent=2)
    return 1 if any(v["problems"] or not v["runs"] for v in variants) else 0


if __name__ == "__main__":
    sys.exit(main())
