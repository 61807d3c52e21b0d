"""Cancelling tasks and actor calls (`cancel`), wherever they are in their life.

What Ray does, and so what this does:
- A task that does not run yet (waiting for its arguments, its function or a worker, or
  on its way to another node) never runs; `get` raises TaskCancelledError.
- A running task gets a KeyboardInterrupt in its thread (the node sends its worker
  CancelTask, then SIGINT: worker.py), or with `force` its worker is killed (the node
  starts another). It is never retried, and `get` raises TaskCancelledError, never a
  value: results that come back anyway (it ended before the cancel reached it, or it
  caught the interrupt) are replaced (`cancelled_results`).
- `recursive` cancels the tasks and actor calls it submitted too (they are owned by the
  node it ran on, which keeps their ids in its record: `TaskRecord.children`).
- An actor call not yet sent to the actor's process never runs. A running one is not
  interrupted: a method of a one-call-at-a-time or threaded actor sees
  `get_runtime_context().is_canceled()` turn True, an async actor's coroutine is
  cancelled (asyncio.CancelledError); `get` raises TaskCancelledError. `force` raises
  ValueError, as in Ray (ignored for the child actor calls of a recursive cancel).
- A task that already finished is left alone.

Where a task is. Its owner (the node whose process submitted it) keeps its record until
the results are in, so a process that cancels a task another node owns sends `Cancel` to
that owner. The owner finds the record in one of these places:
    node.tasks        WAITING, QUEUED or RUNNING on a worker here; RUNNING elsewhere
                      (forwarded: worker None); an actor call sent to another node
    actor.queue       an actor hosted here: a call not sent to its process yet
    actor.inflight    ... sent to its process
    RemoteActor.queue a call waiting for its host or its arguments
A forwarded task is cancelled through rank 0 (`CancelPlaced`): the message reaches rank
0 after the task's Forward, and rank 0 passes it to every node after any Run of it that
it sent, so the node that runs the task has it when the cancel comes (a node forwards a
placed task no further; it may hand one it has not started back to its owner,
`TaskReturned`, which fails it there if it was cancelled meanwhile). An actor call sent
to its host is followed there by `Cancel`.
"""

from __future__ import annotations

import pickle
import signal

from hpcray import exceptions, ids
from hpcray._store import StoreError
from hpcray.runtime import messages
from hpcray.runtime.actors import ActorRecord
from hpcray.runtime.messages import wire
from hpcray.runtime.object_table import IN_STORE, _DependencyWaiter
from hpcray.runtime.specs import ACTOR_CALL, FINISHED, QUEUED, RUNNING, WAITING
from hpcray.serialization import ErrorValue, error_bytes


