"""`get` of an object made on another rank: the whole object path between two nodes.

    mpiexec -n 2 python -m hpcray benchmarks/remote_get.py [--sizes 1Mi,8Mi,64Mi] [--repeat 40]

What it measures: a task pinned to rank 1 makes a numpy array of each size (so its
bytes stay in rank 1's store); once the driver on rank 0 knows it exists
(`wait(fetch_local=False)`), the driver's `get` is timed: the pull request to rank 1,
the transfer over MPI straight into rank 0's store, and the wake-up of the driver.
Median of `--repeat`. transfer_bandwidth.py measures the transport alone; this adds
what the node managers cost (their MPI polling, the messages around the bytes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import hpcray as ray
from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

_UNITS = {"": 1, "KI": 2**10, "MI": 2**20, "GI": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    digits = text.rstrip("KMGI")
    return int(float(digits) * _UNITS[text[len(digits):]])


@ray.remote
def make(nbytes: int):
    return np.ones(nbytes, dtype=np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1Mi,8Mi,64Mi")
    parser.add_argument("--repeat", type=int, default=40)
    args = parser.parse_args()
    ray.init(num_cpus=1, object_store_memory=512 << 20)
    ranks = {node["rank"]: node["NodeID"] for node in ray.nodes()}
    if len(ranks) < 2:
        raise SystemExit("run it on 2 ranks: mpiexec -n 2 python -m hpcray " + __file__)
    on_rank_1 = make.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ranks[1], soft=False))
    print("|     size | get (median) |  GB/s |")
    print("| -------- | ------------ | ----- |")
    for nbytes in map(parse_size, args.sizes.split(",")):
        times = []
        for _ in range(args.repeat + 1):  # the first one warms up
            ref = on_rank_1.remote(nbytes)
            ray.wait([ref], fetch_local=False)
            start = time.perf_counter()
            value = ray.get(ref)
            times.append(time.perf_counter() - start)
            del value, ref
        median = statistics.median(times[1:])
        rate = nbytes / median / 1e9
        print(f"| {nbytes / 2**20:>6g} MiB | {median * 1e3:>9.2f} ms | {rate:5.2f} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
