"""Multi-node mode: every MPI rank is a node, rank 0 runs the driver.

Started by `mpirun -n N python -m hpcray app.py` (or srun, or a script calling
`hpcray.init()` under mpirun). Rank 0's `init()` starts a job on every rank and
`shutdown()` stops it; the other ranks wait in `serve_ranks()` between jobs, so one
mpiexec can run init/shutdown many times (a test suite). When rank 0's program ends,
it tells the others to exit with its status, so no rank outlives the driver and an
uncaught exception in the driver ends the whole job with a non-zero status.

Lifecycle messages (messages.py, "launch"; Stop on "control", since a serving node
handles it): Start(job) -> Started(node) | StartFailed(reason), Go(nodes),
Stop -> Stopped, Exit(code); DescribeGpus -> GpusSeen once per process; ClockPing ->
ClockPong a few times per rank before each Start (clock.py: the timeline's offsets).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
import time

from hpcray._store import StoreError
from hpcray.runtime import clock, messages
from hpcray.runtime.messages import wire
from hpcray.runtime.rank_child import RANK_PID_VARIABLE, child_of_a_rank

log = logging.getLogger("hpcray.launch")
# Ray's floor (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES): a smaller store is refused.
OBJECT_STORE_MINIMUM_BYTES = 75 * 1024 * 1024
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")
_world = None
# Set when SIGTERM arrives on rank 0: the launcher (srun when a rank failed or the job was
# cancelled, mpiexec on SIGTERM) is ending every rank, so rank 0 waits for them briefly.
_terminating = False
_dealt_gpus = None  # rank 0: the GPUs each rank gets, dealt once per process
# A rank did not answer Stop (dead): no rank may wait in MPI_Finalize (leave_if_ranks_lost).
_skip_finalize = False


class LaunchError(RuntimeError):
    """The launcher started the ranks in a way hpcray cannot run under."""


def build_node(job: dict, transport=None, run_thread: bool = True):
    """Create this rank's node manager for `job` (the same recipe on every rank).

    `job` holds what init() was given, applied to every node; a rank's own custom
    resources come from HPCRAY_RESOURCES / HPCRAY_RESOURCES_RANK_<rank>.
    """
    import socket

    from hpcray.config import Config
    from hpcray.resources import detect_node_resources
    from hpcray.runtime import guardian
    from hpcray.runtime.cluster import ClusterLink
    from hpcray.runtime.loopback import LoopbackTransport
    from hpcray.runtime.node_manager import NodeManager

    raise_open_files_limit()

    rank = transport.rank if transport is not None else 0
    config = Config(**job["config"])
    resources = dict(job.get("resources") or {})
    resources.update(rank_resources(rank))
    gpu_shares = job.get("gpus_by_rank")
    node_resources = detect_node_resources(num_cpus=job.get("num_cpus"),
                                           num_gpus=job.get("num_gpus"),
                                           resources=resources,
                                           gpu_uuids=gpu_shares[rank] if gpu_shares else None)
    store_bytes = config.object_store_memory or default_store_bytes()
    check_store_size(store_bytes, chosen=bool(config.object_store_memory))
    node_resources.custom.setdefault("object_store_memory", float(store_bytes))
    job_id = bytes.fromhex(job["job_id"])
    node_id = rank.to_bytes(4, "big") + os.urandom(12)
    store_name = f"/hpcray-{os.getpid()}-{job['job_id']}-n{rank}"
    # One node is a cluster of one: the same parts over a transport to itself.
    cluster = ClusterLink(transport if transport is not None else LoopbackTransport(), job)
    try:
        node = NodeManager(job_id=job_id, node_id=node_id, node_resources=node_resources,
                           config=config, store_name=store_name, store_capacity=store_bytes,
                           cluster=cluster, run_thread=run_thread,
                           activity=guardian.board())
    except StoreError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        # /dev/shm filled up since the check (another rank of this host, another job).
        raise ValueError(_no_room_message(store_bytes, bool(config.object_store_memory))) \
            from exc
    node.info = {"node_id": node_id.hex(), "job_id": job["job_id"], "rank": rank,
                 "object_store_name": store_name, "node_ip_address": "127.0.0.1",
                 "hostname": socket.gethostname()}
    log.info("node %s started on %s (pid %d) for job %s: %s, store %d bytes, logs in %s",
             node_id.hex(), node.info["hostname"], os.getpid(), job["job_id"],
             node.total_resources, store_bytes, config.log_dir or "(none)")
    if transport is None:
        with node.lock:
            node.set_cluster_nodes({0: node.describe_self()})
    node.prestart_workers(max(1, int(node_resources.num_cpus)))
    return node


# Where the hard limit is infinite, the soft one goes this far (Linux's default nr_open).
_OPEN_FILES_CAP = 1 << 20


def raise_open_files_limit() -> None:
    """Each worker costs its node three descriptors (its socket, its stdout and stderr
    pipes), so the usual soft limit of 1024 stopped a node near 330 actors ("Too many
    open files" from `.remote()`). The soft limit is raised to the hard one, which any
    process may do; the driver's process, the fork server and the workers have it."""
    import resource
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = _OPEN_FILES_CAP if hard == resource.RLIM_INFINITY else hard
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # a platform or sandbox that refuses: keep the limit
        pass


def check_store_size(store_bytes: int, chosen: bool = True) -> None:
    """Refuse a store size that cannot work, saying what to do instead: below Ray's
    minimum, or more than /dev/shm (where the segment lives) has free on this host.
    `chosen`: the size came from init() or the environment, not the default."""
    if store_bytes < OBJECT_STORE_MINIMUM_BYTES:
        raise ValueError(
            f"object_store_memory={store_bytes} is too small: the minimum is "
            f"{OBJECT_STORE_MINIMUM_BYTES} bytes (75 MiB), as in Ray. Pass a larger "
            "init(object_store_memory=...) or HPCRAY_OBJECT_STORE_MEMORY, or leave both "
            "unset (30% of memory, capped by /dev/shm).")
    free, _total = shm_space()
    if free is not None and store_bytes > free:
        raise ValueError(_no_room_message(store_bytes, chosen))


def shm_space() -> tuple[int | None, int | None]:
    """(bytes free, bytes in all) of /dev/shm; (None, None) where it cannot be read."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return None, None
    return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize


def _no_room_message(store_bytes: int, chosen: bool) -> str:
    import socket
    free, total = shm_space()
    where = ("object_store_memory" if chosen else
             "the default object store (object_store_memory unset: 30% of memory)")
    return (f"{where}={store_bytes} bytes ({_gib(store_bytes)}) does not fit in /dev/shm on "
            f"{socket.gethostname()}, which has {free} bytes ({_gib(free)}) free of "
            f"{total} ({_gib(total)}); each node's store is a segment there. Pass a smaller "
            "init(object_store_memory=...) or HPCRAY_OBJECT_STORE_MEMORY (ranks sharing "
            "a host each take that much), or make /dev/shm larger (a container's "
            "--shm-size).")


def _gib(size: int | None) -> str:
    return "?" if size is None else f"{size / 2**30:.2f} GiB"


def default_store_bytes() -> int:
    """30% of memory, capped by what /dev/shm can hold (as Ray's default); ranks that
    share a host share both."""
    from hpcray.resources import detect_memory_bytes, host_share
    want = int(detect_memory_bytes() * 0.3)
    try:
        stat = os.statvfs("/dev/shm")
        want = min(want, int(stat.f_bavail * stat.f_frsize * 0.9))
    except OSError:
        pass
    return max(want // host_share()[1], OBJECT_STORE_MINIMUM_BYTES)


def launched_world_size(environ=os.environ) -> int:
    """How many ranks the launcher started (1 when there is no launcher)."""
    for name in _SIZE_VARIABLES:
        value = environ.get(name)
        if value and value.isdigit():
            return int(value)
    if environ.get("PMI_RANK") is not None or environ.get("PMIX_RANK") is not None:
        return 2  # a launcher that does not say the size: ask MPI
    return 1


def launcher_size_variable(environ=os.environ) -> tuple[str, int] | None:
    """(name, value) of the launcher's variable that says it started several ranks."""
    for name in _SIZE_VARIABLES:
        value = environ.get(name)
        if value and value.isdigit() and int(value) > 1:
            return name, int(value)
    return None


def mpi_library() -> str:
    """The first line of the MPI library's version (MPICH, Open MPI, ...)."""
    from mpi4py import MPI
    return " ".join(MPI.Get_library_version().strip().splitlines()[0].split())


def srun_hint() -> str:
    """Which --mpi plugin srun needs for mpi4py's MPI."""
    library = mpi_library()
    if "Open MPI" in library:
        return ("Launch with `srun --mpi=pmix` (Open MPI; `srun --mpi=list` shows the "
                "plugins this Slurm has), or with mpiexec inside the allocation.")
    return ("Launch with `srun --mpi=pmi2` (MPICH and the MPIs built on it; `srun "
            "--mpi=list` shows the plugins this Slurm has), or with mpiexec inside the "
            "allocation.")


def mpiexec_path() -> str | None:
    """The mpiexec to launch hpcray with: the one beside this Python (a venv's MPICH from
    PyPI), else the one on PATH, else None."""
    import shutil
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("mpiexec")


def mpiexec_hint(ranks: str = "N") -> str:
    """How to start `ranks` ranks of hpcray, naming the mpiexec to use, or how to get one."""
    path = mpiexec_path()
    if path is None:
        return (f"No mpiexec was found beside {sys.executable} or on PATH: install one "
                "that matches mpi4py (`pip install mpich`, hpcray's `mpi` extra, or your "
                "site's MPI module), then run `mpiexec -n "
                f"{ranks} python -m hpcray app.py`.")
    return f"Run `{path} -n {ranks} {sys.executable} -m hpcray app.py`."


def under_launcher(environ=os.environ) -> bool:
    """Whether a launcher started this process as one of several ranks (before MPI)."""
    if child_of_a_rank(environ):
        return False  # a subprocess of a rank (or of its workers): a runtime of its own
    slurm_tasks = environ.get("SLURM_NTASKS", "1") or "1"
    return launched_world_size(environ) > 1 or (slurm_tasks.isdigit() and int(slurm_tasks) > 1)


def in_world() -> bool:
    """True once this process is one of several ranks (world() found them)."""
    return _world is not None


def world():
    """The MpiTransport of this process (MPI starts on first use), or None on one node."""
    global _world
    if _world is None:
        if not under_launcher():
            return None
        os.environ[RANK_PID_VARIABLE] = str(os.getpid())  # what its children inherit
        fd = os.environ.get("PMI_FD", "")
        if fd.isdigit():  # nor does any child get the launcher's connection (os.system)
            try:
                os.set_inheritable(int(fd), False)
            except OSError:
                pass
        slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
        # Open MPI's waits spin without giving up the CPU unless told to (it tells itself
        # only when it sees more ranks than cores): the progress thread's wait then took
        # the core of this rank's event loop and driver, for milliseconds at a time (a
        # 1 MiB get over MPI 1.6-2.4 ms, 0.63-0.73 yielding). MPICH's waits yield anyway.
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
        from mpi4py import MPI
        from hpcray.runtime.transport import MpiTransport
        if MPI.COMM_WORLD.size == 1:
            if slurm_tasks > 1 and os.environ.get("SLURM_STEP_ID") is not None:
                raise LaunchError(
                    f"srun started {slurm_tasks} tasks but MPI sees one: each task became a "
                    "singleton, as srun does without the PMI plugin of mpi4py's MPI "
                    f"({mpi_library()}). {srun_hint()}")
            said = launcher_size_variable()
            if said is not None:
                raise LaunchError(
                    f"the launcher started {said[1]} processes ({said[0]}={said[1]}) but MPI "
                    "sees one in each: that launcher belongs to another MPI than the one "
                    f"mpi4py uses ({mpi_library()}). {mpiexec_hint(str(said[1]))}")
            return None
        _world = MpiTransport(MPI.COMM_WORLD, fault_tolerant=ulfm_enabled())
    return _world


def ulfm_enabled(environ=os.environ) -> bool:
    """Whether the job survives a lost rank: Open MPI started with `mpiexec --with-ft
    ulfm` (which sets OMPI_MCA_mpi_ft_enable for its ranks); HPCRAY_ULFM=0/1 overrides."""
    said = environ.get("HPCRAY_ULFM")
    if said:
        return said not in ("0", "false", "no")
    return environ.get("OMPI_MCA_mpi_ft_enable", "").lower() in ("1", "true", "yes")


def rank_resources(rank: int, environ=os.environ) -> dict:
    """Custom resources given to one rank: HPCRAY_RESOURCES_RANK_<rank> (JSON)."""
    import json
    raw = environ.get(f"HPCRAY_RESOURCES_RANK_{rank}")
    if not raw:
        return {}
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"HPCRAY_RESOURCES_RANK_{rank} must be a JSON object, got {raw!r}")
    return value


def _collect(transport, kind: type, count: int, timeout: float) -> dict:
    """Wait for `count` lifecycle replies of type `kind` from other ranks: {rank: its
    one field, or None}."""
    replies: dict = {}
    deadline = time.monotonic() + timeout
    def waiting() -> bool:  # a lost rank (ULFM) never answers
        return len(replies) < count and bool(set(range(1, transport.size)) - set(replies)
                                             - transport.dead)
    while waiting():
        for source, channel, message in transport.poll():
            if channel != "control":
                continue
            if message[0] == kind.CODE:
                replies[source] = message[1] if len(message) > 1 else None
            elif message[0] == messages.StartFailed.CODE:
                raise RuntimeError(f"hpcray could not start node {source}: {message[1]}")
        if not waiting():
            break
        if time.monotonic() > deadline:
            missing = sorted(set(range(1, transport.size)) - set(replies) - transport.dead)
            raise RuntimeError(f"hpcray: ranks {missing} did not answer {kind.__name__} in "
                               f"{timeout} s")
        transport.wait_for_activity(0.01, timeout=0.5)
    return replies


def start_job(transport, job: dict, make_node):
    """Rank 0: start its own node (`make_node()`, whose event loop is not running yet)
    and every other rank's; return its own, running, once each knows every node.

    Rank 0's node comes first: its fork server's imports, the longest part of a start,
    go on while the clocks are measured and the other ranks start theirs (its own
    clock offset is 0 by definition, so its node needs no measurement)."""
    store_bytes = job["config"].get("object_store_memory")
    if store_bytes:  # refused here before any rank starts, as it would be on each
        check_store_size(store_bytes)
    job["gpus_by_rank"] = _gpu_shares(transport)
    node = make_node()
    try:
        offsets = clock.measure_offsets(transport)
        job["clock"] = [offsets.get(rank) for rank in range(transport.size)]
        transport.broadcast(wire(messages.Start, job))
        started = _collect(transport, messages.Started, transport.size - 1, 300.0)
    except BaseException:
        node.shutdown()
        raise
    unlink_mpi_segments()  # every rank has finished MPI_Init: each opened them
    nodes = {0: node.describe_self()}
    nodes.update(started)
    with node.lock:
        node.set_cluster_nodes(nodes)
    node.start_thread()
    transport.broadcast(wire(messages.Go, node.link.nodes))
    return node


def _gpu_shares(transport) -> list:
    """Rank 0, once per process: which GPUs each rank gets. Every rank says which GPUs
    it sees and on which host; each GPU then goes to one rank of its host only."""
    global _dealt_gpus
    if _dealt_gpus is None:
        from hpcray.resources import deal_host_gpus
        transport.broadcast(wire(messages.DescribeGpus))
        views = _collect(transport, messages.GpusSeen, transport.size - 1, 300.0)
        views[0] = _gpus_seen()
        _dealt_gpus = deal_host_gpus([views[rank] for rank in range(transport.size)])
    return _dealt_gpus


def _gpus_seen() -> tuple:
    """(this host's name, the UUIDs of the GPUs this rank may use)."""
    import socket

    from hpcray.resources import detect_gpus
    return socket.gethostname(), [gpu.uuid for gpu in detect_gpus()]


def stop_job(transport) -> None:
    """Rank 0: stop every other rank's node (they wait for the next job)."""
    global _skip_finalize
    transport.broadcast(wire(messages.Stop))
    if not _terminating:
        try:
            _collect(transport, messages.Stopped, transport.size - 1, 60.0)
        except RuntimeError:
            _skip_finalize = True
            raise
        if transport.dead:
            # A rank was lost (ULFM): Open MPI's MPI_Finalize may wait for it. Seen:
            # ranks 0 and 1 in ompi_mpi_finalize's sleep loop until mpiexec was killed,
            # 1 job in 5 at load 2-3 (test_a_dead_ranks_spill_folder_is_removed).
            _skip_finalize = True
        return
    # SIGTERM: the other ranks got it too and wait for this Stop (serve_ranks), which
    # they answer before stopping their nodes; but the launcher's SIGKILL follows
    # (Slurm's KillWait, 30 s by default, 2 s in slurm/local-cluster.sh): a short wait
    # only. A rank that does not answer is dead: its fork server cleans its node.
    try:
        _collect(transport, messages.Stopped, transport.size - 1, _SIGTERM_STOP_WAIT)
    except RuntimeError as exc:
        _skip_finalize = True
        log.warning("%s", exc)


def end_on_sigterm() -> None:
    """Rank 0 under a launcher: SIGTERM ends the program as SystemExit(128 + SIGTERM), so
    the driver shuts down and leaves no worker or segment behind, waiting only briefly
    for the other ranks (they got the SIGTERM too; serve_ranks). Only from the main
    thread, and only when the program has not chosen its own SIGTERM handler."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum, _frame):
        global _terminating
        _terminating = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_sigterm)


def unlink_mpi_segments() -> None:
    """Remove the names of MPICH's shared-memory segments of this job, once every rank
    has opened them. MPICH (4 and later) opens `mpich_shm_<world id>_<host index>` (and
    `mpich_vci_...`) by name in MPI_Init only, and unlinks it in MPI_Finalize from the
    rank that created it; a job that ends any other way (a rank killed, Hydra's SIGKILL
    of the rest, a SIGTERM) would leave it in /dev/shm. Without its name the segment
    lives while a rank maps it and goes with the last one, however the job ends: the
    unlink-after-attach of POSIX shared memory. Only names this process maps are
    removed, so another job's segments are never touched; MPICH's own unlink at
    finalize then fails quietly."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps
                     if "/dev/shm/mpich_shm_" in line or "/dev/shm/mpich_vci_" in line}
    except OSError:
        return
    for path in paths:
        if path.startswith(("/dev/shm/mpich_shm_", "/dev/shm/mpich_vci_")):  # not "(deleted)"
            try:
                os.unlink(path)
            except OSError:
                pass


