"""hpcray's microbenchmark: the same Ray-API program timed on hpcray and on Ray.

    python benchmarks/microbench.py [--backends hpcray,ray] [--quick] [--json out.json]
    python benchmarks/microbench.py --only nested_tasks --repeat 3 --ray-python /path/bin/python
    python benchmarks/microbench.py --ranks 1,2,4 [--quick]   # hpcray alone, 1 node vs mpiexec -n N

Each backend runs in its own fresh subprocess, one after the other, so that neither
runtime's processes, caches or page faults colour the other's figures. The metrics are
named as `ray microbenchmark` names them so that figures compare line by line; the table
gives each backend's figure, the ratio (>1 always means hpcray is better) and hpcray's aim.

The program uses only Ray's public core API (`init`, `shutdown`, `remote`, `.options`,
`.remote`, `get`, `put`, `wait`), so it runs unchanged on `import ray` and on
`import hpcray as ray`. Ray is optional: without it only hpcray's figures are printed.
With `--ranks`, hpcray alone runs once per rank count: 1 as above (no launcher), N > 1
as the driver (rank 0) of `mpiexec -n N python -m hpcray`, every rank a node with
`init(num_cpus=2)`, so each figure shows what the cluster machinery (MPI progress,
the global scheduler, spilling to other nodes) costs the same operation; idle CPU then
counts every process of the job (mpiexec, its proxies, every rank, every worker).
What this is not: a test of correctness (tests/ does that) or of the multi-node
experiments themselves (load_balance.py, weak_scaling.py, idle_cost.py do those).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import _mpirun

REPO_ROOT = Path(__file__).resolve().parent.parent
NUM_CPUS = 2
OBJECT_STORE_BYTES = 2 * 1024**3
# Kwargs that only Ray understands: they are never passed to hpcray.
RAY_ONLY_INIT_KWARGS = {"include_dashboard": False, "log_to_driver": False}


class Knobs:
    """How long and how often each measurement runs; `--quick` cuts everything ~5x."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.warmup_s = 0.2 if quick else 0.5
        self.duration_s = 0.4 if quick else 1.0
        self.trials = 1 if quick else 3
        self.batch = 1000  # tasks or calls per batch in the async metrics, as Ray's
        self.calls_per_caller = 500  # n:n: calls each caller makes per round
        self.small_ops_per_step = 100  # put/get calls between two clock reads
        self.big_put_bytes = 800 * 1024**2  # as Ray's "put gigabytes": 100 Mi int64
        self.big_put_reps = 2 if quick else 5
        self.wait_refs = 1000
        self.nested_parents = 40  # nested tasks: parents per step, each with ...
        self.nested_children = 10  # ... this many child no-ops it submits and gets
        self.actors_to_create = 20 if quick else 100
        self.idle_settle_s = 1.0 if quick else 2.0
        self.idle_window_s = 2.0 if quick else 5.0


# --------------------------------------------------------------------------- metrics
#
# (key, unit, kind, aim). kind "rate": higher is better, ratio hpcray/ray; "time": lower is
# better, ratio ray/hpcray; aim ("ratio", x) wants ratio >= x; ("below", x) wants hpcray's
# own figure < x.

METRICS = [
    ("startup", "s", "time", ("ratio", 10, "≤ 1/10")),
    ("single client tasks sync", "tasks/s", "rate", ("ratio", 5, "≥ 5x")),
    ("single client tasks sync latency", "µs", "time", ("ratio", 5, "≤ 1/5")),
    ("single client tasks async", "tasks/s", "rate", ("ratio", 5, "≥ 5x")),
    ("1:1 actor calls sync", "calls/s", "rate", ("ratio", 5, "≥ 5x")),
    ("1:1 actor calls sync latency", "µs", "time", ("ratio", 5, "≤ 1/5")),
    ("1:1 actor calls async", "calls/s", "rate", ("ratio", 5, "≥ 5x")),
    ("n:n actor calls async", "calls/s", "rate", ("ratio", 5, "≥ 5x")),
    ("nested tasks", "tasks/s", "rate", ("ratio", 3, "≥ 3x")),
    ("single client put calls", "calls/s", "rate", None),
    ("single client get calls", "calls/s", "rate", None),
    ("single client put gigabytes", "GB/s", "rate", ("ratio", 1, "≥ 1x")),
    ("single client wait 1k refs", "waits/s", "rate", None),
    ("create 100 actors", "s", "time", ("ratio", 5, "≥ 5x faster")),
    ("idle CPU", "% of a core", "time", ("below", 1.0, "< 1% (abs)")),
]


