"""A task on another rank and a `get` of its result, over and over: what a program that
waits for each remote result pays per round, the get's neighbours included.

    python benchmarks/task_and_get.py --sizes 1Mi,8Mi --rounds 3 [--compare TREE] [--cma off]

`remote_get.py` times the get alone (after `wait`), so it cannot see what a get leaves
behind for the next round: a holder that still counts its finished send as outstanding
polls slowly, and the next task's message waits for its tick (2 ms ticks made this loop
3.2-3.3 ms a round against 2.3-2.5 at 1 MiB, which the get-only hop jobs did not show).

Each job is `mpiexec -n 2 python -m hpcray benchmarks/task_and_get.py --job SIZE N`
(its own interpreter, HPCRAY_HOST_READS=0: over MPI as between hosts): rank 0's driver
runs a task pinned to rank 1 that returns SIZE bytes and gets it, N times after one
warm-up, and prints the mean time of a round. With `--compare TREE` the jobs of this
tree and of TREE alternate, `--rounds` each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_RESULT = "TASK_AND_GET "


def parse_size(text: str) -> int:
    units = {"": 1, "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    digits = text.rstrip("KMGI")
    return int(float(digits) * units[text[len(digits):]])


def job(nbytes: int, count: int) -> None:
    import numpy as np

    import hpcray as ray
    from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(num_cpus=1, object_store_memory=max(512 << 20, 4 * nbytes))
    ranks = {node["rank"]: node["NodeID"] for node in ray.nodes()}
    if len(ranks) < 2:
        raise SystemExit("run it on 2 ranks")

    @ray.remote(num_cpus=1)
    def make(size: int):
        return np.ones(size, dtype=np.uint8)

    on_other = make.options(scheduling_strategy=NodeAffinitySchedulingStrategy(ranks[1],
                                                                               soft=False))
    ray.get(on_other.remote(nbytes))  # warm-up
    start = time.perf_counter()
    for _ in range(count):
        value = ray.get(on_other.remote(nbytes))
        if value.nbytes != nbytes:
            raise SystemExit("the result arrived wrong")
        del value
    print(f"{_RESULT}{(time.perf_counter() - start) / count}", flush=True)
    ray.shutdown()


def run_job(tree: str, nbytes: int, count: int, cma: str, timeout: float) -> float:
    sys.path.insert(0, _HERE)
    import _mpirun

    env = dict(os.environ, PYTHONPATH=tree, HPCRAY_HOST_READS="0", **_mpirun.cma_env(cma))
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    script = os.path.abspath(__file__)  # this file, the tree's hpcray (PYTHONPATH)
    out = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-m", "hpcray", script,
                          "--job", str(nbytes), str(count)], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=timeout)
    for line in out.stdout.splitlines():
        if line.startswith(_RESULT):
            return float(line[len(_RESULT):])
    raise SystemExit(f"no result from {tree}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", nargs=2, type=int, metavar=("SIZE", "COUNT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="1Mi,8Mi")
    parser.add_argument("--count", type=int, default=0,
                        help="rounds per job (default: ~0.6 s of work per job)")
    parser.add_argument("--rounds", type=int, default=3, help="jobs per tree and size")
    parser.add_argument("--cma", choices=("on", "off"), default="off")
    parser.add_argument("--compare", metavar="TREE")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    if args.job:
        job(*args.job)
        return 0
    trees = [os.path.dirname(_HERE)] + ([os.path.abspath(args.compare)] if args.compare else [])
    print(f"# a task on rank 1 and a get of its result, mean of a job's rounds; CMA "
          f"{args.cma}; load {os.getloadavg()[0]:.2f}")
    print("| size | " + " | ".join(trees) + " |")
    print("|---" * (len(trees) + 1) + "|")
    for size in args.sizes.split(","):
        nbytes = parse_size(size)
        count = args.count or max(10, min(300, int(0.6 / (0.002 + nbytes / 2e9))))
        times: dict = {tree: [] for tree in trees}
        for _ in range(args.rounds):
            for tree in trees:
                times[tree].append(run_job(tree, nbytes, count, args.cma, args.timeout))
        cells = [f"{statistics.median(times[t]) * 1e3:.3f} ms ("
                 + "/".join(f"{x * 1e3:.2f}" for x in times[t]) + ")" for t in trees]
        print(f"| {size} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
