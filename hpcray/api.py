"""The public API: init/shutdown, get/put/wait, cancel/kill, actors by name, resources."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time

from hpcray import context, exceptions, object_ref
from hpcray import options as opts
from hpcray.actor import ActorClass, ActorHandle
from hpcray.config import Config, drain_signals
from hpcray.object_ref import ObjectRef
from hpcray.object_ref_generator import ObjectRefGenerator
from hpcray.remote_function import RemoteFunction
from hpcray.runtime import drain, hops
from hpcray.options import ACTOR_OPTIONS, TASK_OPTIONS, check

log = logging.getLogger(__name__)

_init_lock = threading.Lock()
_atexit_registered = False
# How long init waits for its node's fork server to be ready (its imports: ~0.2 s on a
# quiet host, seconds on a loaded one); past it, init returns and workers start late.
FORKSERVER_READY_TIMEOUT_S = 60


class RuntimeInfo(dict):
    """What init() returns (Ray returns a context with `address_info`)."""

    @property
    def address_info(self) -> dict:
        return self


# Ray's other init() keywords (accepted; those that mean something here are read from
# **ray_only_options), and hpcray's gcs_shards. Any other is an error, as in Ray.
_RAY_INIT_OPTIONS = frozenset({
    "labels", "local_mode", "include_dashboard", "dashboard_host", "dashboard_port",
    "job_config", "configure_logging", "logging_level", "logging_format", "logging_config",
    "namespace", "runtime_env", "storage", "enable_resource_isolation",
    "system_reserved_cpu", "system_reserved_memory", "object_spilling_directory",
    "_enable_object_reconstruction", "_redis_max_memory", "_plasma_directory",
    "_node_ip_address", "_driver_object_store_memory", "_memory", "_redis_password",
    "_temp_dir", "_metrics_export_port", "_system_config", "_tracing_startup_hook",
    "_node_name", "_skip_env_hook", "_cgroup_path", "gcs_shards"})


def init(address: str | None = None, *, num_cpus: float | None = None,
         num_gpus: float | None = None, resources: dict | None = None,
         object_store_memory: int | None = None, ignore_reinit_error: bool = False,
         log_to_driver: bool | None = None, report: str | None = None,
         **ray_only_options) -> RuntimeInfo:
    """Start hpcray on this machine (one node, no MPI), as `ray.init()`.

    Ray options that have no meaning here (dashboard, namespace, ...) are accepted and
    ignored, so Ray programs run unchanged. `runtime_env={"env_vars": {...}}` sets
    environment variables in every worker, and its `worker_process_setup_hook` runs in
    every worker before its first task; its other fields (pip, working_dir, ...),
    which would install things, are ignored with a warning. `report="job.html"` (or
    HPCRAY_REPORT) writes the job's report page there at shutdown (util/report.py).
    """
    global _atexit_registered, _status_line
    from hpcray.runtime import launch
    from hpcray.runtime.client import DriverClient

    unknown = [name for name in ray_only_options if name not in _RAY_INIT_OPTIONS]
    if unknown:  # as Ray: most likely a typo (num_cpu=1), never silently ignored
        raise RuntimeError(f"Unknown keyword argument(s): {', '.join(unknown)}")
    if context.worker is not None:
        raise RuntimeError("hpcray.init() cannot be called inside a task or actor.")
    if address not in (None, "local", "auto"):
        raise ValueError(f"hpcray has no cluster address to connect to ({address!r}); start "
                         "many nodes with `mpirun -n N python -m hpcray app.py` instead.")
    with _init_lock:
        if context.client is not None:
            if ignore_reinit_error:
                return RuntimeInfo(context.driver_node.info)
            raise RuntimeError("hpcray.init() was already called; call shutdown() first "
                               "(or pass ignore_reinit_error=True).")
        transport = launch.world()
        if transport is not None and transport.rank != 0:
            # Under mpirun, ranks > 0 are nodes only: they never return from init().
            launch.exit_rank(launch.serve_ranks(transport, lambda job: launch.build_node(
                job, transport, run_thread=False)))
        config = Config.from_environment()
        if log_to_driver is not None:
            config.log_to_driver = bool(log_to_driver)
        if object_store_memory is not None:
            config.object_store_memory = int(object_store_memory)
        config.env_vars = job_env_vars(ray_only_options.get("runtime_env"))
        config.setup_hook = job_setup_hook(ray_only_options.get("runtime_env"))
        if report is not None:
            config.report = report
        if config.report:  # where the driver started: it may chdir before shutdown
            config.report = os.path.abspath(config.report)
        config.spill_dir = spill_directory_option(ray_only_options) or config.spill_dir
        gcs_shards = ray_only_options.pop("gcs_shards", None) or \
            int(os.environ.get("HPCRAY_GCS_SHARDS", "1") or 1)
        job_id = os.urandom(4).hex()
        config.log_dir = _log_folder(job_id, config.log_dir)
        num_cpus = config.num_cpus if num_cpus is None else num_cpus
        num_gpus = config.num_gpus if num_gpus is None else num_gpus
        job = {"job_id": job_id, "num_cpus": num_cpus, "num_gpus": num_gpus,
               "resources": resources, "config": config.as_dict(), "gcs_shards": gcs_shards}
        if transport is None:
            node = launch.build_node(job)
        else:
            node = launch.start_job(transport, job, lambda: launch.build_node(
                job, transport, run_thread=False))
        if not node.wait_forkserver_ready(FORKSERVER_READY_TIMEOUT_S):
            log.warning("the fork server has not finished its imports after %d s; "
                        "init returns, the first workers will start late",
                        FORKSERVER_READY_TIMEOUT_S)
        counter = node.driver_refs
        object_ref.reference_counter = counter
        counter.enabled = True
        context.driver_node = node
        context.client = DriverClient(node, node.store, config, node.job_id, node.node_id)
        if config.status_interval > 0:
            from hpcray.runtime.status import StatusLine
            client = context.client
            _status_line = StatusLine(config.status_interval,
                                      lambda: client.list_state("status"))
        if not _atexit_registered:
            atexit.register(_at_exit)
            drain.install(drain_signals(), lambda: context.client)  # before SIGTERM's
            _install_sigterm_handler()
            _install_excepthook()
            _atexit_registered = True
        return RuntimeInfo(node.info)


def _log_folder(job_id: str, chosen: str) -> str:
    """The job's log folder (job_logs.py), said once on stderr when hpcray named it."""
    from hpcray.runtime.job_logs import choose_folder
    folder, announce = choose_folder(job_id, chosen)
    if announce:
        print(f"hpcray: job {announce}: logs in {folder}", file=sys.stderr, flush=True)
    return folder


