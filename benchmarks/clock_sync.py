"""What aligning the ranks' clocks costs a job's start, and how tight the alignment is.

    mpiexec -n 4 python -m hpcray benchmarks/clock_sync.py [--jobs 10]

Each of `--jobs` init()/shutdown() pairs measures every rank's clock offset once
(runtime/clock.py: ClockPing/ClockPong round trips before Start); this times that step
on rank 0 and reports the bound each rank got (half its shortest round trip: the
aligned timeline is off by at most that). Medians over the jobs; run it with the
rank counts to compare (on one host the offsets are 0: the bound is what matters).
"""

from __future__ import annotations

import argparse
import statistics
import time

import hpcray as ray
from hpcray.runtime import clock, launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10)
    args = parser.parse_args()
    measure = clock.measure_offsets
    took, bounds = [], []

    def timed(transport):
        started = time.perf_counter()
        offsets = measure(transport)
        took.append((time.perf_counter() - started) * 1e3)
        bounds.append(max(bound for _offset, bound in offsets.values()) * 1e3)
        return offsets

    clock.measure_offsets = timed  # the one call launch.start_job makes per job
    for _ in range(args.jobs):
        ray.init(num_cpus=1)
        ray.shutdown()
    if not took:
        print("one node: no clocks to align")
        return
    print("| ranks | jobs | sync ms (median) | sync ms (max) | worst bound ms (median) |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| {launch.world().size} | {len(took)} | "
          f"{statistics.median(took):.1f} | {max(took):.1f} | "
          f"{statistics.median(bounds):.3f} |")


if __name__ == "__main__":
    main()