def define_remotes(ray):
    """The remote functions and classes, built against whichever module plays `ray`."""

    @ray.remote
    def noop():
        return b"ok"

    @ray.remote
    class Actor:
        def ping(self):
            return b"ok"

    @ray.remote
    def call_actor(actor, calls):
        ray.get([actor.ping.remote() for _ in range(calls)])
        return calls

    @ray.remote
    class Trivial:
        def ping(self):
            return b"ok"

    @ray.remote
    def parent(children):
        # A task that submits tasks and waits for them (blocked in get, it lends its CPU).
        ray.get([noop.remote() for _ in range(children)])
        return children

    return noop, Actor, call_actor, Trivial, parent


def import_backend(name: str):
    if name == "ray":
        return importlib.import_module("ray")
    try:
        return importlib.import_module("hpcray")
    except ImportError:
        # Run from a checkout without `pip install -e .`: the package sits at the root.
        sys.path.insert(0, str(REPO_ROOT))
        return importlib.import_module("hpcray")


class Worker:
    """One backend, measured in this process; reports through two files."""

    def __init__(self, backend: str, quick: bool, result_path: str, progress_path: str,
                 only=None):
        self.backend = backend
        self.only = only  # metric names to measure (startup always is); None: all
        # Under mpiexec the runtime is the whole job: account from mpiexec down.
        self.root_pid = job_root_pid()
        self.knobs = Knobs(quick)
        self.result_path = result_path
        self.progress_path = progress_path
        self.results = {"backend": backend, "quick": quick, "metrics": {}, "errors": {}}
        self.init_started = None
        self.also = None

    # ---- reporting

    def emit(self, **event):
        with open(self.progress_path, "a") as f:
            f.write(json.dumps(event) + "\n")

    def save(self):
        tmp = self.result_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f)
        os.replace(tmp, self.result_path)

    def record(self, key, value, unit, **extra):
        self.results["metrics"][key] = {"value": value, "unit": unit, **extra}
        self.emit(event="done", metric=key, value=value, unit=unit)
        self.save()

    def report_processes(self):
        procs = _common.runtime_processes(self.root_pid, self.also)
        keys = [[pid, created] for pid, created in procs if pid != os.getpid()]
        self.emit(event="pids", pids=keys)

    def measure(self, key, fn):
        if self.only is not None and key not in self.only:
            return
        self.emit(event="start", metric=key)
        try:
            fn()
        except Exception:  # noqa: BLE001 - any failure of the runtime is a result to report
            self.fail(key)

    # ---- the run

    def fail(self, key):
        self.results["errors"][key] = traceback.format_exc()
        self.emit(event="error", metric=key, traceback=self.results["errors"][key])
        self.save()

    def run(self):
        try:
            ray = self.ray = import_backend(self.backend)
            self.results["version"] = getattr(ray, "__version__", "")
            (self.noop, self.Actor, self.call_actor, self.Trivial,
             self.parent) = define_remotes(ray)
        except Exception:  # noqa: BLE001 - reported, as any failure of the runtime
            self.fail("import")
            return 1

        init_kwargs = {"num_cpus": NUM_CPUS, "object_store_memory": OBJECT_STORE_BYTES}
        if self.backend == "ray":
            init_kwargs.update(RAY_ONLY_INIT_KWARGS)
        self.emit(event="start", metric="startup")
        self.init_started = time.time()
        try:
            start = time.perf_counter()
            ray.init(**init_kwargs)
            init_done = time.perf_counter()
            ray.get(self.noop.remote())
            end = time.perf_counter()
        except Exception:  # noqa: BLE001 - reported, as any failure of the runtime
            self.fail("startup")
            self.safe_shutdown()
            return 1
        try:
            if self.backend == "ray":
                self.also = self.ray_process_filter()
            self.report_processes()
            self.record("startup", end - start, "s", init_s=init_done - start)
            self.measure("idle CPU", self.idle_cpu)
            self.measure("single client tasks sync", self.tasks_sync)
            self.measure("single client tasks async", self.tasks_async)
            self.measure("1:1 actor calls sync", self.actor_sync)
            self.measure("1:1 actor calls async", self.actor_async)
            self.measure("n:n actor calls async", self.n_n_actor_async)
            self.measure("nested tasks", self.nested_tasks)
            self.measure("single client put calls", self.put_calls)
            self.measure("single client get calls", self.get_calls)
            self.measure("single client put gigabytes", self.put_gigabytes)
            self.measure("single client wait 1k refs", self.wait_refs)
            self.measure("create 100 actors", self.create_actors)
            self.report_processes()
        finally:
            self.safe_shutdown()
        return 0

    def safe_shutdown(self):
        self.emit(event="start", metric="shutdown")
        try:
            self.ray.shutdown()
        except Exception:  # noqa: BLE001 - reported, as any failure of the runtime
            self.fail("shutdown")
        self.save()
        self.emit(event="finished")

    def ray_process_filter(self):
        """Ray starts some helpers outside the driver's process tree: take Ray's own
        processes born since init (session name or Ray's proctitle in the command line)."""
        session = ""
        with contextlib.suppress(AttributeError):  # private; only helps recognise Ray's
            session = self.ray._private.worker.global_worker.node.session_name
        since = self.init_started - 1.0
        ray_dir = os.path.dirname(self.ray.__file__)

        def is_rays(proc):
            if proc.create_time() < since:
                return False
            cmd = " ".join(proc.cmdline())
            return (session and session in cmd) or cmd.startswith("ray::") or ray_dir in cmd

        return is_rays

    # ---- one method per metric

    def rate(self, step):
        k = self.knobs
        return _common.timed_rate(step, k.duration_s, k.trials, k.warmup_s)

    def idle_cpu(self):
        k = self.knobs
        self.ray.get([self.noop.remote() for _ in range(20)])
        time.sleep(k.idle_settle_s)
        idle = _common.measure_idle_cpu(self.root_pid, k.idle_window_s, self.also)
        if "error" in idle:
            raise RuntimeError(idle["error"])
        self.report_processes()
        self.record("idle CPU", idle.pop("percent"), "% of a core", **idle)

    def tasks_sync(self):
        ray, noop = self.ray, self.noop

        def step():
            ray.get(noop.remote())
            return 1

        r = self.rate(step)
        self.record("single client tasks sync", r.value, "tasks/s", trials=r.trials)
        self.record("single client tasks sync latency", 1e6 / r.value, "µs")

    def tasks_async(self):
        ray, noop, n = self.ray, self.noop, self.knobs.batch

        def step():
            ray.get([noop.remote() for _ in range(n)])
            return n

        r = self.rate(step)
        self.record("single client tasks async", r.value, "tasks/s", trials=r.trials)

    def actor_sync(self):
        ray = self.ray
        actor = self.Actor.options(num_cpus=0).remote()
        ray.get(actor.ping.remote())

        def step():
            ray.get(actor.ping.remote())
            return 1

        r = self.rate(step)
        self.record("1:1 actor calls sync", r.value, "calls/s", trials=r.trials)
        self.record("1:1 actor calls sync latency", 1e6 / r.value, "µs")

    def actor_async(self):
        ray, n = self.ray, self.knobs.batch
        actor = self.Actor.options(num_cpus=0).remote()
        ray.get(actor.ping.remote())

        def step():
            ray.get([actor.ping.remote() for _ in range(n)])
            return n

        r = self.rate(step)
        self.record("1:1 actor calls async", r.value, "calls/s", trials=r.trials)

    def n_n_actor_async(self):
        # n actors, n callers: each caller task holds one actor's handle and makes its
        # calls in a batch, so the n pairs run side by side. Actors take no CPU (as in
        # Ray's own microbenchmark), leaving the n CPUs to the callers.
        ray, m = self.ray, self.knobs.calls_per_caller
        actors = [self.Actor.options(num_cpus=0).remote() for _ in range(NUM_CPUS)]
        ray.get([a.ping.remote() for a in actors])

        def step():
            return sum(ray.get([self.call_actor.remote(a, m) for a in actors]))

        r = self.rate(step)
        self.record("n:n actor calls async", r.value, "calls/s", trials=r.trials, n=NUM_CPUS)

    def nested_tasks(self):
        # Every step: 40 parents, each submitting 10 no-ops and getting them; the rate
        # counts all 440 tasks (parents and children).
        ray, k = self.ray, self.knobs
        parents, children = k.nested_parents, k.nested_children

        def step():
            ray.get([self.parent.remote(children) for _ in range(parents)])
            return parents * (1 + children)

        r = self.rate(step)
        self.record("nested tasks", r.value, "tasks/s", trials=r.trials,
                    parents=parents, children_per_parent=children)

    def put_calls(self):
        ray, n = self.ray, self.knobs.small_ops_per_step

        def step():
            for _ in range(n):
                ray.put(0)
            return n

        r = self.rate(step)
        self.record("single client put calls", r.value, "calls/s", trials=r.trials)

    def get_calls(self):
        ray, n = self.ray, self.knobs.small_ops_per_step
        ref = ray.put(0)

        def step():
            for _ in range(n):
                ray.get(ref)
            return n

        r = self.rate(step)
        self.record("single client get calls", r.value, "calls/s", trials=r.trials)

    def put_gigabytes(self):
        import numpy as np

        ray, k = self.ray, self.knobs
        array = np.ones(k.big_put_bytes // 8, dtype=np.int64)  # pages touched up front
        rates = []
        for rep in range(1 + k.big_put_reps):  # the first is the warm-up
            start = time.perf_counter()
            ref = ray.put(array)
            elapsed = time.perf_counter() - start
            del ref
            if rep:
                rates.append(array.nbytes / 1e9 / elapsed)
        self.record(
            "single client put gigabytes",
            statistics.median(rates),
            "GB/s",
            trials=rates,
            bytes=array.nbytes,
        )

    def wait_refs(self):
        ray, noop = self.ray, self.noop
        refs = [noop.remote() for _ in range(self.knobs.wait_refs)]
        ray.get(refs)

        def step():
            ray.wait(refs, num_returns=len(refs))
            return 1

        r = self.rate(step)
        self.record(
            "single client wait 1k refs",
            r.value,
            "waits/s",
            trials=r.trials,
            ms_per_wait=1e3 / r.value,
        )

    def create_actors(self):
        ray, count = self.ray, self.knobs.actors_to_create
        start = time.perf_counter()
        actors = [self.Trivial.remote() for _ in range(count)]
        ray.get([a.ping.remote() for a in actors])
        elapsed = time.perf_counter() - start
        self.report_processes()
        del actors
        self.record(
            "create 100 actors",
            elapsed * 100 / count,
            "s",
            actors_created=count,
            measured_s=elapsed,
        )


def job_root_pid() -> int:
    """This process, or the mpiexec that started it when it runs as rank 0 of a job."""
    if _common.psutil is None or _mpirun.launched_ranks() <= 1:
        return os.getpid()
    try:
        for parent in _common.psutil.Process().parents():
            if parent.name().startswith("mpiexec"):
                return parent.pid
    except _common.psutil.Error:
        pass
    return os.getpid()


def worker_main(args) -> int:
    only = parse_only(args.only) if args.only else None
    worker = Worker(args.worker_backend, args.quick, args.result_file, args.progress_file,
                    only)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)  # so that `finally: shutdown()` runs

    signal.signal(signal.SIGTERM, on_term)
    return worker.run()