def spill_directory_option(options: dict) -> str:
    """Where init() asks to spill, as Ray takes it: object_spilling_directory=..., or the
    older _system_config={"object_spilling_config": json.dumps({"type": "filesystem",
    "params": {"directory_path": ...}})} (a list of folders: the first); "" if neither."""
    if options.get("object_spilling_directory"):
        return str(options["object_spilling_directory"])
    spilling = (options.get("_system_config") or {}).get("object_spilling_config")
    if not spilling:
        return ""
    import json
    spilling = json.loads(spilling) if isinstance(spilling, str) else spilling
    if spilling.get("type", "filesystem") != "filesystem":
        raise ValueError(f"object_spilling_config type {spilling.get('type')!r}: hpcray "
                         "spills to a local folder only ('filesystem').")
    path = (spilling.get("params") or {}).get("directory_path") or ""
    return str(path[0] if isinstance(path, (list, tuple)) else path)


def job_env_vars(runtime_env) -> dict:
    """The env_vars of a job-level runtime_env, checked as Ray checks them."""
    return opts.env_vars_of(runtime_env, {"worker_process_setup_hook"}) or {}


def job_setup_hook(runtime_env) -> str:
    """runtime_env["worker_process_setup_hook"] (a callable, or "module.function"), as
    every worker calls it before its first task (forkserver.py): pickled here (base64: the
    job's config travels as JSON), so one that cannot be is an error at init()."""
    hook = (runtime_env or {}).get("worker_process_setup_hook")
    if hook is None:
        return ""
    if isinstance(hook, str):
        module, _, name = hook.rpartition(".")
        if not module or not name:
            raise ValueError("runtime_env['worker_process_setup_hook'] must be a callable or "
                             f"'module.function', got {hook!r}.")
    elif not callable(hook):
        raise TypeError("runtime_env['worker_process_setup_hook'] must be a callable or "
                        f"'module.function', got {type(hook).__name__}.")
    import base64
    import cloudpickle
    try:
        pickled = cloudpickle.dumps(hook)
    except Exception as exc:  # noqa: BLE001 - whatever pickling raises, said at the call
        raise TypeError(f"runtime_env['worker_process_setup_hook'] {hook!r} cannot be "
                        f"pickled for the workers: {exc}") from exc
    if len(pickled) > _SETUP_HOOK_MAX:
        raise ValueError(f"runtime_env['worker_process_setup_hook'] {hook!r} pickles to "
                         f"{len(pickled)} bytes (what it captures): at most "
                         f"{_SETUP_HOOK_MAX} fit the job's config; pass 'module.function'.")
    return base64.b64encode(pickled).decode("ascii")


