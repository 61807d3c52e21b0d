"""What the API calls: the runtime as seen from one process (the driver or a worker).

`DriverClient` calls the node manager that lives in the same process; `WorkerClient`
sends the same requests over the worker's socket. Both turn values into inline bytes or
store objects and back, so the API never cares where it runs.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time

from hpcray import context, exceptions, ids
from hpcray._store import (ObjectExistsError, ObjectTooLargeError, SharedMemoryFullError,
                           StoreFullError)
from hpcray.object_ref import ObjectRef
from hpcray.runtime import hops
from hpcray.runtime.call_sites import creation_site
from hpcray.runtime.host_stores import make_copies
from hpcray.runtime.specs import ACTOR_CALL, ACTOR_CREATION, NORMAL_TASK, TaskSpec
from hpcray.runtime.messages import (CancelTask, CreateActor, Drain, ExitWorker, Notice, Reply,
                                     Request, RevokeTask, RunTask, WorkDone, wire)
from hpcray.serialization import (ErrorValue, deserialize_from_store, deserialize_inline,
                                  plain_call_args, serialize)


_NOTICE, _REQUEST, _REPLY = Notice.CODE, Request.CODE, Reply.CODE
# What made a ref, by the kind of its task (specs.py), as Ray's call sites say it.
_CALLED = {NORMAL_TASK: "task call", ACTOR_CREATION: "actor creation", ACTOR_CALL: "actor call"}
_RUN_TASK, _CANCEL_TASK, _REVOKE_TASK = RunTask.CODE, CancelTask.CODE, RevokeTask.CODE
_CARRY_SPEC = (RunTask.CODE, CreateActor.CODE)


def _received(message):
    """A message as read from the node: a RunTask's or CreateActor's spec came as its
    fields (TaskSpec.to_wire)."""
    if message is not None and message[0] in _CARRY_SPEC:
        return (message[0], TaskSpec(*message[1]), *message[2:])
    return message


class CoreClient:
    """The parts of a client that do not depend on where the node manager is."""

    is_driver = False

    def __init__(self, store, config, job_id: bytes, node_id: bytes, total_resources: dict):
        self.store = store
        self.config = config
        self.job_id = job_id
        self.node_id = node_id
        self.total_resources = total_resources
        self.exported_functions: set = set()
        store.copy_threads = config.copy_threads
        self.record_sites = config.record_ref_creation_sites  # call_sites.py

    # -- values ------------------------------------------------------------------
    def encode_value(self, object_id: bytes, value):
        """Serialize `value`; large ones are written to the store.
        -> (inline bytes, or None when in the store; contained ref ids; size in bytes)."""
        return self.encode_serialized(object_id, serialize(value, self.config.inline_threshold))

    def serialize_value(self, value):
        """The first half of encode_value: pickled, nothing written yet."""
        return serialize(value, self.config.inline_threshold)

    def encode_serialized(self, object_id: bytes, sv):
        """The second half of encode_value: a serialized value inline, or into the store."""
        if not sv.buffers and len(sv.pickled) < self.config.inline_threshold:  # is_small
            return sv.pickled, sv.contained, len(sv.pickled)
        size = sv.store_size
        try:
            dest = self.store.create_object(object_id, size)
        except (StoreFullError, SharedMemoryFullError):  # _create_when_full says which
            dest = None
        except ObjectExistsError:
            # A re-run (a retry, an actor restart) of what wrote it, whose first run died
            # after sealing, before its node took the value in: that copy goes (sealed
            # unclaimed, it would never be evicted).
            self.store.delete(object_id)
            dest = None
        if dest is None:  # outside the handler: an error raised has no context (below)
            dest = self._create_when_full(object_id, size)
        try:
            sv.write_into(dest)
        except BaseException:
            dest.release()
            self.store.abort(object_id)
            raise
        dest.release()
        self.store.seal(object_id, unclaimed=True)  # not evicted before its node pins it
        return None, sv.contained, size

    def _create_when_full(self, object_id: bytes, size: int):
        """store.create_object after it failed: what dead processes held is freed, then the
        node spills referenced objects to disk until it fits (or nothing more can go).
        Its errors are raised outside any handler: an exception's __context__ would keep
        the caller's frames (and the refs in them) alive after a task reported it."""
        store = self.store
        cleaned = False
        backoff = _Backoff()
        while True:
            too_large, no_shm = False, None
            try:
                return store.create_object(object_id, size)
            except ObjectTooLargeError:
                too_large = True
            except StoreFullError:
                pass
            except SharedMemoryFullError as exc:
                no_shm = exc.reason
            if no_shm is not None:
                raise exceptions.ObjectStoreFullError(f"An object of {size} bytes: {no_shm}")
            if too_large:
                raise exceptions.ObjectStoreFullError(
                    f"An object of {size} bytes is larger than this node's whole object "
                    f"store ({store.capacity} bytes); start with a larger "
                    "object_store_memory.")
            # Space held by dead processes: writers that never sealed, readers' pins.
            if not cleaned:
                cleaned = True
                if store.abort_dead_creators() + store.release_dead_pins():
                    continue
            if self.make_room(size):
                continue
            if not backoff.wait():
                raise exceptions.ObjectStoreFullError(
                    f"The object store ({store.capacity} bytes) has no room for {size} more "
                    "bytes: everything in it stayed in use (mapped by a process, being read "
                    f"or written) for {_FULL_GRACE_S:g} s, so nothing can be spilled to disk.")

    def decode_value(self, object_id: bytes, payload):
        """The value for a payload the node manager handed out (inline bytes or None)."""
        if payload is not None:
            value = deserialize_inline(payload)
        else:
            buffer = self.store.get(object_id)
            if buffer is None:
                buffer = self._read_back(object_id)
            value, views_store = deserialize_from_store(memoryview(buffer))
            if not views_store:
                buffer.release()
        return value

    def _read_back(self, object_id: bytes):
        """The node said the value is in the store and it is not: spilled to disk since.
        The node restores it (again if it was spilled once more before this get; after a
        wait if the store is full of objects in use). The pin of a get, or an error."""
        backoff = _Backoff()
        while True:
            full = None
            try:
                restored = self.restore(object_id)
            except exceptions.ObjectStoreFullError as error:
                restored, full = True, error
            buffer = self.store.get(object_id) if restored else None
            if buffer is not None:
                return buffer
            if not restored:
                raise exceptions.ObjectLostError(
                    f"Object {object_id.hex()} is no longer in the object store.")
            if not backoff.wait():
                if full is None:
                    raise exceptions.ObjectLostError(
                        f"Object {object_id.hex()} was restored but spilled again before "
                        f"this process could read it, for {_FULL_GRACE_S:g} s.")
                raise full

    def values_or_raise(self, object_ids, payloads) -> list:
        values = []
        for object_id, payload in zip(object_ids, payloads):
            value = self.decode_value(object_id, payload)
            if type(value) is ErrorValue:
                error = value.error
                if isinstance(error, exceptions.RayTaskError):
                    error = error.as_instanceof_cause()
                del value, values  # the error's traceback holds this frame: no cycle
                try:
                    raise error
                finally:
                    del error
            values.append(value)
        return values

    def put(self, value) -> ObjectRef:
        if isinstance(value, ObjectRef):
            raise TypeError("put() of an ObjectRef is not allowed; pass the ref itself.")
        object_id = ids.new_put_id()
        inline, contained, size = self.encode_value(object_id, value)
        ref = self._register_put(object_id, inline, contained, size)
        if self.record_sites:
            self.note_call_sites([object_id], creation_site("put object"))
        return ref

    # -- arguments ---------------------------------------------------------------
    def encode_args(self, task_id: bytes, args: tuple, kwargs: dict):
        """-> (args payload, top-level ref ids, every contained ref id)."""
        deps = [a.binary() for a in args if type(a) is ObjectRef]
        if kwargs:
            deps += [v.binary() for v in kwargs.values() if type(v) is ObjectRef]
        if not args and not kwargs:
            return ("inline", _EMPTY_ARGS), [], []
        if not deps:
            pickled = plain_call_args(args, kwargs)
            if pickled is not None and len(pickled) < self.config.inline_threshold:
                return ("inline", pickled), [], []
        sv = serialize((args, kwargs), self.config.inline_threshold)
        if sv.is_small and len(sv.pickled) < self.config.inline_threshold:
            return ("inline", sv.pickled), deps, sv.contained
        args_id = ids.object_id_for(task_id, 0xFFFFFFFF)
        _, contained, size = self.encode_value(args_id, (args, kwargs))
        self._register_args_object(args_id, contained, size)
        # The stored arguments are the task's first dependency: the node that runs the
        # task pulls them like any other argument when they live on another node.
        return ("store", args_id), [args_id] + deps, contained + [args_id]


