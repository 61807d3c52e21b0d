"""The rows of Ray's state API (`ray.util.state.common`) and how filters apply to them.

Each row class has Ray's field names, in Ray's order, and says which of them Ray lets
a filter name (`FILTERABLE`) and which it fills only for `detail=True` (`DETAIL`; they
are None otherwise). Fields Ray has no use for here stay None (placement groups,
runtime envs, the debugger); the few hpcray adds (`rank`, `owner_node_id`, `node_id` of
an object reference) come last. Rows are also readable as dicts (`row["state"]`).

Filters are Ray's: [(column, "=" or "!=", value)], all of them must hold; a string
column compares without regard to case, a bool or int column converts the value first
("true", "3"); a column that cannot be filtered raises RayStateApiException, an
unknown predicate ValueError, with Ray's messages.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from hpcray.util.state.exception import RayStateApiException

DEFAULT_LIMIT = 100
DEFAULT_LOG_LIMIT = 1000


class StateSchema:
    FILTERABLE: frozenset = frozenset()
    DETAIL: frozenset = frozenset()

    def __getitem__(self, key: str):
        return getattr(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key, default)

    def asdict(self) -> dict:
        return asdict(self)

    @classmethod
    def filterable_columns(cls) -> set:
        return set(cls.FILTERABLE)

    @classmethod
    def detail_columns(cls) -> set:
        return {f.name for f in fields(cls)}

    @classmethod
    def base_columns(cls) -> set:
        return {f.name for f in fields(cls)} - cls.DETAIL


@dataclass(frozen=True)
class TaskState(StateSchema):
    """One row of list_tasks(). `node_id` is the node that ran it last (None while it
    has not run); `owner_node_id` (hpcray's) the node it was submitted on, which owns
    its returns; `task_log_info` names its worker's files in the job's log folder."""

    task_id: str
    attempt_number: int
    name: str
    state: str
    job_id: str
    actor_id: str | None
    type: str  # NORMAL_TASK, ACTOR_CREATION_TASK or ACTOR_TASK
    func_or_class_name: str
    parent_task_id: str | None
    node_id: str | None
    worker_id: str | None
    worker_pid: int | None
    error_type: str | None
    language: str | None = None
    required_resources: dict | None = None
    runtime_env_info: dict | None = None
    placement_group_id: str | None = None
    events: list | None = None
    profiling_data: dict | None = None
    creation_time_ms: int | None = None
    start_time_ms: int | None = None
    end_time_ms: int | None = None
    task_log_info: dict | None = None
    error_message: str | None = None
    is_debugger_paused: bool | None = None
    call_site: str | None = None
    label_selector: dict | None = None
    fallback_strategy: dict | None = None
    owner_node_id: str | None = None

    FILTERABLE = frozenset({
        "task_id", "attempt_number", "name", "state", "job_id", "actor_id", "type",
        "func_or_class_name", "parent_task_id", "node_id", "worker_id", "worker_pid",
        "error_type", "language", "placement_group_id", "is_debugger_paused"})
    DETAIL = frozenset({
        "language", "required_resources", "runtime_env_info", "placement_group_id",
        "events", "profiling_data", "creation_time_ms", "start_time_ms", "end_time_ms",
        "task_log_info", "error_message", "is_debugger_paused", "call_site",
        "label_selector", "fallback_strategy"})


@dataclass(frozen=True)
class ActorState(StateSchema):
    """One row of list_actors(). `death_cause` (detail) says why a DEAD actor died, as
    text."""

    actor_id: str
    class_name: str
    state: str  # DEPENDENCIES_UNREADY, PENDING_CREATION, ALIVE, RESTARTING, DEAD
    job_id: str
    name: str
    node_id: str | None
    pid: int | None
    ray_namespace: str | None
    serialized_runtime_env: str | None = None
    required_resources: dict | None = None
    death_cause: str | None = None
    is_detached: bool | None = None
    placement_group_id: str | None = None
    repr_name: str | None = None
    num_restarts: int | None = None
    num_restarts_due_to_lineage_reconstruction: int | None = None
    num_restarts_due_to_node_preemption: int | None = None
    call_site: str | None = None
    label_selector: dict | None = None
    fallback_strategy: dict | None = None

    FILTERABLE = frozenset({"actor_id", "class_name", "state", "job_id", "name", "node_id",
                            "pid", "ray_namespace", "placement_group_id", "repr_name"})
    DETAIL = frozenset({"serialized_runtime_env", "required_resources", "death_cause",
                        "is_detached", "placement_group_id", "repr_name", "num_restarts",
                        "num_restarts_due_to_lineage_reconstruction",
                        "num_restarts_due_to_node_preemption", "call_site", "label_selector",
                        "fallback_strategy"})


@dataclass(frozen=True)
class NodeState(StateSchema):
    """One row of list_nodes(); `rank` (the MPI rank that is this node) is hpcray's."""

    node_id: str
    node_ip: str
    is_head_node: bool
    state: str  # ALIVE or DEAD
    state_message: str | None
    node_name: str
    resources_total: dict
    labels: dict
    start_time_ms: int | None = None
    end_time_ms: int | None = None
    rank: int | None = None

    FILTERABLE = frozenset({"node_id", "node_ip", "is_head_node", "state", "node_name"})
    DETAIL = frozenset({"start_time_ms", "end_time_ms"})


@dataclass(frozen=True)
class WorkerState(StateSchema):
    """One row of list_workers(): a worker process (a task pool worker or an actor's),
    live or ended, or the driver. `exit_type` (once it ended and its node reaped it):
    SYSTEM_ERROR (killed by a signal, non-zero status), INTENDED_SYSTEM_EXIT (retired,
    stopped), INTENDED_USER_EXIT (kill(), cancel(force=True), sys.exit in a task)."""

    worker_id: str
    is_alive: bool
    worker_type: str  # WORKER or DRIVER
    exit_type: str | None
    node_id: str
    ip: str
    pid: int | None
    exit_detail: str | None = None
    worker_launch_time_ms: int | None = None
    worker_launched_time_ms: int | None = None
    start_time_ms: int | None = None
    end_time_ms: int | None = None
    debugger_port: int | None = None
    num_paused_threads: int | None = None

    FILTERABLE = frozenset({"worker_id", "is_alive", "worker_type", "exit_type", "node_id",
                            "ip", "pid", "debugger_port", "num_paused_threads"})
    DETAIL = frozenset({"exit_detail", "worker_launch_time_ms", "worker_launched_time_ms",
                        "start_time_ms", "end_time_ms", "debugger_port",
                        "num_paused_threads"})


@dataclass(frozen=True)
class ObjectState(StateSchema):
    """One row of list_objects(), one per reference as in Ray: per process that holds the
    object (pid, type DRIVER or WORKER, LOCAL_REFERENCE), and per node where only a
    pending task's arguments (USED_BY_PENDING_TASK) or another value
    (CAPTURED_IN_OBJECT) hold it. `node_id` (the node of the reference) and
    `owner_node_id` are hpcray's; object_size is None until the value exists."""

    object_id: str
    object_size: int | None
    task_status: str  # FINISHED, PENDING, or NIL for a put
    attempt_number: int  # 0: hpcray counts no attempts per object (list_tasks' is 0 too)
    reference_type: str
    call_site: str
    type: str | None
    pid: int | None
    ip: str
    node_id: str | None = None
    owner_node_id: str | None = None

    FILTERABLE = frozenset({"object_id", "object_size", "task_status", "attempt_number",
                            "reference_type", "call_site", "type", "pid", "ip"})


@dataclass(frozen=True)
class PlacementGroupState(StateSchema):
    """One row of list_placement_groups(). `state`: PENDING, CREATED, REMOVED, or
    RESCHEDULING (some bundles were on a lost rank and are being placed again). `bundles`
    (detail): Ray's [{"bundle_id": {"placement_group_id", "bundle_index"},
    "unit_resources", "node_id"}], node_id None until created; `stats` (detail): Ray's
    creation latency, attempts and scheduling state."""

    placement_group_id: str
    name: str
    creator_job_id: str
    state: str
    bundles: list | None = None
    is_detached: bool | None = None
    stats: dict | None = None
    topology_strategy: dict | None = None
    topology_assignments: dict | None = None

    FILTERABLE = frozenset({"placement_group_id", "name", "creator_job_id", "state",
                            "is_detached"})
    DETAIL = frozenset({"bundles", "is_detached", "stats", "topology_strategy",
                        "topology_assignments"})


_PREDICATES = ("=", "!=")


def check_filters(row_class: type, filters) -> list:
    """The filters as [(column, equal?, value)], or Ray's error for a bad one."""
    checks = []
    for column, predicate, value in filters or []:
        if predicate not in _PREDICATES:
            raise ValueError(f"Unsupported filter predicate {predicate} is given. "
                             "Available predicates: =, !=.")
        column = column.lower()
        if column not in row_class.FILTERABLE:
            raise RayStateApiException(
                f"The given filter column {column} is not supported. Enter filters with "
                "--filter key=value or --filter key!=value. Supported filter columns: "
                f"{sorted(row_class.FILTERABLE)}")
        checks.append((column, predicate == "=", value))
    return checks


def keep(row, checks: list) -> bool:
    """Whether `row` passes every filter of check_filters."""
    for column, equal, value in checks:
        if _matches(getattr(row, column), value) != equal:
            return False
    return True


def _matches(have, want) -> bool:
    if isinstance(want, str):
        if isinstance(have, str):
            return have.lower() == want.lower()
        if isinstance(have, bool):
            return have == (want.lower() in ("true", "1", "yes"))
        if isinstance(have, int):
            try:
                return have == int(want)
            except ValueError:
                return False
    return have == want


def limited(rows, checks: list, limit: int) -> list:
    """The first `limit` rows that pass the filters."""
    kept = []
    for row in rows:
        if keep(row, checks):
            kept.append(row)
            if len(kept) >= limit:
                break
    return kept
