"""Checking `@remote(...)` and `.options(...)` arguments, and turning them into demands."""

from __future__ import annotations

TASK_OPTIONS = {"num_cpus", "num_gpus", "resources", "memory", "num_returns", "max_retries",
                "retry_exceptions", "name", "scheduling_strategy", "runtime_env",
                "accelerator_type", "placement_group", "_metadata", "label_selector",
                "max_calls"}
# num_returns of a generator task (runtime/generators.py); a generator function's default
GENERATOR_RETURNS = ("streaming", "dynamic")
ACTOR_OPTIONS = {"num_cpus", "num_gpus", "resources", "memory", "name", "namespace",
                 "lifetime", "max_restarts", "max_task_retries", "max_concurrency",
                 "scheduling_strategy", "runtime_env", "get_if_exists", "accelerator_type",
                 "concurrency_groups", "max_pending_calls", "placement_group", "label_selector"}


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
    lifetime = options.get("lifetime")
    if lifetime not in (None, "detached", "non_detached"):
        raise ValueError(f"lifetime must be 'detached' or 'non_detached', got {lifetime!r}.")
    return options


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


class NodeAffinity(tuple):
    """NodeAffinitySchedulingStrategy as the schedulers take it: run on node `rank`
    (`soft`: or elsewhere if it cannot). A tuple ("node", rank, soft) underneath, which
    is how the Cython global scheduler reads it."""

    __slots__ = ()

    def __new__(cls, rank: int, soft: bool):
        return tuple.__new__(cls, ("node", rank, soft))

    def __reduce__(self):
        return (NodeAffinity, (self[1], self[2]))

    @property
    def rank(self) -> int:
        return self[1]

    @property
    def soft(self) -> bool:
        return self[2]

    def on(self, rank: int) -> bool:
        return self[1] == rank


def strategy_of(options: dict):
    """The scheduling strategy in the form the schedulers take: None (DEFAULT), SPREAD,
    or a NodeAffinity."""
    strategy = options.get("scheduling_strategy")
    if strategy is None or strategy == "DEFAULT":
        return None
    if strategy == SPREAD:
        return SPREAD
    node_id = getattr(strategy, "node_id", None)
    if node_id is not None:
        try:
            rank = int(str(node_id)[:8], 16)
        except ValueError:
            raise ValueError(f"NodeAffinitySchedulingStrategy got an unknown node id "
                             f"{node_id!r}; use a NodeID from hpcray.nodes().") from None
        return NodeAffinity(rank, bool(strategy.soft))
    raise ValueError(f"Unknown scheduling_strategy {strategy!r}: use 'DEFAULT', 'SPREAD' or "
                     "NodeAffinitySchedulingStrategy.")
