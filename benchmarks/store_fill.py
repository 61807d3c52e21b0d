"""What `put` costs while the store's pages are new, and once they are reused.

A fresh runtime per object size puts numpy arrays, keeping every ref, until FILL bytes are
in the store (its pages allocated by tmpfs for the first time: page faults, or the
store's own allocation of them), then frees them all and puts as much again into the
same memory. Prints GB/s of each pass (GB = 1e9 bytes), median of --repeat fresh runs.

    python benchmarks/store_fill.py                       # 64Ki,1Mi,16Mi; 600 MiB; 3 runs
    python benchmarks/store_fill.py --sizes 1Mi --fill 256Mi --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this tree's hpcray, not an installed one

from _common import parse_size  # noqa: E402


def one_run(size: int, fill: int) -> tuple[float, float]:
    import numpy as np

    import hpcray
    hpcray.init(num_cpus=1, object_store_memory=fill + fill // 2)
    array = np.ones(size, dtype=np.uint8)
    count = fill // size
    rates = []
    for _ in range(2):  # new pages, then the same pages again
        refs = []
        start = time.perf_counter()
        for _ in range(count):
            refs.append(hpcray.put(array))
        rates.append(count * size / (time.perf_counter() - start) / 1e9)
        del refs
        time.sleep(0.2)  # the frees reach the node
    hpcray.shutdown()
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64Ki,1Mi,16Mi")
    parser.add_argument("--fill", default="600Mi")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(*one_run(int(args.child[0]), int(args.child[1])))
        return
    fill = parse_size(args.fill)
    print("size | new pages GB/s (each run) | reused pages GB/s (each run)")
    for text in args.sizes.split(","):
        size = parse_size(text)
        runs = []
        for _ in range(args.repeat):  # a fresh process each: a fresh store
            out = subprocess.run([sys.executable, __file__, "--child", str(size), str(fill)],
                                 check=True, capture_output=True, text=True).stdout
            runs.append(tuple(map(float, out.split()[-2:])))
        new, reused = zip(*runs)
        print(f"{text} | {statistics.median(new):.2f} ({' '.join(f'{r:.2f}' for r in new)})"
              f" | {statistics.median(reused):.2f} ({' '.join(f'{r:.2f}' for r in reused)})")


if __name__ == "__main__":
    main()
