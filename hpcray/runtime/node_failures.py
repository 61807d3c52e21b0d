"""A lost node (Open MPI's ULFM): the survivors go on without it.

Only with a fault-tolerant transport (transport.py: `mpiexec --with-ft ulfm`). Every
survivor's transport finds the dead rank by itself (its next MPI call fails) and at once
forgets what it had with it; pulls from it end as ObjectLostError (ObjectMover). What
the loss means for tasks and actors is decided once, by rank 0, which holds the global
scheduler: it stops placing on the rank, marks the node dead in the GCS, and tells
every survivor which of the tasks that survivor owns it had placed there (`NodeDied`).
That message is the agreement: each survivor acts on rank 0's word, in the order rank 0
sent it, not on its own view (which may come earlier or later).

On NodeDied(rank, lost) a survivor
- re-submits the tasks in `lost` it still waits for (and restarts the actors in it that
  never said they started there), within their `max_retries` (else
  their refs raise NodeDiedError, as Ray's raylet-died case);
- sends the actor calls it had sent to that rank again, to the actor's next host, within
  their `max_task_retries` (else ActorDiedError: the call may have run);
- rebuilds the values it owns whose only copy was there (lineage.py), and asks the
  owners of the values it borrows that were there where they are now;
- forgets the rank as a borrower of its objects;
- restarts, as their owner, the actors that rank hosted, on another node, within
  `max_restarts` (the creation spec is kept by the owner: RemoteActor.creation), else
  tells every node the actor is dead (ActorAt with rank -1);
- answers the state queries that waited for the rank's rows without them;
and rank 0 places the placement-group bundles that were there again
(placement_groups.GroupDirectory.node_died): what re-runs into them waits for that.

Every survivor on the dead rank's host also removes what it left there (its store
segment, its spill folder) as soon as its transport finds it dead.

Rank 0 dying ends the job: every other rank logs one line and leaves (launch.py).
Rank 0 knows what it placed where (`ClusterLink.placed`, rank -> {task id: owner});
each node reports the placed tasks that ended in its Load reports (`ended`).
"""

from __future__ import annotations

import logging
import socket

from hpcray import exceptions
from hpcray._store import Store
from hpcray.runtime import messages
from hpcray.runtime.messages import wire
from hpcray.runtime.object_mover import owner_died
from hpcray.runtime.object_table import PENDING, REMOTE
from hpcray.runtime.spilling import remove_directory
from hpcray.runtime.specs import QUEUED, RUNNING

log = logging.getLogger("hpcray.node_failures")


