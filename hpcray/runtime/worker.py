"""A worker process: runs tasks, or hosts one actor, for its node manager.

Forked by the fork server, it talks to its node manager over one socket and never
touches MPI. It waits in a blocking receive when idle (no spinning). Functions and
classes arrive pickled once and are cached by id.
"""

from __future__ import annotations

import contextvars
import inspect
import os
import pickle
import signal
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from types import CoroutineType, GeneratorType

import cloudpickle

from hpcray import context, exceptions, ids, object_ref
from hpcray.object_ref import LocalReferenceCounter, ObjectRef
from hpcray.options import InGroup
from hpcray.runtime import clock, proctitle, protocol, task_output
from hpcray.runtime.client import WorkerChannel, WorkerClient
from hpcray.runtime.messages import (ActorReady, CreateActor, ExitWorker, Hello, ItemReady,
                                     RunTask, WorkDone, wire)
from hpcray.serialization import (ErrorValue, error_bytes, loads_callable, make_error_value,
                                  serialize)


_RUN_TASK, _CREATE_ACTOR, _EXIT = RunTask.CODE, CreateActor.CODE, ExitWorker.CODE
_NONE_PICKLED = pickle.dumps(None, protocol=5)  # a generator task's completion
# The task or actor call the running code belongs to (what get_task_id() says, is_canceled()
# looks at, and a submit names as its parent for a recursive cancel), as [task id or None]:
# per asyncio task in an async actor, whose calls share one thread (each call sets its own);
# per thread elsewhere, where each thread sets one list once and its calls fill and empty
# it: a ContextVar.set per call and one to clear it cost ~2k instructions, 2-3% of an
# actor call. A context copied from a thread's (asyncio.run's tasks, asyncio.to_thread)
# shares its list: while the call runs, it sees the call's id.
_running_call: contextvars.ContextVar = contextvars.ContextVar("hpcray_call", default=None)

class _Cancelled(KeyboardInterrupt):
    """Raised in a pool task's thread to cancel it (the node manager's CancelTask, then
    SIGINT; cancellation.py): a KeyboardInterrupt, as Ray raises."""


# What to do when a task's result cannot be pickled (it must leave the worker's process).
_RETURN_HINT = ("A task's results leave its worker process pickled (cloudpickle): return "
                "plain data, or what rebuilds the object, or give its class __reduce__; "
                "keep locks, open files, sockets and clients inside the process that uses "
                "them (an actor can hold them).")


class _Unusable(Exception):
    """Something a task was sent could not be deserialized, or a value it returned could
    not be serialized: the task's error names which, and the worker lives on."""

    def __init__(self, failed: str, cause: BaseException, hint: str = ""):
        super().__init__(failed)
        self.failed = failed   # e.g. "deserialize the arguments"
        self.cause = cause
        self.hint = hint       # what to do about it

    def task_error(self, name: str, of: str = "task") -> exceptions.RayTaskError:
        """`of` `name`: "task f", "actor A"."""
        cause = self.cause
        text = f"Could not {self.failed} of {of} {name}: {type(cause).__name__}: {cause}\n"
        if self.hint:
            text += self.hint + "\n"
        function_name = f"{name}.__init__" if of == "actor" else name
        return exceptions.RayTaskError(function_name, text, cause, os.getpid())


