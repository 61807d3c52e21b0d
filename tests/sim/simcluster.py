"""A many-node hpcray cluster inside one process, in an order a seed chooses.

Every node is a real NodeManager (its object table, reference counting, borrowing,
pulls, routing, actors, GCS shard, global scheduler) over a real shared-memory store;
every worker and the driver are real `Worker` / `WorkerClient` code running the real
API (`.remote`, `get`, `put`, actor handles). What is simulated is only what connects
them: the MPI transport, the worker sockets and the processes themselves. Each process
runs in a thread that moves only when the simulator hands it the baton, so exactly one
thing happens at a time, and the simulator picks the next thing from every enabled
event with a seeded random generator:

    net      deliver the oldest message of one (source, dest, channel) queue (MPI keeps
             order per pair and communicator; nothing else is ordered)
    data     complete one object transfer whose receive is posted
    up       deliver the oldest message a process sent to its node (socket order)
    run      let one process go on until it blocks (a reply it waits for arrived, a task
             arrived, or the driver paused between operations)
    eof      a process ended: its node sees the socket close
    copy     end one copy from the store of another node on the host (host_stores.py;
             with `host_reads`, two nodes a host, as `hostname`; the bytes of a batch
             copied at once, `inline_max`, are 0, 1 KiB or all, as the seed says)

After every event `check` runs the invariants; at the end `check_quiescent` demands
that everything was freed. A failure names its seed, and the same seed replays the
same schedule (run with PYTHONHASHSEED=0: sets of ids iterate in hash order).
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import random
import signal
import threading
import traceback

from hpcray import context, ids, object_ref
from hpcray._store import Store, copy_into
from hpcray.config import Config
from hpcray.object_ref import LocalReferenceCounter
from hpcray.resources import detect_node_resources
from hpcray.runtime.client import WorkerChannel, WorkerClient
from hpcray.runtime.cluster import ClusterLink
from hpcray.runtime.messages import Hello
from hpcray.runtime.node_manager import NodeManager
from hpcray.runtime.worker_processes import WorkerHandle, WorkerProcesses
from hpcray.runtime.protocol import _FRAME
from hpcray.runtime.worker import Worker

_FAKE_PID_BASE = 1 << 30   # above any pid_max: signals to these pids reach nobody


class SimulationFailure(AssertionError):
    pass


class _ErrorsLogged(logging.Handler):
    """The runtime logs what a handler raised and goes on; the simulation fails."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list = []

    def emit(self, record) -> None:
        self.records.append(record)


# ---------------------------------------------------------------------------- transport
def _segments(buffers) -> list:
    """A transfer's buffer, or its list of segments (a batched pull), as byte views."""
    if not isinstance(buffers, list):
        buffers = [buffers]
    return [memoryview(buffer).cast("B") for buffer in buffers]


class SimTransfer:
    """One half of a transfer; its bytes move in one "data" event. A send with a
    `gate` (a relay's, relay.py) moves only once the gate lets its last segment go."""

    __slots__ = ("peer", "tag", "views", "on_done", "is_send", "nbytes", "gate", "done",
                 "sizes")

    def __init__(self, peer, tag, views, is_send, on_done=None, gate=None):
        self.peer = peer
        self.tag = tag
        self.views = views
        self.is_send = is_send
        self.on_done = on_done
        self.gate = gate
        self.done = False
        self.sizes = [len(view) for view in views]
        self.nbytes = sum(self.sizes)

    def ready(self) -> bool:
        return self.gate is None or self.gate(len(self.sizes) - 1, self.sizes[-1])

    def segment_received(self, index: int) -> int:
        return self.sizes[index] if self.done else 0


class SimCopier:
    """A node's copy thread (host_stores._Copier): each copy ends in a "copy" event."""

    def __init__(self, sim: Simulation, node: SimNode):
        self.sim = sim
        self.node = node

    def submit(self, buffer, dest, on_done) -> None:
        self.sim.copies.append((self.node, buffer, dest, on_done))

    def close(self) -> None:
        pass


