"""What each node records of the job for `hpcray.timeline()` and the report page.

Always on, and bounded. Per node, in memory, as plain tuples (nothing the cyclic GC
keeps walking):

    spans      the tasks and actor calls this node ran, one per attempt: (task id,
               name, kind, worker pid, start, end, failed), as the worker saw them
               (WorkDone.started and .ended; a call cancelled before it started: when
               the node read its WorkDone); an attempt
               whose pool worker died, from when it was sent to the death (failed);
               and the actor constructors, from CreateActor sent to ActorReady read
    submits    (parent task id, child task id, when) for each task a task submitted
               here: the timeline's flow arrows
    transfers  (object id, from rank, to rank, bytes, start, end) of each pull this
               node made (the receiving node records it)
    counters   named counts any part may add to (`count`): retries, worker deaths,
               tasks_run (attempts ended here), bytes_pulled, bytes_sent, ... (the
               report's summary shows every name it finds; the status line of
               status.py reads some)
    samples    a Sampler's (sampler.py) readings, where one runs

Times are this host's clock (clock.now). `rows()` puts them on rank 0's clock: it
subtracts this rank's offset, measured at the job's start (clock.py), so the
recording itself costs nothing more.

Each buffer keeps its last `limit` entries (HPCRAY_TIMELINE_EVENTS, 100,000 by
default: ~20 MB at most per node); older ones are dropped and counted in `dropped`,
which the timeline and the report say. 0 switches recording off: no spans, submissions
or transfers (the timeline and the report's Gantt are empty), counters still counted.
A span costs the node one tuple appended (~3k instructions, measured:
benchmarks/README.md); nothing is sent until someone asks: `hpcray.timeline()` and the
report at shutdown gather every node's buffers with the state API's StateQuery
("timeline", state_queries.py). Not for: live progress (nothing here is pushed), nor
list_tasks (task_events.py, which this does not replace: that keeps states, this keeps
times).
"""

from __future__ import annotations

import collections
import socket

from hpcray.runtime.clock import now
from hpcray.runtime.specs import ACTOR_CALL, ACTOR_CREATION
from hpcray.runtime.task_events import ERROR_START, error_type

KINDS = {0: "task", ACTOR_CREATION: "actor_creation", ACTOR_CALL: "actor_call"}


class Recorder:
    def __init__(self, rank: int, limit: int, clock=None) -> None:
        """`clock`: (offset, bound) of this rank's clock against rank 0's (clock.py);
        None: not measured (one node, or rank 0)."""
        self.rank = rank
        self.clock_offset, self.clock_bound = clock or (0.0, 0.0)
        self.limit = max(0, limit)  # 0: recording is off
        self.spans: collections.deque = collections.deque(maxlen=self.limit)
        self.submits: collections.deque = collections.deque(maxlen=self.limit)
        self.transfers: collections.deque = collections.deque(maxlen=self.limit)
        self.counters: collections.Counter = collections.Counter()
        # The hot counts are plain ints (a Counter update cost a span ~1.9k instructions):
        # attempts ended here, and what was appended to each buffer (less what it holds:
        # what it dropped).
        self.tasks_run = 0
        self.appended = {"spans": 0, "submits": 0, "transfers": 0}
        if not self.limit:  # off: the hot paths count and keep nothing
            self.ran = self._count_run
            self.submitted = _nothing
        self.pull_starts: dict[int, float] = {}  # pull tag -> when it started
        self.constructing: dict[bytes, float] = {}  # actor id -> when CreateActor left
        self.sampler = None                      # a Sampler, when the report wants one
        self.started = now()                     # rank 0's: when the job started

    def ran(self, spec, pid: int, started, ended, results) -> None:
        """The worker `pid` ran an attempt of `spec` from `started` to `ended` (its clock;
        None: it never started, the span is the moment its WorkDone was read)."""
        # The per-task hot path: one tuple, no calls. The spans' count is tasks_run
        # (spans of constructors and deaths are counted in `appended`).
        self.tasks_run += 1
        inline = results[0][1] if results else None
        if ended is None:
            started = ended = now()
        self.spans.append((spec.task_id, spec.name, spec.kind, pid, started, ended,
                           type(inline) is bytes and inline[11:13] == ERROR_START
                           and error_type(inline) is not None))

    def _count_run(self, spec, pid: int, started, ended, results) -> None:  # recording is off
        self.tasks_run += 1

    def died(self, spec, pid: int, dispatched) -> None:
        """The pool worker `pid` died running `spec`, sent to it at `dispatched`."""
        self._span(spec, pid, dispatched, True)

    def creating(self, actor_id: bytes) -> None:
        self.constructing[actor_id] = now()

    def created(self, spec, pid: int, failed: bool) -> None:
        """The constructor of `spec`'s actor ended in worker `pid` (or raised)."""
        self._span(spec, pid, self.constructing.pop(spec.actor_id, None), failed)

    def _span(self, spec, pid: int, started, failed: bool) -> None:
        end = now()
        self.appended["spans"] += 1
        self.spans.append((spec.task_id, spec.name, spec.kind, pid,
                           end if started is None else started, end, failed))

    def submitted(self, parent_id: bytes, task_id: bytes) -> None:
        self.appended["submits"] += 1
        self.submits.append((parent_id, task_id, now()))

    def pull_started(self, tag: int) -> None:
        self.pull_starts[tag] = now()

    def pull_ended(self, tag: int, object_id: bytes, source: int, size: int,
                   last: bool = True) -> None:
        """The pull on transfer `tag` brought `size` bytes of `object_id` from `source`
        (or, size -1, failed); `last`: the transfer's last object."""
        start = self.pull_starts.pop(tag, None) if last else self.pull_starts.get(tag)
        if start is None or size < 0:
            return
        self.counters["bytes_pulled"] += size
        self.appended["transfers"] += 1
        self.transfers.append((object_id, source, self.rank, size, start, now()))

    @property
    def dropped(self) -> dict:
        """How many fell off the front of each buffer (all, when recording is off)."""
        appended = dict(self.appended, spans=self.appended["spans"] + self.tasks_run)
        return {name: count - len(getattr(self, name)) for name, count in appended.items()}

    def counts(self) -> collections.Counter:
        """The named counts, tasks_run among them (a name never counted reads 0)."""
        counts = collections.Counter(self.counters)
        counts["tasks_run"] = self.tasks_run
        return counts

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def rows(self, store_stats: dict) -> dict:
        """This node's records, as plain data for StateRows, on rank 0's clock."""
        shift = -self.clock_offset
        spans, submits, transfers = list(self.spans), list(self.submits), list(self.transfers)
        samples = self.sampler.rows() if self.sampler is not None else None
        if shift:
            spans = [(*s[:4], s[4] + shift, s[5] + shift, s[6]) for s in spans]
            submits = [(parent, child, at + shift) for parent, child, at in submits]
            transfers = [(*t[:4], t[4] + shift, t[5] + shift) for t in transfers]
            if samples is not None:
                samples["samples"] = [(s[0] + shift, *s[1:]) for s in samples["samples"]]
        return {"rank": self.rank, "host": socket.gethostname(), "now": now() + shift,
                "started": self.started + shift, "clock_offset": self.clock_offset,
                "clock_bound": self.clock_bound,
                "spans": spans, "submits": submits, "transfers": transfers,
                "counters": dict(self.counts()), "dropped": self.dropped,
                "store": dict(store_stats), "samples": samples}



def _nothing(*_args) -> None:
    return None