def end_ranks(code: int) -> None:
    """Rank 0 at exit: every other rank exits with `code`."""
    transport = _world
    if transport is None or transport.rank != 0:
        return
    transport.broadcast(wire(messages.Exit, code, not _skip_finalize))
    deadline = time.monotonic() + (0.5 if _terminating else 5.0)
    while transport.busy and time.monotonic() < deadline:
        transport.poll()
        time.sleep(0.001)
    if _skip_finalize and transport.dead and not _terminating:
        # ULFM, no finalize: leave after the others, or one that sees rank 0 gone
        # before it reads Exit ends the job as having lost its driver (status 1).
        while len(transport.live_ranks()) > 1 and time.monotonic() < deadline:
            transport.poll()
            time.sleep(0.005)


def report_lost_ranks(code: int) -> None:
    """Rank 0 at exit under ULFM: one line naming the ranks the job lost. The job's exit
    status stays the program's (as a Ray job's status is its driver's): a program that
    finished right without a node succeeded. Open MPI's mpiexec --with-ft ulfm reports
    only that status, not the loss, so this line is where a batch log shows it."""
    transport = _world
    if transport is None or transport.rank != 0 or not transport.dead:
        return
    lost = sorted(transport.dead)
    log.warning("hpcray: the job lost rank%s %s and the program went on without %s; the "
                "exit status (%d) is the program's", "s" if len(lost) > 1 else "",
                ", ".join(map(str, lost)), "them" if len(lost) > 1 else "it", code)