_EMPTY_ARGS = serialize(((), {}), 1 << 30).pickled
# How long a create or a restore waits for the store's readers to let go (a send in flight,
# a value its node has not pinned yet, a task's views) before it fails, as Ray's do.
_FULL_GRACE_S = 5.0


class _Backoff:
    """Sleeps 1 ms, 2 ms, ... up to 100 ms between tries; False once the grace is over."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + _FULL_GRACE_S
        self.delay = 0.001

    def wait(self) -> bool:
        left = self.deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(self.delay, left))
        self.delay = min(self.delay * 2, 0.1)
        return True


class DriverClient(CoreClient):
    """The driver's client: direct calls into the in-process node manager."""

    is_driver = True

    def __init__(self, node_manager, store, config, job_id, node_id):
        super().__init__(store, config, job_id, node_id, node_manager.total_resources)
        self.nm = node_manager

    def _locked(self):
        nm = self.nm
        nm.lock.acquire()
        try:
            nm.driver_feed.take()
        except BaseException:
            nm.lock.release()
            raise
        return nm

    @contextlib.contextmanager
    def _node(self):
        """The node under its lock, after the driver's queued work (as `_locked`)."""
        nm = self._locked()
        try:
            yield nm
        finally:
            nm.lock.release()

    def _register_put(self, object_id, inline, contained, size) -> ObjectRef:
        nm = self._locked()
        try:
            nm.objects.put(object_id, inline, contained, True, size)
        finally:
            nm.lock.release()
        return ObjectRef(object_id, True)

    def _register_args_object(self, args_id, contained, size) -> None:
        nm = self._locked()
        try:
            nm.objects.put(args_id, None, contained, False, size)
        finally:
            nm.lock.release()

    def export_function(self, function_id: bytes, pickled: bytes) -> None:
        nm = self.nm
        with nm.lock:
            nm.router.export_function(function_id, pickled)
        self.exported_functions.add(function_id)

    def submit(self, spec) -> None:
        if spec.kind != ACTOR_CREATION and not self.record_sites:
            # The node's thread submits it, between its workers' messages; taking the lock
            # for each task, the driver left that thread, and so this node's workers, idle
            # while it submitted (a 100k burst ran ~5% of its tasks on rank 0). On one
            # node too: the two threads took the lock in turns for each task, and each
            # turn waited for the GIL (callgrind, the driver's process per no-op task:
            # 194k -> 189k instructions, per 1:1 async actor call 129k -> 121k).
            self.nm.driver_feed.queue_submission(spec)
            return
        nm = self._locked()
        try:
            nm.submit(spec)
        finally:
            nm.lock.release()
        if self.record_sites:
            self.note_call_sites(spec.return_ids, creation_site(_CALLED[spec.kind]))

    def note_call_sites(self, object_ids: list, site: str) -> None:
        with self.nm.lock:
            self.nm.call_sites.note(object_ids, site)

    def get_payloads(self, object_ids: list, timeout):
        if hops.ENABLED:
            hops.stamp("get.start")
        nm = self._locked()
        nm.hold_wakes()  # (a Pull it sends wakes the loop, which would wait for the lock)
        try:
            if timeout is None:  # (with one, the copy thread copies: the wait can end first)
                nm.host_stores.defer_copies()  # this thread copies, below, without the lock
            try:
                waiter = nm.objects.register_get(object_ids, len(object_ids))
            finally:
                copies = nm.host_stores.take_deferred()
        finally:
            nm.lock.release()
            nm.release_wakes()
        if hops.ENABLED:
            hops.stamp("get.registered")
        if copies:
            payloads = self._end_host_copies(nm, copies, object_ids, waiter)
            if payloads is not None:
                return payloads
        if waiter is not None:
            acquired = waiter.lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout))
            if hops.ENABLED:
                hops.stamp("get.woken")
            if not acquired:
                with nm.lock:
                    nm.objects.cancel_waiter(object_ids, waiter)
                    if not waiter.done:
                        raise exceptions.GetTimeoutError(
                            f"get() timed out after {timeout} s waiting for "
                            f"{len(object_ids)} object(s).")
        with nm.lock:
            return nm.objects.payloads(object_ids)

    @staticmethod
    def _end_host_copies(nm, copies: list, object_ids: list, waiter):
        """Make the copies a get asked for from the stores of this host's other nodes
        (this thread, no lock held), then end those pulls under the lock. Returns the
        payloads, read in that same hold, when the get has all it waits for by then;
        else None."""
        results, interrupted = make_copies(copies)
        nm.lock.acquire()
        nm.hold_wakes()
        try:
            for on_done, copied in results:
                on_done(copied)
            if interrupted is not None:
                raise interrupted
            if waiter is None or waiter.done:
                return nm.objects.payloads(object_ids)
            return None
        finally:
            nm.lock.release()
            nm.release_wakes()

    def wait_ready(self, object_ids: list, num_returns: int, timeout,
                   fetch_local: bool = True) -> list:
        nm = self._locked()
        try:
            ready = nm.objects.ready_ids(object_ids, fetch_local)
            if len(ready) >= num_returns or timeout == 0:
                return ready
            waiter = nm.objects.register_get(object_ids, num_returns, None, fetch_local)
        finally:
            nm.lock.release()
        if waiter is not None:
            acquired = waiter.lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout))
            if not acquired:
                with nm.lock:
                    nm.objects.cancel_waiter(object_ids, waiter)
        with nm.lock:
            return nm.objects.ready_ids(object_ids, fetch_local)

    def generator_next(self, task_id: bytes, index: int, take: bool):
        """(status, item id) of a generator task's item `index` (generators.next_item)."""
        nm = self._locked()
        try:
            return nm.generators.next_item(task_id, index, take)
        finally:
            nm.lock.release()

    def cancel(self, object_id: bytes, force: bool, recursive: bool) -> None:
        nm = self._locked()
        try:
            nm.cancel(object_id, force, recursive)
        finally:
            nm.lock.release()

    def kill_actor(self, actor_id: bytes, no_restart: bool) -> None:
        nm = self._locked()
        try:
            nm.actors.kill_actor(actor_id, no_restart)
        finally:
            nm.lock.release()

    def _answer_of(self, method, *args, timeout: float | None = None):
        """Call a node-manager method that answers through a callback (maybe later, from
        the node manager's thread when the GCS replies) and wait for the answer
        (TimeoutError after `timeout` seconds)."""
        answered = threading.Event()
        box = []

        def answer(value) -> None:
            box.append(value)
            answered.set()

        with self._node():
            method(*args, answer)
        if not answered.wait(timeout):
            raise TimeoutError(f"no answer from {method.__name__} in {timeout} s")
        return box[0]

    def claim_actor_name(self, name: str, actor_id: bytes, info: dict):
        return self._answer_of(self.nm.actors.claim_actor_name, name, actor_id, info)

    def release_actor_name(self, name: str, actor_id: bytes) -> None:
        with self._node() as nm:
            nm.actors.release_actor_name(name, actor_id)

    def get_actor_info(self, name: str):
        return self._answer_of(self.nm.actors.lookup_actor, name)

    def resources(self):
        with self._node() as nm:
            return nm.network.cluster_resources(), nm.network.cluster_available()

    def nodes(self) -> list:
        with self.nm.lock:
            return self.nm.describe_nodes()

    def list_state(self, table: str, timeout: float | None = None) -> list:
        return self._answer_of(self.nm.list_state, table, timeout=timeout)

    def drain(self) -> None:
        """Start no new task on any node (runtime/drain.py)."""
        with self._node() as nm:
            nm.router.on_drain(nm.rank)
            nm.network.peers.broadcast(wire(Drain))

    def create_group(self, group_id: bytes, bundles: list, strategy: str, name: str,
                     detached: bool) -> None:
        with self._node() as nm:
            nm.bundles.create(group_id, bundles, strategy, name, detached)

    def remove_group(self, group_id: bytes) -> None:
        with self._node() as nm:
            nm.bundles.remove(group_id)

    def group_rows(self, group_id, name) -> list:
        return self._answer_of(self.nm.bundles.rows, group_id, name)

    def make_room(self, size: int) -> int:
        nm = self._locked()
        try:
            return nm.spiller.make_room(size)
        finally:
            nm.lock.release()

    def restore(self, object_id: bytes) -> bool:
        nm = self._locked()
        try:
            return nm.spiller.restore(object_id)
        finally:
            nm.lock.release()


