# cython: language_level=3
"""The local scheduler of one node: resource accounting, ready queues, dispatch.

A state machine with no I/O and no clock, as dask's scheduler is: the node manager tells
it what happened (a task is ready, a worker started, a task finished, a worker blocked in
`get`) and gets back the actions to carry out:

    ("dispatch", task_key, worker_key)   run the task on that idle pool worker
    ("place", task_key)                  resources granted to a task that needs no pool
                                         worker (an actor's creation)
    ("start_worker",)                    start one more pool worker
    ("retire", worker_key)               stop an idle pool worker the node no longer needs
    ("pipeline", task_key, worker_key)   send the task to that busy worker, to run after
                                         those sent to it before
    ("revoke", task_key, worker_key)     take back a task pipelined to that worker (it
                                         blocked in `get`): the task is queued again

Ready tasks are queued by scheduling class (their resource shape), so a dispatch pass
costs O(number of classes), not O(queue length), even with 100k tasks queued.
A worker blocked in `get` gives its CPUs back (as Ray does), so nested tasks never
deadlock a full node; more pool workers start while ready tasks fit the freed CPUs,
several at once (as many as ready tasks fit the free resources, at most `max_starting`):
a start takes milliseconds, and one at a time made a burst of nested tasks wait in line.

Pipelining: a task the caller marks `pipelinable` (short, no options, CPUs only) may be
sent to a busy worker whose running task is of the same class, to run right after it:
while tasks wait and no worker is idle, each worker has up to `pipeline_depth` more in
its socket, run in the order sent, so it starts the next without waiting for a round
trip through the node (no-op tasks: 13.5k/s with 2 workers, 18k with 4, measured: the
workers sat idle between tasks; 20-26k with one pipelined), and the node sends, and
hears of, several tasks per wake-up (depth 4 against 1: 1.4-1.7x a driver feeding 4
ranks, benchmarks/README.md). Each task takes over the resources of the one before (same
class). A worker that blocks in `get` gives all its pipelined tasks back (`revoke`): one
could be what the `get` waits for.

Workers beyond the pool size (`target_workers`, plus `max_idle_extra` kept for good)
retire once idle for `idle_timeout` seconds, as Ray retires idle workers above its soft
limit, so the extra workers that nested tasks need stay warm from one burst to the next.
The caller keeps the time: it passes `now` (seconds, monotonic) to the events that leave
a worker idle (`worker_started`, `task_finished`), calls `retire_idle(now)` at
`next_retire_at()`, and sets no timer when that is None (nothing could retire). A caller
that never passes a time gets the behaviour from before timed retirement: workers above
`target_workers + max_idle_extra` retire as soon as the queue empties.
"""

from collections import deque

_EPS = 1e-9
_CLOCK_EPS = 1e-6  # a timer that fires a hair early (float rounding) still retires
LOCALITY_BYTES = 1 << 20  # arguments this large pull a task toward the node holding them


# Bottom-up spilling, as in the paper: a node keeps a task it cannot start at once unless
# another node has room, or it is overloaded relative to the least loaded other node: its
# queue per CPU at SPILL_RATIO times that node's plus SPILL_SLACK_PER_CPU when that node
# submits tasks of its own too, at that node's plus the slack when it only runs what was
# placed on it. A ratio of 2 between submitters: busy submitters' queues differ by how far
# each has got, not by how much work each has (4 on 4 ranks: 3,200 queued on one against
# 1,550 on another), and moving that difference costs two messages and rank 0's time per
# task (1.25: 60% of the submitters' tasks ran where submitted; 2: 90%). Against a node
# that only runs placed work, 2 left a lone submitter with 37% of its 20 ms tasks on 4
# ranks (1.54 s against 1.06 s).
SPILL_SLACK_PER_CPU = 2.0
SPILL_RATIO = 2.0
# A node's view of the others older than this is no view (they may have drained since).
VIEW_TTL = 0.05


