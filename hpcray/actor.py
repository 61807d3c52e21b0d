"""`@remote` classes: actors, their handles and method calls."""

from __future__ import annotations

import inspect
import types
from typing import TypeVar, Union

from hpcray import context, ids, options as opts
from hpcray.object_ref import _note_pickled
from hpcray.remote_function import (_pickle_callable, default_returns, encode_call_args,
                                    generator_refs, refs_for)
from hpcray.runtime.specs import ACTOR_CALL, ACTOR_CREATION, TaskSpec
from hpcray import object_ref as _object_ref


T = TypeVar("T")

# What `ActorClass[T].remote()` returns, for annotations (`ActorProxy[Counter]`), as in
# Ray: its methods' calls type-check as the class's methods.
ActorProxy = Union["ActorHandle[T]", type[T]]


def method(*args, num_returns=None, max_task_retries=None, concurrency_group=None,
           _generator_backpressure_num_objects=None, **_ray_only):
    """`@hpcray.method(num_returns=n, max_task_retries=m, concurrency_group="io")` on an
    actor method, as `ray.method` (also its `_generator_backpressure_num_objects`): the
    method's own defaults, before its call's `.options()`. Bare, `@hpcray.method` marks a
    method for type checkers and changes nothing, as in Ray."""
    if args:
        if len(args) != 1 or not callable(args[0]) or _ray_only or any(
                value is not None for value in (num_returns, max_task_retries,
                                                concurrency_group,
                                                _generator_backpressure_num_objects)):
            raise TypeError("The @ray.method decorator must be applied using no arguments "
                            "or keyword arguments only, for example "
                            "'@ray.method(num_returns=2)'.")
        return args[0]
    if num_returns is not None:
        opts.check({"num_returns": num_returns}, {"num_returns"}, "ray.method")
    if max_task_retries is not None:
        opts.check({"max_task_retries": max_task_retries}, {"max_task_retries"}, "ray.method")
    limit = opts.backpressure_of(
        {"_generator_backpressure_num_objects": _generator_backpressure_num_objects})
    if concurrency_group is not None and not isinstance(concurrency_group, str):
        raise TypeError(f"concurrency_group must be a str, got {concurrency_group!r}.")

    def decorate(function):
        if num_returns is not None:
            function.__hpcray_num_returns__ = num_returns
        if limit is not None:
            function.__hpcray_backpressure__ = limit
        if max_task_retries is not None:
            function.__hpcray_max_task_retries__ = max_task_retries
        if concurrency_group:
            function.__hpcray_concurrency_group__ = concurrency_group
        return function
    return decorate


def _describe(cls) -> dict:
    methods = {}
    backpressure = {}
    method_retries = {}  # a method's own max_task_retries (@method), over the actor's
    method_groups = {}   # a method's concurrency group (@method), checked at creation
    is_async = False
    for name, member in inspect.getmembers(cls):
        if not callable(member) or (name.startswith("__") and name != "__call__"):
            continue
        num_returns = getattr(member, "__hpcray_num_returns__", None)
        methods[name] = default_returns(member) if num_returns is None else num_returns
        limit = getattr(member, "__hpcray_backpressure__", None)
        if limit is not None:
            backpressure[name] = limit
        retries = getattr(member, "__hpcray_max_task_retries__", None)
        if retries is not None:
            method_retries[name] = retries
        group = getattr(member, "__hpcray_concurrency_group__", None)
        if group is not None:
            method_groups[name] = group
        if inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member):
            is_async = True
    methods.setdefault("__ray_ready__", 1)  # added in the worker (worker._create_actor)
    info = {"class_name": cls.__name__, "methods": methods, "is_async": is_async}
    if backpressure:  # method -> its _generator_backpressure_num_objects
        info["backpressure"] = backpressure
    if method_retries:  # method -> its max_task_retries
        info["method_retries"] = method_retries
    if method_groups:  # method -> its concurrency group
        info["method_groups"] = method_groups
    return info


