"""Run the simulated cluster over many seeds: `python -m tests.sim.run FIRST COUNT`.

Run with PYTHONHASHSEED=0 (the test does) so a seed replays exactly; `--verbose`
prints the last events of a failing schedule. Exit status 1 if any seed failed.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

from tests.sim import programs
from tests.sim.simcluster import Simulation, SimulationFailure


def run_seed(seed: int, nodes: int = 3, shards: int = 1, store_bytes: int = 16 << 20,
             kill: bool = False) -> Simulation:
    """One schedule of the random workload; raises SimulationFailure with the seed."""
    gc.disable()  # collections at allocation thresholds would vary drops between runs
    # One node gets the CPUs of three: the workload's actors need 2 CPUs at once.
    sim = Simulation(seed, num_nodes=nodes, gcs_shards=shards,
                     num_cpus=3.0 if nodes == 1 else 1.0, store_bytes=store_bytes, kill=kill)
    try:
        driver = sim.start_driver(programs.failure_workload if kill
                                  else programs.random_workload)
        try:
            sim.run(driver)
            sim.check_quiescent()
        except SimulationFailure as failure:
            raise SimulationFailure(f"{failure}\n{sim.describe()}") from None
    finally:
        sim.close()
        gc.enable()
    return sim


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("first", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--store-bytes", type=int, default=16 << 20,
                        help="each node's store (a few KiB: most values get spilled)")
    parser.add_argument("--kill", action="store_true",
                        help="a node dies at a random step (ULFM); the failure workload")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--stop", action="store_true", help="stop at the first failure")
    args = parser.parse_args(argv)
    failed = []
    steps = messages = spilled = restored = 0
    start = time.monotonic()
    for seed in range(args.first, args.first + args.count):
        try:
            sim = run_seed(seed, args.nodes, args.shards, args.store_bytes, args.kill)
            steps += sim.steps
            spilled += sum(node.spiller.stats.spilled_objects for node in sim.nodes)
            restored += sum(node.spiller.stats.restored_objects for node in sim.nodes)
            messages += sim.network.messages_sent
        except SimulationFailure as failure:
            failed.append(seed)
            text = str(failure)
            print(f"FAILED seed {seed}: " + (text if args.verbose else text.splitlines()[0]),
                  flush=True)
            if args.stop:
                break
    elapsed = time.monotonic() - start
    print(f"{args.count} schedules, {len(failed)} failed {failed[:20]}, {steps} steps, "
          f"{messages} messages between nodes, {spilled} spills, {restored} restores, "
          f"{elapsed:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