class WorkerClient(CoreClient):
    """A worker's client: requests over its socket to the node manager."""

    def __init__(self, channel, store, config, job_id, node_id, total_resources):
        super().__init__(store, config, job_id, node_id, total_resources)
        self.channel = channel

    def _register_put(self, object_id, inline, contained, size) -> ObjectRef:
        self.channel.send_oneway("put", (object_id, inline, contained, True, size))
        return ObjectRef(object_id, True)

    def _register_args_object(self, args_id, contained, size) -> None:
        self.channel.send_oneway("put", (args_id, None, contained, False, size))

    def export_function(self, function_id: bytes, pickled: bytes) -> None:
        self.channel.send_oneway("export_function", (function_id, pickled))
        self.exported_functions.add(function_id)

    def submit(self, spec) -> None:
        # The call it comes from: an actor's process runs several (recursive cancel).
        worker = context.worker
        parent_id = worker.current_task_id if worker is not None else None
        self.channel.send_oneway("submit", (spec.to_wire(), parent_id))
        if self.record_sites:
            self.note_call_sites(spec.return_ids, creation_site(_CALLED[spec.kind]))

    def note_call_sites(self, object_ids: list, site: str) -> None:
        self.channel.send_oneway("call_sites", (object_ids, site))

    def get_payloads(self, object_ids: list, timeout):
        answer = self.channel.request("get", (object_ids, timeout))
        if answer == "timeout":
            raise exceptions.GetTimeoutError(
                f"get() timed out after {timeout} s waiting for {len(object_ids)} object(s).")
        return answer

    def wait_ready(self, object_ids: list, num_returns: int, timeout,
                   fetch_local: bool = True) -> list:
        return self.channel.request("wait", (object_ids, num_returns, timeout, fetch_local))

    def generator_next(self, task_id: bytes, index: int, take: bool):
        return self.channel.request("generator_next", (task_id, index, take))

    def generator_pause(self, task_id: bytes, needed: int) -> int:
        """A generator task this worker runs waits until `needed` of its items are
        taken; -> the count taken (generators.NO_LIMIT once nobody takes them)."""
        return self.channel.request("generator_pause", (task_id, needed))

    def generator_slot(self, task_id: bytes) -> None:
        """A generator method of this actor makes its next item once its actor's
        budget of items not taken has room (runtime/generator_budget.py)."""
        self.channel.request("generator_slot", (task_id,))

    def cancel(self, object_id: bytes, force: bool, recursive: bool) -> None:
        self.channel.request("cancel", (object_id, force, recursive))

    def kill_actor(self, actor_id: bytes, no_restart: bool) -> None:
        self.channel.send_oneway("kill_actor", (actor_id, no_restart))

    def claim_actor_name(self, name: str, actor_id: bytes, info: dict):
        return self.channel.request("claim_actor_name", (name, actor_id, info))

    def release_actor_name(self, name: str, actor_id: bytes) -> None:
        self.channel.send_oneway("release_actor_name", (name, actor_id))

    def get_actor_info(self, name: str):
        return self.channel.request("get_actor", (name,))

    def resources(self):
        return self.channel.request("resources", ())

    def nodes(self) -> list:
        return self.channel.request("nodes", ())

    def list_state(self, table: str) -> list:
        return self.channel.request("list_state", (table,))

    def create_group(self, group_id: bytes, bundles: list, strategy: str, name: str,
                     detached: bool) -> None:
        self.channel.send_oneway("create_group", (group_id, bundles, strategy, name, detached))

    def remove_group(self, group_id: bytes) -> None:
        self.channel.send_oneway("remove_group", (group_id,))

    def group_rows(self, group_id, name) -> list:
        return self.channel.request("group_rows", (group_id, name))

    def make_room(self, size: int) -> int:
        return self.channel.request("make_room", (size,))

    def restore(self, object_id: bytes) -> bool:
        return self.channel.request("restore", (object_id,))