class Worker:
    def __init__(self, connection, job: dict, key: int, is_actor: bool):
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
        # The actor's shared budget of generator items not taken (generator_budget.py)
        self.generator_budget = None
        self.actor_mode = None      # "sync", "threaded" or "async" once an actor
        self.cancel_hint = False    # a SIGINT came: look for a CancelTask before a call
        self.local = threading.local()
        self.idle_title = "ray::IDLE"  # its title between calls (proctitle.py); an actor's
        proctitle.set_title(self.idle_title)  # is its class's once it is created
        self.current_task = task_output.CurrentTask()  # names a pool worker's output lines
        context.set_worker(self)

    # -- context ------------------------------------------------------------------
    @property
    def current_task_id(self):
        call = _running_call.get()
        return None if call is None else call[0]

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
        # The node manager sent CancelTask, then this signal. Interrupt only a pool task's
        # own code, and only for a cancel of that task (the signal may be late, for a task
        # that ended), never in the middle of a message (the channel raises at the end
        # of the node call the main thread is in). An actor is never interrupted.
        self.cancel_hint = True
        channel = self.channel
        if channel.interruptible is None:
            return
        channel.poll_cancels()
        self.cancel_hint = False
        if channel.interrupt_pending and not channel.main_io:
            channel.interrupt_pending = False
            channel.interrupted = channel.interruptible
            raise _Cancelled()

    def is_canceled(self) -> bool:
        """Whether the task or actor call this thread runs was cancelled (Ray's
        `get_runtime_context().is_canceled()`)."""
        if self.actor_mode == "async":
            raise RuntimeError("is_canceled() is not supported in async actors: a cancelled "
                               "call gets asyncio.CancelledError.")
        task_id = self.current_task_id
        if task_id is None:
            raise RuntimeError("is_canceled() is only available inside a task or an actor "
                               "method.")
        self.channel.poll_cancels()
        return task_id in self.channel.cancelled_tasks

    def _cancelled_before_start(self, task_id: bytes) -> bool:
        """A call whose cancel is here already (pipelined to an actor) never runs."""
        if self.cancel_hint:
            self.cancel_hint = False
            self.channel.poll_cancels()
        return task_id in self.channel.cancelled_tasks

    def _load_function(self, function_id: bytes, pickled, what: str = "the function"):
        function = self.functions.get(function_id)
        if function is None:
            if pickled is None:
                raise exceptions.RaySystemError("a worker got a task for an unknown function")
            try:
                function = loads_callable(pickled)
            except Exception as exc:  # noqa: BLE001 - a missing module, a class gone...
                raise _Unusable(f"deserialize {what}", exc) from exc
            self.functions[function_id] = function
        return function

    def _retry_filter(self, spec):
        """retry_exceptions as the task runs with it: True/False or exception classes
        (they come pickled with cloudpickle, unpickled once per list)."""
        pickled = spec.retry_exceptions
        if type(pickled) is not bytes:  # (_execute tests this first: no call per task)
            return pickled
        classes = self.retry_filters.get(pickled)
        if classes is None:
            try:
                classes = self.retry_filters[pickled] = cloudpickle.loads(pickled)
            except Exception as exc:  # noqa: BLE001
                raise _Unusable("deserialize the retry_exceptions option", exc) from exc
        return classes

    def _resolve_args(self, spec, dep_payloads):
        kind, data = spec.args
        if not dep_payloads and kind == "inline":  # no ObjectRef arguments: no lookups
            try:
                return cloudpickle.loads(data)
            except Exception as exc:  # noqa: BLE001
                raise _Unusable("deserialize the arguments", exc) from exc
        values = {}
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
        call = _running_call.get() or _thread_call()
        call[0] = spec.task_id
        pool_task = self.actor is None
        env_before = None
        if pool_task and (spec.options or context.group is not None):
            context.group = _group_of(spec)  # what get_current_placement_group() says
            if spec.options and "env_vars" in spec.options:  # its runtime_env's, meanwhile
                context.env_vars = spec.options["env_vars"]  # (and its children's)
                env_before = _set_env(context.env_vars)
        retry = False
        retry_on = spec.retry_exceptions
        try:
            if type(retry_on) is bytes:
                retry_on = self._retry_filter(spec)
            args, kwargs = self._resolve_args(spec, dep_payloads)
            if pool_task:  # a pool task: a cancel interrupts it from here...
                self.channel.interruptible = spec.task_id
                if self._cancelled_before_start(spec.task_id):
                    raise _Cancelled()
            outcome = function(*args, **kwargs)
            if type(outcome) is CoroutineType:
                import asyncio  # (here: it is 20 ms of the fork server's imports, init's wait)
                outcome = asyncio.run(outcome)
            del args, kwargs
            if spec.options and spec.options.get("generator"):  # its code runs as it streams
                if inspect.isasyncgen(outcome):
                    import asyncio
                    results = asyncio.run(self._stream_async(spec, outcome))
                else:
                    results = self._stream(spec, outcome)
                self.channel.interruptible = None  # ...to here
                return results, False
            if type(outcome) is not GeneratorType:  # (num_returns=N: its code runs here)
                self.channel.interruptible = None  # ...to here
            results = self._store_returns(spec, outcome, function)
            self.channel.interruptible = None
            return results, False
        except _DependencyFailed as failed:
            error = failed.error
        except _Unusable as unusable:
            error = unusable.task_error(spec.name)
        except (_Cancelled, KeyboardInterrupt):
            error = _cancel_error(spec)
        except exceptions.ObjectStoreFullError as exc:
            error = exceptions.RayTaskError(spec.name, traceback.format_exc(), exc, os.getpid())
            exc.__traceback__ = None  # else error -> exc -> traceback -> this frame -> error
        except Exception as exc:  # noqa: BLE001 - the task's error is its result
            error = exceptions.RayTaskError(spec.name, _user_traceback(), exc, os.getpid())
            retry = _should_retry(retry_on, exc)
            # A cycle (error -> exc -> its traceback -> this frame -> error) would keep the
            # task's frames, and the refs in them, until a collection, after its WorkDone.
            exc.__traceback__ = None
        finally:
            call[0] = None
            if pool_task:
                self.channel.interruptible = self.channel.interrupted = None
                self.channel.interrupt_pending = False
                if env_before is not None:
                    _set_env(env_before)
                    context.env_vars = None
        blob = error_bytes(error)
        return [(oid, blob, (), len(blob)) for oid in spec.return_ids], retry

    # -- generators (runtime/generators.py) --------------------------------------------
    def _stream(self, spec, items) -> list:
        """Report each item of a generator task as it is yielded; -> the completion."""
        if not hasattr(items, "__iter__") or isinstance(items, (str, bytes, dict)):
            raise TypeError(f"{spec.name} has num_returns={spec.options['generator']!r} but "
                            f"returned {type(items).__name__}, not a generator.")
        skip = spec.options.get("generator_skip", 0)
        limit = spec.options.get("backpressure")
        budget = self.generator_budget if spec.options["generator"] == "streaming" else None
        taken = 0  # items the consumer took, as last heard
        items = iter(items)
        index = 0
        while True:
            if budget and index >= skip:  # the actor's shared budget has room for one
                self.client.generator_slot(spec.task_id)
            try:
                value = next(items)
            except StopIteration:
                break
            if index >= skip:  # a re-run: the node has the first `skip` already
                self._report_item(spec, index, value)
                while limit is not None and index + 1 - taken >= limit:
                    taken = self.client.generator_pause(spec.task_id, index + 2 - limit)
            index += 1
        return self._completion(spec)

    async def _stream_async(self, spec, items) -> list:
        import asyncio
        skip = spec.options.get("generator_skip", 0)
        limit = spec.options.get("backpressure")
        budget = self.generator_budget if spec.options["generator"] == "streaming" else None
        loop = asyncio.get_running_loop()
        taken = 0
        index = 0
        items = aiter(items)
        while True:
            if budget and index >= skip:  # in a thread: the actor's other calls go on
                await loop.run_in_executor(None, self.client.generator_slot, spec.task_id)
            try:
                value = await anext(items)
            except StopAsyncIteration:
                break
            if index >= skip:
                self._report_item(spec, index, value)
                while limit is not None and index + 1 - taken >= limit:
                    # In a thread: the actor's other calls go on meanwhile.
                    taken = await loop.run_in_executor(
                        None, self.client.generator_pause, spec.task_id, index + 2 - limit)
            index += 1
        return self._completion(spec)

    def _report_item(self, spec, index: int, value) -> None:
        object_id = ids.object_id_for(spec.task_id, index + 2)
        try:
            serialized = self.client.serialize_value(value)
        except Exception as exc:  # noqa: BLE001 - pickling failures come in many types
            raise _Unusable(f"serialize item {index} {value!r:.100}", exc,
                            _RETURN_HINT) from exc
        self.channel.send_done(ItemReady, spec.task_id, index,
                               (object_id, *self.client.encode_serialized(object_id, serialized)))

    def _completion(self, spec) -> list:
        return [(spec.return_ids[0], _NONE_PICKLED, (), len(_NONE_PICKLED))]

    def _generator_returns(self, spec, items) -> list:
        """A generator with num_returns=N, as Ray: its N items are the N returns; if it
        raises after k < N, the other returns hold the error."""
        return_ids = spec.return_ids
        values = []
        failed = None
        try:
            for value in items:
                if len(values) == len(return_ids):
                    failed = ValueError(f"{spec.name} has num_returns={len(return_ids)} but "
                                        "yielded more values.")
                    break
                values.append(value)
        except Exception as exc:  # noqa: BLE001 - the task's error is the other returns'
            if len(values) < len(return_ids):  # (raised after all of them: Ray only logs it)
                error = exceptions.RayTaskError(spec.name, _user_traceback(), exc, os.getpid())
                exc.__traceback__ = None  # no cycle through this frame (see _execute)
                blob = error_bytes(error)
                return (self._store_values(spec, return_ids[:len(values)], values)
                        + [(oid, blob, (), len(blob)) for oid in return_ids[len(values):]])
        if failed is None and len(values) != len(return_ids):
            failed = ValueError(f"{spec.name} has num_returns={len(return_ids)} but yielded "
                                f"{len(values)} values.")
        if failed is not None:
            raise failed
        return self._store_values(spec, return_ids, values)

    def _store_returns(self, spec, outcome, function=None) -> list:
        return_ids = spec.return_ids
        if type(outcome) is GeneratorType:
            if function is not None and not inspect.isgeneratorfunction(function):
                raise TypeError(f"{spec.name} returned a generator object, which cannot be "
                                "stored: write it as a generator function (yield in its "
                                "body) to stream its items, or return a list.")
            return self._generator_returns(spec, outcome)
        if len(return_ids) == 1:  # the usual case, without _store_values' loops
            object_id = return_ids[0]
            try:
                serialized = serialize(outcome, self.client.config.inline_threshold)
            except Exception as exc:  # noqa: BLE001 - pickling failures come in many types
                raise _Unusable(f"serialize the return value {outcome!r:.100}", exc,
                                _RETURN_HINT) from exc
            return [(object_id, *self.client.encode_serialized(object_id, serialized))]
        if not return_ids:
            return []
        if not isinstance(outcome, (tuple, list)) or len(outcome) != len(return_ids):
            raise ValueError(f"{spec.name} has num_returns={len(return_ids)} but returned "
                             f"{type(outcome).__name__} {outcome!r:.80}")
        return self._store_values(spec, return_ids, outcome)

    def _store_values(self, spec, return_ids, values) -> list:
        # Every value is pickled before any is written, so one that cannot be leaves
        # nothing behind in the store.
        serialized = []
        for index, value in enumerate(values):
            try:
                serialized.append(self.client.serialize_value(value))
            except Exception as exc:  # noqa: BLE001 - pickling failures come in many types
                what = "the return value" if len(values) == 1 else \
                    f"return value {index} (counting from 0, of {len(values)})"
                raise _Unusable(f"serialize {what} {value!r:.100}", exc, _RETURN_HINT) from exc
        return [(object_id, *self.client.encode_serialized(object_id, sv))
                for object_id, sv in zip(return_ids, serialized)]

    def _run_and_report(self, spec, pickled_function, dep_payloads, gpu_ids) -> None:
        started = clock.now()
        try:
            if self.actor is not None:
                function = getattr(self.actor, spec.method)
            else:
                function = self._load_function(spec.function_id, pickled_function)
                self._set_gpus(gpu_ids)
                current = self.current_task
                current.spec, current.function = spec, function
        except _Unusable as unusable:
            exc_error = unusable.task_error(spec.name)
            self.channel.send_done(WorkDone, spec.task_id, _error_results(spec, exc_error),
                                   False, started, clock.now())
            return
        except Exception as exc:  # noqa: BLE001
            exc_error = exceptions.RayTaskError(spec.name, traceback.format_exc(), exc, os.getpid())
            self.channel.send_done(WorkDone, spec.task_id, _error_results(spec, exc_error),
                                   False, started, clock.now())
            return
        if self.actor is not None and (self.cancel_hint or self.channel.cancelled_tasks) \
                and self._cancelled_before_start(spec.task_id):  # (no call when none came)
            self.channel.send_done(WorkDone, spec.task_id,
                                   _error_results(spec, _cancel_error(spec, False)), False, None,
                                   None)
            return
        # What ps shows, as Ray's workers: a task's name as its log lines give it.
        proctitle.set_title("ray::" + (spec.name if self.actor is not None
                                       else self.current_task.name()))
        results, retry = self._execute(spec, function, dep_payloads)
        channel = self.channel
        if not (channel.backlog or channel.conn.buffered()):  # idle next, unless more came
            proctitle.set_title(self.idle_title)  # (calls that came in one read: 0 writes)
        _flush_std()
        self.channel.send_done(WorkDone, spec.task_id, results, retry, started,
                               clock.now())

    # -- actors ------------------------------------------------------------------
    def _create_actor(self, spec, pickled_class, dep_payloads, gpu_ids) -> None:
        self.actor_id = spec.actor_id
        context.group = _group_of(spec)
        self.actor_gpu_ids = gpu_ids
        self.generator_budget = spec.options.get("generator_budget")
        context.env_vars = spec.options.get("env_vars")  # its runtime_env's, for its life
        _set_env(context.env_vars or {})                 # (and its children's)
        self._set_gpus(gpu_ids)
        error = None
        try:
            cls = self._load_function(spec.function_id, pickled_class, "the actor class")
            if not hasattr(cls, "__ray_ready__"):  # Ray's: answers once the actor is up
                cls.__ray_ready__ = _ray_ready
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
            info = options["info"]
            groups = _Groups(options.get("concurrency_groups"), info.get("method_groups"))
            if info.get("is_async"):
                self.actor_mode = "async"
                self._start_async_actor(options.get("max_concurrency") or 1000, groups)
            elif (options.get("max_concurrency") or 1) > 1 or groups.sizes:
                self.actor_mode = "threaded"
                self._start_threaded_actor(options.get("max_concurrency") or 1, groups)
        blob = None if error is None else error_bytes(error)
        self.idle_title = "ray::" + spec.name
        proctitle.set_title(self.idle_title)
        self.channel.send_done(ActorReady, spec.actor_id, blob,
                               None if error is not None else _repr_name(self.actor))

    def _start_threaded_actor(self, max_concurrency: int, groups: _Groups) -> None:
        """A pool of threads per concurrency group, the default group's of
        `max_concurrency`: a group's calls beyond its size wait in its pool's queue, and
        a group whose threads are all busy holds up no other group (as Ray's)."""
        pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="hpcray-actor")
        if groups.sizes:
            pools = {name: ThreadPoolExecutor(size, thread_name_prefix=f"hpcray-actor-{name}")
                     for name, size in groups.sizes.items()}
            group_of = groups.group_of

            def dispatch(message):
                if message[0] != _RUN_TASK:
                    return False
                pools.get(group_of(message[1]), pool).submit(self._run_concurrent_call,
                                                             *message[1:])
                return True
        else:
            def dispatch(message):
                if message[0] != _RUN_TASK:
                    return False
                pool.submit(self._run_concurrent_call, *message[1:])
                return True

        self.channel.start_reader(dispatch)

    def _run_concurrent_call(self, spec, _function, dep_payloads, _gpu_ids) -> None:
        if spec.task_id in self.channel.cancelled_tasks:  # cancelled while it waited
            self.channel.send_done(WorkDone, spec.task_id,
                                   _error_results(spec, _cancel_error(spec, False)), False, None,
                                   None)
            return
        started = clock.now()
        proctitle.set_title("ray::" + spec.name)  # (as Ray: the call that started last)
        try:
            function = getattr(self.actor, spec.method)
            results, retry = self._execute(spec, function, dep_payloads)
        except BaseException as exc:  # noqa: BLE001
            results, retry = _error_results(spec, exc), False
        proctitle.set_title(self.idle_title)
        self.channel.send_done(WorkDone, spec.task_id, results, retry, started,
                               clock.now())

    def _start_async_actor(self, max_concurrency: int, groups: _Groups) -> None:
        """An event loop in a thread of its own per concurrency group (as Ray's), the
        default group's running at most `max_concurrency` calls at once, each other group
        at most its size: a call that blocks its loop (a sync method) holds up only its
        own group."""
        import asyncio
        # group (None: the default) -> [its loop, its semaphore (made in the loop)]
        loops = {None: [asyncio.new_event_loop(), None, max_concurrency]}
        for name, size in (groups.sizes or {}).items():
            loops[name] = [asyncio.new_event_loop(), None, size]
        calls: dict = {}  # task id -> the asyncio.Task running that call

        def cancel_call(task_id) -> None:  # Ray's cancel of an async call: asyncio's
            call = calls.get(task_id)
            if call is not None:
                call.cancel()

        def on_cancel(task_id) -> None:
            # Each loop looks (the call may be in any, or not yet begun: run_call looks at
            # cancelled_tasks once it has registered itself in `calls`).
            for loop, _semaphore, _size in loops.values():
                loop.call_soon_threadsafe(cancel_call, task_id)

        self.channel.on_cancel = on_cancel

        async def run_call(spec, dep_payloads, group):
            started = clock.now()
            calls[spec.task_id] = asyncio.current_task()
            proctitle.set_title("ray::" + spec.name)  # (as Ray: the call that started last)
            try:
                if spec.task_id in self.channel.cancelled_tasks:
                    raise asyncio.CancelledError()
                results, retry = await run_call_body(spec, dep_payloads, group)
            except asyncio.CancelledError:  # before it ran (or after: its own catch)
                results, retry = _error_results(spec, _cancel_error(spec, False)), False
            finally:
                del calls[spec.task_id]
                if not calls:
                    proctitle.set_title(self.idle_title)
            self.channel.send_done(WorkDone, spec.task_id, results, retry, started,
                               clock.now())

        async def run_call_body(spec, dep_payloads, group):
            semaphore = group[1]
            if semaphore is None:
                semaphore = group[1] = asyncio.Semaphore(group[2])
            async with semaphore:
                _running_call.set([spec.task_id])  # this call's asyncio task only
                retry_on = False
                try:
                    retry_on = self._retry_filter(spec)
                    args, kwargs = self._resolve_args(spec, dep_payloads)
                    outcome = getattr(self.actor, spec.method)(*args, **kwargs)
                    if inspect.iscoroutine(outcome):
                        outcome = await outcome
                    if spec.options and spec.options.get("generator"):
                        if inspect.isasyncgen(outcome):
                            results = await self._stream_async(spec, outcome)
                        else:
                            results = self._stream(spec, outcome)
                        retry = False
                    else:
                        if inspect.isasyncgen(outcome):  # num_returns=N
                            outcome = _replay(*await _drain(outcome))
                        results, retry = self._store_returns(spec, outcome), False
                except _DependencyFailed as failed:
                    results, retry = _error_results(spec, failed.error), False
                except _Unusable as unusable:
                    results = _error_results(spec, unusable.task_error(spec.name))
                    retry = False
                except asyncio.CancelledError:  # cancel(): interrupted at an await
                    results, retry = _error_results(spec, _cancel_error(spec)), False
                except Exception as exc:  # noqa: BLE001
                    error = exceptions.RayTaskError(spec.name, _user_traceback(), exc, os.getpid())
                    results = _error_results(spec, error)
                    retry = _should_retry(retry_on, exc)
                    exc.__traceback__ = None  # no cycle through this frame (see _execute)
            return results, retry

        group_of = groups.group_of

        def dispatch(message):
            if message[0] != _RUN_TASK:
                return False
            spec, _function, dep_payloads, _gpu = message[1:]
            group = loops.get(group_of(spec)) or loops[None]
            loop = group[0]
            loop.call_soon_threadsafe(
                lambda: loop.create_task(run_call(spec, dep_payloads, group)))
            return True

        for name, (loop, _semaphore, _size) in loops.items():
            # (thread names as Ray's: "AsyncIO Thread: io")
            threading.Thread(target=loop.run_forever, daemon=True,
                             name=f"AsyncIO Thread: {name or 'default'}").start()
        self.channel.start_reader(dispatch)


