"""The tasks and actor calls the driver submits, queued for its node's thread.

Taking the node's lock for each task, the driver left that thread, and so rank 0's
workers, idle while it submitted (a 100k burst ran ~5% of its tasks on rank 0). So the
driver only queues them (`queue_submission`, no lock) and the node's thread submits them
between its workers' messages (`take`, each pass); any driver call that takes the lock
takes what is queued first (client.DriverClient._locked), so what it does next sees them.
"""

from __future__ import annotations

import collections
import logging
import time

log = logging.getLogger("hpcray.node")

# Taken this many at a time, the node's workers answered between batches, for at most
# SUBMIT_BUDGET seconds a pass of the node's thread (then MPI is polled: the forwarded
# tasks leave). Each batch is also one message to each node it forwards to. 64 against
# 16, 4-rank driver feed on 2 cores, 11 runs in two sittings: 1.05-1.09x tasks/s, rank 0's
# share the same; a node with many more workers than this machine may want it smaller.
SUBMIT_BATCH = 64
SUBMIT_BUDGET = 0.002


class DriverFeed:
    def __init__(self, node, driver_refs) -> None:
        self.node = node                 # submit, its event loop's handlers, its network
        self.driver_refs = driver_refs   # the refs the driver dropped (LocalReferenceCounter)
        self.queue: collections.deque = collections.deque()
        self._held_transitions: list = []  # dropped refs waiting for queued submissions

    def queue_submission(self, spec) -> None:
        """The driver's thread, without the lock: a task for `take` to submit."""
        queue = self.queue
        queue.append(spec)
        if len(queue) == 1:
            self.node._wake()

    def take(self, budget: float | None = None) -> None:
        """Under the lock: submit the tasks the driver queued, then apply the refs it
        dropped meanwhile (never before the submissions queued ahead of them, which may
        hold the same objects). `budget`: the node's thread stops after this many seconds
        (the rest waits for its next pass); the driver's thread takes everything (what
        it does next needs them submitted)."""
        transitions = self.driver_refs.drain()
        queue = self.queue
        if queue:
            self._submit_queued(queue, budget)
            if queue:  # out of time: these refs wait for the submissions still queued
                self._held_transitions.extend(transitions)
                return
        if self._held_transitions:
            transitions = self._held_transitions + transitions
            self._held_transitions = []
        self.node.objects.apply_transitions(transitions)

    def _submit_queued(self, queue, budget: float | None) -> None:
        """Submit the queued tasks a batch at a time; between batches, whatever this
        node's workers sent (they get their next task), and every SUBMIT_BUDGET the
        other nodes' messages (the tasks forwarded so far leave)."""
        start = polled = time.monotonic()
        transport = self.node.transport
        # The driver's thread, outside a pass of the event loop: what a batch forwards
        # goes as one message per node (as a pass's would), not the first few alone.
        cork = not transport.corked
        while queue:
            if cork:
                transport.cork()
            try:
                for _ in range(min(len(queue), SUBMIT_BATCH)):
                    spec = queue.popleft()
                    try:
                        self.node.submit(spec)
                    except Exception:  # noqa: BLE001 - one bad task must not stop the others
                        log.exception("rank %d: submitting %s failed", self.node.rank,
                                      spec.name)
            finally:
                if cork:
                    transport.uncork()
            if not queue:
                return
            now = time.monotonic()
            if budget is not None and now - start >= budget:
                return
            self.node.handle_ready_events()
            if now - polled >= SUBMIT_BUDGET:
                polled = now
                self.node.network.poll_cluster(active=True)
