"""Every knob of hpcray: an `HPCRAY_*` environment variable with a default, read here only.

`init()` arguments override the environment; the environment overrides the defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(float(raw))
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def _env_quantity(name: str) -> float | None:
    """A count of CPUs or GPUs (fractions allowed), None when unset."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r} must not be negative")
    return value


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return raw.lower() not in ("0", "false", "no", "off")


@dataclass
class Config:
    # CPUs and GPUs of each node (every rank); None: what the rank may use (its
    # affinity, SLURM_CPUS_PER_TASK; the GPUs NVML shows it). init(num_cpus=, num_gpus=)
    # wins, as it does over Ray's detection.
    num_cpus: float | None = None
    num_gpus: float | None = None
    # Values whose serialized size is under this travel inside messages, not the store.
    inline_threshold: int = 100 * 1024
    # Bytes of the node's shared-memory store; 0 means 30% of memory, capped by /dev/shm.
    object_store_memory: int = 0
    # Retries of a task whose worker died, as Ray's default.
    default_max_retries: int = 3
    # Forward workers' stdout/stderr to the driver, prefixed with their pid.
    log_to_driver: bool = True
    # Seconds a worker may take to start before init or a task fails.
    worker_start_timeout: int = 60
    # Idle workers kept beyond num_cpus (made when others blocked in get) before retiring.
    max_idle_extra_workers: int = 0
    # A pool worker may be sent its next task before the one it runs ends (it then
    # starts it without a round trip through the node) when that task's function last
    # ran under this many milliseconds, has no options and asks only for CPUs; 0: never.
    pipeline_task_ms: float = 1.0
    # Such tasks sent to one worker at most, run in turn: more means fewer wake-ups of
    # the node and its workers per task, and more short tasks that wait behind one that
    # turns out long (a worker blocked in get gives them all back).
    pipeline_depth: int = 4
    # Threads that copy one large value (8 MiB or more) into the store; 0: the CPUs
    # this process may run on, at most 8 (two already double one thread's bandwidth).
    copy_threads: int = 0
    # A task or actor no node of the job can ever run: "pending" (as Ray: it waits, with
    # one warning per request shape, until cancelled) or "error" (its refs raise
    # ResourceInfeasibleError / ActorUnschedulableError at once).
    infeasible: str = "pending"
    # Where a node spills referenced objects when its store is full: a folder of its own
    # (removed at exit) is made in this one; "" means $SLURM_TMPDIR, $TMPDIR or /tmp.
    # init(object_spilling_directory=...), as Ray.
    spill_dir: str = ""
    # Environment variables every worker of the job gets: init(runtime_env={"env_vars":
    # {...}}), as Ray's job-level runtime environment.
    env_vars: dict = field(default_factory=dict)
    # runtime_env={"worker_process_setup_hook": ...}, pickled and in base64: every
    # worker calls it before its first task (forkserver.py); "": none.
    setup_hook: str = ""
    # The job's log folder (job_logs.py): HPCRAY_LOG_DIR, else hpcray-logs/<job id> where
    # the job was submitted; rank 0 makes it absolute and every node writes there.
    log_dir: str = ""
    # Seconds between the driver's status lines on stderr (runtime/status.py); 0: none.
    status_interval: float = 0.0
    # Each node keeps the last this many task spans, submissions and transfers for
    # hpcray.timeline() and the report (runtime/recorder.py); older ones are dropped.
    timeline_events: int = 100_000
    # The report page written at shutdown (init(report=...)); "" writes none.
    report: str = ""
    # Seconds between a node's readings of its CPU/GPU/store use, while a report is due.
    report_interval: float = 1.0
    # After a drain signal (drain_signals), seconds the running tasks get to finish
    # before the program ends anyway (runtime/drain.py).
    drain_grace: float = 30.0
    # One object pulled by many nodes (runtime/relay.py): a pull of an object this size
    # or more may be served by a node that has (or is receiving) a copy; its holder
    # sends it itself to `relay_fanout` pullers, each copy to as many more.
    relay_min_bytes: int = 8 << 20
    relay_fanout: int = 2
    # An object another node on this host holds is copied from that node's store
    # (runtime/host_stores.py); False: pulled over MPI like one from another host.
    host_reads: bool = True
    # Nodes on one host wake each other when they send (runtime/host_wakes.py) instead of
    # polling MPI every 100 us; off by default where host_reads is off (as between hosts).
    host_wakes: bool = True
    # Record where each object reference was created, for list_objects' call_site and
    # summarize_objects (runtime/call_sites.py): Ray's RAY_record_ref_creation_sites.
    record_ref_creation_sites: bool = False

    @classmethod
    def from_environment(cls) -> Config:
        config = cls()
        config.num_cpus = _env_quantity("HPCRAY_NUM_CPUS")
        config.num_gpus = _env_quantity("HPCRAY_NUM_GPUS")
        config.inline_threshold = _env_int("HPCRAY_INLINE_THRESHOLD", config.inline_threshold)
        config.object_store_memory = _env_int("HPCRAY_OBJECT_STORE_MEMORY",
                                              config.object_store_memory)
        config.default_max_retries = _env_int("HPCRAY_DEFAULT_MAX_RETRIES",
                                              config.default_max_retries)
        config.log_to_driver = _env_bool("HPCRAY_LOG_TO_DRIVER", config.log_to_driver)
        config.worker_start_timeout = _env_int("HPCRAY_WORKER_START_TIMEOUT",
                                               config.worker_start_timeout)
        config.max_idle_extra_workers = _env_int("HPCRAY_MAX_IDLE_EXTRA_WORKERS",
                                                 config.max_idle_extra_workers)
        config.pipeline_task_ms = _env_float("HPCRAY_PIPELINE_TASK_MS", config.pipeline_task_ms)
        config.pipeline_depth = _env_int("HPCRAY_PIPELINE_DEPTH", config.pipeline_depth)
        config.copy_threads = _env_int("HPCRAY_COPY_THREADS", config.copy_threads)
        config.log_dir = os.environ.get("HPCRAY_LOG_DIR", "")
        config.status_interval = _env_float("HPCRAY_STATUS_INTERVAL", config.status_interval)
        config.timeline_events = _env_int("HPCRAY_TIMELINE_EVENTS", config.timeline_events)
        config.report = os.environ.get("HPCRAY_REPORT", config.report)
        config.report_interval = _env_float("HPCRAY_REPORT_INTERVAL", config.report_interval)
        config.spill_dir = os.environ.get("HPCRAY_SPILL_DIR") or config.spill_dir
        config.drain_grace = _env_float("HPCRAY_DRAIN_GRACE", config.drain_grace)
        config.relay_min_bytes = _env_int("HPCRAY_RELAY_MIN_BYTES", config.relay_min_bytes)
        config.relay_fanout = _env_int("HPCRAY_RELAY_FANOUT", config.relay_fanout)
        config.host_reads = _env_bool("HPCRAY_HOST_READS", config.host_reads)
        config.host_wakes = _env_bool("HPCRAY_HOST_WAKES", config.host_reads)
        config.record_ref_creation_sites = _env_bool("RAY_record_ref_creation_sites",
                                                     config.record_ref_creation_sites)
        infeasible = os.environ.get("HPCRAY_INFEASIBLE") or config.infeasible
        if infeasible not in ("pending", "error"):
            raise ValueError(f"HPCRAY_INFEASIBLE={infeasible!r}: use 'pending' (the "
                             "default, as Ray) or 'error'.")
        config.infeasible = infeasible
        return config

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def drain_signals(environ=os.environ) -> list:
    """The signals that drain a job (runtime/drain.py): HPCRAY_DRAIN_SIGNALS, names or
    numbers separated by commas (default USR1, as `sbatch --signal=B:USR1@N` is used;
    add TERM to drain at Slurm's time limit too; "none": no drain). Read on every rank
    at start, before any job: ranks > 0 must not die of them."""
    import signal
    raw = environ.get("HPCRAY_DRAIN_SIGNALS")
    raw = "USR1" if raw is None else raw
    if raw.strip().lower() in ("", "none"):
        return []
    found = []
    for item in raw.split(","):
        name = item.strip().upper()
        try:
            signum = int(name) if name.isdigit() else \
                signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        except KeyError:
            raise ValueError(f"HPCRAY_DRAIN_SIGNALS={raw!r}: {item.strip()!r} is not a "
                             "signal (use names such as USR1,TERM)") from None
        if signum in (signal.SIGKILL, signal.SIGSTOP, signal.SIGINT):
            raise ValueError(f"HPCRAY_DRAIN_SIGNALS={raw!r}: {item.strip()} cannot drain "
                             "(SIGINT is Ctrl-C's KeyboardInterrupt)")
        found.append(signal.Signals(signum))
    return found