class ActorClass:
    # Generic in the class it makes actors of, for annotations: `ActorClass[Counter]`.
    __class_getitem__ = classmethod(types.GenericAlias)

    def __init__(self, cls, options: dict, class_id: bytes | None = None):
        self._cls = cls
        self._options = options
        self._class_id = class_id or ids.new_task_id()
        self._pickled = None
        self._info = _describe(cls)
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__module__ = cls.__module__
        self.__doc__ = cls.__doc__

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Actors cannot be instantiated directly. Instead of "
                        f"'{self.__name__}()', use '{self.__name__}.remote()'.")

    def __reduce__(self):
        return (ActorClass, (self._cls, self._options, self._class_id))

    def options(self, **actor_options) -> _ActorOptions:
        opts.check(actor_options, opts.ACTOR_OPTIONS, f"actor {self.__name__}")
        if "concurrency_groups" in actor_options:  # as Ray: only in @remote
            raise ValueError("Setting 'concurrency_groups' is not supported in '.options()'.")
        return _ActorOptions(self, {**self._options, **actor_options})

    def remote(self, *args, **kwargs) -> ActorHandle:
        return self._remote(args, kwargs, self._options)

    def _remote(self, args, kwargs, options: dict) -> ActorHandle:
        client = context.client
        if client is None:  # Ray starts a local runtime at the first .remote()
            from hpcray.api import client_or_init
            client = client_or_init()
        name = options.get("name")
        if name is not None and options.get("get_if_exists"):
            found = client.get_actor_info(name)
            if found is not None:
                return ActorHandle(*found)
        if self._class_id not in client.exported_functions:
            if self._pickled is None:
                self._pickled = _pickle_callable(self._cls, "actor class", self.__name__)
            client.export_function(self._class_id, self._pickled)
        groups = opts.concurrency_groups_of(options.get("concurrency_groups"),
                                            self._info.get("method_groups", {}),
                                            self.__name__)
        actor_id = ids.new_actor_id()
        # What every handle of this actor carries: its callers resolve each call's retries
        # (and check the concurrency group a call names).
        info = {**self._info, "max_task_retries": options.get("max_task_retries") or 0}
        if groups:
            info["concurrency_groups"] = groups
        if context.worker is not None and options.get("lifetime") != "detached":
            info["owner_checked"] = True  # it dies with this process (runtime/owners.py)
        if name is not None:
            holder = client.claim_actor_name(name, actor_id, info)
            if holder is not None:
                found = client.get_actor_info(name) if options.get("get_if_exists") else None
                if found is not None:
                    return ActorHandle(*found)
                raise ValueError(f"An actor named {name!r} already exists.")
        try:
            self._submit(client, actor_id, info, args, kwargs, options)
        except BaseException:
            if name is not None:  # the name goes back: this actor never existed
                client.release_actor_name(name, actor_id)
            raise
        return ActorHandle(actor_id, info, True)

    def _submit(self, client, actor_id: bytes, info: dict, args, kwargs,
                options: dict) -> None:
        args_payload, deps, contained = encode_call_args(client, actor_id, args, kwargs,
                                                         f"{self.__name__}.__init__")
        spec_options = {
            "info": info,
            "name": options.get("name"),
            "detached": options.get("lifetime") == "detached",
            "max_restarts": options.get("max_restarts") or 0,
            "max_task_retries": options.get("max_task_retries") or 0,
            "max_concurrency": options.get("max_concurrency"),
            "scheduling_strategy": opts.strategy_of(options, context.group),
        }
        env_vars = opts.env_vars_of(options.get("runtime_env"))
        if env_vars:  # its process's, from before its constructor (worker.py)
            spec_options["env_vars"] = env_vars
        if context.env_vars is not None:  # its creator's runtime_env is its own too (Ray)
            spec_options = opts.inherit_env_vars(spec_options, context.env_vars)
        if "concurrency_groups" in info:
            # group -> its max concurrency: each its own executor (worker.py); the node
            # sends such an actor its calls at once (actors.py, ActorRecord.serial)
            spec_options["concurrency_groups"] = info["concurrency_groups"]
        budget = opts.actor_backpressure_of(options)
        if budget is not None:  # its generator methods share it (runtime/generator_budget.py)
            spec_options["generator_budget"] = budget
        demand = opts.demand_of(options, 0)
        strategy = spec_options["scheduling_strategy"]
        if type(strategy) is opts.InGroup:
            creation = {**demand, "CPU": 1.0} if options.get("num_cpus") is None else None
            opts.check_fits_group(strategy, demand, self.__name__, creation)
            demand = opts.demand_in_group(demand, strategy)
        spec = TaskSpec(actor_id, ACTOR_CREATION, self._class_id, self.__name__, args_payload,
                        deps, contained, [], demand, 0, False, actor_id, None, spec_options)
        client.submit(spec)


class _ActorOptions:
    def __init__(self, actor_class: ActorClass, options: dict):
        self._actor_class = actor_class
        self._options = options

    def remote(self, *args, **kwargs) -> ActorHandle:
        return self._actor_class._remote(args, kwargs, self._options)

    def get_or_create(self, *args, **kwargs) -> ActorHandle:
        """The live actor of this name, else a new one made with these arguments (Ray's
        `options(name=...).get_or_create(...)`: `get_if_exists=True` by another name)."""
        if self._options.get("name") is None:
            raise ValueError("get_or_create() needs a name: .options(name=...).get_or_create()")
        return self._actor_class._remote(args, kwargs, {**self._options, "get_if_exists": True})