class WorkerChannel:
    """A worker's socket: one-way node operations, requests with replies, incoming work
    (the messages of messages.py's "up" and "down" channels).

    Without a reader thread (plain task workers and one-call-at-a-time actors) the
    thread that waits for a reply reads the socket itself and sets aside the work that
    arrives meanwhile. Concurrent actors start a reader thread that routes replies to
    waiting threads and work to `inbox`. A one-way operation that failed on the node
    comes back as a Reply with request id 0: raised at this process's next node call.

    Cancels (CancelTask) are noted wherever they are read: `cancelled_tasks` holds those
    of the calls this process was sent and has not finished (`known_tasks`); one for the
    pool task running in the main thread (`interruptible`) sets `interrupt_pending`,
    which the worker's SIGINT handler, or the end of the main thread's current node
    call, turns into a KeyboardInterrupt (never in the middle of a message: `main_io`).
    """

    def __init__(self, connection, reference_counter):
        self.conn = connection
        self.refs = reference_counter
        self.backlog: list = []
        self.inbox: queue.SimpleQueue | None = None
        self._slots: dict = {}
        self._request_ids = itertools.count(1)
        self._request_lock = threading.Lock()  # held by the thread that reads the socket
        self._send_lock = threading.Lock()
        self.failed_notices: list = []
        self.known_tasks: set = set()       # RunTask read, its WorkDone not sent yet
        self.cancelled_tasks: set = set()   # those of them the node cancelled
        self.revoked: set = set()           # pipelined tasks taken back before read
        self.interruptible = None           # the pool task whose thread a cancel interrupts
        self.interrupt_pending = False
        self.interrupted = None             # the task its KeyboardInterrupt was raised for
        self.main_io = False                # the main thread is sending or receiving
        self.on_cancel = None               # async actors: called with a cancelled call's id
        self._main_ident = threading.main_thread().ident

    def send(self, message) -> None:
        self.conn.send(message)

    def send_oneway(self, op: str, args: tuple) -> None:
        self._raise_failed_notice()
        main = threading.get_ident() == self._main_ident
        with self._send_lock:  # keeps the drained transitions in message order
            if main:
                self.main_io = True
            try:
                self.conn.send((_NOTICE, op, args, self.refs.drain()))
            finally:
                if main:
                    self.main_io = False
        if main and self.interrupt_pending:
            self._interrupt()

    def send_done(self, record, *fields) -> None:
        """A WorkDone or ActorReady, with the ref transitions so far."""
        # main_io matters only while a pool task can be interrupted (the SIGINT handler
        # looks no further otherwise): a generator's ItemReady, not a WorkDone.
        main = self.interruptible is not None and threading.get_ident() == self._main_ident
        if main:
            with self._send_lock:
                self.main_io = True
                try:
                    self.conn.send((record.CODE, *fields, self.refs.drain()))
                finally:
                    self.main_io = False
        else:
            with self._send_lock:
                self.conn.send((record.CODE, *fields, self.refs.drain()))
        if record is WorkDone:
            self.known_tasks.discard(fields[0])
            if self.cancelled_tasks:
                self.cancelled_tasks.discard(fields[0])

    def next_work(self):
        while True:
            if self.inbox is not None:
                message = self.inbox.get()
            elif self.backlog:
                message = self.backlog.pop(0)
            else:
                with self._request_lock:
                    message = _received(self.conn.recv())
                if message[0] == _RUN_TASK:  # what _arrived notes, inline: once per call
                    if self.revoked and message[1].task_id in self.revoked:
                        self.revoked.discard(message[1].task_id)
                        continue
                    self.known_tasks.add(message[1].task_id)
                    return message
                if self._arrived(message):
                    continue
            if message[0] == _REPLY:  # a failed one-way operation, while idle
                self._note_failed_notice(message)
                continue
            return message

    def _arrived(self, message) -> bool:
        """Note a message as it is read from the socket; True if it is a cancel (consumed)."""
        code = message[0]
        if code == _RUN_TASK:
            self.known_tasks.add(message[1].task_id)
        elif code == _CANCEL_TASK:
            task_id = message[1]
            if task_id in self.known_tasks:  # else it ended before the cancel came
                self.cancelled_tasks.add(task_id)
                if task_id == self.interruptible and task_id != self.interrupted:
                    self.interrupt_pending = True
                if self.on_cancel is not None:
                    self.on_cancel(task_id)
            return True
        if code == _REVOKE_TASK:  # its RunTask came first: set aside, dropped here
            task_id = message[1]
            for index, waiting in enumerate(self.backlog):
                if waiting[0] == _RUN_TASK and waiting[1].task_id == task_id:
                    del self.backlog[index]
                    break
            else:
                self.revoked.add(task_id)
            self.known_tasks.discard(task_id)
            self.cancelled_tasks.discard(task_id)
            return True
        return False

    def poll_cancels(self) -> None:
        """Read what has arrived, without waiting: cancels are noted, the rest is set
        aside. Nothing to do while another thread reads (it notes them itself)."""
        if self.inbox is not None or not self._request_lock.acquire(blocking=False):
            return
        main = threading.get_ident() == self._main_ident
        main_io = self.main_io  # a signal now must not interrupt a half-read message
        if main:
            self.main_io = True
        try:
            while True:
                message = _received(self.conn.recv_nowait())
                if message is None:
                    return
                if message[0] == _REPLY:
                    self._note_failed_notice(message)
                elif not self._arrived(message):
                    self.backlog.append(message)
        except (EOFError, OSError):
            return
        finally:
            if main:
                self.main_io = main_io
            self._request_lock.release()

    def _interrupt(self) -> None:
        self.interrupt_pending = False
        self.interrupted = self.interruptible  # once per task: a later cancel notice is seen
        raise KeyboardInterrupt("cancelled")

    def request(self, op: str, args: tuple):
        self._raise_failed_notice()
        request_id = next(self._request_ids)
        main = threading.get_ident() == self._main_ident
        if self.inbox is not None:
            slot = [threading.Lock(), None]
            slot[0].acquire()
            self._slots[request_id] = slot
            with self._send_lock:
                self.conn.send((_REQUEST, request_id, op, args, self.refs.drain()))
            slot[0].acquire()
            reply = slot[1]
        else:
            with self._request_lock:
                if main:
                    self.main_io = True
                try:
                    with self._send_lock:
                        self.conn.send((_REQUEST, request_id, op, args, self.refs.drain()))
                    while True:
                        message = _received(self.conn.recv())
                        if message[0] == _REPLY:
                            if message[1] == request_id:
                                reply = message
                                break
                            self._note_failed_notice(message)
                        elif self._arrived(message):
                            if main and self.interrupt_pending:  # the node may hold this
                                # request (a get) for a long time: it answers at once now
                                with self._send_lock:
                                    self.conn.send((_NOTICE, "interrupt_wait", (),
                                                    self.refs.drain()))
                        else:
                            self.backlog.append(message)
                finally:
                    if main:
                        self.main_io = False
            if main and self.interrupt_pending:
                self._interrupt()
        _, _, ok, value = reply
        if not ok:
            if type(value) is KeyboardInterrupt and self.interruptible is not None and main:
                self.interrupted = self.interruptible  # the node interrupted its wait
            reply = message = None  # the error's traceback holds this frame: no cycle
            try:
                raise value
            finally:
                del value
        return value

    def _note_failed_notice(self, reply) -> None:
        self.failed_notices.append(reply[3])

    def _raise_failed_notice(self) -> None:
        if self.failed_notices:
            raise self.failed_notices.pop(0)

    def start_reader(self, dispatch) -> None:
        """Route replies to their requests and everything else to `dispatch` (or inbox)."""
        self.inbox = queue.SimpleQueue()
        for message in self.backlog:
            self.inbox.put(message)
        self.backlog = []

        def read():
            while True:
                try:
                    message = _received(self.conn.recv())
                except (EOFError, OSError):
                    self.inbox.put(wire(ExitWorker))
                    return
                if message[0] == _REPLY and message[1] in self._slots:
                    slot = self._slots.pop(message[1])
                    slot[1] = message
                    slot[0].release()
                elif message[0] == _REPLY:
                    self._note_failed_notice(message)
                elif self._arrived(message):
                    continue
                elif dispatch is None or not dispatch(message):
                    self.inbox.put(message)

        threading.Thread(target=read, name="hpcray-worker-reader", daemon=True).start()
