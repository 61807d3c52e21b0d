"""`python -m hpcray app.py [args]` / `python -m hpcray -m module [args]`.

Runs the program as its driver, as `python app.py` would. Under a launcher every rank
runs this; the ranks > 0 become node managers (the multi-node mode). An uncaught
exception in the driver ends the program with a non-zero exit status after the
runtime has shut down, so no worker or segment outlives it.

What it is not: a cluster manager. There are no subcommands (`status`, `start`): a
word that is not an option or an existing file is an error (exit status 2), as is an
unknown option, before any MPI starts. Its options (`--num-cpus`, `--report`, ...) only
set the HPCRAY_* variable of the same setting in this process (every rank parses the
same command line): config.py stays the one place that reads them.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

USAGE = ("usage: python -m hpcray [-h] [--version] [--num-cpus N] [--num-gpus N]\n"
         "                        [--object-store-memory BYTES] [--gcs-shards K]\n"
         "                        [--log-dir DIR] [--report FILE] (app.py | -m module) "
         "[args...]")

# option -> (the variable it sets, its value's name, what values it takes)
OPTIONS = {
    "--num-cpus": ("HPCRAY_NUM_CPUS", "N", "number"),
    "--num-gpus": ("HPCRAY_NUM_GPUS", "N", "number"),
    "--object-store-memory": ("HPCRAY_OBJECT_STORE_MEMORY", "BYTES", "count"),
    "--gcs-shards": ("HPCRAY_GCS_SHARDS", "K", "count"),
    "--log-dir": ("HPCRAY_LOG_DIR", "DIR", "path"),
    "--report": ("HPCRAY_REPORT", "FILE", "path"),
}

HELP = f"""{USAGE}

Run a Ray program (`import hpcray as ray`) as the driver of an hpcray job. Alone it is
one node (the CPUs, GPUs and memory this process may use); under an MPI launcher
every rank is a node, rank 0 runs the program and the other ranks serve until it
ends, then exit with its status. An uncaught exception ends every rank.

  app.py [args...]     run a Python file, as `python app.py` would
  -m module [args...]  run a module, as `python -m module` would
  -h, --help           print this help and exit
  --version            print hpcray's version and exit

Options, before the program; each sets the variable below of the same setting, on
every rank, and init() arguments still win (--num-cpus=N works too):
  --num-cpus N                   CPUs of each node (HPCRAY_NUM_CPUS)
  --num-gpus N                   GPUs of each node (HPCRAY_NUM_GPUS)
  --object-store-memory BYTES    each node's store (HPCRAY_OBJECT_STORE_MEMORY)
  --gcs-shards K                 ranks holding a GCS shard (HPCRAY_GCS_SHARDS)
  --log-dir DIR                  the job's log folder (HPCRAY_LOG_DIR)
  --report FILE                  write the report page there (HPCRAY_REPORT)

Examples (mpiexec and mpirun come with the MPI that mpi4py was built against: in
a venv, activate it first or call .venv/bin/mpiexec):
  python -m hpcray app.py                         one node, no launcher needed
  mpiexec -n 4 python -m hpcray app.py            4 nodes (ranks), here or across hosts
  srun --mpi=pmi2 -N 8 python -m hpcray app.py    Slurm: --mpi=pmi2 for MPICH, pmix
                                                  for Open MPI (slurm/sbatch-template.sh)
  mpiexec -n 3 python -m hpcray -m pytest tests/  a module as the driver