class ActorHandle:
    """A handle to an actor: pass it anywhere, call `handle.method.remote(...)`."""

    __class_getitem__ = classmethod(types.GenericAlias)  # `ActorHandle[Counter]`

    def __init__(self, actor_id: bytes, info: dict, _owned: bool = False):
        self._actor_id = actor_id
        self._info = info
        self._counted = _object_ref.reference_counter.enabled
        if self._counted:
            self._counter = _object_ref.reference_counter
            if _owned:  # the creator's handle: counted when the node made the actor
                self._counter.add_owned(actor_id)
            else:
                self._counter.add(actor_id)

    def __del__(self):
        if self.__dict__.get("_counted"):
            try:
                self._counter.remove(self._actor_id)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def __getattr__(self, name: str) -> ActorMethod:
        info = self.__dict__.get("_info")
        if info is None or name not in info["methods"]:
            raise AttributeError(f"Actor {info['class_name'] if info else '?'} has no method "
                                 f"{name!r}.")
        # Not cached on the handle: the method holds the handle (so `A.remote().f.remote()`
        # keeps a temporary handle, and with it the actor, alive until the call is
        # submitted), and a cache would make that a cycle that keeps actors alive until
        # the next garbage collection.
        return ActorMethod(self, name, info["methods"][name])

    def __reduce__(self):
        _note_pickled(self._actor_id)
        return (ActorHandle, (self._actor_id, self._info))

    def __repr__(self) -> str:
        return f"Actor({self._info['class_name']}, {self._actor_id.hex()})"

    def __hash__(self) -> int:
        return hash(self._actor_id)

    def __eq__(self, other) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id


class ActorMethod:
    __slots__ = ("_handle", "_actor_id", "_name", "_num_returns", "_qualname")

    def __init__(self, handle: ActorHandle, name: str, num_returns: int):
        self._handle = handle
        self._actor_id = handle._actor_id
        self._name = name
        self._num_returns = num_returns
        self._qualname = f"{handle._info['class_name']}.{name}"

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Actor methods cannot be called directly. Instead of running "
                        f"'{self._name}()', try '{self._name}.remote()'.")

    def options(self, **call_options) -> _MethodOptions:
        opts.check(call_options, {"num_returns", "name", "max_task_retries",
                                  "retry_exceptions", "concurrency_group",
                                  "_generator_backpressure_num_objects"},
                   f"actor method {self._qualname}")
        group = call_options.get("concurrency_group")
        if group:  # (None or "": the method's own group, as in Ray)
            self._check_group(group)
        return _MethodOptions(self, call_options)

    def _check_group(self, group) -> None:
        """A call's concurrency group must be one of its actor's. Ray's actor process
        dies of a failed check when it is not; here the call is refused where it is made."""
        if not isinstance(group, str):
            raise TypeError(f"concurrency_group must be a str, got {group!r}.")
        groups = self._handle._info.get("concurrency_groups") or {}
        if group not in groups:
            raise ValueError(f"Actor {self._handle._info['class_name']} has no concurrency "
                             f"group {group!r}: its groups are {sorted(groups)}; leave "
                             "concurrency_group out for the method's own group.")

    def remote(self, *args, **kwargs):
        return self._remote(args, kwargs, None)

    def _remote(self, args, kwargs, options):
        client = context.get_client()
        task_id = ids.new_task_id()
        args_payload, deps, contained = encode_call_args(client, task_id, args, kwargs,
                                                         self._qualname)
        num_returns = self._num_returns
        name = self._qualname
        retry_exceptions = False
        info = self._handle._info
        # Ray's order: the call's options, the method's @method, the actor's option. A
        # call carries the result as its max_retries: each node that loses it (its actor
        # process, or its node) retries it within that.
        retries = info.get("method_retries", {}).get(self._name,
                                                     info.get("max_task_retries", 0))
        if options:
            num_returns = options.get("num_returns", num_returns)
            name = options.get("name") or name
            retry_exceptions = opts.retry_exceptions_of(options)
            if options.get("max_task_retries") is not None:
                retries = options["max_task_retries"]
        generator = call_options = None
        if num_returns in opts.GENERATOR_RETURNS:
            generator, num_returns = num_returns, 1  # its one return: the completion
            call_options = {"generator": generator}
            limit = opts.backpressure_of(options) if options else None
            if limit is None and not (options and "_generator_backpressure_num_objects"
                                      in options):
                limit = self._handle._info.get("backpressure", {}).get(self._name)
            if limit is not None and generator == "streaming":
                call_options["backpressure"] = limit
        if options and options.get("concurrency_group"):  # else the method's own
            call_options = {**(call_options or {}),
                            "concurrency_group": options["concurrency_group"]}
        if info.get("owner_checked") and not ids.made_here(self._actor_id):
            # Another process made the actor, and it dies with that process: the call
            # must not run if that process is dead by now (runtime/owners.py).
            call_options = {**(call_options or {}), "check_owner": True}
        if num_returns == 1:
            return_ids = [ids.object_id_for(task_id, 1)]
        else:
            return_ids = [ids.object_id_for(task_id, i + 1) for i in range(num_returns)]
        spec = TaskSpec(task_id, ACTOR_CALL, None, name, args_payload, deps, contained,
                        return_ids, {}, retries, retry_exceptions, self._actor_id, self._name,
                        call_options)
        client.submit(spec)
        if generator is None:
            return refs_for(return_ids)
        return generator_refs(generator, return_ids)


class _MethodOptions:
    def __init__(self, actor_method: ActorMethod, options: dict):
        self._method = actor_method
        self._options = options

    def remote(self, *args, **kwargs):
        return self._method._remote(args, kwargs, self._options)
