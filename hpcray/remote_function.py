"""`@remote` functions: `f.remote(...)` submits a task and returns ObjectRef(s)."""

from __future__ import annotations

import functools
import inspect

import cloudpickle

from hpcray import context, ids, options as opts
from hpcray.object_ref import ObjectRef
from hpcray.object_ref_generator import ObjectRefGenerator
from hpcray.runtime.specs import NORMAL_TASK, TaskSpec
from hpcray.serialization import dumps_callable


def _pickle_callable(obj, kind: str, name: str) -> bytes:
    try:
        return dumps_callable(obj)
    except Exception as exc:  # noqa: BLE001 - any pickling failure is the user's to fix
        raise TypeError(f"Could not serialize the {kind} {name}: {type(exc).__name__}: {exc}. "
                        "Check for captured locks, sockets, open files or other objects "
                        "that cannot be pickled.") from exc


class RemoteFunction:
    def __init__(self, function, options: dict, function_id: bytes | None = None):
        self._function = function
        self._options = options
        self._name = f"{getattr(function, '__module__', '?')}.{function.__qualname__}"
        self._function_id = function_id or ids.new_task_id()
        self._pickled = None
        self._default_returns = default_returns(function)
        self._template = None  # _CallTemplate of the decorator's options
        functools.update_wrapper(self, function, updated=())

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Remote functions cannot be called directly. Instead of running "
                        f"'{self._function.__name__}()', try '{self._function.__name__}.remote()'.")

    def __reduce__(self):
        return (RemoteFunction, (self._function, self._options, self._function_id))

    def options(self, **task_options) -> _BoundOptions:
        if "max_calls" in task_options:  # as in Ray: a worker counts calls per function
            raise ValueError(f"max_calls cannot be overridden in .options() of {self._name}; "
                             "set it in @remote(max_calls=...).")
        opts.check(task_options, opts.TASK_OPTIONS, f"task {self._name}")
        return _BoundOptions(self, {**self._options, **task_options})

    def remote(self, *args, **kwargs):
        return self._remote(args, kwargs, self._options)

    def _remote(self, args, kwargs, options: dict):
        client = context.client
        if client is None:  # Ray starts a local runtime at the first .remote()
            from hpcray.api import client_or_init
            client = client_or_init()
        function_id = self._function_id
        if function_id not in client.exported_functions:
            if self._pickled is None:
                self._pickled = _pickle_callable(self._function, "function", self._name)
            client.export_function(function_id, self._pickled)
        if options is self._options:  # the decorator's options: read them once per runtime
            template = self._template
            if template is None or template.client is not client:
                template = self._template = _CallTemplate(self, options, client)
        else:
            template = _CallTemplate(self, options, client)
        group = context.group
        if group is not None and group.capture and template.strategy is None:
            # Run in a group that captures child tasks: this call joins it, unless its
            # options opt out (read per call: a worker's group changes from task to task).
            captured = _CallTemplate(self, options, client, group)
            if captured.strategy is not None:
                template = captured
        task_id = ids.new_task_id()
        args_payload, deps, contained = encode_call_args(client, task_id, args, kwargs, self._name)
        num_returns = template.num_returns
        if num_returns == 1:
            return_ids = [ids.object_id_for(task_id, 1)]
        else:
            return_ids = [ids.object_id_for(task_id, i + 1) for i in range(num_returns)]
        extra = template.extra
        extra = None if extra is None else dict(extra)  # a spec's options change
        if context.env_vars is not None:  # a task's runtime_env is its children's (Ray)
            extra = opts.inherit_env_vars(extra, context.env_vars)
        spec = TaskSpec(task_id, NORMAL_TASK, function_id, template.name, args_payload, deps,
                        contained, return_ids, template.demand, template.max_retries,
                        template.retry_exceptions, None, None, extra)
        client.submit(spec)
        if template.generator == "streaming":
            return ObjectRefGenerator(ObjectRef(return_ids[0], True))
        return refs_for(return_ids)


class _CallTemplate:
    """What every call of a function with the same options shares, read from the options
    once: a TaskSpec's fields but the task's own (ids, arguments)."""

    __slots__ = ("client", "name", "demand", "num_returns", "generator", "max_retries",
                 "retry_exceptions", "strategy", "extra")

    def __init__(self, function: RemoteFunction, options: dict, client, group=None):
        self.client = client
        self.name = options.get("name") or function._name
        self.demand = opts.demand_of(options, 1)
        num_returns = options.get("num_returns", function._default_returns)
        self.generator = None
        if num_returns in opts.GENERATOR_RETURNS:
            self.generator, num_returns = num_returns, 1  # its one return: the completion
        self.num_returns = num_returns
        max_retries = options.get("max_retries")
        self.max_retries = client.config.default_max_retries if max_retries is None \
            else max_retries
        self.retry_exceptions = opts.retry_exceptions_of(options)
        extra = {}
        if self.generator is not None:
            extra["generator"] = self.generator
            limit = opts.backpressure_of(options)
            if limit is not None and self.generator == "streaming":
                extra["backpressure"] = limit
        self.strategy = strategy = opts.strategy_of(options, group)
        if strategy:
            extra["scheduling_strategy"] = strategy
        max_calls = options.get("max_calls")
        if max_calls is None:  # Ray's default: a GPU task's worker leaves after it
            max_calls = 1 if "GPU" in self.demand else 0
        if max_calls:
            extra["max_calls"] = max_calls
        env_vars = opts.env_vars_of(options.get("runtime_env"))
        if env_vars:  # set in its worker while it runs (worker.py)
            extra["env_vars"] = env_vars
        self.extra = extra or None
        if strategy and type(strategy) is opts.InGroup:  # the bundle's resources instead
            opts.check_fits_group(strategy, self.demand, self.name)
            self.demand = opts.demand_in_group(self.demand, strategy)


def default_returns(function):
    """Ray's default num_returns: "streaming" for a generator function, else 1."""
    if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
        return "streaming"
    return 1


def generator_refs(generator, return_ids: list):
    """What `.remote()` returns: its refs, or an ObjectRefGenerator for a streaming task."""
    if generator == "streaming":
        return ObjectRefGenerator(ObjectRef(return_ids[0], True))
    return refs_for(return_ids)


def encode_call_args(client, task_id, args, kwargs, name):
    try:
        return client.encode_args(task_id, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - pickling failures come in many types
        if type(exc).__module__.startswith("hpcray"):
            raise
        culprit = _unpicklable_argument(args, kwargs)
        what = "the arguments" if culprit is None else f"the argument {culprit!r:.200}"
        raise TypeError(f"Could not serialize {what} for a task or actor {name}: "
                        f"{type(exc).__name__}: {exc}") from exc


def _unpicklable_argument(args, kwargs):
    """The first argument that cannot be pickled (None if each alone can): named in the
    error, as Ray does. Only on the error path, so the cost does not matter."""
    for value in (*args, *kwargs.values()):
        try:
            cloudpickle.dumps(value, protocol=5)
        except Exception:  # noqa: BLE001 - any pickling failure
            return value
    return None


def refs_for(return_ids: list):
    """The caller's refs to a task's returns, already counted by the node manager."""
    if len(return_ids) == 1:
        return ObjectRef(return_ids[0], True)
    if not return_ids:
        return None
    return [ObjectRef(oid, True) for oid in return_ids]


class _BoundOptions:
    """What `.options(...)` returns: `.remote()` with those options."""

    def __init__(self, target, options: dict):
        self._target = target
        self._options = options

    def remote(self, *args, **kwargs):
        return self._target._remote(args, kwargs, self._options)