class NodeFailures:
    HANDLES = {messages.NodeDied: "on_node_died"}

    def __init__(self, rank: int, link, node, network, objects, actors, router, mover,
                 lineage, gcs, peers) -> None:
        self.rank = rank
        self.link = link
        self.node = node
        self.network = network
        self.objects = objects
        self.actors = actors
        self.router = router
        self.mover = mover
        self.lineage = lineage
        self.gcs = gcs
        self.peers = peers
        self.transport = link.transport

    # ------------------------------------------------------------------ detection
    def peers_lost(self, ranks: list, transfers: list) -> None:
        """This node's transport found `ranks` dead (and receives from them ended)."""
        for transfer in transfers:
            self._pull_lost(transfer)
        if 0 in ranks and self.rank != 0:
            if self.rank == self.transport.live_ranks()[0]:  # one line for the job
                log.error("hpcray: lost rank 0 (the driver and the global scheduler, host "
                          "%s); the job ends", self._host(0))
            self._clean_up_after(0)
            self.link.stop_requested = True
            return
        for rank in ranks:
            log.warning("rank %d: lost rank %d (host %s); the job goes on without it",
                        self.rank, rank, self._host(rank))
            self.node.relay.node_lost(rank)
            self._clean_up_after(rank)
        if self.rank == 0:
            for rank in ranks:
                self._decide(rank)

    def _clean_up_after(self, dead: int) -> None:
        """What the dead node leaves on this host, if it shares it: its store segment and
        its spill folder. Its fork server removes both when its node dies, unless Open
        MPI's cleanup (or anything else) kills that server first (seen: the segment
        stayed). Every survivor of the host tries; each goes once. A host left with no
        survivor keeps them (under Slurm the default spill folder is in $SLURM_TMPDIR,
        which Slurm empties at the end of the job)."""
        node = self.link.nodes.get(dead, {})
        self.node.host_stores.forget(dead)
        self.node.wakes.forget(dead)
        if node.get("pid") and node.get("host_key") == self.node.host_stores.identity:
            self.node.store.release_pins_of(node["pid"])  # what it was copying from here
        if node.get("hostname") != self._host(self.rank, socket.gethostname()):
            return
        if node.get("store_name"):
            try:
                Store.unlink_name(node["store_name"])
            except Exception:  # noqa: BLE001 - gone already (another survivor, its server)
                pass
        if node.get("spill_dir"):
            remove_directory(node["spill_dir"])

    def _host(self, rank: int, unknown: str = "?") -> str:
        return self.link.nodes.get(rank, {}).get("hostname", unknown)

    def _pull_lost(self, transfer) -> None:
        for tag, pulled in list(self.link.pulls.items()):
            if pulled[-1] is not transfer:
                continue
            if self.node.relay.relay_lost(tag):
                continue  # its relay died: pulled from the holder itself again
            for object_id, entry in self.mover.abandon_pull(tag):
                if entry is None:
                    self.mover.object_lost(object_id, entry, transfer.peer)
                else:
                    self.copy_lost(object_id, entry, transfer.peer)

    def copy_lost(self, object_id: bytes, entry, holder: int) -> None:
        """A pull from `holder`, which died, ended without the value (here, or through
        a relay whose own copy failed: relay.py)."""
        if entry.owner in self.transport.dead:
            self.mover.object_lost(object_id, entry, holder)
        elif entry.owner == self.rank and entry.state == PENDING:
            # a reader's copy it pulled to rebuild the value: another, or a re-run
            self.lineage.copy_missing(object_id, entry, holder)
        elif holder in self.link.dead_nodes:  # rank 0 declared it dead already
            if entry.owner == self.rank:
                self.lineage.rebuild([object_id])
            else:
                self._ask_owner_again(object_id, entry)
        # Else left REMOTE on the dead rank, not pulling: at NodeDied its owner rebuilds
        # it from lineage (this node, or another, which a borrower asks again then).

    def _ask_owner_again(self, object_id: bytes, entry) -> None:
        """A borrowed value whose copy was lost: where is it now? (The owner answers
        once it has made it again.)"""
        entry.state = PENDING
        entry.location = None
        self.mover.watch(object_id, entry)

    def _decide(self, dead: int) -> None:
        """Rank 0: the node is gone for the whole job; tell each survivor what it lost."""
        scheduler = self.network.global_scheduler
        scheduler.remove_node(dead)
        self.gcs.mark_node_dead(dead)
        # Before NodeDied: the re-runs it brings, into bundles that were there, must
        # find their groups rescheduling (and wait), not created on a dead rank.
        self.network.groups.node_died(dead)
        placed = self.link.placed.pop(dead, {})
        by_owner: dict = {}
        for task_id, owner in placed.items():
            by_owner.setdefault(owner, []).append(task_id)
        for rank in self.transport.live_ranks():
            message = wire(messages.NodeDied, dead, by_owner.get(rank, []))
            if rank == self.rank:
                self.on_node_died(self.rank, *message[1:])
            else:
                self.peers.send(rank, message)
        self.network.place_pending_actors()

    # ------------------------------------------------------------------ recovery
    def on_node_died(self, source: int, dead: int, lost: list) -> None:
        self.network.node_died(dead)
        self.node.state_queries.node_died(dead)
        # Before the restarts: one placed on this node takes the queue of calls with it.
        requeued = self._requeue_calls_sent_to(dead)
        self.actors.node_died(dead)
        rerun = []
        for task_id in lost:
            remote = self.actors.remote_actors.get(task_id)  # an actor placed there
            if remote is not None:
                if remote.host is None and remote.owner == self.rank:
                    self.actors.restart_elsewhere(remote, dead)
                continue
            record = self.node.tasks.get(task_id)
            if record is None or record.state != RUNNING or record.worker is not None:
                continue  # ended (its TaskDone came first) or run again already
            rerun.append(record)
        # Values before tasks: a task run again must find its lost arguments PENDING (it
        # waits for them), not REMOTE on the dead rank (it would pull from it, into the
        # buffer its rebuild then makes: ObjectExistsError). And the tasks to run again
        # are known first: lineage re-runs the task of a lost value unless it is one.
        self._objects_after(dead)
        lost_values = self.lineage.lost_with(dead)
        if lost_values:
            log.warning("rank %d: %d values it owns had their only copy on rank %d: "
                        "rebuilding them from lineage", self.rank, len(lost_values), dead)
            self.lineage.rebuild(lost_values)
        for remote in requeued:  # after the values: no call describes one as on the dead rank
            if self.actors.remote_actors.get(remote.actor_id) is remote:
                self.router.pump_remote_actor(remote)  # to the new host, if known yet
        for record in rerun:
            self._rerun(record, dead)
        if lost:
            log.warning("rank %d: %d tasks it owns were on rank %d: %d run again",
                        self.rank, len(lost), dead, len(rerun))

    def _objects_after(self, dead: int) -> None:
        """Values the dead rank owned are lost (Ray's OwnerDiedError) unless a copy is
        here or being pulled from elsewhere; those it held for other owners are asked
        of their owners again; it no longer borrows anything."""
        for object_id, entry in list(self.objects.entries.items()):
            lost_here = entry.state == REMOTE and entry.location == dead and not entry.pulling
            if entry.owner == dead:
                if entry.state == PENDING or lost_here:
                    self.objects.object_ready(object_id, owner_died(object_id, dead), (), 0)
            elif lost_here and entry.owner != self.rank:
                self._ask_owner_again(object_id, entry)
            elif entry.borrowers and dead in entry.borrowers:
                self.node.borrowing.count_borrower(object_id, entry, dead,
                                                   -entry.borrowers[dead])

    def _rerun(self, record, dead: int) -> None:
        spec = record.spec
        if record.retries_left == 0:
            self.router.task_failed_remotely(spec, exceptions.NodeDiedError(
                f"Task {spec.name} was running on node {dead} (rank {dead}), which died; "
                "it has no retries left (max_retries)."))
            return
        if record.retries_left > 0:
            record.retries_left -= 1
        self.node.recorder.count("retries")
        # Its arguments again: one may have been lost too (rebuilt, or asked of its owner).
        self.node._resolve_deps(record, self.node._on_task_deps_ready)

    def _requeue_calls_sent_to(self, dead: int) -> list:
        """Actor calls this node sent to the dead rank never come back: as Ray, each goes
        back in its actor's queue, ahead of the calls not sent yet, for the actor's next
        host (after its restart) while its max_task_retries allows, else fails
        (ActorDiedError: it may have run). -> the RemoteActors with calls put back."""
        tasks = self.node.tasks
        requeued = []
        for remote in list(self.actors.remote_actors.values()):
            lost = [(task_id, record) for task_id, (host, record) in remote.sent.items()
                    if host == dead]
            retry = []
            for task_id, record in lost:
                if record.retries_left == 0 or record.cancelled:
                    self.router.task_failed_remotely(record.spec, exceptions.ActorDiedError(
                        f"The actor running {record.spec.name} was on node {dead} (rank "
                        f"{dead}), which died during the call; the call had no retries "
                        "left (max_task_retries)."))
                    continue
                del remote.sent[task_id]
                if record.retries_left > 0:
                    record.retries_left -= 1
                self.node.recorder.count("retries")
                tasks.pop(task_id, None)
                record.state = QUEUED
                retry.append(record)
            if retry:
                remote.queue.extendleft(reversed(retry))
                requeued.append(remote)
        return requeued
