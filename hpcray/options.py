"""Checking `@remote(...)` and `.options(...)` arguments, and turning them into demands."""

from __future__ import annotations

import warnings

TASK_OPTIONS = {"num_cpus", "num_gpus", "resources", "memory", "num_returns", "max_retries",
                "retry_exceptions", "name", "scheduling_strategy", "runtime_env",
                "accelerator_type", "placement_group", "_metadata", "label_selector",
                "max_calls", "placement_group_bundle_index",
                "placement_group_capture_child_tasks", "_generator_backpressure_num_objects"}
# num_returns of a generator task (runtime/generators.py); a generator function's default
GENERATOR_RETURNS = ("streaming", "dynamic")
ACTOR_OPTIONS = {"num_cpus", "num_gpus", "resources", "memory", "name", "namespace",
                 "lifetime", "max_restarts", "max_task_retries", "max_concurrency",
                 "scheduling_strategy", "runtime_env", "get_if_exists", "accelerator_type",
                 "concurrency_groups", "max_pending_calls", "placement_group", "label_selector",
                 "placement_group_bundle_index", "placement_group_capture_child_tasks",
                 "_actor_generator_backpressure_num_objects"}


def env_vars_of(runtime_env, also_known: set = frozenset()) -> dict | None:
    """The env_vars of a runtime_env (init's, a task's or an actor's), checked as Ray
    checks them; its other fields but `also_known` (pip, working_dir, ...: they would
    install something) are ignored with a warning."""
    if runtime_env is None:
        return None
    if not isinstance(runtime_env, dict):
        raise TypeError(f"runtime_env must be a dict, got {type(runtime_env).__name__}.")
    env_vars = runtime_env.get("env_vars") or {}
    if not isinstance(env_vars, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()):
        raise TypeError("runtime_env['env_vars'] must be a dict of str to str, got "
                        f"{env_vars!r}.")
    ignored = sorted(set(runtime_env) - {"env_vars"} - set(also_known))
    if ignored:
        warnings.warn(f"hpcray ignores runtime_env fields {ignored}: it installs nothing; "
                      "every rank runs the Python environment it was started in.",
                      stacklevel=4)
    return dict(env_vars) or None


def inherit_env_vars(spec_options: dict | None, parent: dict) -> dict:
    """A child's spec options with its parent's env_vars under its own (Ray merges the
    child's runtime_env env_vars over the parent's)."""
    spec_options = dict(spec_options or {})
    spec_options["env_vars"] = {**parent, **spec_options.get("env_vars", {})}
    return spec_options


def check(options: dict, allowed: set, what: str) -> dict:
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"Invalid option(s) for {what}: {sorted(unknown)}; "
                         f"valid ones are {sorted(allowed)}.")
    for key in ("num_cpus", "num_gpus", "memory"):
        value = options.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or value < 0):
            raise ValueError(f"{key} must be a non-negative number, got {value!r}.")
    resources = options.get("resources")
    if resources is not None:
        if not isinstance(resources, dict):
            raise ValueError(f"resources must be a dict, got {resources!r}.")
        for name, amount in resources.items():
            if not isinstance(name, str):
                raise ValueError(f"resource names must be strings, got {name!r}.")
            if name in ("CPU", "GPU", "memory"):
                raise ValueError(f"Use num_cpus/num_gpus/memory instead of "
                                 f"resources={{{name!r}: ...}}.")
            if not isinstance(amount, (int, float)) or amount < 0:
                raise ValueError(f"resources[{name!r}] must be a non-negative number.")
    num_returns = options.get("num_returns")
    if num_returns is not None and num_returns not in GENERATOR_RETURNS and (
            not isinstance(num_returns, int) or num_returns < 0):
        raise ValueError(f"num_returns must be a non-negative int, 'streaming' or 'dynamic', "
                         f"got {num_returns!r}.")
    for key in ("max_retries", "max_restarts", "max_task_retries"):
        value = options.get(key)
        if value is not None and (not isinstance(value, int) or value < -1):
            raise ValueError(f"{key} must be an int >= -1, got {value!r}.")
    if "runtime_env" in options:
        env_vars_of(options["runtime_env"])
    backpressure_of(options)
    actor_backpressure_of(options)
    max_calls = options.get("max_calls")
    if max_calls is not None and (not isinstance(max_calls, int) or isinstance(max_calls, bool)
                                  or max_calls < 0):
        raise ValueError(f"max_calls must be an int >= 0 (0: no limit), got {max_calls!r}.")
    max_concurrency = options.get("max_concurrency")
    if max_concurrency is not None and (not isinstance(max_concurrency, int)
                                        or max_concurrency < 1):
        raise ValueError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}.")
    name = options.get("name")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"name must be a string, got {name!r}.")
    retry_exceptions = options.get("retry_exceptions")
    if retry_exceptions is not None and not isinstance(retry_exceptions, bool) and not (
            isinstance(retry_exceptions, (list, tuple))
            and all(isinstance(e, type) and issubclass(e, BaseException)
                    for e in retry_exceptions)):
        raise ValueError("retry_exceptions must be either a boolean or a list of exception "
                         f"classes, got {retry_exceptions!r}.")
    groups = options.get("concurrency_groups")
    if groups is not None and not isinstance(groups, (dict, list)):
        raise TypeError("The type of keyword 'concurrency_groups' must be (<class 'list'>, "
                        "<class 'dict'>, <class 'NoneType'>), but received type "
                        f"{type(groups)}")
    lifetime = options.get("lifetime")
    if lifetime not in (None, "detached", "non_detached"):
        raise ValueError(f"lifetime must be 'detached' or 'non_detached', got {lifetime!r}.")
    return options