# The job's config reaches each fork server in an environment variable (at most 128 KiB).
_SETUP_HOOK_MAX = 64 * 1024


_driver_failed = False
_status_line = None  # HPCRAY_STATUS_INTERVAL's thread (runtime/status.py)


def _install_excepthook() -> None:
    # An uncaught exception in the driver must end every rank with a failure status.
    previous = sys.excepthook

    def hook(kind, value, tb):
        global _driver_failed
        _driver_failed = True
        previous(kind, value, tb)
    sys.excepthook = hook


def _at_exit() -> None:
    from hpcray.runtime import launch
    shutdown()
    code = 128 + signal.SIGTERM if launch.terminating() else int(_driver_failed)
    launch.end_ranks(code)
    launch.leave_if_ranks_lost(code)


def _install_sigterm_handler() -> None:
    # SIGTERM's default action skips atexit; turn it into SystemExit so shutdown() runs.
    from hpcray.runtime import launch
    if launch.in_world():  # started by mpirun/srun: do not wait for ranks being ended
        launch.end_on_sigterm()
        return
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def on_sigterm(signum, _frame):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            raise SystemExit(128 + signum)
        signal.signal(signal.SIGTERM, on_sigterm)


def shutdown(_exiting_interpreter: bool = False) -> None:
    """Stop every worker and free the object store. Safe to call twice."""
    global _status_line
    with _init_lock:
        node = context.driver_node
        if node is None:
            return
        if node.config.report:
            from hpcray.util.report import write_job_report
            write_job_report(context.client, node)
        if _status_line is not None:
            _status_line.stop()
            _status_line = None
        object_ref.reference_counter.enabled = False
        context.client = None
        context.driver_node = None
        drain.job_ended()
        node.shutdown()
        if node.cluster.size > 1:
            from hpcray.runtime import launch
            launch.stop_job(node.cluster.transport)


def timeline(filename: str | None = None):
    """Ray's `timeline()`: every node's tasks, actor calls, submissions and transfers
    as Chrome trace events (hpcray/util/timeline.py), returned, or written to
    `filename` as JSON. Always recorded, nothing to enable (Ray needs RAY_PROFILING)."""
    from hpcray.util.timeline import timeline as gather
    return gather(filename)


def is_initialized() -> bool:
    return context.client is not None


def client_or_init():
    """This process's client, starting a local runtime first when none runs: Ray's
    implicit `init()` at the first call that needs one (`put`, `get`, `wait`, `cancel`,
    `kill`, `get_actor`, `get_gpu_ids`, `get_runtime_context`, `.remote()` on a function
    or an actor class). Under `python -m hpcray` or a launcher, `init()` joins the job's
    ranks as an explicit one would. RAY_ENABLE_AUTO_CONNECT=0 turns it off, as in Ray."""
    client = context.client
    if client is None:
        if context.worker is None and os.environ.get("RAY_ENABLE_AUTO_CONNECT", "") != "0":
            init(ignore_reinit_error=True)  # another thread may be starting it: join that one
        client = context.get_client()
    return client