# --------------------------------------------------------------------------- driver side

PER_METRIC_TIMEOUT_S = {"startup": 180, "create 100 actors": 400, "shutdown": 60}
DEFAULT_METRIC_TIMEOUT_S = 150


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def parse_only(text: str) -> set:
    """`--only`: comma-separated metric names, `_` for spaces (nested_tasks); a latency
    row comes with its rate row. Unknown names are an error."""
    known = {key for key, *_ in METRICS}
    chosen = set()
    for name in text.split(","):
        name = name.strip().replace("_", " ")
        if not name:
            continue
        name = name.removesuffix(" latency")
        if name not in known:
            raise SystemExit(f"--only: unknown metric {name!r}; known: {', '.join(sorted(known))}")
        chosen.add(name)
    return chosen


def selected(key: str, only) -> bool:
    return only is None or key == "startup" or key.removesuffix(" latency") in only


def run_backend(backend: str, quick: bool, ranks: int = 1, only: str | None = None,
                python: str | None = None) -> dict:
    """Run one backend in a fresh subprocess; watch its progress, kill it if a metric hangs.

    ranks > 1: the subprocess is `mpiexec -n ranks python -m hpcray` of the same worker.
    `only`: the --only text, passed on; `python`: the interpreter (default this one)."""
    tmp = tempfile.mkdtemp(prefix=f"microbench-{backend}-")
    result_path = os.path.join(tmp, "result.json")
    progress_path = os.path.join(tmp, "progress.jsonl")
    log_path = os.path.join(tmp, "output.log")
    worker_argv = [
        str(Path(__file__).resolve()),
        "--worker-backend",
        backend,
        "--result-file",
        result_path,
        "--progress-file",
        progress_path,
    ]
    if quick:
        worker_argv.append("--quick")
    if only:
        worker_argv += ["--only", only]
    if ranks > 1:
        cmd = _mpirun.launch_command(ranks, worker_argv)
        backend_label = f"{backend} -n {ranks}"
    else:
        cmd = [python or sys.executable, *worker_argv]
        backend_label = backend
    env = dict(os.environ)
    tag = env[_mpirun.TAG_VARIABLE] = os.urandom(8).hex()
    if backend == "ray":
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    backend = backend_label
    log(f"[{backend}] starting ({'quick' if quick else 'full'} run), log in {log_path}")
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO_ROOT),
            start_new_session=True,
        )
    seen_pids = set()
    current, current_since = None, time.monotonic()
    offset = 0
    hung = None
    while True:
        rc = proc.poll()
        if os.path.exists(progress_path):
            with open(progress_path) as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind("\n") + 1]
            offset += len(complete.encode())
            for line in complete.splitlines():
                event = json.loads(line)
                kind = event["event"]
                if kind == "start":
                    current, current_since = event["metric"], time.monotonic()
                elif kind == "done":
                    log(
                        f"[{backend}] {event['metric']}: "
                        f"{_common.fmt_number(event['value'])} {event['unit']}"
                    )
                elif kind == "error":
                    log(f"[{backend}] {event['metric']} FAILED:\n{event['traceback']}")
                elif kind == "pids":
                    seen_pids.update(tuple(p) for p in event["pids"])
        if rc is not None:
            break
        limit = PER_METRIC_TIMEOUT_S.get(current, DEFAULT_METRIC_TIMEOUT_S)
        if time.monotonic() - current_since > limit:
            hung = current
            log(f"[{backend}] {current} took over {limit} s: stopping the backend")
            stop_process_group(proc)
            break
        time.sleep(0.2)

    result = {"backend": backend, "metrics": {}, "errors": {}}
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
    if hung:
        result["errors"][hung] = (
            f"timed out after {PER_METRIC_TIMEOUT_S.get(hung, DEFAULT_METRIC_TIMEOUT_S)} s"
        )
    if proc.returncode not in (0, None) and not result["errors"]:
        result["errors"]["process"] = f"exit status {proc.returncode}"
    if result["errors"]:
        with open(log_path) as f:
            result["log_tail"] = f.read()[-4000:]
    result["leftover_processes"] = reap_leftovers(backend, seen_pids)
    stragglers = _common.end_processes(_mpirun.tagged_processes(tag))
    if stragglers:  # runtime processes that were never seen in the driver's tree
        log(f"[{backend}] {len(stragglers)} more tagged processes outlived the run; killed:")
        for line in stragglers:
            log(f"    {line}")
        result["leftover_processes"] += stragglers
    if result["errors"]:
        log(f"[{backend}] its output stays in {log_path}")
    else:  # a clean run leaves nothing in /tmp (150 folders had piled up on one machine)
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def stop_process_group(proc):
    # Only the group this benchmark started (start_new_session): SIGTERM first so the
    # worker's `finally` shuts the runtime down, SIGKILL if it does not go.
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            pass