def concurrency_groups_of(groups, method_groups: dict, class_name: str) -> dict | None:
    """An actor's `concurrency_groups` checked, when it is created (Ray checks them then
    too): group name -> its max concurrency; None for none. `method_groups`: method ->
    the group its `@method(concurrency_group=...)` names, each of which must be one."""
    if groups is not None and not isinstance(groups, dict):
        raise TypeError(f"concurrency_groups of actor {class_name} must be a dict of group "
                        f"name to its max concurrency, got {type(groups).__name__}.")
    checked = {}
    for name, size in (groups or {}).items():
        if not isinstance(name, str):
            raise TypeError(f"A concurrency group's name must be a str, got {name!r} "
                            f"(actor {class_name}).")
        if not isinstance(size, (int, float)):  # Ray takes 2.0 (and 2.5, as 2)
            raise TypeError(f"The max concurrency of concurrency group {name!r} of actor "
                            f"{class_name} must be an int, got {size!r}.")
        if size < 1:
            raise ValueError(f"The max concurrency of concurrency group {name!r} of actor "
                             f"{class_name} must be >= 1, got {size!r}.")
        checked[name] = int(size)
    for method_name, group in method_groups.items():
        if group not in checked:
            raise ValueError(f"Method {class_name}.{method_name} is in concurrency group "
                             f"{group!r}, which the actor does not define: its "
                             f"concurrency_groups are {sorted(checked)}.")
    return checked or None


def backpressure_of(options: dict) -> int | None:
    """`_generator_backpressure_num_objects` (Ray's): how many items a streaming
    generator task may have yielded and not yet taken by its consumer before it pauses;
    None (or -1, as in Ray): no limit."""
    limit = options.get("_generator_backpressure_num_objects")
    if limit is None or limit == -1:
        return None
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < -1:
        raise ValueError("_generator_backpressure_num_objects must be an int >= 1 (or -1: "
                         f"no limit), got {limit!r}.")
    if limit == 0:
        raise ValueError("_generator_backpressure_num_objects=0 is not allowed.")
    return limit


def actor_backpressure_of(options: dict) -> int | None:
    """`_actor_generator_backpressure_num_objects` (Ray's): how many items, of all the
    streaming generator methods running on the actor, may be yielded and not yet taken
    by their consumers (runtime/generator_budget.py); None (or -1): no limit."""
    limit = options.get("_actor_generator_backpressure_num_objects")
    if limit is None or limit == -1:
        return None
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError("_actor_generator_backpressure_num_objects must be > 0 to cap the "
                         "actor's total unconsumed generator objects, or -1 to disable. "
                         f"Got {limit!r}.")
    return limit


