"""Generator tasks: the items a task yields reach its owner as they are yielded.

A generator task (Ray's `num_returns="streaming"`, the default for a generator function,
and `num_returns="dynamic"`) has one return, its *completion*: None once the generator
is exhausted, or the error that ended it. Item `i` is the object
`ids.object_id_for(task_id, i + 2)`, owned by the task's owner like any return.

    worker ---ItemReady(task, i, result)---> executing node
    executing node ---TaskItem(task, i, result)---> owner      (when they differ)
    ... then WorkDone / TaskDone with the completion, as for any task

Messages from one node to another arrive in order, so every item is on the owner
before the completion. The owner keeps a `Stream` per generator task it submitted:

- an item reported is held by the stream (one ref) until the consuming process takes it
  (`next_item`: the ref becomes that process's, as a task's return is its caller's);
- the consumer (hpcray.object_ref_generator.ObjectRefGenerator, on the owner's node)
  waits for item `i` on the completion and a PENDING entry of item `i` made here, then
  asks again; once the task ended and no item `i` came, it reads the completion;
- when nothing holds the completion any more (the ObjectRefGenerator was dropped,
  ObjectTable.release_if_unused calls `completion_unused`), the items not taken are
  freed and later ones are freed as they come: an endless generator whose consumer
  stopped costs nothing but its running task;
- `dynamic`: nothing consumes the stream; at the end the owner makes the completion's
  value a DynamicObjectRefGenerator of the items (the value holds them; a task error
  becomes its last item, as in Ray).

Backpressure (Ray's `_generator_backpressure_num_objects=N`, streaming only): after
reporting item `i`, a worker whose consumer may have N items not taken asks its node
(`generator_pause`) to answer once `i + 2 - N` are taken; it learns the count taken
then, so it asks again only when N more are outstanding. The owner keeps the waiting
answers in the stream (`pauses`) and gives them when the consumer takes items, when it
is gone, or when the task ended (NO_LIMIT: never pause again):

    executing node ---GeneratorPaused(task, needed)---> owner    (when they differ)
    owner ---GeneratorResume(task, taken)---> executing node

A pool task paused there is cancelled like one blocked in `get` (`interrupt_wait`).
An actor's shared budget (Ray's actor option `_actor_generator_backpressure_num_objects`,
generator_budget.py) watches its calls' consumers the same way (`watch`: GeneratorPaused
with `watch`, answered also after the task ended, once the count is reached or the
consumer is gone).

Retries: the node that runs the task counts the items it got in the spec's options
(`generator_skip`); a re-run (worker died, retryable error, actor restarted) skips that
many yields without reporting them, as Ray does, so no item is duplicated. A re-run must
yield the same sequence (as in Ray).
"""

from __future__ import annotations

from hpcray import ids
from hpcray.runtime import messages
from hpcray.runtime.generator_budget import GeneratorBudgets
from hpcray.runtime.object_table import IN_STORE, PENDING
from hpcray.runtime.task_events import error_type

STREAMING, DYNAMIC = "streaming", "dynamic"
COMPLETION_INDEX = ids.object_id_for(b"", 1)   # the completion's 4-byte return index

# next_item's answers
ITEM, END, WAIT = 0, 1, 2
NO_LIMIT = 1 << 62   # a pause's answer when nobody will take items any more


def item_id(task_id: bytes, index: int) -> bytes:
    return ids.object_id_for(task_id, index + 2)


def generator_kind(spec):
    """STREAMING, DYNAMIC or None."""
    options = spec.options
    return options.get("generator") if options else None


class Stream:
    """The owner's state of one generator task's items."""

    __slots__ = ("reported", "taken", "done", "released", "dynamic", "pauses")

    def __init__(self, dynamic: bool) -> None:
        self.reported = 0        # items that reached this node (0 .. reported-1)
        self.taken = 0           # items the consumer took (their refs are its own)
        self.done = False        # the completion came
        self.released = False    # nothing holds the completion: no consumer any more
        self.dynamic = dynamic
        self.pauses = None       # [(items taken needed, answer)] of a paused generator