class _Groups:
    """An actor's concurrency groups, as its worker routes calls to them."""

    __slots__ = ("sizes", "method_groups")

    def __init__(self, sizes: dict | None, method_groups: dict | None):
        self.sizes = sizes or None        # group -> its max concurrency
        self.method_groups = method_groups or {}  # method -> its group (@method)

    def group_of(self, spec) -> str | None:
        """A call's group (None: the default), as its node sees it (actors.call_group)."""
        options = spec.options
        if options:
            group = options.get("concurrency_group")
            if group:
                return group
        return self.method_groups.get(spec.method)


def _thread_call() -> list:
    """This thread's [task id] (see _running_call), set at its first call."""
    call = [None]
    _running_call.set(call)
    return call


def _group_of(spec):
    """The placement group a task or actor was scheduled into (options.InGroup), or None."""
    strategy = spec.options.get("scheduling_strategy") if spec.options else None
    return strategy if type(strategy) is InGroup else None


def _cancel_error(spec, interrupted: bool = True) -> BaseException:
    """What a cancelled task reports: as in Ray, TaskCancelledError if it never ran, a
    RayTaskError whose cause is one (an instance of both) if it was interrupted."""
    cancelled = exceptions.TaskCancelledError(f"{spec.name} was cancelled.")
    if not interrupted:
        return cancelled
    return exceptions.RayTaskError(spec.name, _user_traceback(), cancelled, os.getpid())


