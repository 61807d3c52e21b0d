"""A worker process: runs tasks, or hosts one actor, for its node manager.

Forked by the fork server, it talks to its node manager over one socket and never
touches MPI. It waits in a blocking receive when idle (no spinning). Functions and
classes arrive pickled once and are cached by id.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor

import cloudpickle

from hpcray import exceptions, ids, object_ref
from hpcray.object_ref import LocalReferenceCounter, ObjectRef
from hpcray.runtime import protocol
from hpcray.runtime.client import WorkerChannel, WorkerClient
from hpcray.runtime.messages import (ActorReady, CreateActor, ExitWorker, Hello, RunTask,
                                     WorkDone, wire)
from hpcray.serialization import ErrorValue, error_bytes, make_error_value


_RUN_TASK, _CREATE_ACTOR, _EXIT = RunTask.CODE, CreateActor.CODE, ExitWorker.CODE

class _Cancelled(BaseException):
    """Raised in a task's thread to cancel it (SIGINT from the node manager)."""


class _Unusable(Exception):
    """Something a task was sent could not be deserialized, or a value it returned could
    not be serialized: the task's error names which, and the worker lives on."""

    def __init__(self, failed: str, cause: BaseException):
        super().__init__(failed)
        self.failed = failed   # e.g. "deserialize the arguments"
        self.cause = cause

    def task_error(self, name: str, of: str = "task") -> exceptions.RayTaskError:
        """`of` `name`: "task f", "actor A"."""
        cause = self.cause
        text = f"Could not {self.failed} of {of} {name}: {type(cause).__name__}: {cause}\n"
        function_name = f"{name}.__init__" if of == "actor" else name
        return exceptions.RayTaskError(function_name, text, cause, os.getpid())