class Canceller:
    """Finds a task or actor call wherever it is on this node and cancels it there, or
    passes the cancel on to the node that can."""

    HANDLES = {messages.Cancel: "on_cancel", messages.CancelPlaced: "on_cancel_placed"}

    def __init__(self, rank: int, node, objects, borrowing, actors, scheduler, store,
                 peers) -> None:
        self.rank = rank
        self.node = node                  # tasks, workers, task ends
        self.objects = objects
        self.borrowing = borrowing
        self.actors = actors
        self.scheduler = scheduler
        self.store = store
        self.peers = peers

    # ------------------------------------------------------------------ entry points
    def cancel(self, task_id: bytes, force: bool, recursive: bool) -> None:
        """A process on this node cancels `task_id`. Raises ValueError for `force` on an
        actor call this node knows."""
        self._cancel(task_id, force, recursive, route=True, strict=True)

    def on_cancel(self, source: int, task_id: bytes, force: bool, recursive: bool) -> None:
        """This node owns the task (or hosts the actor of the call)."""
        self._cancel(task_id, force, recursive, route=True, strict=False)

    def on_cancel_placed(self, source: int, task_id: bytes, force: bool,
                         recursive: bool) -> None:
        """Rank 0: from the task's owner, after its Forward: on to every node. Another
        node: from rank 0: cancel it if it was placed here."""
        if self.rank == 0:
            self.peers.broadcast(wire(messages.CancelPlaced, task_id, force, recursive))
        self._cancel(task_id, force, recursive, route=False, strict=False)

    # ------------------------------------------------------------------ finding it
    def _find(self, task_id: bytes):
        """(record, where): where is None for node.tasks, else the ActorRecord or
        RemoteActor that queues it (or runs it: in its `inflight`)."""
        record = self.node.tasks.get(task_id)
        if record is not None:
            return record, None
        for actor in self.actors.values():
            record = actor.inflight.get(task_id)
            if record is not None:
                return record, actor
            for queued in actor.queue:
                if queued.spec.task_id == task_id:
                    return queued, actor
        for remote in self.actors.remote_actors.values():
            for queued in remote.queue:
                if queued.spec.task_id == task_id:
                    return queued, remote
        return None, None

    def _cancel(self, task_id: bytes, force: bool, recursive: bool, route: bool,
                strict: bool) -> None:
        """`route`: pass it on to where the task is (its owner, rank 0, an actor's host)
        when that is not here; `strict`: raise ValueError for `force` on an actor call."""
        record, where = self._find(task_id)
        if record is None:
            owner = ids.owner_rank(task_id)
            if route and strict and owner != self.rank:
                self.peers.send(owner, wire(messages.Cancel, task_id, force, recursive))
            return  # finished already (or never here): nothing to do, as in Ray
        if record.spec.kind == ACTOR_CALL:
            if force and strict:
                raise ValueError("force=True is not supported for actor tasks.")
            self._cancel_actor_call(record, where, recursive, route)
        else:
            self._cancel_task(record, force, recursive, route)
        if recursive and record.children:
            for child_id in record.children:
                self._cancel(child_id, force, recursive, route=True, strict=False)

    # ------------------------------------------------------------------ tasks
    def _cancel_task(self, record, force: bool, recursive: bool, route: bool) -> None:
        state = record.state
        if state == FINISHED:
            return
        first = not record.cancelled
        record.cancelled = True
        record.retries_left = 0
        if state == WAITING:
            self._drop_dependency_waiters(record)
            self.node._fail_task(record, cancelled_error(record))
        elif state == QUEUED:
            self.scheduler.cancel(record.spec.task_id)
            self.node._fail_task(record, cancelled_error(record))
        elif state == RUNNING and record.worker is None:
            # Forwarded by this node (its owner): to rank 0, behind the Forward.
            if route and (first or force):
                self.send_placed(record.spec.task_id, force, recursive)
        elif state == RUNNING:
            self._interrupt(record, force, first)

    def send_placed(self, task_id: bytes, force: bool, recursive: bool) -> None:
        message = wire(messages.CancelPlaced, task_id, force, recursive)
        if self.rank == 0:
            self.on_cancel_placed(0, *message[1:])
        else:
            self.peers.send(0, message)

    def interrupt(self, record) -> None:
        """A task cancelled while pipelined to its worker started (or is skipped)."""
        self._interrupt(record, False, True)

    def _interrupt(self, record, force: bool, first: bool) -> None:
        worker = record.worker
        if not worker.alive or not worker.pid:
            return
        if record in worker.pipelined:  # pipelined, not started: the worker skips it
            if first:  # (force too: a kill would end the task that runs now)
                self.tell_worker(worker, record.spec.task_id, interrupt=False)
            return
        if force:  # its death fails the task (node_manager._worker_died)
            self.node.processes.kill(worker, "cancel(force=True)")
            return
        if not first:
            return
        if worker.interrupt_wait is not None:  # blocked in get/wait: interrupted there
            worker.interrupt_wait(KeyboardInterrupt(f"{record.spec.name} was cancelled."))
        self.tell_worker(worker, record.spec.task_id, interrupt=True)
        self._interrupt_again(record, worker, _FIRST_RESEND)

    def _interrupt_again(self, record, worker, delay: float) -> None:
        """A SIGINT that lands just before the task enters a blocking call (time.sleep's
        system call) is handled only when that call returns: signal the worker again,
        less and less often, until the task ends. A signal more does nothing: the worker
        interrupts its task only for a CancelTask it had not seen."""
        def again() -> None:
            if record.state == FINISHED or record.worker is not worker or not worker.alive:
                return
            if not worker.sigint_after_flush:
                self.node.processes.signal(worker.pid, signal.SIGINT)
            self._interrupt_again(record, worker, min(2 * delay, _LAST_RESEND))
        self.node._add_timer(delay, again)

    def tell_worker(self, worker, task_id: bytes, interrupt: bool) -> None:
        """CancelTask to the worker, then (`interrupt`) SIGINT, which makes it look at
        once; the signal waits until the message has left this node."""
        self.node.processes.send(worker, wire(messages.CancelTask, task_id))
        if not interrupt:
            return
        if worker.conn.has_pending_output:
            worker.sigint_after_flush = True
        else:
            self.node.processes.signal(worker.pid, signal.SIGINT)

    # ------------------------------------------------------------------ actor calls
    def _cancel_actor_call(self, record, where, recursive: bool, route: bool) -> None:
        if record.state == FINISHED:
            return
        first = not record.cancelled
        record.cancelled = True
        record.retries_left = 0
        if where is None:  # sent to the actor's node: cancelled there, after the call
            remote = self.actors.remote_actors.get(record.spec.actor_id)
            host = remote.host if remote is not None else None
            if route and first and host is not None:
                self.peers.send(host, wire(messages.Cancel, record.spec.task_id, False,
                                           recursive))
            return
        hosted = isinstance(where, ActorRecord)
        if hosted and record.spec.task_id in where.inflight:
            if first:
                worker = where.worker
                if worker is not None and worker.alive and worker.pid:
                    self.tell_worker(worker, record.spec.task_id,
                                     interrupt=_one_call_at_a_time(where.spec))
            return
        where.queue.remove(record)  # not sent to the process yet: it never runs
        self._drop_dependency_waiters(record)
        if not hosted:  # a RemoteActor: each call holds the actor until it ends
            self.actors.actor_decref(where.actor_id)
        self.node._fail_task(record, cancelled_error(record))

    # ------------------------------------------------------------------ results
    def cancelled_results(self, record, results, source: int | None = None) -> list:
        """What a cancelled task reports instead of the `results` it came back with:
        kept when they are its own cancellation errors, else replaced by one (it ended
        before the cancel reached it, or went on after the interrupt). The values dropped
        are freed: a store object its worker made here (`source` None), or the primary
        copy on node `source` and the registrations made there for the refs inside."""
        if all(_is_cancellation(inline) for _, inline, _, _ in results):
            return results
        for object_id, inline, contained, _size in results:
            if inline is IN_STORE:
                if source is None:
                    try:
                        self.store.delete(object_id)
                    except StoreError:
                        pass
                else:
                    self.borrowing.delete_copies(object_id)
            if contained and source is not None:
                self.borrowing.give_back(contained)
        blob = error_bytes(exceptions.RayTaskError(
            record.spec.name, f"TaskCancelledError: {record.spec.name} was cancelled.\n",
            exceptions.TaskCancelledError(f"{record.spec.name} was cancelled."), None))
        return [(object_id, blob, (), len(blob)) for object_id in record.spec.return_ids]

    def _drop_dependency_waiters(self, record) -> None:
        """The waiters a task registered on its arguments (to resolve or pull them)."""
        for dep in record.spec.deps:
            entry = self.objects.get(dep)
            if entry is None:
                continue
            for attribute in ("waiters", "avail_waiters"):
                waiters = getattr(entry, attribute)
                if waiters:
                    setattr(entry, attribute, [
                        w for w in waiters
                        if not (isinstance(w, _DependencyWaiter) and w.record is record)]
                        or None)


_FIRST_RESEND, _LAST_RESEND = 0.05, 1.0  # seconds between SIGINTs to a cancelled task


def cancelled_error(record) -> exceptions.TaskCancelledError:
    return exceptions.TaskCancelledError(f"{record.spec.name} was cancelled.")


def _one_call_at_a_time(spec) -> bool:
    """A sync actor that runs its calls one at a time in its main thread (no reader
    thread: it looks for cancels when signalled)."""
    options = spec.options or {}
    return not options.get("info", {}).get("is_async") and \
        (options.get("max_concurrency") or 1) <= 1


def _is_cancellation(inline) -> bool:
    """Whether a result is the error of a cancelled task (as its worker reports one)."""
    if type(inline) is not bytes or b"ErrorValue" not in inline:
        return False
    try:
        value = pickle.loads(inline)
    except Exception:  # noqa: BLE001 - not ours to read: not a cancellation
        return False
    if type(value) is not ErrorValue:
        return False
    error = value.error
    return isinstance(error, exceptions.TaskCancelledError) or (
        isinstance(error, exceptions.RayTaskError)
        and isinstance(error.cause, exceptions.TaskCancelledError))

