"""What a task, an actor creation and an actor call carry; the node's record of a task."""

from __future__ import annotations

NORMAL_TASK = 0
ACTOR_CREATION = 1
ACTOR_CALL = 2

# TaskRecord states
WAITING, QUEUED, RUNNING, FINISHED = 0, 1, 2, 3


class TaskSpec:
    """Everything needed to run (and re-run) one task.

    `args` is ("inline", bytes) or ("store", object_id) of the pickled (args, kwargs);
    `deps` are the ids of the top-level ObjectRef arguments, resolved to values before
    the task runs; `contained` every ref id pickled inside the arguments (deps
    included), held alive until the task ends.
    """

    __slots__ = ("task_id", "kind", "function_id", "name", "args", "deps", "contained",
                 "return_ids", "demand", "max_retries", "retry_exceptions", "actor_id",
                 "method", "options")

    def __init__(self, task_id, kind, function_id, name, args, deps, contained, return_ids,
                 demand, max_retries=0, retry_exceptions=False, actor_id=None, method=None,
                 options=None):
        self.task_id = task_id
        self.kind = kind
        self.function_id = function_id
        self.name = name
        self.args = args
        self.deps = deps
        self.contained = contained
        self.return_ids = return_ids
        self.demand = demand
        self.max_retries = max_retries
        self.retry_exceptions = retry_exceptions
        self.actor_id = actor_id
        self.method = method
        self.options = options

    def to_wire(self) -> tuple:
        """Its fields in order: `TaskSpec(*fields)` rebuilds it. A worker's socket carries
        specs this way (messages.py, RunTask): a pickled TaskSpec costs its class's lookup
        by name at each end, ~1 us of the node's thread per message (measured)."""
        return (self.task_id, self.kind, self.function_id, self.name, self.args, self.deps,
                self.contained, self.return_ids, self.demand, self.max_retries,
                self.retry_exceptions, self.actor_id, self.method, self.options)

    def __reduce__(self):
        return (TaskSpec, self.to_wire())

    def __repr__(self) -> str:
        return f"TaskSpec({self.name}, {self.task_id.hex()})"


class TaskRecord:
    """A node manager's state of one task it runs or owns."""

    __slots__ = ("spec", "state", "pending_deps", "worker", "retries_left", "cancelled",
                 "gpu_ids", "blocked", "children", "owner", "dispatched")

    def __init__(self, spec: TaskSpec, retries: int):
        self.spec = spec
        self.state = WAITING
        self.pending_deps = 0
        self.worker = None
        self.retries_left = retries
        self.cancelled = False
        self.gpu_ids = ()
        self.blocked = False
        self.children = None    # ids of the tasks this one submitted (recursive cancel)
        self.owner = 0          # rank of the node that owns its results
        self.dispatched = None  # when a pool worker was sent it (the timeline's, if it dies)
