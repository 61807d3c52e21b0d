"""Every message hpcray's processes exchange, declared once, with named fields.

A message is declared as a record (a NamedTuple) and travels as a plain tuple
`(CODE, *fields)`, made by `wire(Record, *fields)`: a record pickled whole costs ~2 us
more per message than a tuple (its class is looked up by name on every load; measured),
and a task's life is several messages. Dispatch is a dict lookup on the code, in tables
built from the handlers the runtime's parts declare (`HANDLES = {Record: "method"}`,
called with the fields as arguments); `check_handlers`, run when node_manager.py is
imported (control and up channels), fails when a message has no handler or more than
one, or names a method that does not exist; launch and down messages are few and read
by launch.py and worker.py in order; and
`record(wire_tuple)` rebuilds the record where names read better than positions.

Channels
    control   node manager <-> node manager, over MPI (transport "control" channel)
    gcs       node manager <-> GCS shard: the shard's own wire table (gcs/shard.py);
              requests are ("op", request_id, key, *args), answers GcsReply/GcsNotify
    launch    rank 0 <-> the other ranks while a job starts and stops (launch.py)
    up        worker (or a driver's stand-in) -> its node manager, over its socket
    down      node manager -> worker
    fork      node manager <-> its fork server (forkserver.py), over a SEQPACKET socket

Fields that hold values describe them as the runtime does everywhere: a value's
"where" is ("inline", bytes, contained) or ("at", rank, size, contained); results are
[(object_id, inline bytes or None (in the store), contained ids, size)]; ref
transitions are [(id, +1 | -1)], the 0<->1 changes of a process's counts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

CHANNELS: dict[str, list[type]] = {"control": [], "launch": [], "up": [], "down": [],
                                   "fork": []}
RECORDS: list[type] = []   # by code


def _on(channel: str):
    def register(cls):
        CHANNELS[channel].append(cls)
        cls.channel = channel
        cls.CODE = len(RECORDS)
        RECORDS.append(cls)
        return cls
    return register


def wire(record: type, *fields) -> tuple:
    """The message `record(*fields)` as it travels: (code, *fields)."""
    return (record.CODE, *fields)


def record(message: tuple):
    """The record of a message that arrived (a named view of its fields)."""
    return RECORDS[message[0]]._make(message[1:])


# ---------------------------------------------------------------- control: tasks
@_on("control")
class Forward(NamedTuple):
    """owner -> rank 0: place a task (or actor) this node did not keep."""
    spec: Any
    deps: list          # [(id, where)] of the top-level arguments
    strategy: Any       # None, "SPREAD" or ("node", rank, soft)
    arg_bytes: dict     # rank -> bytes of the arguments there
    hops: int = 0       # nodes that sent this actor back for lack of room


@_on("control")
class Run(NamedTuple):
    """rank 0 -> the node that runs a task."""
    spec: Any
    deps: list


@_on("control")
class RunActor(NamedTuple):
    """rank 0 -> the node that hosts an actor (it may send it back: Forward, hops + 1)."""
    spec: Any
    deps: list
    hops: int = 0


@_on("control")
class TaskDone(NamedTuple):
    """executor -> owner: a task's results (`kept`: refs the executor still holds, as
    [(id, [(rank, count)])] for the owner to register; borrowing.py)."""
    task_id: bytes
    results: list
    kept: list
    failed: bool = False


@_on("control")
class TaskReturned(NamedTuple):
    """executor -> owner: a task rank 0 placed here, not started, goes back (no CPU is
    free here while another node has some: cluster.offer_room); the owner forwards it
    again. `kept` as in TaskDone."""
    task_id: bytes
    kept: list


@_on("control")
class TaskItem(NamedTuple):
    """executor -> owner: item `index` a generator task yielded, as it was yielded (a
    result as in TaskDone; it comes before the task's TaskDone; generators.py)."""
    task_id: bytes
    index: int
    result: tuple


@_on("control")
class GeneratorPaused(NamedTuple):
    """executor -> owner: a generator task with a backpressure limit waits until its
    consumer has taken `needed` items (after its TaskItem; generators.py); `watch`: its
    actor's budget waits for that, even after the task ended (generator_budget.py)."""
    task_id: bytes
    needed: int
    watch: bool = False


@_on("control")
class GeneratorResume(NamedTuple):
    """owner -> executor: the consumer has taken `taken` items (or is gone, or the task
    ended: generators.NO_LIMIT); the paused generator goes on."""
    task_id: bytes
    taken: int


@_on("control")
class Cancel(NamedTuple):
    """a node whose process cancelled a task another node owns -> that owner; the owner
    of an actor call -> the actor's node: cancel it (cancellation.py)."""
    task_id: bytes
    force: bool
    recursive: bool


@_on("control")
class CancelPlaced(NamedTuple):
    """owner -> rank 0 (after the task's Forward), rank 0 -> every node (after any Run it
    sent of it): cancel the task wherever the global scheduler placed it."""
    task_id: bytes
    force: bool
    recursive: bool


@_on("control")
class Load(NamedTuple):
    """node -> rank 0, when it changed: what the global scheduler places by."""
    available: dict
    queued: int
    received: int       # tasks rank 0 had placed on this node, as the node counted them
    actor_cpus: float   # CPUs its live actors hold (tasks queued behind them can move)
    ended: tuple = ()   # tasks rank 0 placed here that ended since the last report (ULFM)
    wants_view: bool = False  # the node routes tasks of its own: answer LoadView


@_on("control")
class LoadView(NamedTuple):
    """rank 0 -> a node whose Load wanted it: the other nodes as the global scheduler
    sees them, for its SpillPolicy (keep a task, or forward it)."""
    least_per_cpu: float   # the fewest tasks queued per CPU on another live node
    free_cpus: float       # the most CPUs free on another live node
    own_per_cpu: float     # tasks queued per CPU on the receiver, as rank 0 sees it
    least_submits: bool    # that least loaded node routes tasks of its own too


@_on("control")
class NodeDied(NamedTuple):
    """rank 0 -> every survivor (ULFM): rank `rank` is gone for the job; `lost`: the
    tasks the receiver owns that rank 0 had placed there (node_failures.py)."""
    rank: int
    lost: list


@_on("control")
class FunctionRequest(NamedTuple):
    """executor -> the submitting node: the pickled function of a task."""
    function_id: bytes


@_on("control")
class Function(NamedTuple):
    """the submitting node -> executor (None: ask the GCS)."""
    function_id: bytes
    pickled: bytes | None


# ---------------------------------------------------------------- control: objects
@_on("control")
class Watch(NamedTuple):
    """a node -> an object's owner: say where the value is once it exists (`register`:
    count the asking node as a borrower too)."""
    object_id: bytes
    register: bool


@_on("control")
class Located(NamedTuple):
    """owner -> the watching node: the value's where."""
    object_id: bytes
    where: tuple


@_on("control")
class Pull(NamedTuple):
    """a node -> the node with the bytes: send these objects, in this order, on
    transfer `tag` (one pull per holder for all the objects wanted at once). The
    transfer's first segment says which the holder had (one byte each, 1: sent; 0: an
    empty message stands in its place)."""
    tag: int
    objects: list       # [(object_id, size)]


@_on("control")
class Borrow(NamedTuple):
    """a covered node -> owner: count `count` more registrations for `rank`."""
    key: bytes          # an object id (20 bytes) or an actor id (16)
    rank: int
    count: int


@_on("control")
class Release(NamedTuple):
    """borrower -> owner: it gives its `count` registrations back."""
    key: bytes
    count: int


# ------------------------------------------- control: one object pulled by many (relay.py)
@_on("control")
class Relay(NamedTuple):
    """the holder -> a node with a copy (or receiving one): send it to `puller` on the
    puller's transfer `tag` (segments: 1, the bytes, a trailer byte), from its sealed
    copy or its own pull `source_tag` as it arrives, or refuse."""
    puller: int
    tag: int
    object_id: bytes
    size: int
    source_tag: int


@_on("control")
class PullFrom(NamedTuple):
    """a relay -> the puller: transfer `tag` (this object) comes from me, with a
    trailer byte (1: whole; 0: my copy failed, ask the holder itself)."""
    tag: int
    object_id: bytes
    size: int


@_on("control")
class RelayRefused(NamedTuple):
    """a relay -> the holder: I have no copy; send it to `puller` yourself."""
    puller: int
    tag: int
    object_id: bytes
    size: int


@_on("control")
class RelayGone(NamedTuple):
    """the holder -> a puller it pointed to a relay that died: unless that relay said
    PullFrom already, pull it from the holder again (PullDirect)."""
    tag: int
    object_id: bytes
    relay: int


@_on("control")
class PullDirect(NamedTuple):
    """a puller -> the holder: as Pull, and send it yourself (the relay `failed`
    gave no copy: it died, or its own copy failed)."""
    tag: int
    objects: list       # [(object_id, size)]
    failed: int


# ---------------------------------------------------------------- control: actors
@_on("control")
class ActorAt(NamedTuple):
    """the actor's node -> every node: send its calls to `rank`; `concurrent`: it runs
    calls concurrently (async or threaded), so a call whose arguments are ready need not
    wait behind an earlier one whose arguments are not (Ray orders only serial actors);
    `groups` (method -> concurrency group), a sync actor with concurrency groups: it
    does within each group (actors.GroupOrder)."""
    actor_id: bytes
    rank: int
    concurrent: bool = False
    groups: dict | None = None


@_on("control")
class EndActor(NamedTuple):
    """owner -> the actor's node: no handle is left anywhere."""
    actor_id: bytes


@_on("control")
class ActorCall(NamedTuple):
    """a caller's node -> the actor's node."""
    spec: Any
    deps: list


@_on("control")
class KillActor(NamedTuple):
    actor_id: bytes
    no_restart: bool
    cause: str | None = None  # why, when not kill(): what the actor's death says
    hops: int = 1  # sends so far: a node passes it on while under KILL_HOPS (no storms)


@_on("control")
class OwnerCheck(NamedTuple):
    """a caller's node -> the node of the worker process that created the actor: is that
    process alive now? (calls wait for the answer: owners.py)"""
    actor_id: bytes


@_on("control")
class OwnerAnswer(NamedTuple):
    """the owner's node -> the caller's node: None if the owner lives, else what the
    actor's death says (the owner's death was processed before this was sent)."""
    actor_id: bytes
    death: str | None


# ---------------------------------------------------------------- control: placement groups
@_on("control")
class CreateGroup(NamedTuple):
    """a node -> rank 0: create this placement group (placement_groups.py)."""
    group_id: bytes
    bundles: list       # [{resource: amount}] per bundle
    strategy: str       # PACK, SPREAD, STRICT_PACK or STRICT_SPREAD
    name: str
    detached: bool


@_on("control")
class RemoveGroup(NamedTuple):
    """a node -> rank 0: remove this placement group."""
    group_id: bytes


@_on("control")
class GroupQuery(NamedTuple):
    """a node -> rank 0: the table rows of one group (by id or name) or of all (both None)."""
    request_id: int
    group_id: bytes | None
    name: str | None


@_on("control")
class GroupRows(NamedTuple):
    """rank 0 -> the asking node: the answer to a GroupQuery."""
    request_id: int
    rows: list


@_on("control")
class PrepareBundles(NamedTuple):
    """rank 0 -> a chosen node: reserve these bundles, [(index, {resource: amount})]."""
    group_id: bytes
    bundles: list


@_on("control")
class BundlesPrepared(NamedTuple):
    """the node -> rank 0: whether it reserved them (all of them, or none)."""
    group_id: bytes
    ok: bool


@_on("control")
class CommitBundles(NamedTuple):
    """rank 0 -> each node that prepared: every node did; the bundles are the group's now."""
    group_id: bytes


@_on("control")
class ReturnBundles(NamedTuple):
    """rank 0 -> each node that prepared: another node refused; free them again."""
    group_id: bytes


@_on("control")
class GroupRemoved(NamedTuple):
    """rank 0 -> every node: the group is gone: free its bundles, fail its tasks, kill
    its actors."""
    group_id: bytes


# ---------------------------------------------------------------- launch (launch.py)
@_on("control")
class StateQuery(NamedTuple):
    """a node -> every other node: your rows of a state table (state_queries.py)."""
    request_id: int
    table: str


@_on("control")
class StateRows(NamedTuple):
    """the answer to a StateQuery."""
    request_id: int
    rows: list


@_on("launch")
class Start(NamedTuple):
    """rank 0 -> every rank: build your node for this job."""
    job: dict


@_on("launch")
class DescribeGpus(NamedTuple):
    """rank 0 -> every rank: which GPUs do you see?"""


@_on("launch")
class GpusSeen(NamedTuple):
    gpus: tuple


@_on("launch")
class ClockPing(NamedTuple):
    """rank 0 -> a rank, before Start: what time is it on your clock? (clock.py)"""
    seq: int


@_on("launch")
class ClockPong(NamedTuple):
    """the answer to ClockPing `seq`: the rank's clock.now() when it read it, its host."""
    seq: int
    time: float
    host: str


@_on("launch")
class Started(NamedTuple):
    node: dict


@_on("launch")
class StartFailed(NamedTuple):
    reason: str


@_on("launch")
class Go(NamedTuple):
    """rank 0 -> every rank: every node's id and resources; serve."""
    nodes: dict


@_on("control")
class Drain(NamedTuple):
    """rank 0 -> every rank: the job drains (a drain signal, runtime/drain.py): start no
    task that is not running yet; they wait until the job ends."""


@_on("control")
class Stop(NamedTuple):
    """rank 0 -> every rank (while its node serves): the driver shut down."""


@_on("launch")
class Stopped(NamedTuple):
    pass


@_on("launch")
class Exit(NamedTuple):
    """rank 0 -> every rank: leave the job with this status; `finalize`: every rank is
    alive, so MPI_Finalize (which waits for all of them) can run (launch.py)."""
    code: int
    finalize: bool


# ---------------------------------------------------------------- up: worker -> node
@_on("up")
class Hello(NamedTuple):
    pid: int


@_on("up")
class WorkDone(NamedTuple):
    """a task or actor call ended: its results; `retry`: it raised a retryable error;
    `started`, `ended`: when the worker began and ended it (clock.now(); None if it never
    ran), for the timeline (recorder.py) and pipelining (a short function's next task)."""
    task_id: bytes
    results: list
    retry: bool
    started: float | None
    ended: float | None
    transitions: list


@_on("up")
class ItemReady(NamedTuple):
    """a generator task yielded item `index` (a result: (id, inline or None, contained,
    size)); before its WorkDone."""
    task_id: bytes
    index: int
    result: tuple
    transitions: list


@_on("up")
class ActorReady(NamedTuple):
    """the constructor ran (error: the pickled exception it raised, else None; repr_name:
    repr() of the new instance where its class defines __repr__, else None)."""
    actor_id: bytes
    error: bytes | None
    repr_name: str | None
    transitions: list


@_on("up")
class Notice(NamedTuple):
    """a one-way node operation (`op` one of ONEWAY_OPS) with its arguments."""
    op: str
    args: tuple
    transitions: list


@_on("up")
class Request(NamedTuple):
    """a node operation that answers (`op` one of REQUEST_OPS): Reply(request_id)."""
    request_id: int
    op: str
    args: tuple
    transitions: list


# ---------------------------------------------------------------- down: node -> worker
@_on("down")
class RunTask(NamedTuple):
    """run a task (or an actor call: `function` None, `gpu_ids` ())."""
    spec: tuple              # TaskSpec.to_wire(), as in CreateActor and the submit op
    function: bytes | None   # pickled, the first time this worker runs it
    dep_payloads: list       # [(id, inline bytes or None: in the store)]
    gpu_ids: tuple


@_on("down")
class CreateActor(NamedTuple):
    spec: tuple
    cls: bytes | None
    dep_payloads: list
    gpu_ids: tuple


@_on("down")
class Reply(NamedTuple):
    request_id: int
    ok: bool
    value: Any               # the answer, or the exception to raise at the call site


@_on("down")
class ExitWorker(NamedTuple):
    pass


@_on("down")
class CancelTask(NamedTuple):
    """the task or actor call this worker was sent was cancelled (a SIGINT follows for a
    pool task, which interrupts it, and for a one-call-at-a-time actor, which only looks)."""
    task_id: bytes


@_on("down")
class RevokeTask(NamedTuple):
    """the task pipelined to this pool worker (sent to run after its current one) is
    taken back, unstarted: the current one blocked in get. Drop it unread."""
    task_id: bytes


# ---------------------------------------------------------------- fork: node <-> fork server
@_on("fork")
class ForkWorker(NamedTuple):
    """node -> fork server: start worker `key` (its socket and stdout/stderr pipes travel
    with the message, SCM_RIGHTS)."""
    key: int
    is_actor: bool


@_on("fork")
class ForkServerReady(NamedTuple):
    """fork server -> node: it has imported what workers need; from now a worker asked
    for starts in milliseconds (init waits for this: see NodeManager.wait_forkserver_ready)."""
    pid: int


@_on("fork")
class WorkerExited(NamedTuple):
    """fork server -> node: it reaped worker `pid`; `status` as os.waitpid gives it (the
    node logs a crash with what the worker was running: job_logs.py)."""
    pid: int
    status: int


# ---------------------------------------------------------------- node operations
# What a process asks of its node manager: the driver calls the parts of its
# in-process node directly (client.DriverClient), a worker sends them (Notice /
# Request), and the node's WorkerRequests part serves them, one op_<name> method each:
# `check_operations` holds WorkerRequests to this list at import.
ONEWAY_OPS = ("submit", "put", "export_function", "release_actor_name", "kill_actor",
              "interrupt_wait", "create_group", "remove_group", "call_sites")
REQUEST_OPS = ("get", "wait", "get_actor", "claim_actor_name", "resources", "nodes",
               "list_state", "cancel", "generator_next", "generator_pause", "generator_slot",
               "make_room",
               "restore", "group_rows")


def check_handlers(channel: str, *parts: type) -> dict[type, tuple[type, str]]:
    """{message type: (part class, method name)} for `channel`; raises unless every
    message of the channel has exactly one handler among `parts`, and it exists."""
    table: dict[type, tuple[type, str]] = {}
    for part in parts:
        for message, method in getattr(part, "HANDLES", {}).items():
            if getattr(message, "channel", None) != channel:
                continue
            if message in table:
                raise TypeError(f"{message.__name__} is handled twice: by "
                                f"{table[message][0].__name__} and {part.__name__}")
            if not callable(getattr(part, method, None)):
                raise TypeError(f"{part.__name__}.{method} (the handler of "
                                f"{message.__name__}) does not exist")
            table[message] = (part, method)
    missing = [m.__name__ for m in CHANNELS[channel] if m not in table]
    if missing:
        raise TypeError(f"no handler for the {channel} messages {missing}")
    return table


def check_operations(serving: type, prefix: str = "op_") -> None:
    """Every node operation has its server method `prefix + op`, and only those."""
    declared = set(ONEWAY_OPS) | set(REQUEST_OPS)
    served = {name[len(prefix):] for name in dir(serving) if name.startswith(prefix)}
    if declared != served:
        raise TypeError(f"{serving.__name__} serves {sorted(served - declared)} that are not "
                        f"declared and lacks {sorted(declared - served)}")


def dispatch_table(channel: str, *parts) -> dict:
    """{message code: bound handler} over these part instances (checked as above)."""
    table = check_handlers(channel, *(type(part) for part in parts))
    by_class = {type(part): part for part in parts}
    return {message.CODE: getattr(by_class[cls], method)
            for message, (cls, method) in table.items()}