def demand_of(options: dict, default_cpus: float) -> dict:
    """The resources a task or actor holds while it runs, Ray's way."""
    num_cpus = options.get("num_cpus")
    demand = {"CPU": float(default_cpus if num_cpus is None else num_cpus)}
    if options.get("num_gpus"):
        demand["GPU"] = float(options["num_gpus"])
    if options.get("memory"):
        demand["memory"] = float(options["memory"])
    for name, amount in (options.get("resources") or {}).items():
        if amount:
            demand[name] = float(amount)
    if not demand["CPU"]:
        del demand["CPU"]
    return demand


# Exception classes named in retry_exceptions -> their cloudpickle (see retry_exceptions_of).
_pickled_retry_exceptions: dict = {}


def retry_exceptions_of(options: dict):
    """retry_exceptions as a TaskSpec carries it: True/False, or the list of exception
    classes pickled with cloudpickle (classes of the driver's script travel by value;
    plain pickle would name `__main__`, which a worker has not got). Cached: the same
    list pickles once."""
    value = options.get("retry_exceptions", False)
    if isinstance(value, bool):
        return value
    key = tuple(value)
    if not key:
        return False
    pickled = _pickled_retry_exceptions.get(key)
    if pickled is None:
        import cloudpickle
        pickled = _pickled_retry_exceptions[key] = cloudpickle.dumps(key, protocol=5)
    return pickled


SPREAD = "SPREAD"


class _Strategy(tuple):
    """A strategy record: a tuple (kind, *fields), which is how the Cython global
    scheduler reads it, pickled as its class and fields."""

    __slots__ = ()

    def __reduce__(self):
        return (type(self), tuple(self[1:]))


class NodeAffinity(_Strategy):
    """NodeAffinitySchedulingStrategy as the schedulers take it: run on node `rank`
    (`soft`: or elsewhere if it cannot). A tuple ("node", rank, soft) underneath, which
    is how the Cython global scheduler reads it."""

    __slots__ = ()

    def __new__(cls, rank: int, soft: bool):
        return tuple.__new__(cls, ("node", rank, soft))

    @property
    def rank(self) -> int:
        return self[1]

    @property
    def soft(self) -> bool:
        return self[2]

    def on(self, rank: int) -> bool:
        return self[1] == rank


class InGroup(_Strategy):
    """PlacementGroupSchedulingStrategy as the runtime takes it: run in bundle `index`
    (-1: any) of placement group `group_id`; `capture`: what runs there puts its own
    children into the group too. A tuple ("group", group_id, index, capture)."""

    __slots__ = ()

    def __new__(cls, group_id: bytes, index: int, capture: bool):
        return tuple.__new__(cls, ("group", group_id, index, capture))

    @property
    def group_id(self) -> bytes:
        return self[1]

    @property
    def index(self) -> int:
        return self[2]

    @property
    def capture(self) -> bool:
        return self[3]


BUNDLE_RESOURCE = "bundle"      # every bundle has 1000 of it (Ray's marker resource)
BUNDLE_MARKER_UNITS = 1000.0
_MARKER_DEMAND = 0.001          # what each task asks of it: even a 0-CPU task lands there


def group_resource(name: str, group_hex: str, index: int = -1) -> str:
    """Ray's name of a group's share of `name`: `CPU_group_<i>_<id>` for bundle i, and
    `CPU_group_<id>` for the group as a whole (any bundle)."""
    if index < 0:
        return f"{name}_group_{group_hex}"
    return f"{name}_group_{index}_{group_hex}"


def demand_in_group(demand: dict, strategy: InGroup) -> dict:
    """A demand renamed into the group's resources, as Ray does: only the node holding
    the bundle has them, so the schedulers keep the task there and nowhere else."""
    group_hex = strategy.group_id.hex()
    index = strategy.index
    renamed = {}
    for name, amount in {**demand, BUNDLE_RESOURCE: _MARKER_DEMAND}.items():
        renamed[group_resource(name, group_hex)] = amount
        if index >= 0:
            renamed[group_resource(name, group_hex, index)] = amount
    return renamed


