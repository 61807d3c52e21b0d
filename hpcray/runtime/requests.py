"""What a node manager does for the processes on its node: their one-way messages
(`msg`: submit, put, cancel, ...) and their requests (`req`: get, wait, resources, ...),
each answered with `_reply` now or, for what waits on objects or the GCS, later.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from hpcray.runtime.specs import ACTOR_CREATION

log = logging.getLogger("hpcray.node")

if TYPE_CHECKING:
    from hpcray.runtime.node_manager import WorkerHandle


class WorkerRequestsMixin:
    """The worker-facing part of NodeManager."""

    def _msg_msg(self, worker: WorkerHandle, message) -> None:
        _, op, body, transitions = message
        try:
            if op == "submit":
                self.submit(body, worker.task)
                _note_owned(worker, body)
            elif op == "put":
                self.put(*body)
                if body[3]:  # the ref the putting process holds, counted at once
                    worker.holds.add(body[0])
            elif op == "function":
                self.export_function(body[0], body[1])
            elif op == "release_actor_name":
                self.release_actor_name(*body)
            elif op == "kill":
                self.kill_actor(*body)
            elif op == "cancel":
                self.cancel(*body)
        except Exception:  # noqa: BLE001 - a bad request must not kill the node
            log.exception("rank %d: %s from pid=%s failed", self.rank, op, worker.pid)
        self._apply_transitions(transitions)

    def _msg_req(self, worker: WorkerHandle, message) -> None:
        _, req_id, op, body, transitions = message
        self._apply_transitions(transitions)
        try:
            getattr(self, "_req_" + op)(worker, req_id, body)
        except Exception as exc:  # noqa: BLE001 - the worker re-raises it at its call site
            self._send(worker, ("reply", req_id, ("error", exc)))

    def _reply(self, worker, req_id, value) -> None:
        if worker.alive:
            self._send(worker, ("reply", req_id, ("ok", value)))

    def _req_submit(self, worker, req_id, spec) -> None:
        self.submit(spec)
        _note_owned(worker, spec)
        self._reply(worker, req_id, None)

    def _req_get(self, worker, req_id, body) -> None:
        object_ids, timeout = body
        self._wait_for(worker, req_id, object_ids, len(object_ids), timeout,
                       lambda: self.payloads(object_ids), lambda: "timeout")

    def _req_wait(self, worker, req_id, body) -> None:
        object_ids, num_returns, timeout, fetch_local = body
        answer = lambda: self.ready_ids(object_ids, fetch_local)  # noqa: E731
        self._wait_for(worker, req_id, object_ids, num_returns, timeout, answer, answer,
                       fetch_local)

    def _wait_for(self, worker, req_id, object_ids, num_returns, timeout, answer,
                  timeout_answer, local: bool = True) -> None:
        state = {"done": False}

        def finish(timed_out=False):
            if state["done"]:
                return
            state["done"] = True
            worker.interrupt_wait = None
            self._set_blocked(worker, False)
            self._reply(worker, req_id, timeout_answer() if timed_out else answer())

        def interrupt(error):
            if not state["done"]:
                state["done"] = True
                worker.interrupt_wait = None
                self.cancel_waiter(object_ids, waiter)
                self._set_blocked(worker, False)
                if worker.alive:
                    self._send(worker, ("reply", req_id, ("error", error)))

        waiter = self.register_get(object_ids, num_returns, finish, local)
        if waiter is None:
            self._reply(worker, req_id, answer())
            return
        worker.interrupt_wait = interrupt
        self._set_blocked(worker, True)
        if timeout is not None:
            def expire():
                if not state["done"]:
                    self.cancel_waiter(object_ids, waiter)
                    finish(timed_out=True)
            self._add_timer(timeout, expire)

    def _set_blocked(self, worker, blocked: bool) -> None:
        record = worker.task
        if record is None or record.blocked == blocked:
            return
        record.blocked = blocked
        if blocked:
            self._run_actions(self.scheduler.worker_blocked(worker.key, record.spec.demand))
        else:
            self.scheduler.worker_unblocked(worker.key, record.spec.demand)

    def _req_get_actor(self, worker, req_id, name) -> None:
        self.lookup_actor(name, lambda found: self._reply(worker, req_id, found))

    def _req_claim_actor_name(self, worker, req_id, body) -> None:
        self.claim_actor_name(*body, lambda holder: self._reply(worker, req_id, holder))

    def _req_resources(self, worker, req_id, _body) -> None:
        self._reply(worker, req_id, (self.cluster_resources(), self.cluster_available()))

    def _req_nodes(self, worker, req_id, _body) -> None:
        self._reply(worker, req_id, self.describe_nodes())

    def _req_list_tasks(self, worker, req_id, _body) -> None:
        self.list_tasks(lambda tasks: self._reply(worker, req_id, tasks))

    def list_tasks(self, answer) -> None:
        """answer(every task in the GCS tasks table), after the driver's dropped refs so
        far (they wait for the event loop otherwise) have freed what they free."""
        self._apply_transitions(self.driver_refs.drain())
        self.task_events.list_tasks(answer)

    def describe_nodes(self) -> list:
        """Every node: id, rank, resources, liveness (Ray's `nodes()` fields)."""
        host = socket.gethostname()
        if self.cluster is None:
            nodes = {0: {"node_id": self.node_id.hex(), "resources": self.total_resources}}
        else:
            nodes = self.cluster.nodes
        return [{"NodeID": node["node_id"], "Alive": True, "alive": True, "rank": rank,
                 "NodeManagerAddress": node.get("address", "127.0.0.1"),
                 "NodeManagerHostname": node.get("hostname", host),
                 "NodeName": node.get("hostname", host), "Resources": dict(node["resources"])}
                for rank, node in sorted(nodes.items())]

    def available_resources(self) -> dict:
        return {k: max(0.0, v) for k, v in self.scheduler.available.items()}


def _note_owned(worker, spec) -> None:
    """The refs a submitting process holds from the start (counted by `submit`)."""
    if spec.kind == ACTOR_CREATION:
        worker.holds.add(spec.actor_id)
    else:
        worker.holds.update(spec.return_ids)
