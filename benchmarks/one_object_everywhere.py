"""One object read by a task on every rank, end to end (runtime/relay.py):

    mpiexec -n 4 python -m hpcray benchmarks/one_object_everywhere.py [--size 256Mi]
    HPCRAY_RELAY_MIN_BYTES=1e12 mpiexec -n 4 ...    # relays off: the holder sends N copies

Rank 0 puts the object; one task pinned to each other rank reads it (its sum), and the
time from submitting them to the last result is taken, `--repeat` times with a fresh
object each time (the median is printed), with how many copies rank 0 sent. On one
machine all ranks share one memory bus, so this shows no gain from relaying (see
benchmarks/README.md for the model with one link per node); it shows the cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import hpcray as ray
from hpcray import context
from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from _common import parse_size  # noqa: E402


@ray.remote(num_cpus=0)
def total(weights) -> float:
    return float(weights[::4096].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="256Mi")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    size = parse_size(args.size)
    ray.init()
    nodes = {n["rank"]: n["NodeID"] for n in ray.nodes()}
    times = []
    for _ in range(args.repeat):
        weights = ray.put(np.ones(size // 8, np.float64))
        start = time.perf_counter()
        ray.get([total.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            nodes[rank], soft=False)).remote(weights) for rank in sorted(nodes) if rank])
        times.append(time.perf_counter() - start)
        del weights
    counters = {p["rank"]: p["counters"] for p in context.get_client().list_state("timeline")}
    sent = counters[0].get("bytes_sent", 0) / size / args.repeat
    relayed = sum(c.get("relayed", 0) for c in counters.values()) / args.repeat
    print(f"{len(nodes)} ranks, {size / 2**20:g} MiB, relays from "
          f"{int(float(os.environ.get('HPCRAY_RELAY_MIN_BYTES', 8 << 20))):,} B: median "
          f"{statistics.median(times) * 1e3:.0f} ms ({', '.join(f'{t * 1e3:.0f}' for t in times)})"
          f"; per object rank 0 sent {sent:.1f} copies, {relayed:.1f} relayed; "
          f"load {os.getloadavg()[0]:.1f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