def reap_leftovers(backend, keys) -> list:
    """Runtime processes still alive a while after the worker exited: report, then end them."""
    deadline = time.monotonic() + 15
    left = _common.alive(keys)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _common.alive(keys)
    report = _common.end_processes(left)
    if report:
        log(f"[{backend}] {len(report)} runtime processes outlived the run; killed them:")
        for line in report:
            log(f"    {line}")
    return report


def ratio(kind, ours, theirs):
    if ours is None or theirs is None:
        return None
    if kind == "rate":
        return ours / theirs if theirs else float("inf")
    return theirs / ours if ours else float("inf")


def fmt_ratio(r):
    if r is None:
        return "—"
    return "∞" if math.isinf(r) else _common.fmt_number(r) + "x"


def median_result(runs: list) -> dict:
    """One backend's runs as one result: each metric the median of the runs that have it
    (every run's figure kept in `runs`), errors and leftovers of all runs."""
    if len(runs) == 1:
        return runs[0]
    merged = {"backend": runs[0].get("backend"), "version": runs[0].get("version", ""),
              "metrics": {}, "errors": {}, "leftover_processes": [], "runs": runs}
    for i, run in enumerate(runs):
        for key, error in run.get("errors", {}).items():
            merged["errors"][f"{key} (run {i + 1})"] = error
        merged["leftover_processes"] += run.get("leftover_processes", [])
        merged["version"] = merged["version"] or run.get("version", "")
    for key, unit, _kind, _aim in METRICS:
        values = [r["metrics"][key]["value"] for r in runs if key in r.get("metrics", {})]
        if values:
            merged["metrics"][key] = {"value": statistics.median(values), "unit": unit,
                                      "per_run": values}
    return merged


