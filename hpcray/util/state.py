"""Ray's state API, as `ray.util.state`: the job's tasks, actors, nodes and objects.

Where each comes from (runtime/state_queries.py): tasks, actors and nodes from the GCS
tables, objects from every node's references. Each call answers across every node of
the job, on one node too (a cluster of one), from the driver or from a task.

Tasks: normal tasks, actor creations and actor calls. The GCS keeps a task while some
process may still ask for its returns (its lineage) and, after that, what it showed,
for the last 10,000 such tasks per GCS shard; each node keeps the actor calls it owns,
the last 10,000 that ended (Ray also keeps finished tasks up to a limit). States:
PENDING (submitted, waiting for arguments or a worker), RUNNING, FINISHED, FAILED (as
in Ray 2.x: it raised, was cancelled, or the system failed it; `error_type` says which:
TASK_EXECUTION_EXCEPTION, TASK_CANCELLED, WORKER_DIED, ACTOR_DIED,
TASK_UNSCHEDULABLE_ERROR, ...). The GCS table is written in batches, every 0.1 s per
node (task_events.py): what another node did shows up that much later, so a test polls
with a deadline.

Rows are dataclasses with Ray's field names, also readable as dicts (`row["state"]`);
`filters` are Ray's [(field, "=" or "!=", value)], values compared as strings; `limit`
caps the rows; `detail=True` fills the fields Ray fills only then. `address`, `timeout`,
`raise_on_missing_output` and `_explain` are Ray's and change nothing here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from hpcray import context

__all__ = ["ActorState", "NodeState", "ObjectState", "TaskState", "list_actors",
           "list_nodes", "list_objects", "list_tasks", "summarize_tasks"]

_PREDICATES = {"=": lambda a, b: a == b, "!=": lambda a, b: a != b}
_LANGUAGE = "PYTHON"


class _Row:
    def __getitem__(self, key: str):
        return getattr(self, key)

    def asdict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TaskState(_Row):
    """One row of list_tasks(): Ray's TaskState fields. `detail=True` fills language,
    required_resources and the times (ms since the epoch); `owner_node_id` (the node
    the task was submitted on, which owns its returns) is hpcray's."""

    task_id: str
    attempt_number: int
    name: str
    state: str
    job_id: str
    actor_id: str | None
    type: str  # NORMAL_TASK, ACTOR_CREATION_TASK or ACTOR_TASK
    func_or_class_name: str
    parent_task_id: str | None
    node_id: str | None  # the node that ran it last (None while it has not run)
    worker_id: str | None
    worker_pid: int | None
    error_type: str | None
    owner_node_id: str | None
    language: str | None = None
    required_resources: dict | None = None
    creation_time_ms: int | None = None
    start_time_ms: int | None = None
    end_time_ms: int | None = None
    error_message: str | None = None
    placement_group_id: str | None = None


@dataclass(frozen=True)
class ActorState(_Row):
    """One row of list_actors(): Ray's ActorState fields. `detail=True` fills
    death_cause (why a DEAD actor died, as text)."""

    actor_id: str
    class_name: str
    state: str  # DEPENDENCIES_UNREADY, PENDING_CREATION, ALIVE, RESTARTING, DEAD
    job_id: str
    name: str
    node_id: str | None
    pid: int | None
    ray_namespace: str | None
    serialized_runtime_env: str | None
    required_resources: dict | None
    death_cause: str | None
    is_detached: bool
    placement_group_id: str | None
    repr_name: str
    num_restarts: int


@dataclass(frozen=True)
class NodeState(_Row):
    """One row of list_nodes(): Ray's NodeState fields; `rank` (the MPI rank that is
    this node) is hpcray's."""

    node_id: str
    node_ip: str
    is_head_node: bool
    state: str  # ALIVE or DEAD
    state_message: str | None
    node_name: str
    resources_total: dict
    labels: dict
    rank: int


@dataclass(frozen=True)
class ObjectState(_Row):
    """One row of list_objects(): Ray's ObjectState fields, one per reference as in Ray:
    per process that holds the object (pid, type DRIVER or WORKER, LOCAL_REFERENCE),
    and per node where only a pending task's arguments (USED_BY_PENDING_TASK) or
    another value (CAPTURED_IN_OBJECT) hold it. `node_id` (the node of the reference)
    and `owner_node_id` are hpcray's; object_size is None until the value exists."""

    object_id: str
    pid: int | None
    ip: str
    call_site: str
    task_status: str  # FINISHED, PENDING, or NIL for a put
    type: str | None
    reference_type: str
    object_size: int | None
    node_id: str | None
    owner_node_id: str | None


def list_tasks(address: str | None = None, filters: list | None = None, limit: int = 100,
               timeout: int = 30, detail: bool = False,
               raise_on_missing_output: bool = True, _explain: bool = False
               ) -> list[TaskState]:
    """The tasks of this job (normal tasks, actor creations, actor calls), oldest first."""
    checks = _checks(TaskState, filters)
    client = context.get_client()
    node_ids = _node_ids(client)
    job_id = client.job_id.hex()
    rows = []
    for (task_id, name, state, owner, ran_on, kind, actor_id, parent, demand, created,
         started, ended, pid, error_type) in sorted(client.list_state("tasks"),
                                                    key=_task_order):
        row = TaskState(
            task_id=task_id.hex(), attempt_number=0, name=name or "", state=state,
            job_id=job_id, actor_id=actor_id.hex() if actor_id else None, type=kind,
            func_or_class_name=name or "", parent_task_id=parent.hex() if parent else None,
            node_id=node_ids.get(ran_on), worker_id=None, worker_pid=pid,
            error_type=error_type, owner_node_id=node_ids.get(owner),
            **(dict(language=_LANGUAGE, required_resources=dict(demand or {}),
                    creation_time_ms=created, start_time_ms=started, end_time_ms=ended)
               if detail else {}))
        if _keep(row, checks):
            rows.append(row)
            if len(rows) >= limit:
                break
    return rows