class Worker:
    def __init__(self, connection, job: dict, key: int, is_actor: bool):
        from hpcray import context
        from hpcray._store import Store
        from hpcray.config import Config

        config = Config(**job["config"])
        self.refs = LocalReferenceCounter()
        object_ref.reference_counter = self.refs
        self.channel = WorkerChannel(connection, self.refs)
        self.store = Store.attach(job["store_name"])
        self.client = WorkerClient(self.channel, self.store, config, bytes.fromhex(job["job_id"]),
                                   bytes.fromhex(job["node_id"]), job["resources"])
        self.gpu_uuids = job.get("gpu_uuids", [])
        self.functions: dict = {}
        self.retry_filters: dict = {}  # pickled retry_exceptions -> the classes
        self.actor = None
        self.actor_id = None
        self.actor_gpu_ids = ()
        self.running_task = None
        self.cancel_requested = False
        self.local = threading.local()
        context.set_worker(self)

    # -- context ------------------------------------------------------------------
    @property
    def current_task_id(self):
        return getattr(self.local, "task_id", None)

    @property
    def gpu_ids(self):
        return getattr(self.local, "gpu_ids", self.actor_gpu_ids)

    # -- main loop ---------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_sigint)
        return self.serve()

    def serve(self) -> int:
        """Say hello, then run what the node manager sends until it says exit."""
        self.channel.send(wire(Hello, os.getpid()))
        while True:
            try:
                message = self.channel.next_work()
            except (EOFError, OSError):
                return 0
            kind = message[0]
            if kind == _RUN_TASK:
                self._run_and_report(*message[1:])
            elif kind == _CREATE_ACTOR:
                self._create_actor(*message[1:])
            elif kind == _EXIT:
                return 0

    def _on_sigint(self, _signum, _frame):
        # The node manager's cancel(): interrupt only a running task, never the loop, and
        # never in the middle of reading a message (the channel raises once it has one).
        if self.running_task is None:
            return
        if self.channel.in_io:
            self.channel.interrupted = True
            return
        raise _Cancelled()

    def _load_function(self, function_id: bytes, pickled, what: str = "the function"):
        function = self.functions.get(function_id)
        if function is None:
            if pickled is None:
                raise exceptions.RaySystemError("a worker got a task for an unknown function")
            try:
                function = cloudpickle.loads(pickled)
            except Exception as exc:  # noqa: BLE001 - a missing module, a class gone...
                raise _Unusable(f"deserialize {what}", exc) from exc
            self.functions[function_id] = function
        return function

    def _retry_filter(self, spec):
        """retry_exceptions as the task runs with it: True/False or exception classes
        (they come pickled with cloudpickle, unpickled once per list)."""
        pickled = spec.retry_exceptions
        if type(pickled) is not bytes:
            return pickled
        classes = self.retry_filters.get(pickled)
        if classes is None:
            try:
                classes = self.retry_filters[pickled] = cloudpickle.loads(pickled)
            except Exception as exc:  # noqa: BLE001
                raise _Unusable("deserialize the retry_exceptions option", exc) from exc
        return classes

    def _resolve_args(self, spec, dep_payloads):
        values = {}
        kind, data = spec.args
        for object_id, payload in dep_payloads:
            try:
                value = self.client.decode_value(object_id, payload)
            except exceptions.ObjectLostError:
                raise
            except Exception as exc:  # noqa: BLE001
                what = "the arguments" if kind == "store" and object_id == data else \
                    f"the argument {object_id.hex()} (an ObjectRef's value)"
                raise _Unusable(f"deserialize {what}", exc) from exc
            if type(value) is ErrorValue:
                raise _DependencyFailed(value.error)
            values[object_id] = value
        if kind == "store":  # the pickled (args, kwargs) is the first dependency
            args, kwargs = values.pop(data)
        else:
            try:
                args, kwargs = cloudpickle.loads(data)
            except Exception as exc:  # noqa: BLE001
                raise _Unusable("deserialize the arguments", exc) from exc
        if not values:
            return args, kwargs
        args = [values[a.binary()] if type(a) is ObjectRef else a for a in args]
        if kwargs:
            kwargs = {k: values[v.binary()] if type(v) is ObjectRef else v
                      for k, v in kwargs.items()}
        return args, kwargs

    def _set_gpus(self, gpu_ids) -> None:
        # As Ray does: a task sees exactly its GPUs, and one that asked for none sees
        # none (""), also in a pool worker whose previous task had a GPU. Nodes without
        # detected GPUs leave the variable as the user set it.
        self.local.gpu_ids = gpu_ids
        if gpu_ids or self.gpu_uuids:
            names = [self.gpu_uuids[i] if i < len(self.gpu_uuids) else str(i) for i in gpu_ids]
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(names)

    def _execute(self, spec, function, dep_payloads):
        """Run one task; -> (results, retry), results being (id, inline|None, contained, size)."""
        self.local.task_id = spec.task_id
        retry = retry_on = False
        try:
            retry_on = self._retry_filter(spec)
            args, kwargs = self._resolve_args(spec, dep_payloads)
            outcome = function(*args, **kwargs)
            if asyncio.iscoroutine(outcome):
                outcome = asyncio.run(outcome)
            del args, kwargs
            return self._store_returns(spec, outcome), False
        except _DependencyFailed as failed:
            error = failed.error
        except _Unusable as unusable:
            error = unusable.task_error(spec.name)
        except (_Cancelled, KeyboardInterrupt):
            error = exceptions.TaskCancelledError(f"{spec.name} was cancelled.")
        except exceptions.ObjectStoreFullError as exc:
            error = exceptions.RayTaskError(spec.name, traceback.format_exc(), exc, os.getpid())
        except Exception as exc:  # noqa: BLE001 - the task's error is its result
            error = exceptions.RayTaskError(spec.name, _user_traceback(), exc, os.getpid())
            retry = _should_retry(retry_on, exc)
        finally:
            self.local.task_id = None
        blob = error_bytes(error)
        return [(oid, blob, (), len(blob)) for oid in spec.return_ids], retry

    def _store_returns(self, spec, outcome) -> list:
        return_ids = spec.return_ids
        if len(return_ids) == 1:
            values = (outcome,)
        elif not return_ids:
            return []
        else:
            if not isinstance(outcome, (tuple, list)) or len(outcome) != len(return_ids):
                raise ValueError(f"{spec.name} has num_returns={len(return_ids)} but returned "
                                 f"{type(outcome).__name__} {outcome!r:.80}")
            values = outcome
        # Every value is pickled before any is written, so one that cannot be leaves
        # nothing behind in the store.
        serialized = []
        for index, value in enumerate(values):
            try:
                serialized.append(self.client.serialize_value(value))
            except Exception as exc:  # noqa: BLE001 - pickling failures come in many types
                what = "the return value" if len(values) == 1 else f"return value {index}"
                raise _Unusable(f"serialize {what} {value!r:.100}", exc) from exc
        return [(object_id, *self.client.encode_serialized(object_id, sv))
                for object_id, sv in zip(return_ids, serialized)]

    def _run_and_report(self, spec, pickled_function, dep_payloads, gpu_ids) -> None:
        try:
            if self.actor is not None:
                function = getattr(self.actor, spec.method)
            else:
                function = self._load_function(spec.function_id, pickled_function)
                self._set_gpus(gpu_ids)
        except _Unusable as unusable:
            exc_error = unusable.task_error(spec.name)
            self.channel.send_done(WorkDone, spec.task_id, _error_results(spec, exc_error), False)
            return
        except Exception as exc:  # noqa: BLE001
            exc_error = exceptions.RayTaskError(spec.name, traceback.format_exc(), exc, os.getpid())
            self.channel.send_done(WorkDone, spec.task_id, _error_results(spec, exc_error), False)
            return
        self.running_task = spec.task_id
        try:
            results, retry = self._execute(spec, function, dep_payloads)
        finally:
            self.running_task = None
        _flush_std()
        self.channel.send_done(WorkDone, spec.task_id, results, retry)

    # -- actors ------------------------------------------------------------------
    def _create_actor(self, spec, pickled_class, dep_payloads, gpu_ids) -> None:
        self.actor_id = spec.actor_id
        self.actor_gpu_ids = gpu_ids
        self._set_gpus(gpu_ids)
        error = None
        try:
            cls = self._load_function(spec.function_id, pickled_class, "the actor class")
            args, kwargs = self._resolve_args(spec, dep_payloads)
            self.actor = cls(*args, **kwargs)
        except _DependencyFailed as failed:
            error = failed.error
        except _Unusable as unusable:
            error = unusable.task_error(spec.name, "actor")
        except Exception as exc:  # noqa: BLE001 - reported as the actor's death
            error = exceptions.RayTaskError(f"{spec.name}.__init__", _user_traceback(), exc,
                                            os.getpid())
        _flush_std()
        options = spec.options
        self.actor_mode = "sync"
        if error is None:
            if options["info"].get("is_async"):
                self.actor_mode = "async"
                self._start_async_actor(options.get("max_concurrency") or 1000)
            elif (options.get("max_concurrency") or 1) > 1:
                self.actor_mode = "threaded"
                self._start_threaded_actor(options["max_concurrency"])
        blob = None if error is None else error_bytes(error)
        self.channel.send_done(ActorReady, spec.actor_id, blob)

    def _start_threaded_actor(self, max_concurrency: int) -> None:
        pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="hpcray-actor")

        def dispatch(message):
            if message[0] != _RUN_TASK:
                return False
            pool.submit(self._run_concurrent_call, *message[1:])
            return True

        self.channel.start_reader(dispatch)

    def _run_concurrent_call(self, spec, _function, dep_payloads, _gpu_ids) -> None:
        try:
            function = getattr(self.actor, spec.method)
            results, retry = self._execute(spec, function, dep_payloads)
        except BaseException as exc:  # noqa: BLE001
            results, retry = _error_results(spec, exc), False
        self.channel.send_done(WorkDone, spec.task_id, results, retry)

    def _start_async_actor(self, max_concurrency: int) -> None:
        loop = asyncio.new_event_loop()
        semaphore = None

        async def run_call(spec, dep_payloads):
            nonlocal semaphore
            if semaphore is None:
                semaphore = asyncio.Semaphore(max_concurrency)
            async with semaphore:
                self.local.task_id = spec.task_id
                retry_on = False
                try:
                    retry_on = self._retry_filter(spec)
                    args, kwargs = self._resolve_args(spec, dep_payloads)
                    outcome = getattr(self.actor, spec.method)(*args, **kwargs)
                    if asyncio.iscoroutine(outcome):
                        outcome = await outcome
                    results, retry = self._store_returns(spec, outcome), False
                except _DependencyFailed as failed:
                    results, retry = _error_results(spec, failed.error), False
                except _Unusable as unusable:
                    results = _error_results(spec, unusable.task_error(spec.name))
                    retry = False
                except Exception as exc:  # noqa: BLE001
                    error = exceptions.RayTaskError(spec.name, _user_traceback(), exc, os.getpid())
                    results = _error_results(spec, error)
                    retry = _should_retry(retry_on, exc)
            self.channel.send_done(WorkDone, spec.task_id, results, retry)

        def dispatch(message):
            if message[0] != _RUN_TASK:
                return False
            spec, _function, dep_payloads, _gpu = message[1:]
            loop.call_soon_threadsafe(lambda: loop.create_task(run_call(spec, dep_payloads)))
            return True

        threading.Thread(target=loop.run_forever, name="hpcray-async-actor", daemon=True).start()
        self.channel.start_reader(dispatch)


class _DependencyFailed(Exception):
    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


def _error_results(spec, error) -> list:
    blob = error_bytes(error)
    return [(oid, blob, (), len(blob)) for oid in spec.return_ids]


def _should_retry(retry_exceptions, exc) -> bool:
    if retry_exceptions is True:
        return True
    if isinstance(retry_exceptions, (list, tuple)):
        return isinstance(exc, tuple(retry_exceptions))
    return False


def _user_traceback() -> str:
    """The traceback without the runtime's own frames."""
    kind, value, tb = sys.exc_info()
    frames = traceback.extract_tb(tb)
    frames = [f for f in frames if "/hpcray/runtime/" not in f.filename] or frames
    return "".join(traceback.format_list(frames)) + "".join(
        traceback.format_exception_only(kind, value))


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def main(fd: int, job: dict, key: int, is_actor: bool) -> int:
    import socket
    ids.reseed(job.get("rank", 0))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass
    sock = socket.socket(fileno=fd)
    worker = Worker(protocol.BlockingConnection(sock), job, key, is_actor)
    try:
        return worker.run()
    finally:
        _flush_std()


__all__ = ["main", "Worker", "make_error_value"]