class SimNetwork:
    """Every message and transfer between nodes that has not arrived yet."""

    def __init__(self):
        self.queues: dict = {}            # (source, dest, channel) -> deque of messages
        self.receives: dict = {}          # (dest, source, tag) -> SimTransfer
        self.sends: list = []             # (source, dest, SimTransfer)
        self.messages_sent = 0
        self.dead: set = set()            # ranks killed (a node's transport learns later)
        self.late_lost: list = []         # (rank, receive) posted from a rank it knew dead

    def kill(self, rank: int) -> None:
        """Rank `rank` dies: nothing more leaves it; what it sent may still arrive until
        each receiver's transport finds out (SimTransport.lose)."""
        self.dead.add(rank)
        for key in [k for k in self.queues if k[1] == rank]:
            del self.queues[key]
        for key in [k for k in self.receives if k[0] == rank]:
            del self.receives[key]
        sends = []
        for source, dest, transfer in self.sends:
            if source == rank:
                continue  # its bytes never come (the receiver's loss reports the receive)
            if dest == rank:
                if transfer.on_done is not None:
                    transfer.on_done()  # the sender lets go of the buffer (_forget)
                continue
            sends.append((source, dest, transfer))
        self.sends = sends

    def post(self, source, dest, channel, message) -> None:
        # Pickled as MPI would: no object is shared between nodes.
        copy = pickle.loads(pickle.dumps(message, protocol=5))
        self.queues.setdefault((source, dest, channel), collections.deque()).append(copy)
        self.messages_sent += 1

    def idle(self) -> bool:
        return not any(self.queues.values()) and not self.sends


class SimTransport:
    """MpiTransport's interface over a SimNetwork."""

    busy = False
    poll_slowly = False
    needs_polling = True
    has_messages = False  # messages arrive by the simulator's "net" events, not polls
    expecting = False

    def __init__(self, network: SimNetwork, rank: int, size: int,
                 fault_tolerant: bool = False):
        self.network = network
        self.rank = rank
        self.size = size
        self._tag = 0
        self.fault_tolerant = fault_tolerant
        self.dead: set = set()    # ranks this node's transport found dead ("lost" event)

    def send(self, dest, message, channel="control") -> None:
        if dest not in self.dead and dest not in self.network.dead:
            self.network.post(self.rank, dest, channel, message)

    def broadcast(self, message, channel="control") -> None:
        for dest in range(self.size):
            if dest != self.rank:
                self.send(dest, message, channel)

    def live_ranks(self) -> list:
        return [rank for rank in range(self.size) if rank not in self.dead]

    def lose(self, rank: int) -> list:
        """This node's MPI finds `rank` dead (MpiTransport._peers_failed): messages from
        it not yet delivered are gone; the receives posted from it, returned, never end."""
        self.dead.add(rank)
        network = self.network
        for key in [k for k in network.queues if k[0] == rank and k[1] == self.rank]:
            del network.queues[key]
        lost = [t for (dest, source, _tag), t in network.receives.items()
                if dest == self.rank and source == rank]
        for transfer in lost:
            del network.receives[(self.rank, rank, transfer.tag)]
        sends = []
        for source, dest, transfer in network.sends:  # begun before it knew: let go
            if source == self.rank and dest == rank:
                if transfer.on_done is not None:
                    transfer.on_done()
            else:
                sends.append((source, dest, transfer))
        network.sends = sends
        return lost

    def new_transfer_tag(self) -> int:
        self._tag += 1
        return self._tag

    def start_receive(self, source, tag, dest) -> SimTransfer:
        transfer = SimTransfer(source, tag, _segments(dest), False)
        self.network.receives[(self.rank, source, tag)] = transfer
        if source in self.dead:  # never comes: reported with the next "lost" of this node
            self.network.late_lost.append((self.rank, transfer))
        return transfer

    def start_send(self, dest, tag, src, on_done=None, gate=None, stage=False) -> SimTransfer:
        # (stage: MpiTransport may copy through staging buffers; the bytes are the same)
        transfer = SimTransfer(dest, tag, _segments(src), True, on_done, gate)
        self.network.sends.append((self.rank, dest, transfer))
        return transfer

    def cancel_receive(self, transfer) -> None:
        self.network.receives.pop((self.rank, transfer.peer, transfer.tag), None)

    def poll(self) -> list:
        return []

    def progress(self) -> list:
        return []


