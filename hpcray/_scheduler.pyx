# cython: language_level=3
"""The local scheduler of one node: resource accounting, ready queues, dispatch.

A state machine with no I/O, as dask's scheduler is: the node manager tells it what
happened (a task is ready, a worker started, a task finished, a worker blocked in
`get`) and gets back the actions to carry out:

    ("dispatch", task_key, worker_key)   run the task on that idle pool worker
    ("place", task_key)                  resources granted to a task that needs no pool
                                         worker (an actor's creation)
    ("start_worker",)                    start one more pool worker
    ("retire", worker_key)               stop an idle pool worker the node no longer needs

Ready tasks are queued by scheduling class (their resource shape), so a dispatch pass
costs O(number of classes), not O(queue length), even with 100k tasks queued.
A worker blocked in `get` gives its CPUs back (as Ray does), so nested tasks never
deadlock a full node; more pool workers start while ready tasks fit the freed CPUs.
"""

from collections import deque

_EPS = 1e-9
LOCALITY_BYTES = 1 << 20  # arguments this large pull a task toward the node holding them


cdef class LocalScheduler:
    cdef public dict total            # resource name -> capacity of this node
    cdef public dict available        # resource name -> capacity not held right now
    cdef public dict queues           # class key -> deque of (task_key, demand)
    cdef public list class_order      # class keys in the order they first appeared
    cdef public list idle_workers     # worker keys, most recently idle last
    cdef public set busy_workers
    cdef public set blocked_workers
    cdef public int num_starting
    cdef public int target_workers    # pool size kept warm (num_cpus)
    cdef public int max_idle_extra
    cdef public bint validate
    cdef public long num_queued

    def __init__(self, dict total, int target_workers, int max_idle_extra=0,
                 bint validate=False):
        self.total = {k: float(v) for k, v in total.items() if v}
        self.available = dict(self.total)
        self.queues = {}
        self.class_order = []
        self.idle_workers = []
        self.busy_workers = set()
        self.blocked_workers = set()
        self.num_starting = 0
        self.target_workers = target_workers
        self.max_idle_extra = max_idle_extra
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
        for name, amount in demand.items():
            if amount > self.available.get(name, 0.0) + _EPS:
                return False
        return True

    @property
    def num_workers(self):
        return len(self.idle_workers) + len(self.busy_workers) + self.num_starting

    # -- resources ---------------------------------------------------------------
    cpdef void acquire(self, dict demand):
        for name, amount in demand.items():
            self.available[name] = self.available.get(name, 0.0) - amount

    cpdef void release(self, dict demand):
        for name, amount in demand.items():
            self.available[name] = self.available.get(name, 0.0) + amount

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

    def worker_starting(self):
        """The node manager started a pool worker on its own (e.g. prestart at init)."""
        self.num_starting += 1

    def worker_started(self, worker_key):
        if self.num_starting > 0:
            self.num_starting -= 1
        self.idle_workers.append(worker_key)
        return self._schedule()

    def worker_start_failed(self):
        if self.num_starting > 0:
            self.num_starting -= 1
        return self._schedule()

    def task_finished(self, worker_key, dict demand, bint retire=False):
        """The worker finished its task: resources back, worker idle (or, with `retire`,
        leaving: it reached its function's max_calls)."""
        if worker_key in self.blocked_workers:
            self.blocked_workers.discard(worker_key)
            self._release_cpu_free(demand)
        else:
            self.release(demand)
        self.busy_workers.discard(worker_key)
        if not retire:
            self.idle_workers.append(worker_key)
        return self._schedule()

    def worker_blocked(self, worker_key, dict demand):
        """The worker waits in `get`: lend its CPUs to other tasks meanwhile."""
        if worker_key in self.busy_workers and worker_key not in self.blocked_workers:
            self.blocked_workers.add(worker_key)
            cpu = demand.get("CPU", 0.0)
            if cpu:
                self.available["CPU"] = self.available.get("CPU", 0.0) + cpu
        return self._schedule()

    def worker_unblocked(self, worker_key, dict demand):
        """The worker's `get` returned: it takes its CPUs back, even if that oversubscribes."""
        if worker_key in self.blocked_workers:
            self.blocked_workers.discard(worker_key)
            cpu = demand.get("CPU", 0.0)
            if cpu:
                self.available["CPU"] = self.available.get("CPU", 0.0) - cpu
        return []

    def worker_died(self, worker_key, demand):
        """A pool worker exited; `demand` is what its running task held (or None)."""
        if worker_key in self.idle_workers:
            self.idle_workers.remove(worker_key)
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

    cdef void _release_cpu_free(self, dict demand):
        # A blocked worker already gave its CPU back: return only the rest.
        for name, amount in demand.items():
            if name != "CPU":
                self.available[name] = self.available.get(name, 0.0) + amount

    # -- the dispatch pass -------------------------------------------------------
    cdef list _schedule(self):
        cdef list actions = []
        cdef bint want_worker = False
        for cls in self.class_order:
            queue = self.queues[cls]
            needs_worker = cls[0]
            while queue:
                task_key, demand = queue[0]
                if not self.fits(demand):
                    break
                if needs_worker:
                    if not self.idle_workers:
                        want_worker = True
                        break
                    worker_key = self.idle_workers.pop()
                    self.busy_workers.add(worker_key)
                    queue.popleft()
                    self.acquire(demand)
                    actions.append(("dispatch", task_key, worker_key))
                else:
                    queue.popleft()
                    self.acquire(demand)
                    actions.append(("place", task_key))
                self.num_queued -= 1
        if want_worker and self.num_starting == 0:
            self.num_starting += 1
            actions.append(("start_worker",))
        elif self.num_queued == 0:
            extra = len(self.idle_workers) + len(self.busy_workers) - self.target_workers
            while extra > self.max_idle_extra and self.idle_workers:
                actions.append(("retire", self.idle_workers.pop(0)))
                extra -= 1
        if self.validate:
            self.check_invariants()
        return actions

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