def list_actors(address: str | None = None, filters: list | None = None, limit: int = 100,
                timeout: int = 30, detail: bool = False,
                raise_on_missing_output: bool = True, _explain: bool = False
                ) -> list[ActorState]:
    """The actors of this job, live and dead, from the GCS actors table."""
    checks = _checks(ActorState, filters)
    client = context.get_client()
    node_ids = _node_ids(client)
    job_id = client.job_id.hex()
    rows = []
    for actor_id, info in sorted(client.list_state("actors"), key=lambda row: row[0]):
        row = ActorState(
            actor_id=actor_id.hex(), class_name=info.class_name, state=info.state,
            job_id=job_id, name=info.name or "", node_id=node_ids.get(info.node),
            pid=info.pid, ray_namespace=None, serialized_runtime_env=None,
            required_resources=None, death_cause=info.death_cause if detail else None,
            is_detached=bool(info.info.get("detached")), placement_group_id=None,
            repr_name="", num_restarts=info.restarts)
        if _keep(row, checks):
            rows.append(row)
            if len(rows) >= limit:
                break
    return rows


def list_nodes(address: str | None = None, filters: list | None = None, limit: int = 100,
               timeout: int = 30, detail: bool = False,
               raise_on_missing_output: bool = True, _explain: bool = False
               ) -> list[NodeState]:
    """The nodes of this job (one per rank) from the GCS nodes table; rank 0, where the
    driver runs, is the head node."""
    checks = _checks(NodeState, filters)
    client = context.get_client()
    described = {node["rank"]: node for node in client.nodes()}
    rows = []
    for info in client.list_state("nodes"):
        node = described.get(info.rank, {})
        row = NodeState(
            node_id=node.get("NodeID", ""), node_ip=node.get("NodeManagerAddress", ""),
            is_head_node=info.rank == 0, state="ALIVE" if info.alive else "DEAD",
            state_message=None, node_name=node.get("NodeName", ""),
            resources_total=dict(info.resources), labels={}, rank=info.rank)
        if _keep(row, checks):
            rows.append(row)
            if len(rows) >= limit:
                break
    return rows


def list_objects(address: str | None = None, filters: list | None = None, limit: int = 100,
                 timeout: int = 30, detail: bool = False,
                 raise_on_missing_output: bool = True, _explain: bool = False
                 ) -> list[ObjectState]:
    """The references to objects that the processes and pending tasks of every node
    hold, one row per reference (as Ray)."""
    checks = _checks(ObjectState, filters)
    client = context.get_client()
    described = {node["rank"]: node for node in client.nodes()}
    rows = []
    for (object_id, size, status, owner, rank, pid, kind,
         reference_type) in sorted(client.list_state("objects"),
                                   key=lambda row: (row[0], row[4], row[5] or 0)):
        node = described.get(rank, {})
        row = ObjectState(
            object_id=object_id.hex(), pid=pid, ip=node.get("NodeManagerAddress", ""),
            call_site="disabled", task_status=status, type=kind,
            reference_type=reference_type, object_size=size, node_id=node.get("NodeID"),
            owner_node_id=described.get(owner, {}).get("NodeID"))
        if _keep(row, checks):
            rows.append(row)
            if len(rows) >= limit:
                break
    return rows


def summarize_tasks(address: str | None = None, timeout: int = 30,
                    raise_on_missing_output: bool = True, _explain: bool = False) -> dict:
    """Ray's task summary: per function or class name, its type and how many tasks are
    in each state; totals of normal tasks, actor calls and actors created."""
    summary: dict[str, dict] = {}
    totals = {"NORMAL_TASK": 0, "ACTOR_TASK": 0, "ACTOR_CREATION_TASK": 0}
    for task in list_tasks(limit=2**62):
        entry = summary.setdefault(task.func_or_class_name, {
            "func_or_class_name": task.func_or_class_name, "type": task.type,
            "state_counts": {}})
        entry["state_counts"][task.state] = entry["state_counts"].get(task.state, 0) + 1
        totals[task.type] = totals.get(task.type, 0) + 1
    return {"cluster": {"summary": summary, "total_tasks": totals["NORMAL_TASK"],
                        "total_actor_tasks": totals["ACTOR_TASK"],
                        "total_actor_scheduled": totals["ACTOR_CREATION_TASK"],
                        "summary_by": "func_name"}}


def _checks(row_class: type, filters: list | None) -> list:
    names = {field.name for field in fields(row_class)}
    checks = []
    for key, predicate, value in filters or []:
        if predicate not in _PREDICATES:
            raise ValueError(f"Unsupported filter predicate {predicate!r}; use '=' or '!='.")
        if key not in names:
            what = row_class.__name__.removesuffix("State").lower()
            raise ValueError(f"Unknown {what} field {key!r} in filters; fields are "
                             f"{sorted(names)}.")
        checks.append((key, _PREDICATES[predicate], str(value)))
    return checks


def _keep(row, checks: list) -> bool:
    return all(check(str(row[key]), value) for key, check, value in checks)


def _node_ids(client) -> dict:
    return {node["rank"]: node["NodeID"] for node in client.nodes()}


def _task_order(row: tuple):
    # Submission order where it is known (the creation time), then the id.
    return (row[9] if row[9] is not None else float("inf"), row[0])