def _check_refs(object_refs, what: str) -> list:
    if not isinstance(object_refs, (list, tuple)):
        raise TypeError(f"{what} expects an ObjectRef or a list of ObjectRefs, "
                        f"got {type(object_refs).__name__}.")
    for ref in object_refs:
        if not isinstance(ref, ObjectRef):
            raise TypeError(f"{what} expects ObjectRefs, got {type(ref).__name__} {ref!r:.60} "
                            "in the list.")
    return object_refs


def get(object_refs, *, timeout: float | None = None):
    """The value(s) of ObjectRef(s), waiting for them; raises the task's error if it failed."""
    client = client_or_init()
    if timeout is not None and timeout < 0:
        raise ValueError("timeout must be None or >= 0.")
    if isinstance(object_refs, ObjectRef):
        object_id = object_refs.binary()
        payloads = client.get_payloads([object_id], timeout)
        value = client.values_or_raise([object_id], payloads)[0]
        if hops.ENABLED:
            hops.stamp("get.end")
        return value
    refs = _check_refs(object_refs, "get()")
    if not refs:
        return []
    object_ids = [r.binary() for r in refs]
    payloads = client.get_payloads(object_ids, timeout)
    return client.values_or_raise(object_ids, payloads)


def put(value) -> ObjectRef:
    """Store `value` (zero-copy for numpy data on `get`) and return its ObjectRef."""
    return client_or_init().put(value)


def wait(object_refs, *, num_returns: int = 1, timeout: float | None = None,
         fetch_local: bool = True):
    """-> (ready, not_ready): the first `num_returns` ready refs, in the order given."""
    client = client_or_init()
    if not isinstance(object_refs, (list, tuple)):
        raise TypeError(f"wait() expects a list of ObjectRefs, got {type(object_refs).__name__}.")
    try:
        object_ids = [ref._id for ref in object_refs]
    except AttributeError:  # not only refs (a generator has no _id): off the fast path
        if any(type(ref) is ObjectRefGenerator for ref in object_refs):
            return _wait_with_generators(client, object_refs, num_returns, timeout,
                                         fetch_local)
        _check_refs(object_refs, "wait()")
        raise
    if len(set(object_ids)) != len(object_ids):
        raise ValueError("wait() got duplicate ObjectRefs.")
    if not isinstance(num_returns, int) or num_returns < 0 or num_returns > len(object_ids):
        raise ValueError(f"num_returns must be between 0 and len(object_refs) = "
                         f"{len(object_ids)}, got {num_returns!r}.")
    if timeout is not None and timeout < 0:
        raise ValueError("timeout must be None or >= 0.")
    if not object_ids:
        return [], []
    ready_ids = client.wait_ready(object_ids, num_returns, timeout, fetch_local)
    if len(ready_ids) == len(object_ids):  # all ready: the common case of a drained batch
        return list(object_refs[:num_returns]), list(object_refs[num_returns:])
    ready_set = set(ready_ids)
    ready, not_ready = [], []
    for ref, object_id in zip(object_refs, object_ids):
        if object_id in ready_set and len(ready) < num_returns:
            ready.append(ref)
        else:
            not_ready.append(ref)
    return ready, not_ready