def strategy_of(options: dict, group: InGroup | None = None):
    """The scheduling strategy in the form the schedulers take: None (DEFAULT), SPREAD,
    a NodeAffinity or an InGroup. `group`: the group the caller runs in (context.group),
    which an unspecified strategy joins when it captures child tasks, as in Ray."""
    strategy = options.get("scheduling_strategy")
    if strategy is None:
        if group is None and "placement_group" not in options:
            return None  # the common case first: a plain task's submission pays this only
        legacy = options.get("placement_group", "default")
        if legacy == "default":  # a captured child may use any bundle of the group
            if group is not None and group.capture:
                return InGroup(group.group_id, -1, True)
            return None
        if legacy is None:
            return None
        return _in_group(legacy, options.get("placement_group_bundle_index", -1),
                         options.get("placement_group_capture_child_tasks"))
    if strategy == "DEFAULT":
        return None
    if strategy == SPREAD:
        return SPREAD
    if hasattr(strategy, "placement_group_bundle_index"):
        if strategy.placement_group is None:  # Ray's way to opt out of capturing
            return None
        return _in_group(strategy.placement_group, strategy.placement_group_bundle_index,
                         strategy.placement_group_capture_child_tasks)
    node_id = getattr(strategy, "node_id", None)
    if node_id is not None:
        try:
            rank = int(str(node_id)[:8], 16)
        except ValueError:
            raise ValueError(f"NodeAffinitySchedulingStrategy got an unknown node id "
                             f"{node_id!r}; use a NodeID from hpcray.nodes().") from None
        return NodeAffinity(rank, bool(strategy.soft))
    raise ValueError(f"Unknown scheduling_strategy {strategy!r}: use 'DEFAULT', 'SPREAD', "
                     "NodeAffinitySchedulingStrategy or PlacementGroupSchedulingStrategy.")


def _in_group(group, index, capture) -> InGroup:
    index = -1 if index is None else index
    bundles = group.bundle_specs
    count = len(bundles)
    if not isinstance(index, int) or not -1 <= index < count:
        raise ValueError(f"Invalid placement_group_bundle_index {index!r}: the placement "
                         f"group has {count} bundles (use -1 for any, or 0 to {count - 1}).")
    _group_bundles[group.id.binary()] = bundles
    return InGroup(group.id.binary(), index, bool(capture))


# Group id -> its bundles (they never change), for check_fits_group.
_group_bundles: dict = {}


def check_fits_group(strategy: InGroup, demand: dict, what: str,
                     creation: dict | None = None) -> None:
    """Refuse at the call, as Ray does, a task or actor that no bundle of its group can
    hold: it would wait forever. `creation`: what an actor needs to be placed, when more
    than it holds while it runs (Ray places a default actor with 1 CPU). Stricter than
    Ray on one point: a named bundle (index >= 0) must hold it, not just any bundle."""
    bundles = _group_bundles.get(strategy.group_id)
    if bundles is None:  # a captured child's group, known by id only
        from hpcray.util.placement_group import PlacementGroup, PlacementGroupID
        bundles = PlacementGroup(PlacementGroupID(strategy.group_id)).bundle_specs
        _group_bundles[strategy.group_id] = bundles
    if not bundles:  # removed or unknown: its tasks fail at the node, as in Ray
        return
    index = strategy.index
    candidates = bundles if index < 0 else [bundles[index]]
    where = "any bundles for the placement group" if index < 0 else \
        f"bundle {index} of the placement group"
    if not _fits_one(demand, candidates):
        raise ValueError(f"Cannot schedule {what} with the placement group because the "
                         f"resource request {_shown(demand)} cannot fit into {where}, "
                         f"{bundles}.")
    if creation is not None and not _fits_one(creation, candidates):
        raise ValueError(f"Cannot schedule {what} with the placement group because the "
                         f"actor requires {_shown(creation).get('CPU', 0)} CPU for creation, "
                         f"but it cannot fit into {where}, {bundles}. Consider creating a "
                         "placement group with CPU resources.")


def _fits_one(demand: dict, bundles: list) -> bool:
    return any(all(bundle.get(name, 0) >= amount for name, amount in demand.items()
                   if name != BUNDLE_RESOURCE) for bundle in bundles)


def _shown(demand: dict) -> dict:
    return {name: int(amount) if float(amount).is_integer() else amount
            for name, amount in demand.items()}
