"""What a generator task returns: `ObjectRefGenerator` (streaming, Ray's default for a
generator function) and `DynamicObjectRefGenerator` (the value of a
`num_returns="dynamic"` task's one ref).

An `ObjectRefGenerator` yields one ObjectRef per item as the task yields it (the node's
side, and why dropping it frees the items not taken: hpcray/runtime/generators.py). It
lives in the process that called `.remote()` and, as in Ray, cannot be passed to other
tasks; the refs it yields are ordinary refs.
"""

from __future__ import annotations

import pickle

from hpcray import context
from hpcray.object_ref import ObjectRef, _note_pickled

# generators.next_item's answers (hpcray.runtime.generators)
_ITEM, _END = 0, 1


def _client():
    client = context.client
    if client is None:
        from hpcray.api import client_or_init
        client = client_or_init()
    return client


class ObjectRefGenerator:
    """Iterate to get the ObjectRef of each item a generator task yields, as it yields
    it; StopIteration at its end. If the task raised after k items, the k refs come
    first, then one whose `get` raises the error."""

    __slots__ = ("_completion", "_task_id", "_index", "_finished", "__weakref__")

    def __init__(self, completion: ObjectRef):
        self._completion = completion   # the task's one return: None, or its error
        self._task_id = completion.task_id()
        self._index = 0
        self._finished = False

    def __iter__(self):
        return self

    def __next__(self) -> ObjectRef:
        ref = self._next(None)
        if ref is None:
            raise StopIteration
        return ref

    def _next(self, timeout):
        """The next ref; None at the end (or, with `timeout`, when none came in time:
        then `_index` is unchanged)."""
        if self._finished:
            return None
        client = _client()
        completion_id = self._completion.binary()
        while True:
            status, object_id = client.generator_next(self._task_id, self._index, True)
            if status == _ITEM:
                self._index += 1
                return ObjectRef(object_id, True)  # the node counted it for this process
            if status == _END:
                self._finished = True
                from hpcray import api
                try:
                    api.get(self._completion)
                except Exception:  # noqa: BLE001 - the task's error: the last ref raises it
                    return self._completion
                return None
            ready = client.wait_ready([object_id, completion_id], 1, timeout, False)
            if not ready and timeout is not None:
                return None

    def _next_ready(self) -> tuple:
        """(ready, ids to wait on): ready when `next` would not block."""
        if self._finished:
            return True, ()
        status, object_id = _client().generator_next(self._task_id, self._index, False)
        if status != _ITEM and status != _END:
            return False, (object_id, self._completion.binary())
        return True, ()

    def next_ready(self) -> bool:
        """Whether `next` returns without waiting."""
        return self._next_ready()[0]

    def is_finished(self) -> bool:
        """Whether every ref was taken (next raises StopIteration)."""
        return self._finished

    def completed(self) -> ObjectRef:
        """A ref ready when the task has ended (its `get` raises the task's error)."""
        return self._completion

    def task_id(self) -> bytes:
        return self._task_id

    def __aiter__(self):
        return self

    async def __anext__(self) -> ObjectRef:
        import asyncio  # not at import: it was a third of `import hpcray` (whoever awaits has it)
        ref = await asyncio.get_running_loop().run_in_executor(None, self._next, None)
        if ref is None:
            raise StopAsyncIteration
        return ref

    def __reduce__(self):
        raise TypeError("An ObjectRefGenerator cannot be serialized or passed to another "
                        "task or actor (as in Ray); pass the ObjectRefs it yields instead.")

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._task_id.hex()})"


class DynamicObjectRefGenerator:
    """The value of a `num_returns="dynamic"` task's ref: iterate for the item refs."""

    def __init__(self, refs):
        self._refs = list(refs)

    def __iter__(self):
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __reduce__(self):
        return (DynamicObjectRefGenerator, (self._refs,))

    def __repr__(self) -> str:
        return f"DynamicObjectRefGenerator({len(self._refs)} refs)"


def _dynamic_from_ids(object_ids) -> DynamicObjectRefGenerator:
    return DynamicObjectRefGenerator([ObjectRef(object_id) for object_id in object_ids])


class _DynamicIds:
    """Pickles as a DynamicObjectRefGenerator of these ids without making ObjectRefs
    here (a node manager makes the value; refs made there would count for its process)."""

    __slots__ = ("object_ids",)

    def __init__(self, object_ids):
        self.object_ids = object_ids

    def __reduce__(self):
        for object_id in self.object_ids:
            _note_pickled(object_id)
        return (_dynamic_from_ids, (list(self.object_ids),))


def dynamic_generator_bytes(object_ids) -> bytes:
    """The inline value of a dynamic generator task's ref (its `contained` are the ids)."""
    return pickle.dumps(_DynamicIds(object_ids), protocol=5)