def build_rows(results: dict, quick: bool, only=None):
    hp = results.get("hpcray", {}).get("metrics", {})
    rr = results.get("ray", {}).get("metrics", {})
    rows = []
    for key, unit, kind, aim in METRICS:
        if not selected(key, only):
            continue
        ours = hp.get(key, {}).get("value")
        theirs = rr.get(key, {}).get("value")
        r = ratio(kind, ours, theirs)
        aim_text = "—"
        if aim:
            how, target, text = aim
            if how == "ratio":
                met = None if r is None else r >= target
            else:
                met = None if ours is None else ours < target
            aim_text = text + ("" if met is None else (" ✓" if met else " ✗"))
        label = key
        if key == "create 100 actors" and quick:
            label += " (20, ×5)"
        rows.append(
            [
                label,
                unit,
                _common.fmt_number(ours),
                _common.fmt_number(theirs),
                fmt_ratio(r),
                aim_text,
            ]
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backends",
        default="hpcray,ray",
        help="comma-separated, run in this order (default: hpcray,ray)",
    )
    parser.add_argument("--quick", action="store_true", help="cut every measurement ~5x")
    parser.add_argument("--json", metavar="PATH", help="write raw figures and the table here")
    parser.add_argument(
        "--ranks",
        metavar="LIST",
        help="hpcray only, once per rank count (1: no launcher; N: mpiexec -n N), e.g. 1,2,4",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per backend (or per rank count with --ranks), interleaved; medians shown",
    )
    parser.add_argument(
        "--only",
        metavar="LIST",
        help="measure only these metrics (comma-separated, _ for spaces, e.g. nested_tasks); "
        "startup is always measured",
    )
    parser.add_argument(
        "--ray-python",
        metavar="PATH",
        help="the interpreter that runs the Ray backend (a venv with ray); default: this one",
    )
    parser.add_argument("--worker-backend", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    parser.add_argument("--progress-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_backend:
        return worker_main(args)
    if args.ranks:
        return main_ranks(args)

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"hpcray", "ray"}
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    notes = []
    only = parse_only(args.only) if args.only else None
    if "ray" in backends and not ray_available(args.ray_python):
        backends.remove("ray")
        notes.append(
            f"Ray is not installed in {args.ray_python or sys.executable} (pip install ray): "
            "hpcray's figures only."
        )
        log(notes[-1])
    if not backends:
        parser.error("no backend left to run")

    meta = {
        "machine": _common.machine_facts(),
        "python": sys.version.split()[0],
        "quick": args.quick,
        "num_cpus": NUM_CPUS,
        "repeat": args.repeat,
        "only": sorted(only) if only else None,
        "ray_python": args.ray_python,
    }
    runs = {backend: [] for backend in backends}
    for rep in range(args.repeat):
        for backend in backends:  # interleaved, so load drifts hit both backends alike
            if args.repeat > 1:
                log(f"== {backend}, run {rep + 1} of {args.repeat}")
            python = args.ray_python if backend == "ray" else None
            runs[backend].append(run_backend(backend, args.quick, only=args.only, python=python))
    results = {backend: median_result(runs[backend]) for backend in backends}

    rows = build_rows(results, args.quick, only)
    versions = {b: results[b].get("version", "") for b in backends}
    header = [
        "metric",
        "unit",
        f"hpcray {versions.get('hpcray', '')}".strip(),
        f"ray {versions.get('ray', '')}".strip(),
        "ratio",
        "aim",
    ]
    table = _common.markdown_table(header, rows)
    print(table)
    print("\nratio > 1 means hpcray is better (hpcray/ray for rates, ray/hpcray for times).")
    if args.repeat > 1:
        print(f"Each figure is the median of {args.repeat} runs per backend, interleaved.")
        for key, *_ in METRICS:
            per_run = {b: results[b]["metrics"].get(key, {}).get("per_run") for b in backends}
            if any(per_run.values()):
                text = "; ".join(
                    f"{b} {' / '.join(_common.fmt_number(v) for v in vals)}"
                    for b, vals in per_run.items()
                    if vals
                )
                print(f"  {key}: {text}")
    if args.quick:
        print("--quick: shorter loops; 'create 100 actors' created 20 and is scaled ×5.")
    for backend in backends:
        for metric, error in results[backend].get("errors", {}).items():
            first = error.strip().splitlines()[-1] if error.strip() else error
            print(f"{backend}: {metric} failed: {first}")
        if results[backend].get("leftover_processes"):
            print(
                f"{backend}: {len(results[backend]['leftover_processes'])} processes "
                "outlived the run (killed)"
            )
    for note in notes:
        print(note)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "table": table}, f, indent=2)
    failed = any(results[b].get("errors") for b in backends)
    return 1 if failed else 0


