"""Weak scaling of no-op task throughput over ranks (the Ray paper's Figure 8b, small).

    python benchmarks/weak_scaling.py             # ranks 1,2,4; 10k tasks per rank; 3 runs
    python benchmarks/weak_scaling.py --ranks 1,2 --tasks-per-rank 2000 --runs 1
    python benchmarks/weak_scaling.py --modes submitters

Each point is one `mpiexec -n R python -m hpcray benchmarks/weak_scaling.py --driver ...`
job under a timeout (R = 1 runs with no MPI at all: one rank is the embedded one-node
mode). The work grows with the ranks: R × TASKS_PER_RANK no-op tasks per point, each
rank with `init(num_cpus=NUM_CPUS)`. Two ways to submit:

- `driver`: the one driver (rank 0) submits every task, then `get`s them all: the
  scaling one program gets from the bottom-up scheduler spilling its tasks to other nodes.
- `submitters`: the driver starts one "submitter" task pinned to each node
  (NodeAffinitySchedulingStrategy, hard) that submits TASKS_PER_RANK no-ops itself and
  `get`s them; this is how the paper reaches 1M tasks/s (work submitted on every node,
  kept local by the bottom-up scheduler) in a runtime with one driver per job.

Timed: from the first submission to the last result, after a warm-up that starts every
node's workers. tasks/s is the median over `--runs` jobs; "local" is the share of the
tasks a submitter made that ran on the submitter's own node.

On a 2-core machine, ranks beyond 2 are oversubscribed (every rank is a node manager,
its workers, and rank 0 also the driver): the figure measures contention there, not
scaling; read it as such.
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

STORE_BYTES = 256 * 1024**2


def driver(args) -> int:
    import hpcray as ray
    from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(num_cpus=args.num_cpus, object_store_memory=STORE_BYTES)
    rank_of = {n["NodeID"]: n["rank"] for n in ray.nodes()}
    ranks = len(rank_of)

    @ray.remote
    def noop():
        return ray.get_runtime_context().get_node_id()

    @ray.remote
    def submitter(count):
        here = ray.get_runtime_context().get_node_id()
        start = time.perf_counter()
        where = ray.get([noop.remote() for _ in range(count)])
        return here, sum(1 for w in where if w == here), time.perf_counter() - start

    ray.get([noop.remote() for _ in range(20 * ranks * args.num_cpus)])  # warm-up
    total = args.tasks_per_rank * ranks
    result = {"ranks": ranks, "num_cpus": args.num_cpus, "mode": args.mode, "tasks": total}
    if args.mode == "driver":
        start = time.perf_counter()
        where = ray.get([noop.remote() for _ in range(total)])
        elapsed = time.perf_counter() - start
        per_rank = {r: 0 for r in sorted(rank_of.values())}
        for w in where:
            per_rank[rank_of[w]] += 1
        result["per_rank"] = per_rank
    else:
        pinned = [submitter.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id, soft=False)) for node_id in rank_of]
        ray.get([s.remote(10) for s in pinned])  # warm-up of the submitters' path
        start = time.perf_counter()
        done = ray.get([s.remote(args.tasks_per_rank) for s in pinned])
        elapsed = time.perf_counter() - start
        result["local_share"] = sum(local for _, local, _ in done) / total
        result["submitter_s"] = {rank_of[here]: s for here, _, s in done}
    result["total_s"] = elapsed
    result["tasks_per_s"] = total / elapsed
    ray.shutdown()
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--num-cpus", type=int, default=1, help="CPUs per rank (default 1)")
    parser.add_argument("--tasks-per-rank", type=int, default=10_000)
    parser.add_argument("--modes", default="driver,submitters")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mpiexec job")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.driver:
        return driver(args)

    state = _mpirun.machine_state()
    rank_counts = [int(r) for r in args.ranks.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    points, problems = {}, []
    for mode in modes:
        for ranks in rank_counts:
            runs = []
            for i in range(args.runs):
                with tempfile.TemporaryDirectory(prefix="hpcray-ws-") as tmp:
                    out = os.path.join(tmp, "result.json")
                    argv_ = [str(Path(__file__).resolve()), "--driver", "--mode", mode,
                             "--tasks-per-rank", str(args.tasks_per_rank),
                             "--num-cpus", str(args.num_cpus), "--out", out]
                    job = _mpirun.run_job(ranks, argv_, timeout_s=args.timeout)
                    if os.path.exists(out):
                        with open(out) as f:
                            runs.append(json.load(f))
                        r = runs[-1]
                        extra = (f"per rank {list(r['per_rank'].values())}" if "per_rank" in r
                                 else f"local {100 * r['local_share']:.0f}%")
                        _mpirun.log(f"{mode} ranks={ranks} run {i + 1}: "
                                    f"{r['tasks_per_s']:,.0f} tasks/s ({r['total_s']:.2f} s), "
                                    f"{extra}")
                    for p in job.problems():
                        problems.append(f"{mode} ranks={ranks} run {i + 1}: {p}")
                        _mpirun.log(problems[-1])
                    if job.problems() and not os.path.exists(out):
                        _mpirun.log("output tail:\n" + job.output[-3000:])
            points[(mode, ranks)] = runs

    print(f"# weak scaling: {args.tasks_per_rank:,} no-op tasks per rank, "
          f"init(num_cpus={args.num_cpus}) per rank, median of {args.runs} runs; at start: "
          f"{state}; at end: load {os.getloadavg()[0]:.2f}")
    header = ["mode", "ranks", "tasks", "tasks/s (median)", "per run", "vs 1 rank", "detail"]
    rows = []
    for mode in modes:
        base = None
        for ranks in rank_counts:
            runs = points[(mode, ranks)]
            if not runs:
                rows.append([mode, str(ranks), "—", "failed", "", "", ""])
                continue
            rate = statistics.median(r["tasks_per_s"] for r in runs)
            if base is None:
                base = rate
            if mode == "driver":
                shares = [statistics.median(r["per_rank"][k] for r in runs) / runs[0]["tasks"]
                          for k in sorted(runs[0]["per_rank"], key=int)]
                detail = "ran on ranks: " + " / ".join(f"{100 * s:.0f}%" for s in shares)
            else:
                local = statistics.median(r["local_share"] for r in runs)
                detail = f"local {100 * local:.0f}%"
            rows.append([mode, str(ranks), f"{runs[0]['tasks']:,}", _common.fmt_number(rate),
                         " / ".join(_common.fmt_number(r["tasks_per_s"]) for r in runs),
                         f"{rate / base:.2f}x", detail])
    print(_common.markdown_table(header, rows))
    for p in problems:
        print("PROBLEM", p)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine_at_start": state,
                       "points": {f"{m} {r}": v for (m, r), v in points.items()},
                       "problems": problems}, f, indent=2)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