# ---------------------------------------------------------------------------- processes
class SimProcess:
    """A worker or the driver: a thread that runs only while it holds the baton."""

    def __init__(self, sim: Simulation, node: SimNode, name: str, body):
        self.sim = sim
        self.node = node
        self.name = name
        self.pid = _FAKE_PID_BASE + sim.next_pid()
        self.inbox: collections.deque = collections.deque()   # node -> process
        self.outbox: collections.deque = collections.deque()  # process -> node
        self.state = "new"        # new, running, waiting (for a message), paused, done
        self.killed = False       # its connection ends: the simulation is over, or SIGKILL
        self.sigkilled = False    # its node killed it (kill(), cancel(force=True), ...)
        self.error = None
        self.handle: WorkerHandle | None = None
        self._go = threading.Semaphore(0)
        # What the process has of its own: its ref counter, client, id prefix.
        self.refs = LocalReferenceCounter()
        self.saved = {"prefix": node.rank.to_bytes(2, "big") + sim.rng.randbytes(6),
                      "counter": None, "client": None, "worker": None}
        self._body = body
        self.thread = threading.Thread(target=self._main, name=f"sim-{name}", daemon=True)

    @property
    def runnable(self) -> bool:
        return self.state in ("new", "paused") or (self.state == "waiting" and
                                                   (bool(self.inbox) or self.killed))

    def _main(self) -> None:
        self._go.acquire()
        try:
            self._body(self)
        except BaseException as exc:  # noqa: BLE001 - reported by the simulator
            if not self.sigkilled:  # a killed process ends wherever it was
                self.error = "".join(traceback.format_exception(exc))
        self.state = "done"
        self.sim.baton.release()

    def block(self, state: str) -> None:
        """Give the baton back and wait until the simulator runs this process again."""
        self.state = state
        self.sim.baton.release()
        self._go.acquire()
        self.state = "running"

    def resume(self) -> None:
        """Simulator side: run the process until it blocks or ends."""
        saved = self.saved
        ids._prefix = saved["prefix"]
        ids._counter = saved["counter"] or __import__("itertools").count(1)
        object_ref.reference_counter = self.refs
        context.client = saved["client"]
        context.worker = saved["worker"]
        if self.state == "new":
            self.state = "running"
            self.thread.start()
        self._go.release()
        self.sim.baton.acquire()
        saved["counter"] = ids._counter
        saved["client"] = context.client
        saved["worker"] = context.worker
        object_ref.reference_counter = self.sim.idle_counter
        context.client = context.worker = None


class ProcessConnection:
    """The process's end of its socket (BlockingConnection's interface)."""

    def __init__(self, process: SimProcess):
        self.process = process

    def send(self, message) -> None:
        if message[0] == Hello.CODE:
            message = (Hello.CODE, self.process.pid)
        self.process.outbox.append(pickle.loads(pickle.dumps(message, protocol=5)))

    def recv(self):
        process = self.process
        while not process.inbox or process.sigkilled:  # killed: it reads nothing more
            if process.killed:
                raise EOFError("simulation over")
            process.block("waiting")
        return process.inbox.popleft()

    def buffered(self) -> bool:
        return bool(self.process.inbox)

    def recv_nowait(self):
        inbox = self.process.inbox
        return inbox.popleft() if inbox and not self.process.sigkilled else None

    def close(self) -> None:
        pass


