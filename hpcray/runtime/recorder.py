"""What each node records of the job for `hpcray.timeline()` and the report page.

Always on, and bounded. Per node, in memory (spans and submits packed into bytes,
the rest as plain tuples: nothing the cyclic GC keeps walking):

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
default); older ones are dropped and counted in `dropped`,
which the timeline and the report say. 0 switches recording off: no spans, submissions
or transfers (the timeline and the report's Gantt are empty), counters still counted.
Spans and submissions, one per task, are packed into rings of bytes (`_Ring`), not
kept as tuples: 200,000 live tuples and the ids they hold took ~20 MB per node and gave
the allocator one tuple to free per task once full; packed, a record costs the node's
thread ~0.5 us (0.3 us more than a tuple, measured in isolation) and the rings ~8 MB
(benchmarks/README.md: the microbench A/B). Nothing is sent until someone asks:
`hpcray.timeline()` and the report at shutdown gather every node's buffers with the
state API's StateQuery ("timeline", state_queries.py). Not for: live progress
(nothing here is pushed), nor list_tasks (task_events.py, which this does not replace:
that keeps states, this keeps times).
"""

from __future__ import annotations

import collections
import socket
import struct

from hpcray.ids import TASK_ID_SIZE
from hpcray.runtime.clock import now
from hpcray.runtime.specs import ACTOR_CALL, ACTOR_CREATION
from hpcray.runtime.task_events import ERROR_START, error_type

KINDS = {0: "task", ACTOR_CREATION: "actor_creation", ACTOR_CALL: "actor_call"}

# A span: task id, kind, name (its index in Recorder.names), pid, start, end, failed.
_SPAN = struct.Struct(f"<{TASK_ID_SIZE}sBIiddB")
# A submission: parent task id, child task id, when.
_SUBMIT = struct.Struct(f"<{TASK_ID_SIZE}s{TASK_ID_SIZE}sd")
_pack_span, _pack_submit = _SPAN.pack_into, _SUBMIT.pack_into
_MAX_NAMES = 1 << 16  # distinct names kept; more show as _NAME_NOT_KEPT
_NAME_NOT_KEPT = "(name not kept)"


class _Ring:
    """The last `limit` records of one fixed layout, packed into one bytearray that
    grows (doubling) up to `limit` records, then is written over from its start."""

    __slots__ = ("layout", "limit", "buffer", "appended")

    def __init__(self, layout: struct.Struct, limit: int) -> None:
        self.layout = layout
        self.limit = limit
        self.buffer = bytearray(layout.size * min(limit, 256))
        self.appended = 0  # ever: those over `limit` were dropped

    def slot(self) -> int:
        """Where the next record goes (the caller packs it there: no tuple made)."""
        offset = (self.appended % self.limit) * self.layout.size
        self.appended += 1
        if offset >= len(self.buffer):
            self.buffer.extend(bytes(min(len(self.buffer),
                                         self.limit * self.layout.size - len(self.buffer))))
        return offset

    def __len__(self) -> int:
        return min(self.appended, self.limit)

    def records(self) -> list:
        """The records kept, oldest first, as tuples."""
        size, unpack = self.layout.size, self.layout.unpack_from
        first = self.appended - len(self)
        return [unpack(self.buffer, (i % self.limit) * size)
                for i in range(first, self.appended)]


class Recorder:
    def __init__(self, rank: int, limit: int, clock=None) -> None:
        """`clock`: (offset, bound) of this rank's clock against rank 0's (clock.py);
        None: not measured (one node, or rank 0)."""
        self.rank = rank
        self.clock_offset, self.clock_bound = clock or (0.0, 0.0)
        self.limit = max(0, limit)  # 0: recording is off
        self.spans = _Ring(_SPAN, max(1, self.limit))
        self.submits = _Ring(_SUBMIT, max(1, self.limit))
        self.transfers: collections.deque = collections.deque(maxlen=self.limit)
        self.names: dict[str, int] = {_NAME_NOT_KEPT: 0}  # a span's name -> its index
        self.counters: collections.Counter = collections.Counter()
        # The hot count is a plain int (a Counter update cost a span ~1.9k instructions):
        # attempts ended here.
        self.tasks_run = 0
        self.transfers_appended = 0
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
        # The per-task hot path: one record packed, no call for a known name. The spans'
        # count is tasks_run (spans of constructors and deaths are counted in `appended`).
        self.tasks_run += 1
        inline = results[0][1] if results else None
        if ended is None:
            started = ended = now()
        name = self.names.get(spec.name)
        if name is None:
            name = self._name_index(spec.name)
        spans = self.spans
        _pack_span(spans.buffer, spans.slot(), spec.task_id, spec.kind, name, pid, started,
                   ended, type(inline) is bytes and inline[11:13] == ERROR_START
                   and error_type(inline) is not None)

    def _name_index(self, name: str) -> int:
        """The index of a span's name (`ran` looks a known one up itself: its hot path)."""
        index = self.names.get(name)
        if index is not None:
            return index
        if len(self.names) >= _MAX_NAMES:
            return self.names[_NAME_NOT_KEPT]
        return self.names.setdefault(name, len(self.names))

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
        if self.limit:
            spans = self.spans
            _pack_span(spans.buffer, spans.slot(), spec.task_id, spec.kind,
                       self._name_index(spec.name), pid or 0,
                       end if started is None else started, end, failed)

    def submitted(self, parent_id: bytes, task_id: bytes) -> None:
        submits = self.submits
        _pack_submit(submits.buffer, submits.slot(), parent_id, task_id, now())

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
        self.transfers_appended += 1
        self.transfers.append((object_id, source, self.rank, size, start, now()))

    @property
    def dropped(self) -> dict:
        """How many fell off the front of each buffer (all, when recording is off)."""
        if not self.limit:
            return {"spans": self.tasks_run, "submits": 0, "transfers": 0}
        return {"spans": self.spans.appended - len(self.spans),
                "submits": self.submits.appended - len(self.submits),
                "transfers": self.transfers_appended - len(self.transfers)}

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
        names = list(self.names)
        spans = [(task_id, names[name], kind, pid, start, end, bool(failed))
                 for task_id, kind, name, pid, start, end, failed in self.spans.records()]
        submits = self.submits.records()  # (empty when off: nothing is packed)
        transfers = list(self.transfers)
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
