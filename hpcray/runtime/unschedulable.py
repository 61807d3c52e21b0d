"""What becomes of a task or actor that no node of this job can run (Ray's infeasible
requests): one warning per request shape and pending, as Ray; or failed at once."""

from __future__ import annotations

import logging

from hpcray import exceptions
from hpcray.runtime.specs import TaskRecord, TaskSpec

log = logging.getLogger("hpcray.node")


class Unschedulable:
    def __init__(self, network, mode: str, actors, fail_task) -> None:
        self.network = network      # the cluster's resources, for the message
        self.mode = mode            # config.infeasible: "pending" (Ray's) or "error"
        self.actors = actors
        self.fail_task = fail_task  # NodeManager._fail_task
        self.shapes_warned: set = set()  # (is actor, demand) warned of once

    def handle(self, spec: TaskSpec, problem: str, record: TaskRecord | None) -> None:
        """No node of this job can run `spec` (a task's `record`, or an actor's creation):
        a hard node affinity that cannot hold fails it at once, as in Ray. Otherwise, as
        Ray does, it stays pending (WAITING on nothing, outside the scheduler, so it blocks
        nothing) until cancelled, killed or the job ends, with one warning per request
        shape; or, with HPCRAY_INFEASIBLE=error, it fails at once through its refs."""
        is_actor = record is None
        demand = dict(spec.demand)
        cluster = self.network.cluster_resources()
        what = f"{'Actor' if is_actor else 'Task'} {spec.name}"
        if problem == "removed":  # into a placement group already removed
            message = (f"{what} cannot be scheduled: its placement group "
                       f"{spec.options['scheduling_strategy'].group_id.hex()} was removed.")
        elif problem == "affinity":
            strategy = spec.options["scheduling_strategy"]
            message = (f"{what} requests {demand} on node rank {strategy.rank}: the node "
                       "specified via NodeAffinitySchedulingStrategy doesn't exist or is "
                       "infeasible, and soft=False was specified.")
        elif self.mode == "error":
            message = (f"{what} requests {demand}, but no node of this cluster can ever "
                       f"satisfy it: the cluster has {cluster} (HPCRAY_INFEASIBLE=error).")
        else:
            shape = (is_actor, tuple(sorted(demand.items())))
            if shape not in self.shapes_warned:
                self.shapes_warned.add(shape)
                kind = "actor" if is_actor else "task"
                log.warning(
                    "The %s %s (ID %s) cannot be scheduled right now. It requires %s for "
                    "placement, however the cluster currently cannot provide the requested "
                    "resources: no node has them (the cluster has %s). It stays pending "
                    "until %s, as in Ray (but an hpcray job's nodes are fixed at launch, so "
                    "it will not run in this job). Consider reducing the resource "
                    "requirements of the %s, or set HPCRAY_INFEASIBLE=error to fail such "
                    "requests through their refs instead.", kind, spec.name,
                    (spec.actor_id if is_actor else spec.task_id).hex(), demand, cluster,
                    "killed" if is_actor else "cancelled", kind)
            return
        if is_actor:
            self.actors.actor_dead(self.actors[spec.actor_id],
                                   exceptions.ActorUnschedulableError(message))
        elif problem in ("affinity", "removed"):
            self.fail_task(record, exceptions.TaskUnschedulableError(message))
        else:
            self.fail_task(record, exceptions.ResourceInfeasibleError(message))