def serve_ranks(transport, make_node) -> int:
    """Ranks > 0: run a node for each job rank 0 starts; return the exit status it sends."""
    global _skip_finalize
    _defer_signals_to_rank0()
    while True:
        message = messages.record(_next_lifecycle_message(transport))
        kind = type(message)
        if kind is messages.Exit:
            _skip_finalize = not message.finalize
            return int(message.code)
        if kind is messages.DescribeGpus:
            transport.send(0, wire(messages.GpusSeen, _gpus_seen()))
            continue
        if kind is messages.ClockPing:
            clock.answer_ping(transport, message)
            continue
        if kind is not messages.Start:
            continue
        try:
            node = make_node(message.job)
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which raises it
            transport.send(0, wire(messages.StartFailed, f"{type(exc).__name__}: {exc}"))
            continue
        transport.send(0, wire(messages.Started, node.describe_self()))
        early: list = []
        go = messages.record(_next_lifecycle_message(transport, want=messages.Go,
                                                     others=early))
        if type(go) is messages.Exit:  # another rank's node failed to start: no job
            node.shutdown()
            _skip_finalize = not go.finalize
            return int(go.code)
        unlink_mpi_segments()  # rank 0 had every rank's Started: each opened them
        with node.lock:
            node.set_cluster_nodes(go.nodes)
            node.network.handle_cluster_messages(early)
        node.serve()
        if _sigterm_seen and 0 not in transport.dead:
            # Rank 0 waits only briefly for this after a SIGTERM (stop_job): answer first.
            transport.send(0, wire(messages.Stopped))
            _send_now(transport)
            node.shutdown()
            continue
        node.shutdown()
        if 0 in transport.dead:  # ULFM: the driver's rank died (node_failures.py)
            _skip_finalize = True
            return 1
        transport.send(0, wire(messages.Stopped))