cpdef bint overloaded(double own_per_cpu, double least_per_cpu, bint least_submits=True):
    """Whether a node with `own_per_cpu` tasks queued per CPU should hand work to one with
    `least_per_cpu`; `least_submits`: that node routes tasks of its own too (else its
    queue is what was placed on it, and the queues are balanced as they are: ratio 1)."""
    return own_per_cpu >= (SPILL_RATIO if least_submits else 1.0) * least_per_cpu \
        + SPILL_SLACK_PER_CPU - _EPS


cdef bint _cpu_only(dict demand):
    for name in demand:
        if name != "CPU":
            return False
    return True


cdef bint _fits_in(dict available, dict demand):
    for name, amount in demand.items():
        if amount > available.get(name, 0.0) + _EPS:
            return False
    return True


cdef inline bint _lent_while_blocked(str name):
    """CPUs, and a placement group's CPUs (`CPU_group_...`, options.demand_in_group), go
    back to the pool while their task's worker waits in `get`: its children can run."""
    return name == "CPU" or name.startswith("CPU_group_")


cdef class LocalScheduler:
    cdef public dict total            # resource name -> capacity of this node
    cdef public dict available        # resource name -> capacity not held right now
    cdef public dict queues           # class key -> deque of (task_key, demand)
    cdef public list class_order      # class keys in the order they first appeared
    cdef public list idle_workers     # worker keys, most recently idle last
    cdef public dict idle_since       # idle worker key -> when it became idle (once timed)
    cdef public set busy_workers
    cdef public set blocked_workers
    cdef public int num_starting
    cdef public int target_workers    # pool size kept warm (num_cpus)
    cdef public int max_idle_extra    # idle workers beyond target_workers kept for good
    cdef public double idle_timeout   # seconds an extra worker may idle before it retires
    cdef public int max_starting      # worker starts in flight at most
    cdef public object clock          # the latest `now` an event carried; None: untimed
    cdef public bint validate
    cdef public long num_queued
    cdef public dict pipelined        # busy worker key -> [(task key, demand)] pipelined to it
    cdef public int pipeline_depth    # tasks pipelined to one worker at most
    cdef public dict running_class    # busy worker key -> class key of its running task
    cdef public bint pipelining

    def __init__(self, dict total, int target_workers, int max_idle_extra=0,
                 bint validate=False, double idle_timeout=1.0, int max_starting=0,
                 bint pipelining=True, int pipeline_depth=1):
        """`max_starting` 0: max(2, target_workers), as Ray starts up to num_cpus
        workers at once; `pipelining`: whether pipelinable tasks may be sent to busy
        workers, `pipeline_depth` of them at most to each, to run in turn."""
        self.total = {k: float(v) for k, v in total.items() if v}
        self.available = dict(self.total)
        self.queues = {}
        self.class_order = []
        self.idle_workers = []
        self.idle_since = {}
        self.busy_workers = set()
        self.blocked_workers = set()
        self.num_starting = 0
        self.target_workers = target_workers
        self.max_idle_extra = max_idle_extra
        self.idle_timeout = idle_timeout
        self.max_starting = max_starting if max_starting > 0 else max(2, target_workers)
        self.clock = None
        self.validate = validate
        self.num_queued = 0
        self.pipelined = {}
        self.running_class = {}
        self.pipelining = pipelining
        self.pipeline_depth = max(1, pipeline_depth)

    # -- queries ------------------------------------------------------------------
    cpdef bint is_feasible(self, dict demand):
        """Could this node ever run it (its totals cover the demand)?"""
        for name, amount in demand.items():
            if amount > self.total.get(name, 0.0) + _EPS:
                return False
        return True

    cpdef bint fits(self, dict demand):
        return _fits_in(self.available, demand)

    @property
    def num_waiting(self):
        """Tasks not started: queued, and pipelined to busy workers (what a load report
        and the status line count as queued)."""
        return self.num_queued + sum(len(w) for w in self.pipelined.values())

    @property
    def num_workers(self):
        return len(self.idle_workers) + len(self.busy_workers) + self.num_starting

    def next_retire_at(self):
        """When `retire_idle` would next retire a worker (the `now` to call it with), or
        None when no idle worker is beyond the kept pool: an idle node sets no timer."""
        if self.clock is None or not self.idle_workers or self._excess() <= 0:
            return None
        return self.idle_since[self.idle_workers[0]] + self.idle_timeout

    # -- resources ---------------------------------------------------------------
    cpdef void acquire(self, dict demand):
        for name, amount in demand.items():
            self.available[name] = self.available.get(name, 0.0) - amount

    cpdef void release(self, dict demand):
        for name, amount in demand.items():
            self.available[name] = self.available.get(name, 0.0) + amount

    cpdef void add_resources(self, dict resources):
        """A placement group's bundle became this node's (placement_groups.py): its
        resources, under the group's names, join the totals and the free pool."""
        for name, amount in resources.items():
            self.total[name] = self.total.get(name, 0.0) + amount
            self.available[name] = self.available.get(name, 0.0) + amount
        self._drop_spent()

    cpdef void remove_resources(self, dict resources):
        """A group's bundle went: its names leave the totals. What tasks still hold of
        them comes back when they end (their workers are being killed)."""
        for name, amount in resources.items():
            self.total[name] = self.total.get(name, 0.0) - amount
            self.available[name] = self.available.get(name, 0.0) - amount
        self._drop_spent()

    cdef void _drop_spent(self):
        """Names whose total reached zero leave the totals (no new task fits them); their
        free amount goes too once nothing holds any (it is back to zero)."""
        for name in [n for n, v in self.total.items() if v <= _EPS]:
            del self.total[name]
        for name in [n for n, v in self.available.items()
                     if n not in self.total and -_EPS <= v <= _EPS]:
            del self.available[name]

    # -- events ------------------------------------------------------------------
    def task_ready(self, task_key, dict demand, bint needs_worker=True,
                   bint pipelinable=False):
        """A task (or actor creation, needs_worker=False) has its arguments ready;
        `pipelinable`: it may wait in a busy worker (see the module docstring)."""
        cls = (needs_worker, tuple(sorted(demand.items())),
               pipelinable and needs_worker and _cpu_only(demand))
        queue = self.queues.get(cls)
        if queue is None:
            queue = self.queues[cls] = deque()
            self.class_order.append(cls)
        queue.append((task_key, demand))
        self.num_queued += 1
        return self._schedule()

    def cancel(self, task_key):
        """Drop a queued task; False when it is not queued (running or unknown)."""
        for queue in self.queues.values():
            for item in queue:
                if item[0] == task_key:
                    queue.remove(item)
                    self.num_queued -= 1
                    return True
        return False

    def take_queued(self):
        """Remove every queued task that needs a pool worker (actor placements stay) and
        return their keys, in queue order per class: a draining node holds them."""
        taken = []
        for cls in self.class_order:
            if cls[0]:
                queue = self.queues[cls]
                taken.extend(item[0] for item in queue)
                self.num_queued -= len(queue)
                queue.clear()
        return taken

    def take_newest(self, long count, can_move, long scan=64):
        """Remove up to `count` queued tasks that need a pool worker and only CPUs, newest
        first, those for which `can_move(task_key)` holds (looking at `scan` at most per
        class), and return their keys: other nodes have CPUs free (task_router.py)."""
        cdef list taken = []
        cdef list kept
        cdef long looked
        for cls in reversed(self.class_order):
            if len(taken) >= count:
                break
            if not cls[0] or not _cpu_only(dict(cls[1])):
                continue
            queue = self.queues[cls]
            kept = []
            looked = 0
            while queue and len(taken) < count and looked < scan:
                item = queue.pop()
                looked += 1
                if can_move(item[0]):
                    taken.append(item[0])
                else:
                    kept.append(item)
            while kept:
                queue.append(kept.pop())
        self.num_queued -= len(taken)
        if self.validate:
            self.check_invariants()
        return taken

    def worker_starting(self):
        """The node manager started a pool worker on its own (e.g. prestart at init)."""
        self.num_starting += 1

    def worker_started(self, worker_key, now=None):
        """A pool worker is up; `now`: the time (see the module docstring)."""
        self._tick(now)
        if self.num_starting > 0:
            self.num_starting -= 1
        self._make_idle(worker_key)
        return self._schedule()

    def worker_start_failed(self):
        if self.num_starting > 0:
            self.num_starting -= 1
        return self._schedule()

    def task_finished(self, worker_key, dict demand, bint retire=False, now=None):
        """The worker finished its task: resources back, worker idle (or, with `retire`,
        leaving: it reached its function's max_calls). `now`: the time, from which an
        extra worker's idle timeout runs."""
        self._tick(now)
        if self.pipelined and worker_key in self.pipelined:
            # The first task pipelined to it runs now, on the resources of this one (same class).
            waiting = self.pipelined[worker_key]
            waiting.pop(0)
            if not waiting:
                del self.pipelined[worker_key]
            return self._schedule()
        self.running_class.pop(worker_key, None)
        if worker_key in self.blocked_workers:
            self.blocked_workers.discard(worker_key)
            self._release_cpu_free(demand)
        else:
            self.release(demand)
        self.busy_workers.discard(worker_key)
        if not retire:
            self._make_idle(worker_key)
        return self._schedule()

    def worker_blocked(self, worker_key, dict demand):
        """The worker waits in `get`: lend its CPUs (a placement group bundle's too) to
        other tasks meanwhile, and take back the tasks pipelined to it."""
        cdef list actions = []
        for task_key in self._requeue_next(worker_key):
            actions.append(("revoke", task_key, worker_key))
        if worker_key in self.busy_workers and worker_key not in self.blocked_workers:
            self.blocked_workers.add(worker_key)
            for name, amount in demand.items():
                if _lent_while_blocked(name):
                    self.available[name] = self.available.get(name, 0.0) + amount
        return actions + self._schedule()

    def worker_unblocked(self, worker_key, dict demand):
        """The worker's `get` returned: it takes its CPUs back, even if that oversubscribes."""
        if worker_key in self.blocked_workers:
            self.blocked_workers.discard(worker_key)
            for name, amount in demand.items():
                if _lent_while_blocked(name):
                    self.available[name] = self.available.get(name, 0.0) - amount
        return []

    def worker_died(self, worker_key, demand):
        """A pool worker exited; `demand` is what its running task held (or None). The
        tasks pipelined to it, never started, are queued again, first."""
        self._requeue_next(worker_key)
        self.running_class.pop(worker_key, None)
        if worker_key in self.idle_workers:
            self.idle_workers.remove(worker_key)
            self.idle_since.pop(worker_key, None)
        if worker_key in self.busy_workers:
            self.busy_workers.discard(worker_key)
            if demand is not None:
                if worker_key in self.blocked_workers:
                    self._release_cpu_free(demand)
                else:
                    self.release(demand)
        self.blocked_workers.discard(worker_key)
        return self._schedule()

    def reschedule(self):
        """A dispatch pass after resources came back outside a task (an actor ended)."""
        return self._schedule()

    def retire_idle(self, now):
        """Retire the workers beyond the kept pool (target_workers + max_idle_extra) that
        have been idle for idle_timeout seconds by `now`, longest idle first."""
        cdef list actions = []
        self._tick(now)
        cdef long excess = self._excess()
        while excess > 0 and self.idle_workers:
            worker_key = self.idle_workers[0]
            if self.idle_since[worker_key] + self.idle_timeout > self.clock + _CLOCK_EPS:
                break  # the rest became idle later still
            del self.idle_workers[0]
            del self.idle_since[worker_key]
            actions.append(("retire", worker_key))
            excess -= 1
        if self.validate:
            self.check_invariants()
        return actions

    cdef void _release_cpu_free(self, dict demand):
        # A blocked worker already gave its CPU back: return only the rest.
        for name, amount in demand.items():
            if not _lent_while_blocked(name):
                self.available[name] = self.available.get(name, 0.0) + amount

    # -- idle workers and time ---------------------------------------------------
    cdef void _tick(self, now):
        if now is None:
            return
        if self.clock is None:
            # The first time heard of: idle workers are counted idle from now on.
            for worker_key in self.idle_workers:
                self.idle_since[worker_key] = now
            self.clock = now
        elif now > self.clock:  # never backwards: idle_workers stays in idle order
            self.clock = now

    cdef void _make_idle(self, worker_key):
        self.idle_workers.append(worker_key)
        if self.clock is not None:
            self.idle_since[worker_key] = self.clock

    cdef long _excess(self):
        """Workers (starting ones too) beyond those kept for good."""
        return self.num_workers - self.target_workers - self.max_idle_extra

    # -- the dispatch pass -------------------------------------------------------
    cdef list _schedule(self):
        cdef list actions = []
        cdef list starved = None      # queues whose head fits but found no idle worker
        for cls in self.class_order:
            queue = self.queues[cls]
            needs_worker = cls[0]
            while queue:
                task_key, demand = queue[0]
                if not self.fits(demand):
                    break
                if needs_worker:
                    if not self.idle_workers:
                        if starved is None:
                            starved = []
                        starved.append(queue)
                        break
                    worker_key = self.idle_workers.pop()
                    if self.clock is not None:
                        del self.idle_since[worker_key]
                    self.busy_workers.add(worker_key)
                    self.running_class[worker_key] = cls
                    queue.popleft()
                    self.acquire(demand)
                    actions.append(("dispatch", task_key, worker_key))
                else:
                    queue.popleft()
                    self.acquire(demand)
                    actions.append(("place", task_key))
                self.num_queued -= 1
        if self.pipelining and self.num_queued and not self.idle_workers \
                and self.num_starting == 0:
            self._pipeline(actions)
        if starved is not None:
            for _ in range(self._workers_wanted(starved) - self.num_starting):
                self.num_starting += 1
                actions.append(("start_worker",))
        elif self.clock is None and self.num_queued == 0:
            extra = len(self.idle_workers) + len(self.busy_workers) - self.target_workers
            while extra > self.max_idle_extra and self.idle_workers:
                actions.append(("retire", self.idle_workers.pop(0)))
                extra -= 1
        if self.validate:
            self.check_invariants()
        return actions

    cdef object _requeue_next(self, worker_key):
        """The tasks pipelined to the worker, if any, back at the head of their queue in
        the same order; their keys."""
        if not self.pipelined or worker_key not in self.pipelined:
            return []
        items = self.pipelined.pop(worker_key)
        queue = self.queues[self.running_class[worker_key]]
        for item in reversed(items):
            queue.appendleft(item)
        self.num_queued += len(items)
        return [item[0] for item in items]

    cdef void _pipeline(self, list actions):
        """Give each busy, unblocked worker the next queued tasks of its running task's
        class, where that class is pipelinable, up to `pipeline_depth` pipelined to it:
        one more to each in turn, so that a short queue is spread over the workers
        rather than lined up behind one (which would leave the others idle)."""
        cdef int level
        for level in range(1, self.pipeline_depth + 1):
            if not self.num_queued:
                return
            for worker_key in self.busy_workers:
                if worker_key in self.blocked_workers or \
                        len(self.pipelined.get(worker_key, ())) >= level:
                    continue
                cls = self.running_class.get(worker_key)
                if cls is None or not cls[2]:
                    continue
                queue = self.queues[cls]
                if not queue:
                    continue
                item = queue.popleft()
                self.num_queued -= 1
                self.pipelined.setdefault(worker_key, []).append(item)
                actions.append(("pipeline", item[0], worker_key))

    cdef long _workers_wanted(self, list starved):
        """How many of the starved queues' tasks, heads first, fit the free resources
        together (at most max_starting): the workers worth having on their way."""
        cdef dict spare = dict(self.available)
        cdef long wanted = 0
        for queue in starved:
            for _, demand in queue:
                if wanted >= self.max_starting or not _fits_in(spare, demand):
                    break
                for name, amount in demand.items():
                    spare[name] = spare.get(name, 0.0) - amount
                wanted += 1
        return wanted

    def check_invariants(self):
        """Raise AssertionError if the state is inconsistent (tests turn this on)."""
        idle = set(self.idle_workers)
        assert len(idle) == len(self.idle_workers), "a worker is idle twice"
        assert not (idle & self.busy_workers), "a worker is idle and busy"
        assert self.blocked_workers <= self.busy_workers, "a blocked worker is not busy"
        assert self.num_queued == sum(len(q) for q in self.queues.values()), "queue count"
        assert self.num_starting >= 0
        for worker_key in self.pipelined:
            assert worker_key in self.busy_workers, "a task pipelined to a worker not busy"
            assert worker_key not in self.blocked_workers, "a task pipelined to a blocked worker"
            assert self.running_class[worker_key][2], "pipelined behind an unpipelinable task"
        for name, amount in self.available.items():
            assert amount <= self.total.get(name, 0.0) + _EPS, f"{name} over its total"
        if idle:
            # The dispatch pass leaves no worker idle that a ready task could use now.
            for cls in self.class_order:
                queue = self.queues[cls]
                assert not (cls[0] and queue and self.fits(queue[0][1])), \
                    "a worker idles while a ready task fits"
        if self.clock is None:
            assert not self.idle_since, "idle times kept without a clock"
        else:
            assert set(self.idle_since) == idle, "idle times are not the idle workers'"
            since = [self.idle_since[w] for w in self.idle_workers]
            assert since == sorted(since), "idle workers out of idle order"
            assert not since or since[-1] <= self.clock, "idle since after the clock"