def ray_available(python: str | None) -> bool:
    if not python:
        return importlib.util.find_spec("ray") is not None
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('ray') is None)"
    check = subprocess.run([python, "-c", probe], capture_output=True)
    return check.returncode == 0


def main_ranks(args) -> int:
    """hpcray at 1 rank and under mpiexec -n N: one column per rank count."""
    rank_counts = [int(r) for r in args.ranks.split(",") if r.strip()]
    meta = {
        "machine": _common.machine_facts(),
        "python": sys.version.split()[0],
        "quick": args.quick,
        "num_cpus_per_rank": NUM_CPUS,
        "repeat": args.repeat,
    }
    runs = {ranks: [] for ranks in rank_counts}
    for rep in range(args.repeat):
        for ranks in rank_counts:  # interleaved, so load drifts hit every column alike
            log(f"== ranks {ranks}, run {rep + 1} of {args.repeat}")
            runs[ranks].append(run_backend("hpcray", args.quick, ranks, only=args.only))

    def median_of(ranks, key):
        values = [r["metrics"][key]["value"] for r in runs[ranks] if key in r["metrics"]]
        return statistics.median(values) if values else None

    base = rank_counts[0]
    header = ["metric", "unit"] + [
        "1 node" if r == 1 else f"mpiexec -n {r}" for r in rank_counts
    ] + [f"ratio -n {r} / {'1 node' if base == 1 else base}" for r in rank_counts[1:]]
    rows = []
    only = parse_only(args.only) if args.only else None
    for key, unit, kind, _aim in METRICS:
        if not selected(key, only):
            continue
        values = [median_of(r, key) for r in rank_counts]
        label = key + (" (20, ×5)" if key == "create 100 actors" and args.quick else "")
        ratios = []
        for v in values[1:]:
            # ratio > 1: the N-rank run is better than the baseline, as in the Ray table
            r = ratio(kind, v, values[0])
            ratios.append(fmt_ratio(r))
        rows.append([label, unit, *(_common.fmt_number(v) for v in values), *ratios])
    table = _common.markdown_table(header, rows)
    print(
        f"# hpcray microbench, init(num_cpus={NUM_CPUS}) on every rank, median of "
        f"{args.repeat} run(s) per column; load average at start "
        f"{' '.join(f'{x:.2f}' for x in meta['machine']['loadavg_at_start'])}, "
        f"at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs"
    )
    print(table)
    print("\nratio > 1 means the multi-rank run is better than the baseline column.")
    failed = False
    for ranks in rank_counts:
        for i, result in enumerate(runs[ranks]):
            for metric, error in result.get("errors", {}).items():
                first = error.strip().splitlines()[-1] if error.strip() else error
                print(f"ranks {ranks} run {i + 1}: {metric} failed: {first}")
                failed = True
            if result.get("leftover_processes"):
                print(
                    f"ranks {ranks} run {i + 1}: {len(result['leftover_processes'])} "
                    "processes outlived the run (killed)"
                )
                failed = True
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"meta": meta, "runs": {str(k): v for k, v in runs.items()}, "table": table},
                f,
                indent=2,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