init() arguments win over these environment variables (read in hpcray/config.py and
where noted); each is read on every rank:
  HPCRAY_NUM_CPUS                CPUs of each node (rank) (default: the CPUs the rank
                                 may run on: its affinity, SLURM_CPUS_PER_TASK)
  HPCRAY_NUM_GPUS                GPUs of each node (default: the NVIDIA GPUs NVML shows
                                 the rank, after CUDA_VISIBLE_DEVICES and Slurm's; ranks
                                 on one host split them)
  HPCRAY_OBJECT_STORE_MEMORY     bytes of each node's shared-memory store (default 30%
                                 of memory, capped by /dev/shm; at least 75 MiB)
  HPCRAY_INLINE_THRESHOLD        values smaller than this travel inside messages, not
                                 the store (default 102400 bytes)
  HPCRAY_DEFAULT_MAX_RETRIES     retries of a task whose worker died (default 3)
  HPCRAY_LOG_TO_DRIVER           1: workers' output reaches the driver, 0: not (1)
  HPCRAY_WORKER_START_TIMEOUT    seconds a worker may take to start (default 60)
  HPCRAY_MAX_IDLE_EXTRA_WORKERS  idle workers kept beyond num_cpus (default 0)
  HPCRAY_PIPELINE_TASK_MS        a worker gets its next task before its current one ends
                                 when that function last ran under this (default 1; 0:
                                 never)
  HPCRAY_PIPELINE_DEPTH          such tasks sent to one busy worker at most (default 4)
  HPCRAY_COPY_THREADS            threads copying a large value into the store (default
                                 0: the CPUs this process may use, at most 8)
  HPCRAY_INFEASIBLE              a task no node can run: pending (default, as Ray) or
                                 error (its refs raise at once)
  HPCRAY_RESOURCES               custom resources of every node, a JSON object:
                                 '{{"ssd": 1}}' (default none)
  HPCRAY_RESOURCES_RANK_<r>      the same for rank r only, added to HPCRAY_RESOURCES
  HPCRAY_GCS_SHARDS              ranks holding a shard of the global control store
                                 (default 1; init(gcs_shards=k) wins)
  HPCRAY_LOG_DIR                 the job's log folder: node-<rank>.log (each node's
                                 log), node-<rank>-worker-<pid>.out/.err (each
                                 worker's output) (default hpcray-logs/<job id> in the
                                 directory the job was submitted from: SLURM_SUBMIT_DIR,
                                 else the current one; job id: SLURM_JOB_ID, else said
                                 at start)
  HPCRAY_STATUS_INTERVAL         seconds between status lines on stderr: tasks done,
                                 running and queued, CPUs and store per node, bytes
                                 moved (default 0: none)
  HPCRAY_TIMELINE_EVENTS         task spans, submissions and transfers each node keeps
                                 for hpcray.timeline() and the report; older ones are
                                 dropped (default 100000; 0: recording off)
  HPCRAY_REPORT                  write the job's report page (one HTML file, every
                                 rank) there at shutdown (default none; init(report=))
  HPCRAY_REPORT_INTERVAL         seconds between a node's CPU/GPU/store readings for
                                 the report (default 1)
  HPCRAY_SPILL_DIR               where a full store spills referenced objects: each
                                 node makes its own folder there and removes it at
                                 exit (default $SLURM_TMPDIR, $TMPDIR or /tmp;
                                 init(object_spilling_directory=) wins)
  HPCRAY_DRAIN_SIGNALS           signals that drain the job (sbatch --signal=B:USR1@N,
                                 scancel -s USR1): no new task starts, running ones
                                 finish, hpcray.util.on_drain callbacks run, then the
                                 program ends with status 0; names, comma-separated
                                 (default USR1; USR1,TERM drains at Slurm's time limit
                                 too; none: no drain)
  HPCRAY_DRAIN_GRACE             seconds a drain lets running tasks finish before they
                                 are cancelled and the program ends (default 30)
  HPCRAY_RELAY_MIN_BYTES         an object this large or larger pulled by many nodes
                                 may be served by a node that has a copy (default
                                 8388608)
  HPCRAY_RELAY_FANOUT            how many pullers each copy of such an object serves
                                 (default 2)
  HPCRAY_HOST_READS              0: an object another node on the same host holds is
                                 pulled over MPI, not copied from that node's store
                                 (default 1)
  HPCRAY_HOST_WAKES              0: nodes on the same host poll MPI for each other's
                                 messages instead of waking each other (default: as
                                 HPCRAY_HOST_READS)
  HPCRAY_STAGED_SENDS            0: never stage a send for a peer that reads memory
                                 with CMA, 1: for every peer (default: as detected)
  HPCRAY_STAGE_THREADS           threads that copy a chunk into a staging buffer
                                 (default: the host's cores per rank less one, 1-4)
  HPCRAY_TRACE                   1: print every message between nodes (default off)
  HPCRAY_TRACE_HOPS              a folder: every process writes there the timestamps
                                 of each remote get's steps (default off)
  HPCRAY_TEST_CLOCK_SKEW         for tests: seconds added to the clock this rank and
                                 its workers stamp the timeline with, as if its host's
                                 clock were off (default 0; the timeline aligns it)
  HPCRAY_ULFM                    1: survive a lost rank (Open MPI's `mpiexec --with-ft
                                 ulfm`, which this follows by default), 0: do not
  HPCRAY_RANK_PID                set by each rank for its children (not by you): a
                                 program a driver or task starts that uses hpcray runs
                                 a runtime of its own, not one more rank
  RAY_record_ref_creation_sites  1: record where each object ref was created, for
                                 list_objects' call_site and summarize_objects (default
                                 0: "disabled", as Ray)
  RAY_ENABLE_AUTO_CONNECT        0: put/get/.remote() before init() raise instead of
                                 starting a runtime (default 1, as Ray)
Read from the launcher: SLURM_CPUS_PER_TASK (CPUs per node), CUDA_VISIBLE_DEVICES and
Slurm's GPU variables (the GPUs a rank may use; ranks on one host split them).

Signals: Ctrl-C (SIGINT) raises KeyboardInterrupt in the program, then the whole job
ends with status 130; SIGTERM the same as SystemExit, status 143. Under a launcher a
rank killed by a signal is named in one line (rank, host, pid, what its node ran) by
its guardian, a parent process that outlives it ("hpcray-guard" in ps).
"""


def _version() -> str:
    from hpcray import __version__
    return f"hpcray {__version__} (Python {sys.version.split()[0]})"


def _first_rank() -> bool:
    """Whether this process should print a usage error: rank 0, or no launcher (every
    rank checks its arguments; one message is enough)."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        value = os.environ.get(name)
        if value is not None:
            return value == "0"
    return True


def _usage_error(message: str) -> int:
    if _first_rank():
        see = " See" if message.endswith(".") else "; see"
        print(f"python -m hpcray: error: {message}{see} python -m hpcray --help",
              file=sys.stderr)
    return 2


def _module_exists(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def take_options(argv: list[str]):
    """The launcher's options at the front of `argv` -> ({variable: value}, the rest), or
    (None, message) for a bad value."""
    settings: dict = {}
    while argv and argv[0].split("=", 1)[0] in OPTIONS:
        option, equals, value = argv[0].partition("=")
        variable, name, kind = OPTIONS[option]
        if not equals:
            if len(argv) < 2:
                return None, f"{option} needs a value ({name})"
            value, argv = argv[1], argv[2:]
        else:
            argv = argv[1:]
        if kind != "path":
            try:
                number = float(value) if kind == "number" else int(value)
            except ValueError:
                number = -1
            if number < 0 or (kind == "count" and number == 0):
                what = "a number of 0 or more" if kind == "number" else "a whole number above 0"
                return None, f"{option} {value!r}: {name} must be {what}"
        elif not value:
            return None, f"{option} needs a value ({name})"
        settings[variable] = value
    return settings, argv


def parse(argv: list[str]):
    """-> ("help" | "version" | "module" | "file", target, the program's argv) or
    ("error", message, None)."""
    if not argv:
        return "error", "no program to run", None
    first = argv[0]
    if first in ("-h", "--help"):
        return "help", None, None
    if first == "--version":
        return "version", None, None
    if first == "-m":
        if len(argv) < 2 or argv[1].startswith("-"):
            return "error", "-m needs a module name", None
        if not _module_exists(argv[1]):
            return "error", f"no module named {argv[1]!r}", None
        return "module", argv[1], argv[1:]
    if first in ("-n", "-np", "--np", "-N") or first.startswith(("-n=", "--np=")):
        from hpcray.runtime.launch import mpiexec_hint
        ranks = argv[1] if len(argv) > 1 and argv[1].isdigit() else "N"
        return "error", (f"{first} is an option of the MPI launcher, not of python -m "
                         f"hpcray. {mpiexec_hint(ranks)}"), None
    if first.startswith("-"):
        return "error", f"unknown option {first!r}", None
    if not os.path.exists(first):
        hint = " (hpcray has no subcommands)" if os.sep not in first and "." not in first \
            else ""
        return "error", f"no such file {first!r}{hint}", None
    if os.path.isdir(first) and not os.path.exists(os.path.join(first, "__main__.py")):
        return "error", f"{first!r} is a folder with no __main__.py", None
    return "file", first, argv


def main(argv: list[str]) -> int:
    settings, rest = take_options(argv)
    if settings is None:
        return _usage_error(rest)
    kind, target, program_argv = parse(rest)
    if kind == "help":
        print(HELP, end="")
        return 0
    if kind == "version":
        print(_version())
        return 0
    if kind == "error":
        return _usage_error(target)
    os.environ.update(settings)  # before anything reads them; workers inherit them
    sys.argv = program_argv
    if kind == "module":
        run = lambda: runpy.run_module(target, run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        run = lambda: runpy.run_path(target, run_name="__main__")  # noqa: E731
    from hpcray.config import drain_signals
    from hpcray.runtime import guardian, launch
    rank = guardian.launcher_rank()
    if rank is not None and launch.under_launcher() and not launch.ulfm_enabled():
        # Before MPI starts: a parent that outlives this rank reports its death. Not under
        # ULFM: the job goes on and the survivors say so (node_failures.py), and Open MPI
        # then misses the death of a rank that is not the process it started.
        guardian.guard(rank, target)
    try:
        transport = launch.world()
    except launch.LaunchError as exc:
        print(f"hpcray: {exc}", file=sys.stderr)
        return 1
    if transport is not None and transport.rank != 0:
        # Only rank 0 runs the program; the other ranks are its nodes until it ends.
        code = launch.serve_ranks(transport, lambda job: launch.build_node(
            job, transport, run_thread=False))
        launch.leave_if_ranks_lost(code)
        return code
    if transport is not None and signal.SIGTERM not in drain_signals():
        launch.end_on_sigterm()
    code = 0
    try:
        run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        import traceback
        traceback.print_exc()
        code = 128 + signal.SIGINT  # what a shell reports for Ctrl-C
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        from hpcray import api
        api.shutdown()
        launch.report_lost_ranks(code)  # (before end_ranks: the ranks it ends are not lost)
        launch.end_ranks(code)
    launch.leave_if_ranks_lost(code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