class Generators:
    """The items of generator tasks: reported where the task runs, kept where it is owned."""

    HANDLES = {messages.ItemReady: "on_item_ready", messages.TaskItem: "on_task_item",
               messages.GeneratorPaused: "on_generator_paused",
               messages.GeneratorResume: "on_generator_resume"}

    def __init__(self, rank: int, node, objects, borrowing, actors, router, peers) -> None:
        self.rank = rank
        self.node = node
        self.objects = objects
        self.borrowing = borrowing
        self.actors = actors
        self.router = router
        self.peers = peers
        self.streams: dict[bytes, Stream] = {}   # task id -> its owner's stream
        # task id -> the answers of the pauses and watches its owner was asked for
        self.paused: dict[bytes, list] = {}
        self.budgets = GeneratorBudgets(self)    # actors' shared budgets (generator_budget.py)

    # ------------------------------------------------------------------ owner: a task
    def submitted(self, spec) -> None:
        """A generator task this node owns was submitted (its completion's entry exists)."""
        self.streams[spec.task_id] = Stream(generator_kind(spec) == DYNAMIC)

    def task_ended(self, task_id: bytes, results) -> None:
        """The completion came (before its entry is made ready). A dynamic generator's
        completion is made here: the DynamicObjectRefGenerator of its items."""
        stream = self.streams.get(task_id)
        if stream is None:
            return
        stream.done = True
        self._resume(stream, NO_LIMIT, ended=True)
        self._drop_waiting_entry(task_id, stream)
        if not stream.dynamic:
            if stream.released:
                del self.streams[task_id]
            return
        del self.streams[task_id]
        completion, inline, _contained, _size = results[0]
        held = [item_id(task_id, i) for i in range(stream.reported)]
        if error_type(inline) is not None:  # Ray: the error is the generator's last item
            error_item = item_id(task_id, stream.reported)
            self.objects.entry(error_item).refs += 1
            self.objects.object_ready(error_item, inline, (), len(inline))
            held.append(error_item)
        from hpcray.object_ref_generator import dynamic_generator_bytes
        blob = dynamic_generator_bytes(held)
        self.objects.object_ready(completion, blob, held, len(blob))
        for key in held:  # the completion's value holds them now
            self.objects.decref(key)

    def completion_unused(self, key: bytes) -> None:
        """Nothing on this node holds `key` any more (ObjectTable.release_if_unused): if
        it is a stream's completion, its consumer is gone."""
        stream = self.streams.get(key[:ids.TASK_ID_SIZE])
        if stream is None or stream.dynamic or stream.released \
                or key[ids.TASK_ID_SIZE:] != COMPLETION_INDEX:
            return
        task_id = key[:ids.TASK_ID_SIZE]
        stream.released = True
        self._resume(stream, NO_LIMIT)
        for index in range(stream.taken, stream.reported):
            self.objects.decref(item_id(task_id, index))
        if stream.done:
            del self.streams[task_id]
        else:
            self._drop_waiting_entry(task_id, stream)

    def _drop_waiting_entry(self, task_id: bytes, stream: Stream) -> None:
        """The PENDING entry a consumer waited on for the next item: no item comes."""
        next_id = item_id(task_id, stream.reported)
        entry = self.objects.get(next_id)
        if entry is not None and entry.state == PENDING and entry.refs <= 0:
            del self.objects[next_id]

    # ------------------------------------------------------------------ owner: consumer
    def next_item(self, task_id: bytes, index: int, take: bool):
        """-> (ITEM, id): item `index` is here (taken: its ref is now the caller's);
        (END, None): the task ended before yielding it; (WAIT, id): not yet, wait for
        `id` or the completion, then ask again."""
        stream = self.streams.get(task_id)
        if stream is None:
            return END, None
        if index < stream.reported:
            if take:
                stream.taken = index + 1
                if stream.pauses:
                    self._resume(stream, stream.taken)
            return ITEM, item_id(task_id, index)
        if stream.done:
            return END, None
        next_id = item_id(task_id, index)
        self.objects.entry(next_id)  # PENDING: what the consumer's wait registers on
        return WAIT, next_id

    # ------------------------------------------------------------------ backpressure
    def pause(self, worker, task_id: bytes, needed: int, answer) -> None:
        """A worker of this node paused generator task `task_id` until `needed` of its
        items are taken: `answer(taken)` then (NO_LIMIT once nobody takes them)."""
        record = self._running_record(worker, task_id)
        if record is None:
            answer(NO_LIMIT)
        else:
            self.watch(task_id, record.owner, needed, answer, watch=False)

    def watch(self, task_id: bytes, owner: int, needed: int, answer, watch: bool = True) -> None:
        """`answer(taken)` once the consumer of `task_id` (on node `owner`) took `needed`
        items, or NO_LIMIT once it is gone; `watch`: also after the task ended (an
        actor's budget counts its items until they are taken), else NO_LIMIT then."""
        if owner == self.rank:
            self.when_taken(task_id, needed, answer, watch)
            return
        self.paused.setdefault(task_id, []).append(answer)
        self.peers.send(owner, messages.wire(messages.GeneratorPaused, task_id, needed, watch))

    def when_taken(self, task_id: bytes, needed: int, answer, watch: bool = False) -> None:
        """Owner: `answer(taken)` once the consumer of `task_id` took `needed` items."""
        stream = self.streams.get(task_id)
        if stream is None or stream.released or (stream.done and not watch):
            answer(NO_LIMIT)
        elif stream.taken >= needed:
            answer(stream.taken)
        else:
            if stream.pauses is None:
                stream.pauses = []
            stream.pauses.append((needed, answer, watch))

    def on_generator_paused(self, source: int, task_id: bytes, needed: int,
                            watch: bool = False) -> None:
        self.when_taken(task_id, needed, lambda taken: self.peers.send(
            source, messages.wire(messages.GeneratorResume, task_id, taken)), watch)

    def on_generator_resume(self, source: int, task_id: bytes, taken: int) -> None:
        # Every answer waiting on this task gets the count: one asked for more asks again.
        for answer in self.paused.pop(task_id, ()):
            answer(taken)

    def _resume(self, stream: Stream, taken: int, ended: bool = False) -> None:
        """Answer the pauses `taken` satisfies (`ended`: all but the watches)."""
        if not stream.pauses:
            return
        waiting = []
        for needed, answer, watch in stream.pauses:
            if taken >= needed and not (ended and watch):
                answer(taken)
            else:
                waiting.append((needed, answer, watch))
        stream.pauses = waiting or None

    # ------------------------------------------------------------------ owner: items
    def item_reported(self, task_id: bytes, index: int, result, location) -> None:
        object_id, inline, contained, size = result
        stream = self.streams.get(task_id)
        # Made ready in any case, so that dropping it frees every copy (another node's
        # primary copy too); kept only if it is the next item and a consumer is left.
        self.objects.entry(object_id).refs += 1  # the stream's hold
        self.objects.object_ready(object_id, inline, contained, size, location)
        if stream is not None and not stream.released and index == stream.reported:
            stream.reported = index + 1
        else:
            self.objects.decref(object_id)  # nobody will take it

    def on_task_item(self, source: int, task_id: bytes, index: int, result) -> None:
        """An item of a task this node owns, yielded on node `source`."""
        self.borrowing.foreign_results((result,))
        self.item_reported(task_id, index, result, source if result[1] is IN_STORE else None)

    # ------------------------------------------------------------------ where it runs
    def on_item_ready(self, worker, task_id: bytes, index: int, result, transitions) -> None:
        """A worker of this node yielded item `index` of a generator task."""
        record = self._running_record(worker, task_id)
        skip = record.spec.options.get("generator_skip", 0) if record is not None else 0
        if record is None or index != skip:
            self._discard(result)
        else:
            record.spec.options["generator_skip"] = index + 1  # what a re-run skips
            if worker.actor_id is not None and self.budgets.budgets:
                self.budgets.item_reported(worker.actor_id, task_id)
            if record.owner == self.rank:
                self.item_reported(task_id, index, result, None)
            else:
                self.router.keep_results_for_owner(record.owner, task_id, (result,))
                self.peers.send(record.owner, messages.wire(messages.TaskItem, task_id,
                                                            index, result))
        self.objects.apply_transitions(transitions)

    def _running_record(self, worker, task_id: bytes):
        if worker.actor_id is None:
            record = worker.task
            return record if record is not None and record.spec.task_id == task_id else None
        actor = self.actors.get(worker.actor_id)
        return actor.inflight.get(task_id) if actor is not None else None

    def _discard(self, result) -> None:
        """An item of a task no longer running here (cancelled, failed): no one holds it."""
        object_id, inline, _contained, _size = result
        if inline is IN_STORE and self.objects.get(object_id) is None:
            try:
                self.objects.store.delete(object_id)
            except Exception:  # noqa: BLE001 - StoreError: already gone
                pass