class _DependencyFailed(Exception):
    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


async def _drain(items) -> tuple:
    """An async generator's values, and the exception that ended it (or None)."""
    values = []
    try:
        async for value in items:
            values.append(value)
    except Exception as exc:  # noqa: BLE001 - replayed to the caller
        return values, exc
    return values, None


def _replay(values, error):
    yield from values
    if error is not None:
        raise error


def _error_results(spec, error) -> list:
    blob = error_bytes(error)
    return [(oid, blob, (), len(blob)) for oid in spec.return_ids]


def _should_retry(retry_exceptions, exc) -> bool:
    if retry_exceptions is True:
        return True
    if isinstance(retry_exceptions, (list, tuple)):
        return isinstance(exc, tuple(retry_exceptions))
    return False


def _set_env(env_vars: dict) -> dict:
    """Set `env_vars` (a value None unsets its name); -> what undoes it. A task's
    runtime_env env_vars are set in its pool worker while it runs: Ray starts a process
    per runtime_env, so a library that reads a variable once at import (before the task)
    sees it there and not here."""
    before = {name: os.environ.get(name) for name in env_vars}
    for name, value in env_vars.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return before


def _ray_ready(_self) -> bool:
    return True


def _user_traceback() -> str:
    """The traceback without the runtime's own frames."""
    kind, value, tb = sys.exc_info()
    frames = traceback.extract_tb(tb)
    frames = [f for f in frames if "/hpcray/runtime/" not in f.filename] or frames
    return "".join(traceback.format_list(frames)) + "".join(
        traceback.format_exception_only(kind, value))


def _repr_name(instance) -> str | None:
    """What names the actor in its log prefix from now on, as in Ray: repr() of the
    instance once its constructor ran, where its class defines __repr__."""
    if type(instance).__repr__ is object.__repr__:
        return None
    try:
        return repr(instance)
    except Exception:  # noqa: BLE001 - a broken __repr__ leaves the class name
        return None


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if type(stream) is task_output.TaskNamedStream:
                stream.flush_if_written()
            else:  # the task replaced it
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
    if not is_actor:  # an actor's lines are named by the actor (job_logs.py)
        task_output.install(worker.current_task)
    try:
        return worker.run()
    finally:
        _flush_std()


__all__ = ["main", "Worker", "make_error_value"]