cdef class SpillPolicy:
    """Whether a node keeps a task submitted on it (no strategy, no large argument
    elsewhere) or forwards it to the global scheduler.

    It keeps a task that starts now. Otherwise it needs its view of the nodes, as the
    global scheduler estimated them (rank 0 reads its own; the others get a LoadView in
    answer to their Load): the fewest tasks queued per CPU on another node, the most
    CPUs free on one, and this node's own queue per CPU as of the same moment (a node
    takes its workers' submissions a hundred or more at a time: its queue now is always
    ahead of the others' of a report ago). A CPU-only task without stored arguments goes
    to a node with a CPU free, else stays here unless this node is `overloaded` and has
    kept at least its `fair_share` (its CPUs' share of the cluster's) of the tasks routed
    since its queue was last empty: the driver's node keeps its quarter of a burst over
    four nodes, though its queue drains slowest (its thread also submits and places the
    burst and takes every result; by queue lengths alone it ran 6-13% of the burst).
    Without a fresh view, for other resources (a GPU queue is not a CPU queue) and for
    tasks with arguments in a store (kept, they hold them in this store while they wait),
    the rule from before: a task waits here only behind an empty queue.

    What a stale view kept here is not stuck: when a node reports CPUs free, rank 0 tells
    the most loaded node, which hands on the newest of its queued tasks
    (TaskRouter.spill_queued, as Ray's raylet spills queued work to nodes with room).
    """

    cdef public double cpus             # this node's CPUs (at least 1)
    cdef public double least_elsewhere  # queued per CPU on the least loaded other node
    cdef public double free_elsewhere   # CPUs free on the other node with the most
    cdef public double own              # queued per CPU here, as of the view
    cdef public object view_time        # when the view was taken; None: no view yet
    cdef public double fair_share       # this node's CPUs / the cluster's
    cdef public long burst_routed       # tasks routed since the queue was last empty
    cdef public long burst_kept         # ... and kept here
    cdef public bint least_submits      # the least loaded other node routes its own tasks

    def __init__(self, double cpus, double fair_share=0.0):
        self.cpus = max(1.0, cpus)
        self.fair_share = fair_share
        self.burst_routed = self.burst_kept = 0
        self.least_submits = True
        self.least_elsewhere = 0.0
        self.free_elsewhere = 0.0
        self.own = 0.0
        self.view_time = None

    def update(self, double least_elsewhere, double free_elsewhere, double own,
               double now, bint least_submits=True):
        self.least_submits = least_submits
        self.least_elsewhere = least_elsewhere
        self.free_elsewhere = free_elsewhere
        self.own = own
        self.view_time = now

    cpdef bint keep(self, long queued, bint fits, dict demand, double now,
                    bint stored_args=False):
        """`queued`: tasks queued here now; `fits`: its resources are free (it starts
        now if nothing is queued: queued tasks hold nothing until they start);
        `stored_args`: some of its arguments are in a store (they would be pulled here
        and held while it waits: such a task waits only behind an empty queue, as
        before, or a small store fills with the arguments of waiting tasks)."""
        cdef bint kept
        if queued == 0:  # a new burst: its fair share is counted afresh
            self.burst_routed = self.burst_kept = 0
        self.burst_routed += 1
        if fits and queued == 0:
            kept = True
        elif self.view_time is None or now - self.view_time > VIEW_TTL \
                or not _cpu_only(demand) or stored_args:
            kept = queued == 0
        elif self.free_elsewhere >= demand.get("CPU", 0.0) - _EPS:
            kept = False
        else:
            kept = self.burst_kept < self.fair_share * self.burst_routed \
                or not overloaded(self.own, self.least_elsewhere, self.least_submits)
        self.burst_kept += kept
        return kept