class NodeConnection:
    """The node's end of a process's socket (NonBlockingConnection's interface)."""

    closed = False
    has_pending_output = False

    def __init__(self, process: SimProcess):
        self.process = process

    def send(self, message) -> bool:
        if not self.closed:
            self.process.inbox.append(pickle.loads(pickle.dumps(message, protocol=5)))
        return False

    def send_raw(self, data) -> bool:
        """Messages already encoded (protocol.encode), several in one write."""
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            (size,) = _FRAME.unpack_from(view, pos)
            self.send(pickle.loads(view[pos + 4:pos + 4 + size]))
            pos += 4 + size
        return False

    def fileno(self) -> int:
        return -1

    def flush(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


# ---------------------------------------------------------------------------- nodes
class SimProcesses(WorkerProcesses):
    """A node's worker processes as the simulator's threads: no fork server, no pipes."""

    def __init__(self, node: SimNode, sources, job_logs):
        super().__init__(node.rank, sources, job_logs, node.job_dict, node.on_worker_messages,
                         node._worker_died)
        self.node = node

    def _start_forkserver(self, job: dict) -> None:
        self.forkserver = None

    def start(self, actor_id: bytes | None = None) -> WorkerHandle:
        key = next(self.keys)
        node = self.node
        process = node.sim.start_process(node, f"n{node.rank}w{key}", _worker_body(
            node.job_dict, key, actor_id is not None))
        worker = WorkerHandle(key, NodeConnection(process), {}, actor_id)
        process.handle = worker
        self.workers[key] = worker
        return worker

    def signal(self, pid: int, signum: int) -> None:
        """SIGKILL ends the worker's thread at its next read, after what it sent already
        (as a socket's buffered bytes outlive the process); the node then sees its
        connection close (the "eof" event). Other signals (a cancel's SIGINT) are not
        simulated: the simulated tasks never run long enough to be interrupted."""
        if signum != signal.SIGKILL:
            return
        node = self.node
        for process in node.sim.processes:
            if process.pid == pid and process.node is node and process.state != "done":
                process.sigkilled = process.killed = True


class SimNode(NodeManager):
    """A real NodeManager whose worker processes are SimProcesses and whose event loop
    is the simulator (no fork server, no epoll waits, no timers that fire)."""

    def __init__(self, sim: Simulation, rank: int, size: int, job: dict, config: Config,
                 num_cpus: float):
        self.sim = sim
        self.freed_ids: set = set()
        transport = SimTransport(sim.network, rank, size, sim.kill_at is not None)
        resources = detect_node_resources(num_cpus=num_cpus, num_gpus=0, resources={},
                                          environ={}, gpu_uuids=[])
        store_name = f"/hpcray-{os.getpid()}-sim{sim.seed}-n{rank}"
        self.job_dict = {"store_name": store_name, "job_id": job["job_id"],
                         "node_id": f"{rank:08x}" + "00" * 12, "resources": None,
                         "config": config.as_dict(), "gpu_uuids": [], "rank": rank}
        super().__init__(job_id=bytes.fromhex(job["job_id"]),
                         node_id=bytes.fromhex(self.job_dict["node_id"]),
                         node_resources=resources, config=config, store_name=store_name,
                         store_capacity=sim.store_bytes, cluster=ClusterLink(transport, job),
                         run_thread=False)
        self.job_dict["resources"] = self.total_resources

    # What the real node does with processes and its event loop, done by the simulator.
    def _worker_processes(self) -> SimProcesses:
        return SimProcesses(self, self.sources, self.job_logs)

    def _wake(self) -> None:
        pass

    def _wake_always(self) -> None:
        pass

    def _add_timer(self, delay, callback) -> None:
        self.sim.timers.append(callback)  # never fires: the simulation has no clock

    def _build_parts(self) -> None:
        super()._build_parts()
        self.router.clock = lambda: 0.0  # no clock: a view of the other nodes never ages
        free_object = self.objects.free_object

        def recording_free(object_id, entry) -> None:
            self.freed_ids.add(object_id)
            free_object(object_id, entry)
        self.objects.free_object = recording_free

    def after_event(self) -> None:
        """What the event loop does after handling events: load and task events out."""
        self.network.report_load(now_=True)  # when it changed; no clock in the simulation
        self.task_events.flush()

    def close(self) -> None:
        for entry in self.objects.values():
            if entry.pin is not None:
                entry.pin.release()
        self.objects.clear()
        self.spiller.close()
        self.host_stores.close()
        Store.unlink_name(self.store_name)
        self.store.close()
        self.sources.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


def _worker_body(job: dict, key: int, is_actor: bool):
    def body(process: SimProcess) -> None:
        worker = Worker(ProcessConnection(process), job, key, is_actor)
        process.refs = worker.refs
        worker.serve()
    return body


# ---------------------------------------------------------------------------- simulator
class Simulation:
    def __init__(self, seed: int, num_nodes: int = 3, num_cpus: float = 1.0,
                 inline_threshold: int = 300, store_bytes: int = 16 << 20,
                 gcs_shards: int = 1, max_steps: int = 40000, kill: bool = False,
                 relay_min_bytes: int | None = None, relay_fanout: int = 2,
                 host_reads: bool = False):
        self.seed = seed
        self.copies: list = []     # host copies in flight: (node, buffer, dest, on_done)
        self.relay_object = None   # the relay workload's object: (holder rank, size)
        self.submitted: list = []  # the submitters workload's (alone?, tasks, ran there)
        # With `kill`: a node other than the driver's dies at a random step (ULFM), and
        # each survivor's transport finds out at a step of its own ("lost" events).
        self.kill_at = None
        self.killed = None
        self.rng = random.Random(seed)
        if kill and num_nodes > 1:
            self.kill_at = self.rng.randrange(20, 400)
        self.network = SimNetwork()
        self.baton = threading.Semaphore(0)
        self.idle_counter = LocalReferenceCounter()
        self.idle_counter.enabled = False
        self.processes: list[SimProcess] = []
        self.timers: list = []
        self.store_bytes = store_bytes
        self.max_steps = max_steps
        self.steps = 0
        self.trace: collections.deque = collections.deque(
            maxlen=int(os.environ.get("HPCRAY_SIM_TRACE", "40")))
        self._pids = 0
        # Every function counts as short once it ran (pipeline_task_ms: a wall-clock
        # test would make a schedule depend on timing): tasks pipeline wherever they can.
        config = Config(inline_threshold=inline_threshold, object_store_memory=store_bytes,
                        log_to_driver=False, relay_fanout=relay_fanout,
                        pipeline_task_ms=float("inf"))
        if relay_min_bytes is not None:  # the workload's stored values are ~2 KB
            config.relay_min_bytes = relay_min_bytes
        job = {"job_id": f"{seed & 0xffffffff:08x}", "gcs_shards": gcs_shards}
        object_ref.reference_counter = self.idle_counter
        self.errors = _ErrorsLogged()
        logging.getLogger("hpcray").addHandler(self.errors)
        self.nodes: list[SimNode] = []
        try:
            for rank in range(num_nodes):
                self.nodes.append(SimNode(self, rank, num_nodes, job, config, num_cpus))
            # Two nodes a host: the survivor of a host cleans up after its dead neighbour,
            # and with `host_reads` the two copy from each other's stores, some copies at
            # once and some in events of their own (as the copy thread does large ones).
            inline_max = self.rng.choice((0, 1 << 10, 1 << 40)) if host_reads else 0
            for node in self.nodes:
                node.host_stores.identity = f"sim{node.rank // 2}" if host_reads else ""
                node.host_stores.inline_max = inline_max
                node.host_stores.copier = SimCopier(self, node)
            described = {node.rank: {"node_id": node.node_id.hex(),
                                      "resources": node.total_resources,
                                      "hostname": f"sim{node.rank // 2}",
                                      "host_key": node.host_stores.identity,
                                      "store_name": node.store_name,
                                      "spill_dir": node.spill_dir} for node in self.nodes}
            for node in self.nodes:
                node.set_cluster_nodes(described)
                node.prestart_workers(max(1, int(num_cpus)))
        except BaseException:
            self.close()
            raise

    def next_pid(self) -> int:
        self._pids += 1
        return self._pids

    def start_process(self, node: SimNode, name: str, body) -> SimProcess:
        process = SimProcess(self, node, name, body)
        self.processes.append(process)
        return process

    def start_driver(self, program) -> SimProcess:
        """Run `program(sim)` as the job's driver, a client of node 0."""
        node = self.nodes[0]

        def body(process: SimProcess) -> None:
            channel = WorkerChannel(ProcessConnection(process), process.refs)
            context.client = WorkerClient(channel, node.store, node.config, node.job_id,
                                          node.node_id, node.total_resources)
            program(self)
            # The driver's last drops reach its node with one more request.
            channel.request("resources", ())

        driver = self.start_process(node, "driver", body)
        driver.refs.enabled = True
        # A driver's node knows it as a worker that never runs tasks.
        handle = WorkerHandle(0, NodeConnection(driver), {}, None)
        handle.ready = True
        driver.handle = handle
        return driver

    def pause(self) -> None:
        """Called by the driver between operations: anything may happen meanwhile."""
        current = threading.current_thread()
        for process in self.processes:
            if process.thread is current:
                process.block("paused")
                return

    # -- events ----------------------------------------------------------------------
    def alive(self, node) -> bool:
        return node.rank not in self.network.dead

    def enabled_events(self) -> list:
        if self.kill_at is not None and self.killed is None and self.steps >= self.kill_at:
            return [("kill", self.rng.randrange(1, len(self.nodes)))]
        events = [("net", key) for key, queue in self.network.queues.items() if queue]
        if self.killed is not None:
            late = {rank for rank, _ in self.network.late_lost}
            events += [("lost", node) for node in self.nodes if self.alive(node)
                       and (self.killed not in node.transport.dead or node.rank in late)]
        events += [("copy", i) for i in range(len(self.copies))]
        receives = self.network.receives
        events += [("data", i) for i, (source, dest, transfer) in enumerate(self.network.sends)
                   if (dest, source, transfer.tag) in receives and transfer.ready()]
        for process in self.processes:
            if not self.alive(process.node):
                continue
            if process.outbox:
                events.append(("up", process))
            if process.runnable:
                events.append(("run", process))
            if process.state == "done" and process.handle is not None and \
                    process.handle.alive and not process.outbox and process.handle.key != 0:
                events.append(("eof", process))
        return events

    def step(self, event) -> None:
        kind, what = event
        if kind == "net":
            source, dest, channel = what
            message = self.network.queues[what].popleft()
            self.trace.append(f"net {source}->{dest} {channel} {str(message)[:120]}")
            node = self.nodes[dest]
            node.network.handle_cluster_messages([(source, channel, message)])
            node.after_event()
        elif kind == "data":
            source, dest, transfer = self.network.sends.pop(what)
            receive = self.network.receives.pop((dest, source, transfer.tag))
            self.trace.append(f"data {source}->{dest} {transfer.nbytes} B")
            # As MPI matches them: segment i into receive i; a shorter message (an
            # object the holder no longer had) fills the start of its buffer.
            if len(receive.views) != len(transfer.views) or any(
                    len(src) > len(dst) for src, dst in zip(transfer.views, receive.views)):
                raise SimulationFailure(f"transfer {transfer.tag} {source}->{dest}: "
                                        "segments do not match the receive's")
            for src, dst in zip(transfer.views, receive.views):
                dst[:len(src)] = src
                src.release()
            transfer.done = receive.done = True
            if transfer.on_done is not None:
                transfer.on_done()
            self.nodes[source].after_event()
            if receive.on_done is not None:
                receive.on_done()
            self.nodes[dest].after_event()
        elif kind == "copy":
            node, buffer, dest, on_done = self.copies.pop(what)
            self.trace.append(f"copy into node {node.rank}, {len(buffer)} B")
            if self.alive(node):
                copy_into(dest, 0, buffer)
                buffer.release()
                on_done(True)
                node.after_event()
            else:  # its reader died: the holder's store gives back what it pinned
                buffer.release()
                dest.release()
        elif kind == "up":
            message = what.outbox.popleft()
            self.trace.append(f"up {what.name} {str(message)[:120]}")
            what.node.on_worker_messages(what.handle, [message])
            what.node.after_event()
        elif kind == "run":
            self.trace.append(f"run {what.name}")
            what.resume()
            if what.error is not None:
                raise SimulationFailure(f"{what.name} raised:\n{what.error}")
        elif kind == "eof":
            self.trace.append(f"eof {what.name}")
            what.node._worker_died(what.handle)
            what.node.after_event()
        elif kind == "kill":
            self.trace.append(f"kill node {what}")
            self.killed = what
            self.network.kill(what)
        elif kind == "lost":
            self.trace.append(f"lost: node {what.rank} finds node {self.killed} dead")
            first = self.killed not in what.transport.dead
            transfers = what.transport.lose(self.killed) if first else []
            transfers += [t for rank, t in self.network.late_lost if rank == what.rank]
            for transfer in transfers:  # as MpiTransport: no view of the buffer is kept
                for view in transfer.views:
                    view.release()
            self.network.late_lost = [(r, t) for r, t in self.network.late_lost
                                      if r != what.rank]
            what.failures.peers_lost([self.killed] if first else [], transfers)
            what.after_event()

    def run(self, driver: SimProcess) -> None:
        """Step until the driver is done and nothing else can happen."""
        while True:
            events = self.enabled_events()
            if not events:
                if driver.state != "done":
                    raise SimulationFailure("deadlock: nothing can happen and the driver "
                                            f"is {driver.state}\n" + self.describe_state())
                return
            self.steps += 1
            if self.steps > self.max_steps:
                raise SimulationFailure(f"no end after {self.max_steps} steps")
            try:
                self.step(self.rng.choice(events))
            except SimulationFailure:
                raise
            except Exception:  # noqa: BLE001 - a node's handler raised: a failure of the seed
                raise SimulationFailure(f"step raised:\n{traceback.format_exc()}") from None
            if self.errors.records:
                record = self.errors.records[0]
                raise SimulationFailure(f"the runtime logged an error: {record.getMessage()}"
                                        f"\n{self.errors.format(record)}")
            self.check()

    # -- invariants ------------------------------------------------------------------
    def check(self) -> None:
        """After every event: no object that a live process holds was freed by its owner."""
        for process in self.processes:
            if process.state == "done" or not self.alive(process.node):
                continue
            for key in process.refs.counts:
                if len(key) == ids.OBJECT_ID_SIZE:
                    owner = self.nodes[ids.owner_rank(key)]
                    if key in owner.freed_ids and self.alive(owner):
                        raise SimulationFailure(
                            f"{process.name} holds {key.hex()}, which node {owner.rank} "
                            "freed")
        for node in self.nodes:
            if self.alive(node):
                node.scheduler.check_invariants()
                self.check_spilled(node)

    @staticmethod
    def check_spilled(node) -> None:
        """A value this node keeps in its store is pinned there, or spilled: in a file of
        the spiller and not in the store; the spiller has a file of no freed object."""
        spiller = node.spiller
        for key, entry in node.objects.items():
            if entry.spilled:
                if entry.pin is not None or key not in spiller.files:
                    raise SimulationFailure(f"node {node.rank}: {key.hex()} spilled with pin "
                                            f"{entry.pin} and no file")
                if node.store.contains(key):
                    raise SimulationFailure(f"node {node.rank}: {key.hex()} spilled and "
                                            "still in the store")
        for key in spiller.files:
            if key not in node.objects:
                raise SimulationFailure(f"node {node.rank}: a spill file of {key.hex()}, "
                                        "which this node no longer keeps")

    def check_quiescent(self) -> None:
        """Once the driver is done and every message delivered: everything is freed."""
        problems = []
        for node in self.nodes:
            if not self.alive(node):
                if os.path.exists(node.spill_dir) and self.alive(self.nodes[node.rank ^ 1]):
                    problems.append(f"dead node {node.rank}'s spill folder is left on its "
                                    "host, whose other node lives")
                continue
            held = {key.hex(): (entry.state, entry.refs, entry.borrowers, entry.lent,
                                entry.primary)
                    for key, entry in node.objects.items()}
            if held:
                problems.append(f"node {node.rank} still has entries {held}")
            if node.tasks:
                problems.append(f"node {node.rank} still has tasks {list(node.tasks)}")
            if node.generators.streams:
                problems.append(f"node {node.rank} still has generator streams "
                                f"{[t.hex() for t in node.generators.streams]}")
            if node.link.pulls:
                problems.append(f"node {node.rank} has pulls {node.link.pulls}")
            relay = node.relay
            if not relay.idle():
                problems.append(f"node {node.rank} has relay state: trees "
                                f"{[k.hex() for k in relay.trees]}, sources "
                                f"{[k.hex() for k in relay.sources]}, relayed {relay.relayed}")
            stored = node.store.objects()
            if stored:
                problems.append(f"node {node.rank} store still holds {stored}")
            pins = node.store.pins()
            if pins:
                problems.append(f"node {node.rank} store has pins {pins}")
            if node.spiller.files or os.path.exists(node.spill_dir) and \
                    os.listdir(node.spill_dir):
                problems.append(f"node {node.rank} has spill files "
                                f"{[k.hex() for k in node.spiller.files]}")
            if node.pins.tasks:
                problems.append(f"node {node.rank} keeps the lineage of tasks "
                                f"{[t.hex() for t in node.pins.tasks]}")
            shard = node.network.gcs_shard
            kept = [t.hex() for t, task in (shard.tasks.items() if shard else ())
                    if task.spec is not None and self.alive(self.nodes[ids.owner_rank(t)])]
            if kept:
                problems.append(f"GCS shard {node.rank} keeps the specs of {kept}")
            live_actors = [a for a in node.actors.values() if a.death is None]
            if live_actors:
                problems.append(f"node {node.rank} has live actors {live_actors}")
        if problems:
            for process in self.processes:
                if process.refs.counts or process.refs.transitions:
                    problems.append(f"{process.name} ({process.state}) holds "
                                    f"{[k.hex() for k in process.refs.counts]}, unsent "
                                    f"{[(k.hex(), d) for k, d in process.refs.transitions]}")
            raise SimulationFailure("not quiescent:\n" + "\n".join(problems))

    def close(self) -> None:
        for process in self.processes:
            process.killed = True
        for process in self.processes:
            if process.thread.is_alive() and process.state != "done":
                process._go.release()
                self.baton.acquire(timeout=5)
        for node in self.nodes:
            node.close()
        logging.getLogger("hpcray").removeHandler(self.errors)
        object_ref.reference_counter = self.idle_counter
        context.client = context.worker = None

    def describe_state(self) -> str:
        lines = []
        for node in self.nodes:
            tasks = {t.hex()[-6:]: (r.spec.name.split(".")[-1], r.state, r.pending_deps,
                                    r.worker.key if r.worker else None)
                     for t, r in node.tasks.items()}
            lines.append(f"node {node.rank}: tasks {tasks} queued "
                         f"{node.scheduler.num_queued} available {node.scheduler.available} "
                         f"idle {node.scheduler.idle_workers} busy {node.scheduler.busy_workers}"
                         f" blocked {node.scheduler.blocked_workers} starting "
                         f"{node.scheduler.num_starting}")
        lines += [f"{p.name}: {p.state}" for p in self.processes if p.state != "done"]
        return "\n".join(lines)

    def describe(self) -> str:
        return f"seed {self.seed}, step {self.steps}; last events:\n  " + \
            "\n  ".join(self.trace)
