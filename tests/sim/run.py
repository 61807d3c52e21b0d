"""Run the simulated cluster over many seeds: `python -m tests.sim.run FIRST COUNT`.

Run with PYTHONHASHSEED=0 (the test does) so a seed replays exactly; `--verbose`
prints the last events of a failing schedule. Exit status 1 if any seed failed.
"""

from __future__ import annotations

import argparse
import collections
import gc
import sys
import time

from hpcray import ids

# The workloads' remote functions and actor classes take their ids when `programs` is
# imported: from a fixed prefix, not os.urandom's, or the runtime's dicts and sets keyed
# by them order differently from run to run and a seed does not replay (seed 100135 of
# 4 nodes deadlocked in 3 runs of 6).
ids._prefix = bytes(ids.TASK_ID_SIZE // 2)
from tests.sim import programs  # noqa: E402
from tests.sim.simcluster import Simulation, SimulationFailure  # noqa: E402


WORKLOADS = {"random": programs.random_workload, "failure": programs.failure_workload,
             "relay": programs.relay_workload, "submitters": programs.submitters_workload,
             "held_cpus": programs.held_cpus_workload,
             "full_store": programs.full_store_workload}


def run_seed(seed: int, nodes: int = 3, shards: int = 1, store_bytes: int = 16 << 20,
             kill: bool = False, workload: str | None = None,
             relay_min_bytes: int | None = None, relay_fanout: int = 2,
             host_reads: bool = False) -> Simulation:
    """One schedule of a workload (default: random, or failure with `kill`); raises
    SimulationFailure with the seed."""
    gc.disable()  # collections at allocation thresholds would vary drops between runs
    # One node gets the CPUs of three: the workload's actors need 2 CPUs at once.
    sim = Simulation(seed, num_nodes=nodes, gcs_shards=shards,
                     num_cpus=3.0 if nodes == 1 else 1.0, store_bytes=store_bytes, kill=kill,
                     relay_min_bytes=relay_min_bytes, relay_fanout=relay_fanout,
                     host_reads=host_reads)
    try:
        driver = sim.start_driver(WORKLOADS[workload or ("failure" if kill else "random")])
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
    parser.add_argument("--workload", choices=sorted(WORKLOADS),
                        help="default: random (failure with --kill)")
    parser.add_argument("--relay-min-bytes", type=int, default=None,
                        help="objects this size or more may be relayed (relay.py; the "
                             "workloads' stored values are ~2 KB)")
    parser.add_argument("--fanout", type=int, default=2, help="the relay tree's fanout")
    parser.add_argument("--host-reads", action="store_true",
                        help="two nodes a host copy from each other's stores (host_stores.py)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--stop", action="store_true", help="stop at the first failure")
    args = parser.parse_args(argv)
    failed = []
    steps = messages = spilled = restored = relayed = rebuilt = revived = host_copies = 0
    copies = []  # per schedule: (most copies one node sent, copies the holder sent)
    kept = {False: [0, 0], True: [0, 0]}  # alone? -> [tasks submitted, ran there]
    start = time.monotonic()
    for seed in range(args.first, args.first + args.count):
        try:
            sim = run_seed(seed, args.nodes, args.shards, args.store_bytes, args.kill,
                           args.workload, args.relay_min_bytes, args.fanout,
                           args.host_reads)
            if sim.relay_object is not None:
                copies.append(copies_sent(sim))
            for alone, tasks, local in sim.submitted:
                kept[alone][0] += tasks
                kept[alone][1] += local
            steps += sim.steps
            spilled += sum(node.spiller.stats.spilled_objects for node in sim.nodes)
            restored += sum(node.spiller.stats.restored_objects for node in sim.nodes)
            relayed += sum(node.recorder.counters["relayed"] for node in sim.nodes)
            messages += sim.network.messages_sent
            rebuilt += sum(node.recorder.counters.get("reconstructions", 0)
                           for node in sim.nodes)
            revived += sum(node.recorder.counters.get("revived", 0) for node in sim.nodes)
            host_copies += sum(node.recorder.counters.get("bytes_copied_on_host", 0) > 0
                               for node in sim.nodes)
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
          f"{relayed} relayed copies, {rebuilt} tasks re-run by lineage, {revived} freed "
          f"values revived, {host_copies} nodes that copied from another's store, "
          f"{elapsed:.1f} s", flush=True)
    if kept[False][0]:
        print(f"submitters: {kept[False][1]} of {kept[False][0]} tasks ran where submitted "
              f"with a submitter on every node, {kept[True][1]} of {kept[True][0]} with "
              "one alone", flush=True)
    if copies:
        holder = collections.Counter(h for _, h in copies)
        most = collections.Counter(m for m, _ in copies)
        print(f"relay: copies the holder sent {sorted(holder.items())}, most copies one node "
              f"sent {sorted(most.items())} ([(copies, schedules)])", flush=True)
    return 1 if failed else 0


def copies_sent(sim: Simulation) -> tuple[int, int]:
    """The relay workload's object: (the most copies of it one node sent, the copies
    its holder sent), from each node's count of bytes sent (nothing else it moves
    through a store)."""
    holder, size = sim.relay_object
    sent = [node.recorder.counters["bytes_sent"] // size for node in sim.nodes]
    return max(sent), sent[holder]


if __name__ == "__main__":
    sys.exit(main())
