"""Ray's state API for tasks, as `ray.util.state`: what the GCS tasks table holds.

The table keeps a task while some process may still ask for its returns (its lineage):
submitted, running, and finished tasks whose returns are still referenced. A task
whose returns were all freed is gone, as Ray drops old tasks past its own limit.
States: PENDING (submitted, waiting for arguments or a worker), RUNNING, FINISHED (its
returns hold its value or its own exception), FAILED (the system failed it: worker
crashes past its retries, cancel).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hpcray import context

__all__ = ["TaskState", "list_tasks"]

_PREDICATES = {"=": lambda a, b: a == b, "!=": lambda a, b: a != b}


@dataclass(frozen=True)
class TaskState:
    """One row of list_tasks(); fields as Ray names them. Also readable as a dict."""

    task_id: str
    name: str
    func_or_class_name: str
    state: str
    type: str
    node_id: str | None  # the node that ran it last (None while it has not run)
    owner_node_id: str | None  # the node it was submitted on, which owns its returns

    def __getitem__(self, key: str):
        return getattr(self, key)

    def asdict(self) -> dict:
        return asdict(self)


def list_tasks(address: str | None = None, filters: list | None = None, limit: int = 100,
               timeout: int = 30, detail: bool = False,
               raise_on_missing_output: bool = True) -> list[TaskState]:
    """The tasks of this job in the GCS tasks table, across every node. `filters`:
    [(field, "=" or "!=", value)], values compared as strings; `limit`: at most that
    many rows. `address`, `timeout`, `detail`, `raise_on_missing_output` are Ray's and
    change nothing here."""
    checks = []
    for key, predicate, value in filters or []:
        if predicate not in _PREDICATES:
            raise ValueError(f"Unsupported filter predicate {predicate!r}; use '=' or '!='.")
        if key not in TaskState.__dataclass_fields__:
            raise ValueError(f"Unknown task field {key!r} in filters; fields are "
                             f"{sorted(TaskState.__dataclass_fields__)}.")
        checks.append((key, _PREDICATES[predicate], str(value)))
    client = context.get_client()
    node_ids = {node["rank"]: node["NodeID"] for node in client.nodes()}
    rows = []
    for task_id, name, state, owner, ran_on in sorted(client.list_tasks()):
        row = TaskState(task_id=task_id.hex(), name=name or "", func_or_class_name=name or "",
                        state=state, type="NORMAL_TASK", node_id=node_ids.get(ran_on),
                        owner_node_id=node_ids.get(owner))
        if all(check(str(row[key]), value) for key, check, value in checks):
            rows.append(row)
            if len(rows) >= limit:
                break
    return rows