def _send_now(transport, seconds: float = 0.5) -> None:
    """Progress what this rank sends (no message is taken in: the next is read later)."""
    deadline = time.monotonic() + seconds
    while transport.busy and time.monotonic() < deadline:
        transport.progress()
        time.sleep(0.0005)


# A rank > 0 that got SIGTERM leaves on its own after this long without rank 0's Exit:
# rank 0 is gone (with it alive the job ends within a second or two).
_SIGTERM_GRACE = 20.0
# After SIGTERM rank 0 waits this long for every rank's Stopped (sent at once by a live one).
_SIGTERM_STOP_WAIT = 1.0
_sigterm_seen = False  # ranks > 0: a SIGTERM came


def _defer_signals_to_rank0() -> None:
    """Ranks > 0: the launcher delivers Ctrl-C and SIGTERM to every rank (Hydra signals
    each rank's process group, Slurm every process of the step), but only rank 0 runs the
    program: it decides (a KeyboardInterrupt the program may catch, SystemExit on
    SIGTERM, a drain) and then stops the job, whose nodes must still answer. So SIGINT
    and the drain signals do nothing here, and SIGTERM (unless it drains) only arms a
    fallback: when rank 0 does not end the job within _SIGTERM_GRACE seconds (it is
    gone), this rank leaves (its fork server then ends its workers and its store)."""
    from hpcray.config import drain_signals
    if threading.current_thread() is not threading.main_thread():
        return

    def on_sigint(signum, _frame):
        log.debug("rank %d: %s is rank 0's to act on", _world.rank if _world else -1,
                  signal.Signals(signum).name)

    def on_sigterm(signum, _frame):
        global _sigterm_seen
        _sigterm_seen = True
        timer = threading.Timer(_SIGTERM_GRACE, _leave_without_rank0, (128 + signum,))
        timer.daemon = True
        timer.start()
        signal.signal(signal.SIGTERM, on_sigint)  # one fallback is enough

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigterm)
    for signum in drain_signals():  # rank 0 drains the job (drain.py)
        signal.signal(signum, on_sigint)


