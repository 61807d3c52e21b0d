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

Workers: every node's worker processes, live and ended, and the driver. Logs
(`get_log`, `list_logs`): the files of the job's log folder (runtime/job_logs.py), read
by the calling process: the folder is where the job was submitted, which every node of
a cluster sees (a shared file system).

Rows (common.py) are dataclasses with Ray's field names, also readable as dicts
(`row["state"]`); `filters` are Ray's [(column, "=" or "!=", value)] on the columns Ray
lets a filter name; `limit` caps the rows (Ray's default 100); `detail=True` fills the
fields Ray fills only then. Summaries are Ray's `{"cluster": {...}}`. `address`,
`timeout`, `raise_on_missing_output` and `_explain` are Ray's and change nothing here.
"""

from __future__ import annotations

import fnmatch
import os
import time

from hpcray import context
from hpcray.object_ref import ObjectRef
from hpcray.runtime import task_output
from hpcray.runtime.job_logs import worker_file
from hpcray.util.state.common import (DEFAULT_LIMIT, ActorState, NodeState, ObjectState,
                                      PlacementGroupState, TaskState, WorkerState,
                                      check_filters, limited)
from hpcray.util.state.exception import RayStateApiException

__all__ = ["ActorState", "NodeState", "ObjectState", "PlacementGroupState",
           "RayStateApiException", "TaskState", "WorkerState", "get_actor", "get_log",
           "get_node", "get_objects", "get_placement_group", "get_task", "get_worker",
           "list_actors", "list_logs", "list_nodes", "list_objects",
           "list_placement_groups", "list_tasks", "list_workers", "object_store_stats",
           "summarize_actors", "summarize_objects", "summarize_tasks"]

_LANGUAGE = "PYTHON"


def list_tasks(address: str | None = None, filters: list | None = None,
               limit: int = DEFAULT_LIMIT, timeout: int = 30, detail: bool = False,
               raise_on_missing_output: bool = True, _explain: bool = False
               ) -> list[TaskState]:
    """The tasks of this job (normal tasks, actor creations, actor calls), oldest first."""
    checks = check_filters(TaskState, filters)
    client = context.get_client()
    nodes = _nodes(client)
    job_id = client.job_id.hex()
    return limited((_task_row(row, nodes, job_id, detail)
                    for row in sorted(client.list_state("tasks"), key=_task_order)),
                   checks, limit)


def _task_row(row: tuple, nodes: dict, job_id: str, detail: bool) -> TaskState:
    (task_id, name, state, owner, ran_on, kind, actor_id, parent, demand, created,
     started, ended, pid, error_type) = row
    extra = {}
    if detail:
        events = [{"state": "PENDING_ARGS_AVAIL", "created_ms": created}]
        if started is not None:
            events.append({"state": "RUNNING", "created_ms": started})
        if ended is not None and state in ("FINISHED", "FAILED"):
            events.append({"state": state, "created_ms": ended})
        # no call site is recorded (None); no node has labels, so no selector ({})
        extra = dict(language=_LANGUAGE, required_resources=dict(demand or {}),
                     label_selector={}, events=events, creation_time_ms=created,
                     start_time_ms=started, end_time_ms=ended, task_log_info=(
                         None if pid is None or ran_on is None else
                         {"stdout_file": worker_file(ran_on, pid, "out"),
                          "stderr_file": worker_file(ran_on, pid, "err")}))
    return TaskState(
        task_id=task_id.hex(), attempt_number=0, name=name or "", state=state,
        job_id=job_id, actor_id=actor_id.hex() if actor_id else None, type=kind,
        func_or_class_name=name or "", parent_task_id=parent.hex() if parent else None,
        node_id=_node_id(nodes, ran_on), worker_id=None, worker_pid=pid,
        error_type=error_type, owner_node_id=_node_id(nodes, owner), **extra)


def list_actors(address: str | None = None, filters: list | None = None,
                limit: int = DEFAULT_LIMIT, timeout: int = 30, detail: bool = False,
                raise_on_missing_output: bool = True, _explain: bool = False
                ) -> list[ActorState]:
    """The actors of this job, live and dead, from the GCS actors table."""
    checks = check_filters(ActorState, filters)
    client = context.get_client()
    nodes = _nodes(client)
    job_id = client.job_id.hex()
    return limited((_actor_row(actor_id, info, nodes, job_id, detail) for actor_id, info
                    in sorted(client.list_state("actors"), key=lambda row: row[0])),
                   checks, limit)


def _actor_row(actor_id: bytes, info, nodes: dict, job_id: str, detail: bool) -> ActorState:
    extra = {}
    if detail:
        extra = dict(death_cause=info.death_cause, is_detached=bool(info.info.get("detached")),
                     repr_name="", num_restarts=info.restarts,
                     num_restarts_due_to_lineage_reconstruction=0,
                     num_restarts_due_to_node_preemption=0, label_selector={})
    return ActorState(actor_id=actor_id.hex(), class_name=info.class_name, state=info.state,
                      job_id=job_id, name=info.name or "", node_id=_node_id(nodes, info.node),
                      pid=info.pid, ray_namespace=None, **extra)


def list_nodes(address: str | None = None, filters: list | None = None,
               limit: int = DEFAULT_LIMIT, timeout: int = 30, detail: bool = False,
               raise_on_missing_output: bool = True, _explain: bool = False
               ) -> list[NodeState]:
    """The nodes of this job (one per rank) from the GCS nodes table; rank 0, where the
    driver runs, is the head node."""
    checks = check_filters(NodeState, filters)
    client = context.get_client()
    nodes = _nodes(client)
    return limited((NodeState(
        node_id=nodes.get(info.rank, {}).get("NodeID", ""),
        node_ip=nodes.get(info.rank, {}).get("NodeManagerAddress", ""),
        is_head_node=info.rank == 0, state="ALIVE" if info.alive else "DEAD",
        state_message=None, node_name=nodes.get(info.rank, {}).get("NodeName", ""),
        resources_total=dict(info.resources), labels={}, rank=info.rank)
        for info in client.list_state("nodes")), checks, limit)


def list_placement_groups(address: str | None = None, filters: list | None = None,
                          limit: int = DEFAULT_LIMIT, timeout: int = 30, detail: bool = False,
                          raise_on_missing_output: bool = True, _explain: bool = False
                          ) -> list[PlacementGroupState]:
    """The placement groups of this job, in the order they were asked for, from rank 0's
    directory (runtime/placement_groups.py; `placement_group_table`'s rows)."""
    checks = check_filters(PlacementGroupState, filters)
    client = context.get_client()
    job_id = client.job_id.hex()
    return limited((_group_row(row, job_id, detail) for row in client.group_rows(None, None)),
                   checks, limit)


def _group_row(row: dict, job_id: str, detail: bool) -> PlacementGroupState:
    extra = {}
    if detail:
        group_hex = row["placement_group_id"]
        where = row["bundles_to_node_id"]
        extra = dict(
            bundles=[{"bundle_id": {"placement_group_id": group_hex, "bundle_index": index},
                      "unit_resources": dict(bundle), "node_id": where.get(index)}
                     for index, bundle in sorted(row["bundles"].items())],
            is_detached=row["is_detached"], stats=dict(row["stats"]),
            topology_strategy={}, topology_assignments={})
    return PlacementGroupState(placement_group_id=row["placement_group_id"],
                               name=row["name"] or "", creator_job_id=job_id,
                               state=row["state"], **extra)


def list_workers(address: str | None = None, filters: list | None = None,
                 limit: int = DEFAULT_LIMIT, timeout: int = 30, detail: bool = False,
                 raise_on_missing_output: bool = True, _explain: bool = False
                 ) -> list[WorkerState]:
    """The worker processes of every node, live and ended, and the driver, by node and
    start."""
    checks = check_filters(WorkerState, filters)
    client = context.get_client()
    nodes = _nodes(client)
    rows = sorted(client.list_state("workers"), key=lambda row: (row[1], row[0]))
    return limited((_worker_row(row, nodes, detail) for row in rows), checks, limit)


def _worker_row(row: tuple, nodes: dict, detail: bool) -> WorkerState:
    worker_id, rank, pid, alive, kind, exit_type, exit_detail, launch, start, end = row
    node = nodes.get(rank, {})
    extra = {}
    if detail:
        extra = dict(exit_detail=exit_detail, worker_launch_time_ms=launch,
                     worker_launched_time_ms=start, start_time_ms=start, end_time_ms=end)
    return WorkerState(worker_id=worker_id, is_alive=alive, worker_type=kind,
                       exit_type=exit_type, node_id=node.get("NodeID", ""),
                       ip=node.get("NodeManagerAddress", ""), pid=pid, **extra)


def list_objects(address: str | None = None, filters: list | None = None,
                 limit: int = DEFAULT_LIMIT, timeout: int = 30, detail: bool = False,
                 raise_on_missing_output: bool = True, _explain: bool = False
                 ) -> list[ObjectState]:
    """The references to objects that the processes and pending tasks of every node
    hold, one row per reference (as Ray)."""
    checks = check_filters(ObjectState, filters)
    client = context.get_client()
    nodes = _nodes(client)
    rows = sorted(client.list_state("objects"), key=lambda row: (row[0], row[4], row[5] or 0))
    # As Ray: "disabled" unless RAY_record_ref_creation_sites=1 (runtime/call_sites.py);
    # then "" for a ref no process of its node made (it came from another node).
    unknown = "" if client.config.record_ref_creation_sites else "disabled"
    return limited((ObjectState(
        object_id=object_id.hex(), pid=pid, ip=nodes.get(rank, {}).get("NodeManagerAddress", ""),
        call_site=call_site or unknown, task_status=status, attempt_number=0, type=kind,
        reference_type=reference_type, object_size=size, node_id=_node_id(nodes, rank),
        owner_node_id=_node_id(nodes, owner))
        for (object_id, size, status, owner, rank, pid, kind, reference_type, call_site)
        in rows), checks, limit)


def get_actor(id: str, address: str | None = None, timeout: int = 30,
              _explain: bool = False) -> ActorState | None:
    """The actor with this id (hex), with every field (detail), or None."""
    found = list_actors(filters=[("actor_id", "=", id)], detail=True)
    return found[0] if found else None


def get_task(id, address: str | None = None, timeout: int = 30,
             _explain: bool = False) -> list[TaskState] | None:
    """The attempts of the task with this id (hex) or of the task that makes this
    ObjectRef, with every field (detail), as Ray: a list (one attempt here: a retry
    updates its row), or None."""
    if isinstance(id, ObjectRef):
        id = id.task_id().hex()
    found = list_tasks(filters=[("task_id", "=", id)], detail=True)
    return found or None


def get_node(id: str, address: str | None = None, timeout: int = 30,
             _explain: bool = False) -> NodeState | None:
    """The node with this id, or None."""
    found = list_nodes(filters=[("node_id", "=", id)], detail=True)
    return found[0] if found else None


def get_placement_group(id: str, address: str | None = None, timeout: int = 30,
                        _explain: bool = False) -> PlacementGroupState | None:
    """The placement group with this id (hex), with every field (detail), or None."""
    found = list_placement_groups(filters=[("placement_group_id", "=", id)], detail=True)
    return found[0] if found else None


def get_worker(id: str, address: str | None = None, timeout: int = 30,
               _explain: bool = False) -> WorkerState | None:
    """The worker with this id (list_workers' worker_id), with every field, or None."""
    found = list_workers(filters=[("worker_id", "=", id)], detail=True)
    return found[0] if found else None


def get_objects(id: str, address: str | None = None, timeout: int = 30,
                _explain: bool = False) -> list[ObjectState]:
    """Every reference to the object with this id (hex), as Ray: a list."""
    return list_objects(filters=[("object_id", "=", id)], detail=True, limit=2**62)


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
        _count(entry["state_counts"], task.state)
        totals[task.type] = totals.get(task.type, 0) + 1
    return {"cluster": {"summary": summary, "total_tasks": totals["NORMAL_TASK"],
                        "total_actor_tasks": totals["ACTOR_TASK"],
                        "total_actor_scheduled": totals["ACTOR_CREATION_TASK"],
                        "summary_by": "func_name"}}


def summarize_actors(address: str | None = None, timeout: int = 30,
                     raise_on_missing_output: bool = True, _explain: bool = False) -> dict:
    """Ray's actor summary: per class, how many actors are in each state."""
    summary: dict[str, dict] = {}
    actors = list_actors(limit=2**62)
    for actor in actors:
        entry = summary.setdefault(actor.class_name, {"class_name": actor.class_name,
                                                      "state_counts": {}})
        _count(entry["state_counts"], actor.state)
    return {"cluster": {"summary": summary, "total_actors": len(actors),
                        "summary_by": "class"}}


def summarize_objects(address: str | None = None, timeout: int = 30,
                      raise_on_missing_output: bool = True, _explain: bool = False) -> dict:
    """Ray's object summary, by call site: references, their total size in MiB, how many
    processes and nodes hold them, and counts by task status and reference type. Call
    sites are recorded with RAY_record_ref_creation_sites=1, as in Ray; otherwise every
    reference is in one group, "disabled", and callsite_enabled is False."""
    summary: dict[str, dict] = {}
    holders: dict[str, tuple[set, set]] = {}
    references = list_objects(limit=2**62)
    total_mb = 0.0
    for ref in references:
        entry = summary.setdefault(ref.call_site, {
            "total_objects": 0, "total_size_mb": 0.0, "total_num_workers": 0,
            "total_num_nodes": 0, "task_state_counts": {}, "ref_type_counts": {}})
        entry["total_objects"] += 1
        _count(entry["task_state_counts"], ref.task_status)
        _count(entry["ref_type_counts"], ref.reference_type)
        if ref.object_size:
            entry["total_size_mb"] += ref.object_size / 2**20
            total_mb += ref.object_size / 2**20
        pids, node_ids = holders.setdefault(ref.call_site, (set(), set()))
        if ref.pid is not None:
            pids.add((ref.node_id, ref.pid))
        node_ids.add(ref.node_id)
    for call_site, (pids, node_ids) in holders.items():
        summary[call_site]["total_num_workers"] = len(pids)
        summary[call_site]["total_num_nodes"] = len(node_ids)
    return {"cluster": {"summary": summary, "total_objects": len(references),
                        "total_size_mb": total_mb,
                        "callsite_enabled": "disabled" not in summary,
                        "summary_by": "callsite"}}


# Counters of object_store_stats() summed over the nodes for its "cluster" entry.
_STORE_TOTALS = ("capacity", "used_bytes", "num_objects", "num_evictions", "spilled_objects",
                 "spilled_bytes", "written_bytes", "spill_seconds", "restored_objects",
                 "restored_bytes", "restore_seconds", "served_from_disk", "files",
                 "bytes_on_disk", "lineage_tasks", "lineage_only", "lineage_released")


def object_store_stats() -> dict:
    """hpcray's own (Ray prints these in `ray memory --stats-only`): each node's object
    store and what it spilled to disk and restored, and the sums over the nodes.

    {"cluster": {...sums...}, "nodes": {rank: {...}}}. Per node: the store's counters
    (capacity, used_bytes, num_objects, num_pinned, num_evictions, ...) and spilling's:
    spilled_objects / spilled_bytes (moved out of the store to disk), written_bytes and
    spill_seconds (file writes), restored_objects / restored_bytes / restore_seconds
    (read back), served_from_disk (other nodes' pulls answered from a file), files and
    bytes_on_disk (spill files now); and lineage's (runtime/lineage.py): lineage_tasks
    (specs of the tasks this node owns that the GCS keeps), lineage_only (of them, those
    kept only to rebuild a lost value downstream) and lineage_released."""
    nodes = dict(context.get_client().list_state("store"))
    cluster = {key: sum(node.get(key, 0) for node in nodes.values()) for key in _STORE_TOTALS}
    return {"cluster": cluster, "nodes": dict(sorted(nodes.items()))}


def list_logs(address: str | None = None, node_id: str | None = None,
              node_ip: str | None = None, glob_filter: str | None = None,
              timeout: int = 30) -> dict[str, list[str]]:
    """The files of the job's log folder, as Ray's {group: [filename]}: "node" (the node
    logs) and "worker" (workers' stdout and stderr); `node_id` keeps one node's."""
    folder = _log_folder()
    rank = None if node_id is None else _rank_of(node_id)
    groups: dict[str, list[str]] = {"node": [], "worker": []}
    for name in sorted(os.listdir(folder)):
        parts = name.split("-")
        if parts[0] != "node" or (rank is not None and parts[1].split(".")[0] != str(rank)):
            continue
        if glob_filter and not fnmatch.fnmatch(name, glob_filter):
            continue
        groups["worker" if "-worker-" in name else "node"].append(name)
    return groups


def get_log(address: str | None = None, node_id: str | None = None,
            node_ip: str | None = None, filename: str | None = None,
            actor_id: str | None = None, task_id: str | None = None, pid: int | None = None,
            follow: bool = False, tail: int = -1, timeout: int = 30, suffix: str = "out",
            encoding: str | None = "utf-8", errors: str | None = "strict",
            submission_id: str | None = None, attempt_number: int = 0,
            _interval: float | None = None, filter_ansi_code: bool = False):
    """The lines of one file of the job's log folder, as Ray's get_log: by `node_id` and
    `filename` (list_logs names them: node-<rank>.log, node-<rank>-worker-<pid>.out), or
    the stdout (`suffix="out"`) or stderr ("err") of a worker found by `pid` (with
    `node_id`), `actor_id` or `task_id` (its worker's whole output: hpcray does not cut
    out one task's lines). `tail` keeps the last lines (-1: all); `follow` then yields
    each line appended later, read every `_interval` seconds (0.5), until the caller stops
    iterating. Returns an iterator of lines without their newlines."""
    if suffix not in ("out", "err"):
        raise ValueError(f"Invalid suffix: {suffix}. Must be one of 'out' or 'err'.")
    if not (node_id or node_ip) and not (actor_id or task_id):
        raise ValueError("node_id or node_ip must be provided as constructor arguments when "
                         "no actor or task_id is supplied as arguments.")
    if not (actor_id or task_id or pid or filename):
        raise ValueError("None of actor_id, task_id, pid, submission_id or filename is "
                         "provided. At least one of them is required to fetch logs.")
    path = os.path.join(_log_folder(), _log_file_name(node_id, node_ip, filename, actor_id,
                                                      task_id, pid, suffix))
    try:
        file = open(path, encoding=encoding, errors=errors)
    except FileNotFoundError:
        raise RayStateApiException(f"Log file {os.path.basename(path)} does not exist in "
                                   f"{os.path.dirname(path)} (the worker wrote nothing "
                                   "there yet, or no such file: see list_logs()).") from None
    return _lines(file, tail, follow, _interval or 0.5)


def _lines(file, tail: int | None, follow: bool, interval: float):
    """The file's lines (the last `tail`), then, with `follow`, each line appended later,
    read every `interval` seconds, until the caller stops iterating. The lines a pool
    worker writes to name the task that prints next (task_output.py) are left out."""
    with file:
        *lines, rest = file.read().split("\n")  # rest: a last line not ended yet, or ""
        if rest and not follow:
            lines.append(rest)
        lines = [line for line in lines if not line.startswith(task_output.MARK)]
        if tail is not None and tail >= 0:
            lines = lines[len(lines) - tail:] if tail else []
        yield from lines
        while follow:
            more = file.read()
            if not more:
                time.sleep(interval)
                continue
            *done, rest = (rest + more).split("\n")
            yield from (line for line in done if not line.startswith(task_output.MARK))


def _log_file_name(node_id, node_ip, filename, actor_id, task_id, pid, suffix) -> str:
    if filename:
        if os.path.basename(filename) != filename:
            raise ValueError(f"filename {filename!r} must name a file of the job's log "
                             "folder (see list_logs()), not a path.")
        return filename
    if actor_id:
        found = list_actors(filters=[("actor_id", "=", actor_id)], detail=True)
        if not found or found[0].pid is None:
            raise RayStateApiException(f"Actor {actor_id} not found, or not started yet.")
        return worker_file(_rank_of(found[0].node_id), found[0].pid, suffix)
    if task_id:
        found = list_tasks(filters=[("task_id", "=", task_id)])
        if not found or found[0].worker_pid is None:
            raise RayStateApiException(f"Task {task_id} not found, or not run yet.")
        return worker_file(_rank_of(found[0].node_id), found[0].worker_pid, suffix)
    rank = _rank_of(node_id) if node_id else _rank_of_ip(node_ip)
    return worker_file(rank, int(pid), suffix)


def _log_folder() -> str:
    folder = context.get_client().config.log_dir
    if not folder:
        raise RayStateApiException("This job writes no log folder.")
    return folder


def _rank_of(node_id: str) -> int:
    for node in context.get_client().nodes():
        if node["NodeID"] == node_id:
            return node["rank"]
    raise RayStateApiException(f"Node {node_id} is not a node of this job.")


def _rank_of_ip(node_ip: str) -> int:
    ranks = [node["rank"] for node in context.get_client().nodes()
             if node["NodeManagerAddress"] == node_ip]
    if len(ranks) != 1:
        raise RayStateApiException(f"node_ip {node_ip!r} names {len(ranks)} nodes of this "
                                   "job; pass node_id.")
    return ranks[0]


def _count(counts: dict, key) -> None:
    counts[key] = counts.get(key, 0) + 1


def _nodes(client) -> dict:
    return {node["rank"]: node for node in client.nodes()}


def _node_id(nodes: dict, rank) -> str | None:
    node = nodes.get(rank)
    return None if node is None else node["NodeID"]


def _task_order(row: tuple):
    # Submission order where it is known (the creation time), then the id.
    return (row[9] if row[9] is not None else float("inf"), row[0])