def _wait_with_generators(client, object_refs, num_returns, timeout, fetch_local):
    """wait() of refs and ObjectRefGenerators, as Ray: a generator is ready when its
    next item is there (or it has ended: `next` raises StopIteration at once)."""
    if len(set(map(id, object_refs))) != len(object_refs):
        raise ValueError("wait() got duplicate ObjectRefs.")
    if not isinstance(num_returns, int) or not 0 <= num_returns <= len(object_refs):
        raise ValueError(f"num_returns must be between 0 and len(object_refs) = "
                         f"{len(object_refs)}, got {num_returns!r}.")
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        ready, blocking_ids = [], []
        refs = [ref for ref in object_refs if type(ref) is not ObjectRefGenerator]
        for ref in refs:
            if not isinstance(ref, ObjectRef):
                _check_refs([ref], "wait()")
        ready_refs = set(client.wait_ready([r.binary() for r in refs], len(refs), 0,
                                           fetch_local)) if refs else set()
        for ref in object_refs:
            if type(ref) is ObjectRefGenerator:
                is_ready, wait_ids = ref._next_ready()
                blocking_ids.extend(wait_ids)
            else:
                is_ready = ref.binary() in ready_refs
                if not is_ready:
                    blocking_ids.append(ref.binary())
            if is_ready:
                ready.append(ref)
        left = None if deadline is None else deadline - time.monotonic()
        if len(ready) >= num_returns or (left is not None and left <= 0):
            ready = ready[:num_returns]
            return ready, [ref for ref in object_refs if all(ref is not r for r in ready)]
        # Something changes: a ref or a generator's item becomes ready (or a generator
        # ends: its completion); then look again.
        client.wait_ready(list(dict.fromkeys(blocking_ids)), 1, left, fetch_local)


def cancel(object_ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task that makes `object_ref`, as Ray does: one not running yet never
    runs; a running one gets a KeyboardInterrupt (`force`: its worker is killed); it is
    never retried and `get` of it raises TaskCancelledError. `recursive`: the tasks and
    actor calls it submitted too. An actor call not yet sent to the actor never runs; a
    running one sees `get_runtime_context().is_canceled()` (async actors: its coroutine
    is cancelled); `force` raises ValueError for actor calls. A finished task is left
    alone. Works wherever the task is (runtime/cancellation.py). An ObjectRefGenerator's
    task is cancelled as Ray does: what it yielded before comes first, then the error."""
    if type(object_ref) is ObjectRefGenerator:
        object_ref = object_ref.completed()
    if not isinstance(object_ref, ObjectRef):
        raise TypeError(f"cancel() expects an ObjectRef, got {type(object_ref).__name__}.")
    client_or_init().cancel(object_ref.binary(), force, recursive)


def kill(actor: ActorHandle, *, no_restart: bool = True) -> None:
    """Kill the actor's process now; calls to it then raise RayActorError."""
    if not isinstance(actor, ActorHandle):
        raise TypeError(f"kill() expects an actor handle, got {type(actor).__name__}.")
    client_or_init().kill_actor(actor._actor_id, no_restart)


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    """The handle of the live actor created with `.options(name=name)`."""
    if not isinstance(name, str) or not name:
        raise ValueError("get_actor() needs a non-empty actor name.")
    found = client_or_init().get_actor_info(name)
    if found is None:
        raise ValueError(f"Failed to look up actor with name {name!r}: no live actor has it.")
    return ActorHandle(*found)


def get_gpu_ids() -> list:
    """The GPU indices assigned to the calling task or actor ([] in the driver)."""
    client_or_init()
    worker = context.worker
    return list(worker.gpu_ids) if worker is not None else []


def cluster_resources() -> dict:
    total, _ = context.get_client().resources()
    return dict(total)


def available_resources() -> dict:
    _, available = context.get_client().resources()
    return {k: v for k, v in available.items() if v > 0}


def nodes() -> list:
    """Every node of the job (one per MPI rank): NodeID, Alive, Resources, rank."""
    return context.get_client().nodes()


def remote(*args, **options):
    """`@remote` or `@remote(num_cpus=..., ...)` on a function or a class."""
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args:
        raise TypeError("@remote takes either no arguments or keyword options only.")

    def decorate(target):
        return _make_remote(target, options)
    return decorate


def _make_remote(target, options: dict):
    if isinstance(target, type):
        return ActorClass(target, check(options, ACTOR_OPTIONS, f"actor {target.__name__}"))
    if callable(target):
        return RemoteFunction(target, check(options, TASK_OPTIONS,
                                            f"task {getattr(target, '__name__', target)}"))
    raise TypeError("@remote must decorate a function or a class.")


__all__ = ["init", "shutdown", "is_initialized", "get", "put", "wait", "cancel", "kill",
           "get_actor", "get_gpu_ids", "cluster_resources", "available_resources", "nodes",
           "remote", "RemoteFunction", "ActorClass", "ActorHandle", "exceptions"]
