"""What a node manager does for the processes on its node (workers; a driver calls the
node in process instead): the node operations of messages.py, one-way (`Notice`) or
answered (`Request` -> `Reply`, now or, for what waits on objects or the GCS, later).
Each operation is one `op_<name>` method here; `messages.check_operations` holds this
class to the declared list.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hpcray.runtime import messages
from hpcray.runtime.generators import ITEM
from hpcray.runtime.messages import wire
from hpcray.runtime.specs import ACTOR_CREATION, TaskSpec

log = logging.getLogger("hpcray.node")

if TYPE_CHECKING:
    from hpcray.runtime.worker_processes import WorkerHandle


class WorkerRequests:
    """Serves the node operations its workers send."""

    HANDLES = {messages.Notice: "on_notice", messages.Request: "on_request"}

    def __init__(self, rank: int, node, objects, actors, router, network, scheduler,
                 spiller) -> None:
        self.rank = rank
        self.node = node                  # submit, cancel, worker sockets, timers
        self.objects = objects
        self.actors = actors
        self.router = router
        self.network = network
        self.scheduler = scheduler
        self.spiller = spiller

    def on_notice(self, worker: WorkerHandle, op: str, args: tuple, transitions) -> None:
        try:
            getattr(self, "op_" + op)(worker, *args)
        except Exception as exc:  # noqa: BLE001 - the node goes on; the worker is told
            log.exception("rank %d: %s from pid=%s failed", self.rank, op, worker.pid)
            self.node.processes.send(worker, wire(messages.Reply, 0, False, exc))
        self.objects.apply_transitions(transitions)

    def on_request(self, worker: WorkerHandle, request_id: int, op: str, args: tuple,
                   transitions) -> None:
        self.objects.apply_transitions(transitions)
        try:
            getattr(self, "op_" + op)(worker, request_id, *args)
        except Exception as exc:  # noqa: BLE001 - the worker re-raises it at its call site
            self.node.processes.send(worker, wire(messages.Reply, request_id, False, exc))

    def reply(self, worker, request_id: int, value) -> None:
        if worker.alive:
            self.node.processes.send(worker, wire(messages.Reply, request_id, True, value))

    # ------------------------------------------------------------------ one-way
    def op_submit(self, worker, spec_fields: tuple, parent_id: bytes | None) -> None:
        spec = TaskSpec(*spec_fields)
        self.node.submit(spec, self._parent(worker, parent_id))
        # The refs the submitting process holds from the start (counted by submit).
        if spec.kind == ACTOR_CREATION:
            worker.holds.add(spec.actor_id)
            if not spec.options.get("detached"):  # it dies with this process (owners.py)
                self.actors.owners.created(worker, spec.actor_id)
        else:
            worker.holds.update(spec.return_ids)

    def _parent(self, worker, parent_id: bytes | None):
        """The record of the task or actor call a submit came from (a recursive cancel of
        it cancels what it submitted): a pool worker's task, or the call of an actor's
        process that `parent_id` names (running, so sent: in `inflight`)."""
        if worker.actor_id is None:
            return worker.task
        actor = self.actors.get(worker.actor_id) if parent_id is not None else None
        return actor.inflight.get(parent_id) if actor is not None else None

    def op_put(self, worker, object_id, inline, contained, holds_ref: bool, size: int) -> None:
        self.objects.put(object_id, inline, contained, holds_ref, size)
        if holds_ref:  # the ref the putting process holds, counted at once
            worker.holds.add(object_id)

    def op_call_sites(self, worker, object_ids: list, site: str) -> None:
        self.node.call_sites.note(object_ids, site)

    def op_export_function(self, worker, function_id: bytes, pickled: bytes) -> None:
        self.router.export_function(function_id, pickled)

    def op_release_actor_name(self, worker, name: str, actor_id: bytes) -> None:
        self.actors.release_actor_name(name, actor_id)

    def op_kill_actor(self, worker, actor_id: bytes, no_restart: bool) -> None:
        self.actors.kill_actor(actor_id, no_restart)

    def op_create_group(self, worker, group_id: bytes, bundles: list, strategy: str,
                        name: str, detached: bool) -> None:
        self.node.bundles.create(group_id, bundles, strategy, name, detached)

    def op_remove_group(self, worker, group_id: bytes) -> None:
        self.node.bundles.remove(group_id)

    def op_interrupt_wait(self, worker) -> None:
        """The worker read the cancel of the task it runs while blocked in a get or wait
        sent before it: that ends now, with the KeyboardInterrupt of a cancel (one sent
        after the cancel waits as usual: a task may clean up after catching it)."""
        if worker.interrupt_wait is not None and worker.task is not None \
                and worker.task.cancelled:
            worker.interrupt_wait(KeyboardInterrupt(f"{worker.task.spec.name} was cancelled."))

    # ------------------------------------------------------------------ answered
    def op_get(self, worker, request_id, object_ids, timeout) -> None:
        self.wait_for(worker, request_id, object_ids, len(object_ids), timeout,
                      lambda: self.objects.payloads(object_ids), lambda: "timeout")

    def op_wait(self, worker, request_id, object_ids, num_returns, timeout,
                fetch_local) -> None:
        answer = lambda: self.objects.ready_ids(object_ids, fetch_local)  # noqa: E731
        self.wait_for(worker, request_id, object_ids, num_returns, timeout, answer, answer,
                      fetch_local)

    def op_get_actor(self, worker, request_id, name) -> None:
        self.actors.lookup_actor(name, lambda found: self.reply(worker, request_id, found))

    def op_claim_actor_name(self, worker, request_id, name, actor_id, info) -> None:
        self.actors.claim_actor_name(name, actor_id, info,
                                     lambda holder: self.reply(worker, request_id, holder))

    def op_resources(self, worker, request_id) -> None:
        self.reply(worker, request_id, (self.network.cluster_resources(),
                                        self.network.cluster_available()))

    def op_nodes(self, worker, request_id) -> None:
        self.reply(worker, request_id, self.node.describe_nodes())

    def op_cancel(self, worker, request_id, object_id: bytes, force: bool,
                  recursive: bool) -> None:
        """Answered, so that the worker's cancel raises what the driver's would (force on
        an actor call) and returns once this node has done its part."""
        self.node.cancel(object_id, force, recursive)
        self.reply(worker, request_id, None)

    def op_group_rows(self, worker, request_id, group_id, name) -> None:
        self.node.bundles.rows(group_id, name, lambda rows: self.reply(worker, request_id, rows))

    def op_list_state(self, worker, request_id, table: str) -> None:
        self.node.list_state(table, lambda rows: self.reply(worker, request_id, rows))

    def op_generator_next(self, worker, request_id, task_id: bytes, index: int,
                          take: bool) -> None:
        status, object_id = self.node.generators.next_item(task_id, index, take)
        if take and status == ITEM:  # the item's ref is the asking process's now
            worker.holds.add(object_id)
        self.reply(worker, request_id, (status, object_id))

    def op_generator_pause(self, worker, request_id, task_id: bytes, needed: int) -> None:
        """A generator task with a backpressure limit waits until `needed` of its items
        are taken (generators.py); answered with the count taken. A pool task's cancel
        ends the wait with its KeyboardInterrupt, as it ends a get."""
        state = {"done": False}

        def answer(value, ok: bool = True) -> None:
            if state["done"]:
                return
            state["done"] = True
            if worker.interrupt_wait is interrupt:
                worker.interrupt_wait = None
            if worker.alive:
                self.node.processes.send(worker, wire(messages.Reply, request_id, ok, value))

        def interrupt(error) -> None:
            answer(error, ok=False)

        if worker.actor_id is None:
            worker.interrupt_wait = interrupt
        self.node.generators.pause(worker, task_id, needed, answer)

    def op_generator_slot(self, worker, request_id, task_id: bytes) -> None:
        """A generator method of an actor with a shared budget of items not taken makes
        its next item once this answers (generator_budget.py)."""
        actor = self.actors.get(worker.actor_id)
        record = actor.inflight.get(task_id) if actor is not None else None
        if record is None:  # not running here any more: nothing to hold it for
            self.reply(worker, request_id, None)
            return
        self.node.generators.budgets.request_slot(
            actor, record, lambda _none: self.reply(worker, request_id, None))

    def op_make_room(self, worker, request_id, size: int) -> None:
        """The worker's create of `size` bytes found the store full: spill (spilling.py)."""
        self.reply(worker, request_id, self.spiller.make_room(size))

    def op_restore(self, worker, request_id, object_id: bytes) -> None:
        """The worker found an object it was told is in the store gone: spilled."""
        self.reply(worker, request_id, self.spiller.restore(object_id))

    # ------------------------------------------------------------------ waiting
    def wait_for(self, worker, request_id, object_ids, num_returns, timeout, answer,
                 timeout_answer, local: bool = True) -> None:
        """Reply once `num_returns` of `object_ids` are here (or anywhere: not `local`);
        meanwhile the worker is blocked and lends its CPU."""
        state = {"done": False}

        def finish(timed_out=False):
            if state["done"]:
                return
            state["done"] = True
            worker.interrupt_wait = None
            self.set_blocked(worker, False)
            self.reply(worker, request_id, timeout_answer() if timed_out else answer())

        def interrupt(error):
            if not state["done"]:
                state["done"] = True
                worker.interrupt_wait = None
                self.objects.cancel_waiter(object_ids, waiter)
                self.set_blocked(worker, False)
                if worker.alive:
                    self.node.processes.send(worker, wire(messages.Reply, request_id, False, error))

        waiter = self.objects.register_get(object_ids, num_returns, finish, local)
        if waiter is None:
            self.reply(worker, request_id, answer())
            return
        worker.interrupt_wait = interrupt
        self.set_blocked(worker, True)
        if timeout is not None:
            def expire():
                if not state["done"]:
                    self.objects.cancel_waiter(object_ids, waiter)
                    finish(timed_out=True)
            self.node._add_timer(timeout, expire)

    def set_blocked(self, worker, blocked: bool) -> None:
        record = worker.task
        if record is None or record.blocked == blocked:
            return
        record.blocked = blocked
        if blocked:
            self.node._run_actions(self.scheduler.worker_blocked(worker.key, record.spec.demand))
        else:
            self.scheduler.worker_unblocked(worker.key, record.spec.demand)


messages.check_operations(WorkerRequests)