cdef class GlobalScheduler:
    """Places the tasks that nodes forward (the paper's global scheduler), on rank 0.

    It knows each node's totals and what it last reported (available resources, tasks
    queued, and how many placed tasks it had received). A report is older than the
    placements still on their way to the node, so those in flight are added back on top
    of it: a burst of forwarded tasks spreads instead of piling onto the node that
    looked idlest a moment ago. `place` returns a rank, or -1 when no live node can
    ever run the task. It sends a task back to the node that forwarded it unless another
    has room where that one has none, holds more of its arguments, or that node is
    `overloaded` against it (the node forwarded on an older view than this one).
    """

    cdef public dict totals        # rank -> resource totals
    cdef public dict available     # rank -> resources available (report - in flight)
    cdef public dict queued        # rank -> tasks queued there (report + in flight)
    cdef public set alive
    cdef public long spread_next
    cdef dict in_flight            # rank -> deque of demands placed, not yet reported
    cdef dict placed_total         # rank -> tasks placed there so far
    cdef dict reported             # rank -> (available, queued) of its last report
    cdef public set submitting     # ranks that routed tasks of their own in their last report

    def __init__(self):
        self.totals = {}
        self.available = {}
        self.queued = {}
        self.alive = set()
        self.spread_next = 0
        self.in_flight = {}
        self.placed_total = {}
        self.reported = {}
        self.submitting = set()

    def add_node(self, int rank, dict total):
        self.totals[rank] = {k: float(v) for k, v in total.items()}
        self.available[rank] = dict(self.totals[rank])
        self.queued[rank] = 0
        self.alive.add(rank)
        self.in_flight[rank] = deque()
        self.placed_total[rank] = 0
        self.reported[rank] = (dict(self.totals[rank]), 0)

    def add_resources(self, int rank, dict resources):
        """A placement group's bundle was committed on `rank`: its group-named resources."""
        for target in (self.totals[rank], self.available[rank]):
            for name, amount in resources.items():
                target[name] = target.get(name, 0.0) + amount

    def remove_resources(self, int rank, dict resources):
        for target in (self.totals[rank], self.available[rank]):
            for name, amount in resources.items():
                left = target.get(name, 0.0) - amount
                if left > _EPS:
                    target[name] = left
                else:
                    target.pop(name, None)

    def remove_node(self, int rank):
        self.alive.discard(rank)

    def report(self, int rank, dict available, long queued, received=None,
               bint submits=False):
        """A node's own view of its load; `received`: how many placed tasks it had got
        (None: all of them). The placements it had not got yet still count. `submits`:
        it routed tasks of its own since its last report."""
        if rank not in self.totals:
            return
        if submits:
            self.submitting.add(rank)
        else:
            self.submitting.discard(rank)
        in_flight = self.in_flight[rank]
        arrived = len(in_flight) if received is None else \
            len(in_flight) - (self.placed_total[rank] - received)
        for _ in range(max(0, min(arrived, len(in_flight)))):
            in_flight.popleft()
        self.reported[rank] = (dict(available), queued)
        self._estimate(rank)

    cdef void _estimate(self, int rank):
        available, queued = self.reported[rank]
        estimate = dict(available)
        for demand in self.in_flight[rank]:
            for name, amount in demand.items():
                estimate[name] = estimate.get(name, 0.0) - amount
        self.available[rank] = estimate
        self.queued[rank] = queued + len(self.in_flight[rank])

    cpdef bint feasible_on(self, int rank, dict demand):
        total = self.totals.get(rank)
        if total is None or rank not in self.alive:
            return False
        for name, amount in demand.items():
            if amount > total.get(name, 0.0) + _EPS:
                return False
        return True

    cdef bint _fits_now(self, int rank, dict demand):
        available = self.available[rank]
        for name, amount in demand.items():
            if amount > available.get(name, 0.0) + _EPS:
                return False
        return True

    def place(self, dict demand, dict arg_bytes=None, strategy=None, int source=-1):
        """The rank to run a task on. `arg_bytes`: rank -> bytes of its arguments there;
        `strategy`: None/"DEFAULT", "SPREAD", or ("node", rank, soft); `source`: the
        node that forwarded it."""
        feasible = [r for r in sorted(self.alive) if self.feasible_on(r, demand)]
        if not feasible:
            return -1
        if isinstance(strategy, tuple) and strategy[0] == "node":
            target, soft = strategy[1], strategy[2]
            if target in feasible:
                return self._placed(target, demand)
            if not soft:
                return -1
        elif strategy == "SPREAD":
            rank = feasible[self.spread_next % len(feasible)]
            self.spread_next += 1
            return self._placed(rank, demand)
        best = -1
        best_score = source_score = None
        for rank in feasible:
            local_bytes = (arg_bytes or {}).get(rank, 0)
            # Large arguments pin a task to their node (moving them costs more than
            # waiting for a CPU there); otherwise a node with room now, then the least load.
            score = (local_bytes if local_bytes >= LOCALITY_BYTES else 0,
                     self._fits_now(rank, demand),
                     local_bytes,
                     -self.queued_per_cpu(rank),
                     rank == source)
            if rank == source:
                source_score = score
            if best_score is None or score > best_score:
                best, best_score = rank, score
        if source_score is not None and best != source \
                and source_score[:3] == best_score[:3] \
                and not overloaded(-source_score[3], -best_score[3],
                                   best in self.submitting):
            best = source
        return self._placed(best, demand)

    cpdef double queued_per_cpu(self, int rank):
        return self.queued[rank] / max(1.0, self.totals[rank].get("CPU", 1.0))

    def view_for(self, int rank):
        """What `rank`'s SpillPolicy compares itself with: (the fewest tasks queued per
        CPU on another live node, the most CPUs free on one, tasks queued per CPU on
        `rank`, whether that least loaded node submits tasks of its own). (0, 0, ...)
        with no other."""
        least = None
        least_rank = -1
        free = 0.0
        for other in self.alive:
            if other == rank:
                continue
            per_cpu = self.queued_per_cpu(other)
            if least is None or per_cpu < least:
                least, least_rank = per_cpu, other
            free = max(free, self.available[other].get("CPU", 0.0))
        return ((0.0 if least is None else least), free, self.queued_per_cpu(rank),
                least_rank in self.submitting)

    cdef int _placed(self, int rank, dict demand):
        available = self.available[rank]
        for name, amount in demand.items():
            available[name] = available.get(name, 0.0) - amount
        self.queued[rank] += 1
        self.in_flight[rank].append(demand)
        self.placed_total[rank] += 1
        return rank
