"""Many small objects made on one rank and fetched by another in ONE `get`.

    mpiexec -n 2 python -m hpcray benchmarks/many_small_objects.py [--count 10000]
        [--sizes 10K,200K] [--modes puts,tasks] [--repeat 3]
    python benchmarks/many_small_objects.py --ray [...]     # Ray: a Cluster of two raylets

Two ways to make the objects on rank 1 (the other node), each timed by a `get` of the
whole list from the driver on rank 0, after every object exists:

- `puts`: an actor pinned to rank 1 `put`s COUNT numpy arrays and returns their refs, so
  rank 1 owns and holds them; the driver borrows the refs (its node asks the owner
  where each value is, and pulls the ones in rank 1's store).
- `tasks`: COUNT tasks pinned to rank 1 each return one array, so the driver owns the
  refs (an inline value comes back with the task's result; a larger one stays in rank
  1's store as the primary copy and is pulled). The driver waits for all of them with
  `wait(fetch_local=False)` before the timed `get`.

Values under `inline_threshold` (100 KiB) travel inside messages; larger ones are in a
store and move as object transfers. Reported: objects/s and MB/s of the `get`, median
of `--repeat` (each repeat makes fresh objects). With `--ray`, the same program runs
on Ray 2.x, `ray.cluster_utils.Cluster` with a head raylet and one more (each with its
own object store), the actor and tasks pinned to the second with
NodeAffinitySchedulingStrategy; run it with Ray's interpreter.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

_UNITS = {"": 1, "K": 2**10, "KI": 2**10, "M": 2**20, "MI": 2**20}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    digits = text.rstrip("KMI")
    return int(float(digits) * _UNITS[text[len(digits):]])


def run(ray, strategy_on_other, count: int, sizes, modes, repeat: int) -> None:
    @ray.remote(num_cpus=0)
    class Maker:
        def puts(self, n, size):
            return [ray.put(np.full(size, i % 251, dtype=np.uint8)) for i in range(n)]

    @ray.remote(num_cpus=1)
    def make(i, size):
        return np.full(size, i % 251, dtype=np.uint8)

    maker = Maker.options(scheduling_strategy=strategy_on_other).remote()
    on_other = make.options(scheduling_strategy=strategy_on_other)
    print("| mode  |   size | objects | get (median) |  objects/s |   MB/s |")
    print("| ----- | ------ | ------- | ------------ | ---------- | ------ |")
    for size in sizes:
        for mode in modes:
            times = []
            for _ in range(repeat):
                if mode == "puts":
                    refs = ray.get(maker.puts.remote(count, size))
                else:
                    refs = [on_other.remote(i, size) for i in range(count)]
                    ray.wait(refs, num_returns=len(refs), fetch_local=False)
                start = time.perf_counter()
                values = ray.get(refs)
                times.append(time.perf_counter() - start)
                assert len(values) == count and values[-1][0] == (count - 1) % 251
                del values, refs
            median = statistics.median(times)
            label = f"{size // 1024}K"
            print(f"| {mode:<5} | {label:>6} | {count:>7} | {median * 1e3:>9.1f} ms | "
                  f"{count / median:>10,.0f} | {count * size / median / 1e6:>6.0f} |",
                  flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--sizes", default="10K,200K")
    parser.add_argument("--modes", default="puts,tasks")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ray", action="store_true", help="run on Ray (two raylets)")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    store = max(512 << 20, 3 * args.count * max(sizes))
    if args.ray:
        import ray
        from ray.cluster_utils import Cluster
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "object_store_memory": store, "include_dashboard": False})
        other = cluster.add_node(num_cpus=1, object_store_memory=store)
        ray.init(address=cluster.address, log_to_driver=False)
        strategy = NodeAffinitySchedulingStrategy(other.node_id, soft=False)
        try:
            print(f"# Ray {ray.__version__}, Cluster of 2 raylets on one machine")
            run(ray, strategy, args.count, sizes, modes, args.repeat)
        finally:
            ray.shutdown()
            cluster.shutdown()
        return 0
    import hpcray as ray
    from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(num_cpus=1, object_store_memory=store)
    ranks = {node["rank"]: node["NodeID"] for node in ray.nodes()}
    if len(ranks) < 2:
        raise SystemExit("run it on 2 ranks: mpiexec -n 2 python -m hpcray " + __file__)
    print(f"# hpcray, mpiexec -n {len(ranks)}, objects made on rank 1, get on rank 0")
    run(ray, NodeAffinitySchedulingStrategy(ranks[1], soft=False), args.count, sizes,
        modes, args.repeat)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
