"""The node manager: one per node, the node's event loop, workers and tasks, and the
parts it wires together (docs/ARCHITECTURE.md draws them):

  objects    ObjectTable (object_table.py): id -> ObjectEntry, values, holders, waiters
  borrowing  Borrowing (borrowing.py): reference counts across nodes
  mover      ObjectMover (object_mover.py): values to and from other nodes
  actors     Actors (actors.py): the actors hosted here, handles of the others
  router     TaskRouter (task_router.py): keep or forward tasks, run placed ones
  network    Network (cluster.py): MPI polling, dispatch, GCS, global scheduler
  requests   WorkerRequests (worker_requests.py): the node operations of workers

In the embedded (single-node) mode it lives inside the driver process: an event-loop
thread waits on the workers' sockets and output pipes (epoll, no timeout when idle,
so an idle node costs nothing), and the driver calls its operations directly. One
lock guards all of its state; both the driver thread and the event loop take it.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import logging
import math
import os
import select
import socket
import sys
import threading
import time

from hpcray import exceptions
from hpcray._scheduler import LocalScheduler
from hpcray._store import Store
from hpcray.object_ref import LocalReferenceCounter
from hpcray.gcs.shard import OBJECT_DELETED
from hpcray.runtime import clock, hops, messages, sampler
from hpcray.runtime.messages import Hello, wire
from hpcray.runtime.actors import A_ALIVE, A_DEAD, Actors
from hpcray.runtime.borrowing import Borrowing
from hpcray.runtime.call_sites import CallSites
from hpcray.runtime.cancellation import Canceller, cancelled_error
from hpcray.runtime.cluster import Network, precise_sleeps
from hpcray.runtime.generators import Generators, generator_kind
from hpcray.runtime.host_stores import HostStores
from hpcray.runtime.host_wakes import HostWakes
from hpcray.runtime.job_logs import JobLogs
from hpcray.runtime.guardian import NoBoard
from hpcray.runtime.lineage import Lineage, LineagePins
from hpcray.runtime.node_failures import NodeFailures
from hpcray.runtime.object_mover import ObjectMover
from hpcray.runtime.object_table import ObjectTable
from hpcray.runtime.owners import ActorOwners
from hpcray.runtime.placement_groups import Bundles, GroupDirectory, group_of, take_gpu_ids
from hpcray.runtime.relay import ObjectRelay
from hpcray.runtime.spilling import Spiller, remove_directory, spill_directory
from hpcray.runtime.task_router import TaskRouter
from hpcray.runtime.worker_requests import WorkerRequests
from hpcray.runtime.specs import (ACTOR_CALL, ACTOR_CREATION, FINISHED, NORMAL_TASK, QUEUED,
                                  RUNNING, TaskRecord, TaskSpec)
from hpcray.runtime.state_queries import StateQueries
from hpcray.runtime.driver_feed import SUBMIT_BUDGET, DriverFeed
from hpcray.runtime.recorder import Recorder
from hpcray.runtime.task_events import TaskEvents
from hpcray.runtime.unschedulable import Unschedulable
from hpcray.runtime.worker_processes import (EventSources, WorkerHandle, WorkerProcesses,
                                             close_fd)
from hpcray.serialization import error_bytes

log = logging.getLogger("hpcray.node")
_HELLO = Hello.CODE
# select() takes descriptors below FD_SETSIZE only; an epoll made above it (a driver that
# had opened many files before init) is waited on in whole milliseconds instead.
_SELECTABLE_FDS = 1024

# The node's thread shares the GIL with the driver's. A thread that wants it gets it
# only once the holder has run a whole switch interval (5 ms by default): while the
# driver submits in a loop, its node's thread, and with it every worker waiting for its
# next call, waited that long per turn. Measured, 1:1 async actor calls on one node:
# 25-37k/s at 5 ms, 46-53k/s at 0.2 ms. Set while the node runs in a driver's process,
# unless the program chose an interval of its own.
NODE_SWITCH_INTERVAL = 0.0002
PYTHON_SWITCH_INTERVAL = 0.005  # Python's default
# The same process's first-generation collection threshold, raised likewise (only from
# Python's default). Each queued task holds ~10 objects the cyclic GC tracks (spec,
# record, entry, ref, pin...): every 700 allocations a burst's queue was walked, and
# what it held was promoted, so the driver's ~250k long-lived objects were walked in a
# full collection every few thousand tasks. At 10,000 most of a task's objects are
# freed (reference counting) before a collection sees them. Measured (callgrind, the
# driver's process per no-op task): garbage collection 20k of 208k instructions -> 7k.
NODE_GC_THRESHOLD = 10_000
PYTHON_GC_THRESHOLD = 700  # Python's default

class NodeManager:
    """One per node: its event loop, its worker processes and the tasks they run; it
    builds the node's other parts and hands each what it depends on."""

    HANDLES = {messages.Hello: "on_hello", messages.WorkDone: "on_work_done"}

    def __init__(self, *, job_id: bytes, node_id: bytes, node_resources, config,
                 store_name: str, store_capacity: int, cluster, run_thread: bool = True,
                 activity=None):
        """`cluster`: a ClusterLink (over a LoopbackTransport on one node). `run_thread`:
        the event loop runs in a thread of its own (the driver's node); else the caller
        runs `serve()`. `activity`: where the names of what workers run are kept for the
        rank's guardian (guardian.py), or None."""
        self.link = self.cluster = cluster
        self.activity = activity if activity is not None else NoBoard()
        self.activity.reset()
        self.rank = cluster.rank
        self.job_id = job_id
        self.node_id = node_id
        self.config = config
        self.node_resources = node_resources
        self.total_resources = node_resources.as_dict()
        self.scheduler = LocalScheduler(dict(self.total_resources),
                                        max(1, int(node_resources.num_cpus)),
                                        config.max_idle_extra_workers,
                                        pipelining=config.pipeline_task_ms > 0,
                                        pipeline_depth=config.pipeline_depth)
        # function id -> whether its last run was short enough to pipeline (pipelinable)
        self._short_functions: dict[bytes, bool] = {}
        self._retire_timer_at: float | None = None
        self.free_gpus = list(range(len(node_resources.gpus) or int(node_resources.num_gpus)))
        self.lock = threading.Lock()
        self.tasks: dict[bytes, TaskRecord] = {}
        self.functions: dict[bytes, bytes] = {}
        self.driver_refs = LocalReferenceCounter()
        self.driver_refs.on_actor_released = self._wake_always
        # Tasks the driver submitted in a job of several nodes, for this node's thread:
        # the driver never waits for the lock to submit one.
        self.driver_feed = DriverFeed(self, self.driver_refs)
        self._timers: list = []
        self._thread = None
        self._wakes_held = False   # hold_wakes
        self._wake_pending = False
        self._timer_seq = itertools.count()
        self._running = True
        self._start_failures = 0
        self.store_name = store_name
        self.spill_dir = spill_directory(config, store_name)
        self.sources = EventSources(self.rank)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sources.register(self._wake_r, self._on_wake)
        self.job_logs = JobLogs(config.log_dir, self.rank, cluster.size > 1,
                                config.log_to_driver, self._actor_log_name)
        self.processes = self._worker_processes()
        self.workers = self.processes.workers  # key -> WorkerHandle
        try:
            self.store = Store.create(store_name, store_capacity)
        except BaseException:
            self.processes.stop_forkserver()  # it exits at once, and unlinks the name
            remove_directory(self.spill_dir)
            self.sources.close()
            close_fd(self._wake_r)
            close_fd(self._wake_w)
            self.job_logs.close()
            raise
        self._build_parts()
        self._thread = None
        self._switch_interval = None
        self._gc_threshold = None
        if run_thread:
            self.start_thread()

    def start_thread(self) -> None:
        """Run the event loop in a thread of its own (the driver's node), from now on."""
        if math.isclose(sys.getswitchinterval(), PYTHON_SWITCH_INTERVAL):
            self._switch_interval = PYTHON_SWITCH_INTERVAL
            sys.setswitchinterval(NODE_SWITCH_INTERVAL)
        self._raise_gc_threshold()
        self._thread = threading.Thread(target=self._event_loop,
                                        name="hpcray-node-manager", daemon=True)
        self._thread.start()

    def _build_parts(self) -> None:
        """The node's parts, each handed what it depends on; the parts that depend on
        each other both ways get the other through `bind`."""
        rank, link, store, scheduler = self.rank, self.link, self.store, self.scheduler
        self.network = Network(rank, link, scheduler, self.total_resources, self._wake)
        self.gcs = gcs = self.network.gcs
        self.transport = self.network.transport
        peers = self.network.peers
        self.task_events = TaskEvents(rank, gcs)
        self.recorder = Recorder(rank, self.config.timeline_events,
                                 (link.job.get("clock") or {rank: None})[rank])
        if self.config.report:
            gpus = sampler.gpu_utilization([g.uuid for g in self.node_resources.gpus])
            self.recorder.sampler = sampler.Sampler(store, self.total_resources.get("CPU", 1),
                                                    gpus, self.config.report_interval)
            self._add_timer(0.0, self._sample)
        self.pins = LineagePins(self.task_events)
        self.objects = ObjectTable(rank, store, self.pins)
        self.call_sites = CallSites(self.objects.entries)
        self.spiller = Spiller(rank, self.objects, store, self.spill_dir)
        self.borrowing = Borrowing(rank, self.objects, store, gcs, peers)
        self.host_stores = HostStores(rank, link, self.sources, self.config.host_reads)
        self.wakes = HostWakes(rank, self.job_id.hex(), self.sources, self.config.host_wakes,
                               self.recorder.counters)
        if self.transport.needs_polling:  # (a cluster of one wakes itself)
            self.transport.on_post = self.wakes.ring
            # from the MPI progress thread (not held back by hold_wakes: the driver's
            # release could miss a wake set meanwhile)
            self.transport.on_chunks_done = self._wake_always
        self.mover = ObjectMover(rank, link, self.objects, self.borrowing, store, self.spiller,
                                 gcs, peers, self.recorder, self.host_stores)
        self.relay = ObjectRelay(rank, link, self.objects, store, self.spiller, peers,
                                 self.recorder, self.config.relay_min_bytes,
                                 self.config.relay_fanout)
        self.mover.bind(self.relay)
        self.actors = Actors(rank, link, self, self.objects, scheduler, gcs, peers)
        self.owners = ActorOwners(rank, self, self.actors, peers)
        self.unschedulable = Unschedulable(self.network, self.config.infeasible, self.actors,
                                           self._fail_task)
        self.router = TaskRouter(rank, link, self, self.network, self.objects, self.borrowing,
                                 self.mover, self.actors, scheduler, self.task_events, peers)
        self.canceller = Canceller(rank, self, self.objects, self.borrowing, self.actors,
                                   scheduler, store, peers)
        self.requests = WorkerRequests(rank, self, self.objects, self.actors, self.router,
                                       self.network, scheduler, self.spiller)
        self.state_queries = StateQueries(rank, link, self, self.objects, gcs,
                                          self.task_events, self.recorder, peers)
        self.generators = Generators(rank, self, self.objects, self.borrowing, self.actors,
                                     self.router, peers)
        self.groups = GroupDirectory(rank, link, self.network, scheduler, peers)
        self.bundles = Bundles(rank, self, self.network, self.actors, self.canceller,
                               scheduler, peers)
        self.groups.bind(self.router)
        self.objects.bind(self.mover, self.borrowing, self.actors, self.generators,
                          self.spiller, self.relay)
        self.router.bind(self.generators)
        self.borrowing.bind(self.actors)
        self.actors.bind(self.router, self.borrowing, self.owners)
        self.lineage = Lineage(rank, self, self.objects, self.pins, gcs)
        self.mover.copy_missing = self.lineage.copy_missing
        self.failures = NodeFailures(rank, link, self, self.network, self.objects,
                                     self.actors, self.router, self.mover, self.lineage,
                                     gcs, peers)
        self.relay.bind(self.mover, self.failures.copy_lost)
        self.network.bind(self.router, self.failures, messages.dispatch_table(
            "control", self.network, self.router, self.borrowing, self.mover,
            self.state_queries, self.canceller, self.generators, self.failures,
            self.groups, self.bundles, self.relay, self.owners), self.groups, self.mover)
        self.worker_handlers = messages.dispatch_table("up", self, self.actors, self.requests,
                                                       self.generators)
        gcs.subscribe_handler(OBJECT_DELETED, self.borrowing.on_object_deleted)

    def describe_self(self) -> dict:
        """This node as the start handshake tells the others."""
        return {"node_id": self.node_id.hex(), "resources": self.total_resources,
                "hostname": self.info["hostname"], "store_name": self.store_name,
                "spill_dir": self.spill_dir, "pid": os.getpid(),
                "host_key": self.host_stores.identity, **self.wakes.describe()}

    def set_cluster_nodes(self, nodes: dict) -> None:
        """Every node's id and totals (from the start handshake)."""
        self.wakes.set_peers(nodes)
        self.network.set_cluster_nodes(nodes, woken_by_peers=self.wakes.every_peer_wakes)

    def serve(self) -> None:
        """Run the event loop in this thread until rank 0 says stop (ranks > 0)."""
        self._thread = threading.current_thread()
        self._raise_gc_threshold()
        self._event_loop()

    def _raise_gc_threshold(self) -> None:
        """NODE_GC_THRESHOLD for this process while the node runs, unless the program
        set a threshold of its own (shutdown puts Python's back)."""
        threshold = gc.get_threshold()
        if threshold[0] == PYTHON_GC_THRESHOLD:
            self._gc_threshold = threshold
            gc.set_threshold(NODE_GC_THRESHOLD, *threshold[1:])

    # ------------------------------------------------------------------ start/stop
    def _forkserver_job(self) -> dict:
        """What the fork server and the workers it forks need to know of this node."""
        return {"store_name": self.store_name, "job_id": self.job_id.hex(),
                "node_id": self.node_id.hex(), "resources": self.total_resources,
                "config": self.config.as_dict(), "driver_pid": os.getpid(),
                "gpu_uuids": [g.uuid for g in self.node_resources.gpus], "rank": self.rank,
                "spill_dir": self.spill_dir}

    def _worker_processes(self) -> WorkerProcesses:
        """The fork server starts here, first: from the moment the store segment exists,
        a process that outlives this one (even a SIGKILL) is there to unlink it."""
        return WorkerProcesses(self.rank, self.sources, self.job_logs, self._forkserver_job(),
                               self.on_worker_messages, self._worker_died)

    def wait_forkserver_ready(self, timeout: float) -> bool:
        """Wait until the fork server has imported what workers need (or died).

        The driver's init waits for this so that the first worker it asks for starts in
        milliseconds: otherwise the first actor waits for the server's imports (~1-2 s on
        a loaded host), after init returned, and a program that cancels its first actor
        call "once it has started" (Ray's actors.py) cancels it before it runs."""
        return self.processes.forkserver_ready.wait(timeout)

    def prestart_workers(self, count: int) -> None:
        with self.lock:
            for _ in range(count):
                self.scheduler.worker_starting()
                self.processes.start()

    def shutdown(self) -> None:
        """Stop every worker and the fork server, unlink the store. Idempotent."""
        with self.lock:
            if not self._running:
                return
            self._running = False
            self.processes.ask_to_exit(self._busy)
        os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._switch_interval is not None and math.isclose(sys.getswitchinterval(),
                                                               NODE_SWITCH_INTERVAL):
            sys.setswitchinterval(self._switch_interval)
        if self._gc_threshold is not None and gc.get_threshold()[0] == NODE_GC_THRESHOLD:
            gc.set_threshold(*self._gc_threshold)
        self.processes.close()
        self.owners.close()
        if self.recorder.sampler is not None:
            self.recorder.sampler.close()
        for entry in self.objects.values():
            if entry.pin is not None:
                entry.pin.release()
        self.objects.clear()
        self.spiller.close()
        self.host_stores.close()
        self.transport.on_post = None
        self.transport.on_chunks_done = None
        self.wakes.close()
        Store.unlink_name(self.store_name)
        self.store.close()
        self.sources.close()
        close_fd(self._wake_r)
        close_fd(self._wake_w)
        log.info("node stopped")
        hops.dump(self.rank)
        self.job_logs.close()

    def _busy(self, worker: WorkerHandle) -> bool:
        """Whether the worker runs a task, an actor call or an actor's constructor."""
        if worker.actor_id is None:
            return worker.task is not None
        actor = self.actors.hosted.get(worker.actor_id)
        return actor is not None and (bool(actor.inflight) or actor.state != A_ALIVE)

    # ------------------------------------------------------------------ event loop
    def _event_loop(self) -> None:
        link, network, transport = self.link, self.network, self.transport
        processes = self.processes
        if transport.needs_polling:  # (one node's loop sleeps until woken)
            precise_sleeps()
        while self._running and not link.stop_requested:
            timeout = 0.0 if self.driver_feed.queue else network.cluster_poll_timeout()
            if self._timers:
                due = max(0.0, self._timers[0][0] - time.monotonic())
                timeout = due if timeout < 0 else min(timeout, due)
            try:
                events = self._wait_for_events(timeout)
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return
            with self.lock:
                if not self._running:
                    return
                transport.cork()  # what the pass sends goes at its end, together
                processes.hold_tasks()
                try:
                    self.driver_feed.take(SUBMIT_BUDGET)
                    self.sources.dispatch(events)
                    self._run_timers()
                    self.task_events.flush_due()
                    network.poll_cluster(active=bool(events))
                finally:
                    processes.release_tasks()
                    transport.uncork()

    def handle_ready_events(self) -> None:
        """Under the lock: what this node's sockets have now (its workers' messages)."""
        self.sources.dispatch(self.sources.epoll.poll(0))

    def _wait_for_events(self, timeout: float) -> list:
        """epoll waits whole milliseconds (Python rounds a 50 us timeout up to 1 ms), so
        the short waits of MPI polling (a reply or a transfer due) go through select on
        the epoll descriptor, which keeps microseconds. Not while `poll_slowly`: a
        sender polling every 50-200 us made pulls of 7 MiB and more 5-10x slower, and a
        receiver's polls slowed the progress thread's 64 MiB without CMA by 25%; a
        small pull's receiver notices its end sooner. A small transfer just started
        (`expecting`) is polled for on both sides."""
        epoll = self.sources.epoll
        if 0 < timeout < 0.001 and (self.transport.expecting or not self.transport.poll_slowly) \
                and epoll.fileno() < _SELECTABLE_FDS:
            ready, _, _ = select.select((epoll,), (), (), timeout)
            return epoll.poll(0) if ready else []
        return epoll.poll(timeout)

    def hold_wakes(self) -> None:
        """Under the lock, from the driver's thread: until `release_wakes`, a wake-up of
        the event loop waits. Woken while the driver holds the lock, the loop's thread
        only takes the GIL to wait for the lock (a remote get's Pull left ~17 us later)."""
        self._wakes_held = True

    def release_wakes(self) -> None:
        """After the lock's release: the wake-up asked for meanwhile, if any."""
        self._wakes_held = False
        if self._wake_pending:
            self._wake_pending = False
            self._wake()

    def _wake(self) -> None:
        """Make the event loop go round now (from another thread)."""
        if self._wakes_held:
            self._wake_pending = True
            return
        if threading.current_thread() is not self._thread:
            try:
                os.write(self._wake_w, b"w")
            except BlockingIOError:
                pass

    def _wake_always(self) -> None:
        try:
            os.write(self._wake_w, b"a")
        except OSError:  # the pipe is full (a wake-up is pending anyway) or closed
            pass

    def _on_wake(self, fd, _mask) -> None:
        try:
            os.read(fd, 4096)
        except BlockingIOError:
            pass

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, callback = heapq.heappop(self._timers)
            callback()

    def _sample(self) -> None:
        """The report's reading of this node (sampler.py), then the next one's timer."""
        self.sample()
        self._add_timer(self.recorder.sampler.interval, self._sample)

    def sample(self) -> None:
        self.recorder.sampler.sample([w.pid for w in self.workers.values()
                                      if w.alive and w.pid])

    def _add_timer(self, delay: float, callback) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), callback))
        if threading.current_thread() is not self._thread:
            os.write(self._wake_w, b"t")

    # ------------------------------------------------------------------ workers
    def on_worker_messages(self, worker: WorkerHandle, messages) -> None:
        """Handle what a worker sent, in order."""
        handlers = self.worker_handlers
        for message in messages:
            if message[0] != _HELLO:  # every other message ends with ref transitions
                _note_holds(worker.holds, message[-1])
            handlers[message[0]](worker, *message[1:])

    def _actor_log_name(self, actor_id: bytes) -> str | None:
        """The actor's name in its workers' log prefix: its repr once constructed where its
        class defines __repr__, else its class name."""
        actor = self.actors.get(actor_id)
        if actor is None:
            return None
        return actor.repr_name or actor.info["class_name"]

    def on_hello(self, worker: WorkerHandle, pid: int) -> None:
        worker.pid = pid
        worker.ready = True
        worker.ready_ms = round(time.time() * 1000)
        self.job_logs.hello(worker)
        self._start_failures = 0
        if worker.actor_id is None:
            self._run_actions(self.scheduler.worker_started(worker.key, now=time.monotonic()))
        else:
            actor = self.actors.get(worker.actor_id)
            if actor is None or actor.state == A_DEAD or actor.killed:  # (killed: it ends)
                self.processes.send(worker, wire(messages.ExitWorker))
                return
            self.actors.send_actor_creation(actor, worker)

    def _worker_died(self, worker: WorkerHandle) -> None:
        if not worker.alive:
            return
        worker.alive = False
        self.processes.disconnect(worker)
        self.activity.idle(worker.key)
        if not self._running:
            return
        self.job_logs.died(worker)
        # It may have died halfway through writing an object (reaped ones only: a zombie
        # still counts as alive; the store-full path retries this too).
        self.store.abort_dead_creators()
        if worker.pid:  # its socket closed: it is exiting, its zero-copy views are gone
            self.store.release_pins_of(worker.pid)
        holds, worker.holds = worker.holds, set()
        for key in holds:  # the refs its process held (a crash never reported them)
            self.objects.decref(key)
        if worker.ready and worker.task is not None:
            self.recorder.count("worker_deaths")
            self.recorder.died(worker.task.spec, worker.pid, worker.task.dispatched)
        elif worker.ready and worker.actor_id is not None:
            self.recorder.count("worker_deaths")
        self.owners.worker_died(worker)  # the actors it created die with it (most often)
        if worker.actor_id is not None:
            self.actors.actor_process_died(worker)
            return
        record = worker.task
        worker.task = None
        if not worker.ready:
            self._worker_start_failed(worker)
            return
        self._release_gpus(record)
        pipelined, worker.pipelined = worker.pipelined, []
        actions = self.scheduler.worker_died(worker.key, record.spec.demand if record else None)
        for taken in pipelined:  # never started: the scheduler queued it again, first
            self._taken_back(taken)
        if record is not None:
            if record.cancelled:  # cancel(force=True) killed it: a new worker takes its place
                self._fail_task(record, exceptions.TaskCancelledError(
                    f"{record.spec.name} was cancelled (force=True: its worker was killed)."))
                scheduler = self.scheduler
                if len(scheduler.idle_workers) + len(scheduler.busy_workers) + \
                        scheduler.num_starting < scheduler.target_workers:
                    scheduler.worker_starting()
                    actions = actions + [("start_worker",)]
            elif record.retries_left != 0:
                record.retries_left -= 1
                self.recorder.count("retries")
                record.state = QUEUED
                record.worker = None
                actions = actions + self.scheduler.task_ready(record.spec.task_id,
                                                              record.spec.demand)
            else:
                self._fail_task(record, exceptions.WorkerCrashedError(
                    f"The worker (pid={worker.pid}) running {record.spec.name} died "
                    "unexpectedly; the task ran out of retries."))
        self._run_actions(actions)

    # Pool workers that die before saying hello, this many times in a row, mean no worker
    # can start (the store segment was removed, the environment is broken): the queued
    # tasks fail with the workers' own error instead of waiting on endless restarts.
    _MAX_START_FAILURES = 3

    def _worker_start_failed(self, worker: WorkerHandle) -> None:
        self.processes.read_all_output(worker)  # what it wrote before dying
        if worker.doomed:  # killed while it started (its fork server died): no failure
            self._run_actions(self.scheduler.worker_start_failed())
            return
        self._start_failures += 1
        if self._start_failures >= self._MAX_START_FAILURES:
            detail = "\n".join(worker.stderr_tail) or "(it wrote nothing to stderr)"
            error = exceptions.WorkerCrashedError(
                f"No worker process could start on this node ({self._start_failures} "
                f"tried in a row); the last one said:\n{detail}")
            for record in [r for r in self.tasks.values()
                           if r.state == QUEUED and r.worker is None]:
                self.scheduler.cancel(record.spec.task_id)
                self._fail_task(record, error)
        self._run_actions(self.scheduler.worker_start_failed())

    def _run_actions(self, actions) -> None:
        for action in actions:
            kind = action[0]
            if kind == "dispatch":
                self._dispatch(self.tasks[action[1]], self.workers[action[2]])
            elif kind == "place":
                self.actors.place_actor(self.actors[action[1]])
            elif kind == "pipeline":
                self._pipeline(self.tasks[action[1]], self.workers[action[2]])
            elif kind == "revoke":
                self._revoke(self.tasks[action[1]], self.workers[action[2]])
            elif kind == "start_worker":
                self.processes.start()
            elif kind == "retire":
                worker = self.workers.get(action[1])
                if worker is not None and worker.alive:
                    worker.retiring = True
                    self.processes.send(worker, wire(messages.ExitWorker))
        self._arm_retire_timer()

    def _arm_retire_timer(self) -> None:
        """Workers beyond the pool (started while others were blocked in get) leave
        after a second idle, not at once: nested tasks would fork them again on every
        burst (measured: the nested-tasks row 1.4x -> 8x Ray). No timer when none could
        retire, so an idle node still sleeps."""
        at = self.scheduler.next_retire_at()
        if at is None or (self._retire_timer_at is not None and self._retire_timer_at <= at):
            return
        self._retire_timer_at = at
        self._add_timer(max(0.0, at - time.monotonic()), self._on_retire_timer)

    def _on_retire_timer(self) -> None:
        self._retire_timer_at = None
        self._run_actions(self.scheduler.retire_idle(time.monotonic()))

    # ------------------------------------------------------------------ tasks
    def submit(self, spec: TaskSpec, parent: TaskRecord | None = None) -> None:
        """A task from any client on this node; its return entries exist on return."""
        problem = None
        if spec.kind != ACTOR_CALL:
            problem = self.network.unschedulable(
                spec.demand, spec.options.get("scheduling_strategy") if spec.options else None)
        if parent is None:
            self.task_events.submitted(spec)
        else:
            self.task_events.submitted(spec, parent.spec.task_id)
            self.recorder.submitted(parent.spec.task_id, spec.task_id)
        if spec.kind != ACTOR_CALL:  # (no lineage kept of an actor call: a call less)
            self.pins.submitted(spec)
        if spec.kind == ACTOR_CREATION:
            self.actors.create_actor(spec, pending=problem is not None)
            if problem is not None:
                self.unschedulable.handle(spec, problem, None)
            return
        record = TaskRecord(spec, spec.max_retries)
        record.owner = self.rank
        for object_id in spec.return_ids:
            self.objects.entry(object_id).refs = 1  # the caller's ref (ObjectRef made "owned")
        for key in spec.contained:
            self.objects.incref(key)
        if parent is not None:  # what a recursive cancel of the parent cancels too
            if parent.children is None:
                parent.children = []
            parent.children.append(spec.task_id)
        if spec.options and generator_kind(spec) is not None:
            self.generators.submitted(spec)
        if spec.kind == ACTOR_CALL:
            self.actors.submit_actor_call(record, spec.options is not None
                                          and "check_owner" in spec.options)
            return
        self.tasks[spec.task_id] = record
        if problem is not None:
            self.unschedulable.handle(spec, problem, record)
            return
        self._resolve_deps(record, self._on_task_deps_ready)

    def _resolve_deps(self, record: TaskRecord, ready_callback) -> None:
        """`ready_callback(record)` once every argument exists on some node."""
        self.objects.wait_for_objects(record, record.spec.deps, self.objects.add_avail_waiter,
                               ready_callback)

    def _on_task_deps_ready(self, record: TaskRecord) -> None:
        self.router.route(record)

    def _dep_payloads(self, spec: TaskSpec) -> list:
        return [(dep, self.objects.payload(dep)) for dep in spec.deps]

    def pipelinable(self, spec: TaskSpec) -> bool:
        """Whether the task may wait in a busy worker's socket, to run after its current
        one (_scheduler.pyx): no options (max_calls, placement, runtime env, GPUs) and
        its function's last run was short, so nothing waits long behind another task."""
        return spec.options is None and self._short_functions.get(spec.function_id, False)

    def _dispatch(self, record: TaskRecord, worker: WorkerHandle) -> None:
        spec = record.spec
        worker.task = record
        self.activity.running(worker.key, spec.name)
        # (no options: no placement group; no GPU asked: none to take)
        record.gpu_ids = self._take_gpus(spec) if spec.options or "GPU" in spec.demand else ()
        if spec.kind == NORMAL_TASK:
            self.task_events.running(spec, worker.pid)
        self._send_task(record, worker)

    def _pipeline(self, record: TaskRecord, worker: WorkerHandle) -> None:
        """Send the task to the busy worker, which runs it after its current one; it
        counts as running from then on (list_tasks: once that one's WorkDone is read)."""
        worker.pipelined.append(record)
        record.gpu_ids = ()
        self._send_task(record, worker)

    def _revoke(self, record: TaskRecord, worker: WorkerHandle) -> None:
        """Its worker blocked in get: the task pipelined to it is queued again (the
        scheduler did), and the worker drops it unread."""
        worker.pipelined.remove(record)
        worker.functions.discard(record.spec.function_id)  # its RunTask may have carried it
        self.processes.send(worker, wire(messages.RevokeTask, record.spec.task_id))
        self._taken_back(record)

    def _taken_back(self, record: TaskRecord) -> None:
        """A pipelined task its worker never started, queued again by the scheduler;
        cancelled meanwhile (its CancelTask went to that worker), it ends here."""
        record.state = QUEUED
        record.worker = None
        if record.cancelled:
            self.scheduler.cancel(record.spec.task_id)
            self._fail_task(record, cancelled_error(record))

    def _send_task(self, record: TaskRecord, worker: WorkerHandle) -> None:
        spec = record.spec
        record.state = RUNNING
        record.worker = worker
        record.blocked = False  # an attempt killed while blocked in get left it set
        record.dispatched = clock.now()
        function = None
        if spec.function_id not in worker.functions:
            worker.functions.add(spec.function_id)
            function = self.functions.get(spec.function_id)
        self.processes.send_task(worker, wire(messages.RunTask, spec.to_wire(), function,
                                              self._dep_payloads(spec), record.gpu_ids))

    def on_work_done(self, worker: WorkerHandle, task_id: bytes, results, retry: bool,
                     started, ended, transitions) -> None:
        if worker.actor_id is not None:
            self.actors.actor_call_done(worker, task_id, results, retry, started, ended,
                                        transitions)
            return
        record = self.tasks.get(task_id)
        following = worker.task = worker.pipelined.pop(0) if worker.pipelined else None
        if following is None:
            self.activity.idle(worker.key)
        else:
            self._started_pipelined(following, worker)
        if record is None:
            self.objects.apply_transitions(transitions)
            return
        spec = record.spec
        self.recorder.ran(spec, worker.pid, started, ended, results)
        if self.scheduler.pipelining and started is not None:
            self._short_functions[spec.function_id] = \
                ended - started < self.config.pipeline_task_ms / 1000
        if record.gpu_ids:
            self._release_gpus(record)
        retire = following is None and (worker.doomed or (
            spec.options is not None and self._reached_max_calls(worker, spec)))
        if retire and not worker.doomed:
            worker.retiring = True
            self.processes.send(worker, wire(messages.ExitWorker))
        if retry and record.retries_left != 0 and not record.cancelled:
            record.retries_left -= 1
            self.recorder.count("retries")
            self.objects.apply_transitions(transitions)
            actions = self.scheduler.task_finished(worker.key, spec.demand, retire,
                                                   now=time.monotonic())
            record.state = QUEUED
            actions += self.scheduler.task_ready(task_id, spec.demand)
            self._run_actions(actions)
            return
        self._finish_task(record, results, transitions)
        self._run_actions(self.scheduler.task_finished(worker.key, spec.demand, retire,
                                                       now=time.monotonic()))

    def _started_pipelined(self, record: TaskRecord, worker: WorkerHandle) -> None:
        self.activity.running(worker.key, record.spec.name)
        self.task_events.running(record.spec, worker.pid)
        if record.cancelled:  # cancelled while it waited: the worker may have started it
            self.canceller.interrupt(record)

    @staticmethod
    def _reached_max_calls(worker: WorkerHandle, spec: TaskSpec) -> bool:
        """Whether the worker must now leave: Ray's max_calls, which defaults to 1 for a
        task with GPUs, so its CUDA context and GPU memory go with its process and the
        next GPU task starts with CUDA_VISIBLE_DEVICES still unread."""
        max_calls = spec.options.get("max_calls") if spec.options else None
        if not max_calls:
            return False
        if worker.calls is None:
            worker.calls = {}
        runs = worker.calls[spec.function_id] = worker.calls.get(spec.function_id, 0) + 1
        return runs >= max_calls

    def _finish_task(self, record: TaskRecord, results, transitions,
                     failed: bool = False) -> None:
        record.state = FINISHED
        self.tasks.pop(record.spec.task_id, None)
        placed_here = self.link.placed_here
        if placed_here and record.spec.task_id in placed_here:  # ULFM: rank 0 forgets it
            placed_here.discard(record.spec.task_id)
            self.link.ended_placed.append(record.spec.task_id)
        if record.cancelled and not failed:  # never a value once cancelled
            results = self.canceller.cancelled_results(record, results)
        if record.owner != self.rank:  # the owner holds the arguments and gets the results
            self.router.send_results_to_owner(record, results, transitions, failed)
            return
        self.task_events.ended(record.spec.task_id, results, failed, record.cancelled,
                               record.spec.name)
        if record.spec.task_id in self.generators.streams:
            self.generators.task_ended(record.spec.task_id, results)
        for object_id, inline, contained, size in results:
            self.objects.object_ready(object_id, inline, contained, size)
        self.objects.apply_transitions(transitions)
        for key in record.spec.contained:
            self.objects.decref(key)

    def _fail_task(self, record: TaskRecord, error: BaseException) -> None:
        blob = error_bytes(error)
        self._finish_task(record, [(oid, blob, (), len(blob)) for oid in record.spec.return_ids],
                          (), failed=True)

    def _take_gpus(self, spec: TaskSpec) -> tuple:
        """The GPU ids a task or actor gets: from the node's free ones, or, in a placement
        group, from those its bundle reserved (placement_groups.Bundles)."""
        group = group_of(spec)
        if group is not None:
            return self.bundles.take_gpus(group, spec.demand)
        return take_gpu_ids(self.free_gpus, spec.demand.get("GPU", 0))

    def _release_gpus(self, record) -> None:
        if record is None or not record.gpu_ids:
            return
        group = group_of(record.spec)
        if group is not None:
            self.bundles.release_gpus(group, record.spec.demand, record.gpu_ids)
        elif record.spec.demand.get("GPU", 0) >= 1:
            self.free_gpus.extend(record.gpu_ids)
            self.free_gpus.sort()
        record.gpu_ids = ()


    # ------------------------------------------------------------------ queries
    def list_state(self, table: str, answer) -> None:
        """answer(the rows of a state table: "tasks", "actors", "nodes" or "objects";
        state_queries.py), after the driver's dropped refs so far (they wait for the
        event loop otherwise) have freed what they free."""
        self.driver_feed.take()
        self.state_queries.query(table, answer)

    def describe_nodes(self) -> list:
        """Every node: id, rank, resources, liveness (Ray's `nodes()` fields)."""
        host = socket.gethostname()
        nodes = self.link.nodes
        dead = self.link.dead_nodes
        return [{"NodeID": node["node_id"], "Alive": rank not in dead,
                 "alive": rank not in dead, "rank": rank,
                 "NodeManagerAddress": node.get("address", "127.0.0.1"),
                 "NodeManagerHostname": node.get("hostname", host),
                 "NodeName": node.get("hostname", host), "Resources": dict(node["resources"])}
                for rank, node in sorted(nodes.items())]

    # ------------------------------------------------------------------ cancel
    def cancel(self, object_id: bytes, force: bool, recursive: bool = True) -> None:
        """A process on this node cancels the task of `object_id` (cancellation.py)."""
        self.canceller.cancel(object_id[:16], force, recursive)


def _note_holds(holds: set, transitions) -> None:
    for key, delta in transitions:
        if delta > 0:
            holds.add(key)
        else:
            holds.discard(key)


# Every message of the node's channels has exactly one handler among its parts.
messages.check_handlers("control", Network, TaskRouter, Borrowing, ObjectMover,
                        StateQueries, Canceller, Generators, NodeFailures,
                        GroupDirectory, Bundles, ObjectRelay, ActorOwners)
messages.check_handlers("up", NodeManager, Actors, WorkerRequests, Generators)
