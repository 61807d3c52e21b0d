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

Ready tasks are queued by scheduling class (their resource shape), so a dispatch pass
costs O(number of classes), not O(queue length), even with 100k tasks queued.
A worker blocked in `get` gives its CPUs back (as Ray does), so nested tasks never
deadlock a full node; more pool workers start while ready tasks fit the freed CPUs,
several at once (as many as ready tasks fit the free resources, at most `max_starting`):
a start takes milliseconds, and one at a time made a burst of nested tasks wait in line.

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

    def __init__(self, dict total, int target_workers, int max_idle_extra=0,
                 bint validate=False, double idle_timeout=1.0, int max_starting=0):
        """`max_starting` 0: max(2, target_workers), as Ray starts up to num_cpus
        workers at once."""
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
    def task_ready(self, task_key, dict demand, bint needs_worker=True):
        """A task (or actor creation, needs_worker=False) has its arguments ready."""
        cls = (needs_worker, tuple(sorted(demand.items())))
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
        other tasks meanwhile."""
        if worker_key in self.busy_workers and worker_key not in self.blocked_workers:
            self.blocked_workers.add(worker_key)
            for name, amount in demand.items():
                if _lent_while_blocked(name):
                    self.available[name] = self.available.get(name, 0.0) + amount
        return self._schedule()

    def worker_unblocked(self, worker_key, dict demand):
        """The worker's `get` returned: it takes its CPUs back, even if that oversubscribes."""
        if worker_key in self.blocked_workers:
            self.blocked_workers.discard(worker_key)
            for name, amount in demand.items():
                if _lent_while_blocked(name):
                    self.available[name] = self.available.get(name, 0.0) - amount
        return []

    def worker_died(self, worker_key, demand):
        """A pool worker exited; `demand` is what its running task held (or None)."""
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
                    queue.popleft()
                    self.acquire(demand)
                    actions.append(("dispatch", task_key, worker_key))
                else:
                    queue.popleft()
                    self.acquire(demand)
                    actions.append(("place", task_key))
                self.num_queued -= 1
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


cdef class GlobalScheduler:
    """Places the tasks that nodes forward (the paper's global scheduler), on rank 0.

    It knows each node's totals and what it last reported (available resources, tasks
    queued, and how many placed tasks it had received). A report is older than the
    placements still on their way to the node, so those in flight are added back on top
    of it: a burst of forwarded tasks spreads instead of piling onto the node that
    looked idlest a moment ago. `place` returns a rank, or -1 when no live node can
    ever run the task; between equally good nodes it keeps a task on the node that
    forwarded it.
    """

    cdef public dict totals        # rank -> resource totals
    cdef public dict available     # rank -> resources available (report - in flight)
    cdef public dict queued        # rank -> tasks queued there (report + in flight)
    cdef public set alive
    cdef public long spread_next
    cdef dict in_flight            # rank -> deque of demands placed, not yet reported
    cdef dict placed_total         # rank -> tasks placed there so far
    cdef dict reported             # rank -> (available, queued) of its last report

    def __init__(self):
        self.totals = {}
        self.available = {}
        self.queued = {}
        self.alive = set()
        self.spread_next = 0
        self.in_flight = {}
        self.placed_total = {}
        self.reported = {}

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

    def report(self, int rank, dict available, long queued, received=None):
        """A node's own view of its load; `received`: how many placed tasks it had got
        (None: all of them). The placements it had not got yet still count."""
        if rank not in self.totals:
            return
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
        best_score = None
        for rank in feasible:
            cpus = max(1.0, self.totals[rank].get("CPU", 1.0))
            local_bytes = (arg_bytes or {}).get(rank, 0)
            # Large arguments pin a task to their node (moving them costs more than
            # waiting for a CPU there); otherwise a node with room now, then the least load.
            score = (local_bytes if local_bytes >= LOCALITY_BYTES else 0,
                     self._fits_now(rank, demand),
                     local_bytes,
                     -self.queued[rank] / cpus,
                     rank == source)
            if best_score is None or score > best_score:
                best, best_score = rank, score
        return self._placed(best, demand)

    cdef int _placed(self, int rank, dict demand):
        available = self.available[rank]
        for name, amount in demand.items():
            available[name] = available.get(name, 0.0) - amount
        self.queued[rank] += 1
        self.in_flight[rank].append(demand)
        self.placed_total[rank] += 1
        return rank