def _leave_without_rank0(code: int) -> None:
    log.error("hpcray: rank %d got SIGTERM and rank 0 did not end the job in %.0f s; "
              "leaving", _world.rank if _world else -1, _SIGTERM_GRACE)
    sys.stderr.flush()
    os._exit(code)


def _next_lifecycle_message(transport, want=None, others=None):
    """The next lifecycle message; node messages that arrive first go to `others`."""
    while True:
        batch = transport.poll()
        if 0 in transport.dead:  # ULFM: the driver's rank died between jobs
            log.error("hpcray: lost rank 0 (the driver); the job ends")
            return wire(messages.Exit, 1, False)
        for index, item in enumerate(batch):
            _source, channel, message = item
            if channel == "control" and (want is None or
                                         message[0] in (want.CODE, messages.Exit.CODE)):
                if others is not None:
                    others.extend(batch[index + 1:])
                return message
            if others is not None:
                others.append(item)
        transport.wait_for_activity(0.02, timeout=1.0)


def exit_rank(code: int) -> None:
    """Leave the process now that the job is over (ranks > 0)."""
    try:
        if _world is not None:
            _world.close()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    leave_if_ranks_lost(code)
    sys.exit(code)


def leave_if_ranks_lost(code: int) -> None:
    """Leave without MPI_Finalize (mpi4py calls it at exit) when a rank did not answer
    rank 0's Stop: MPICH's finalize waits for every rank, so it would wait for the dead
    one until the launcher's SIGKILL (Hydra's, or Slurm's after KillWait). Every rank
    skips it alike (Exit.finalize), since one finalizing waits for the others. Nothing is
    lost: the nodes are shut down and MPICH's segments have no name left to remove
    (unlink_mpi_segments). With every rank alive, all finalize: that keeps their exits
    together, and a launcher sees a failure status only once all have left (Hydra and
    Slurm end the others when one leaves with a failure)."""
    if _world is None or not _skip_finalize:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def terminating() -> bool:
    """Whether rank 0 got SIGTERM (end_on_sigterm)."""
    return _terminating
