"""`ObjectRef`, the future of a task's result or a `put` value, and reference counting.

Each process counts the live `ObjectRef` (and `ActorHandle`) objects per id in its
`LocalReferenceCounter`; only the 0->1 and 1->0 transitions leave the process, batched,
to the node manager, which frees an object once no process, no pending task and no
stored value holds it. `__del__` may run anywhere (inside a lock, inside the GC), so it
only appends to a deque; the owner of the counter drains it when it is safe.
"""

from __future__ import annotations

import collections
import os
import threading
import types


class LocalReferenceCounter:
    """Per-process counts of live references, reporting transitions as (id, +1|-1)."""

    __slots__ = ("counts", "transitions", "enabled", "on_actor_released")

    def __init__(self):
        self.counts: dict[bytes, int] = {}
        self.transitions: collections.deque = collections.deque()
        self.enabled = True
        # Called when the last local handle of an actor goes (the driver wakes its node
        # manager, which ends the actor; object releases wait for the next call instead).
        self.on_actor_released = None

    def add(self, key: bytes) -> None:
        counts = self.counts
        n = counts.get(key, 0)
        counts[key] = n + 1
        if n == 0:
            self.transitions.append((key, 1))

    def add_owned(self, key: bytes) -> None:
        """Count a reference the node manager already counted when it made the object
        (a task's return, a put): no transition, so none can arrive after the result."""
        self.counts[key] = self.counts.get(key, 0) + 1

    def remove(self, key: bytes) -> None:
        counts = self.counts
        n = counts.get(key, 0)
        if n <= 1:
            counts.pop(key, None)
            if n == 1:
                self.transitions.append((key, -1))
                if len(key) == 16 and self.on_actor_released is not None:
                    self.on_actor_released()
        else:
            counts[key] = n - 1

    def drain(self) -> list:
        """Transitions since the last drain, oldest first."""
        if not self.transitions:  # the usual case: no IndexError raised and caught
            return []
        out = []
        pop = self.transitions.popleft
        try:
            while True:
                out.append(pop())
        except IndexError:
            return out


# The counter of this process; replaced by the runtime at init, disabled at shutdown.
reference_counter = LocalReferenceCounter()
reference_counter.enabled = False
_serialization_state = threading.local()


def begin_collecting_refs() -> list:
    """Start recording the ids of refs pickled by this thread; returns the list filled."""
    contained: list = []
    _serialization_state.contained = contained
    return contained


def end_collecting_refs() -> None:
    _serialization_state.contained = None


def _note_pickled(key: bytes) -> None:
    contained = getattr(_serialization_state, "contained", None)
    if contained is not None:
        contained.append(key)


# Refs this process pickled out of band (not as part of a value hpcray serializes: the
# user's own pickle.dumps or ray.cloudpickle.dump): nothing counts the copies, so, as in
# Ray, the object stays until the process ends (or internal_api.free lets it go).
_pinned_out_of_band: dict = {}


def _pin_out_of_band(ref) -> None:
    # Ray's switch for finding where refs escape: off, such a pickle raises.
    if os.environ.get("RAY_allow_out_of_band_object_ref_serialization", "1") == "0":
        from hpcray.exceptions import OufOfBandObjectRefSerializationException
        raise OufOfBandObjectRefSerializationException(
            f"It is not allowed to serialize ray.ObjectRef {ref.hex()} out of band "
            "(RAY_allow_out_of_band_object_ref_serialization=0). Unset it to allow it: "
            "the object is then pinned for the life of this process.")
    _pinned_out_of_band.setdefault(ref._id, ref)


def release_out_of_band(object_ids) -> None:
    for object_id in object_ids:
        _pinned_out_of_band.pop(object_id, None)


class ObjectRef:
    """A reference to an object in hpcray: a task's return value or a `put` value."""

    __slots__ = ("_id", "_counter", "__weakref__")
    __class_getitem__ = classmethod(types.GenericAlias)  # `ObjectRef[int]`, as in Ray

    def __init__(self, object_id: bytes, _owned: bool = False):
        self._id = object_id
        counter = reference_counter
        if counter.enabled:
            self._counter = counter
            if _owned:
                counter.add_owned(object_id)
            else:
                counter.add(object_id)
        else:
            self._counter = None

    def __del__(self):
        counter = self._counter
        if counter is not None:
            try:
                counter.remove(self._id)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def binary(self) -> bytes:
        return self._id

    def hex(self) -> str:
        return self._id.hex()

    def task_id(self) -> bytes:
        return self._id[:16]

    def __hash__(self) -> int:
        return hash(self._id)

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectRef) and other._id == self._id

    def __repr__(self) -> str:
        return f"ObjectRef({self._id.hex()})"

    def __reduce__(self):
        contained = getattr(_serialization_state, "contained", None)
        if contained is not None:
            contained.append(self._id)
        elif reference_counter.enabled:
            _pin_out_of_band(self)
        return (ObjectRef, (self._id,))

    def __await__(self):
        from hpcray import api
        import asyncio
        loop = asyncio.get_event_loop()
        return loop.run_in_executor(None, api.get, self).__await__()

    def future(self):
        """A concurrent.futures.Future that resolves to this object's value."""
        import concurrent.futures
        from hpcray import api
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def _resolve():
            try:
                fut.set_result(api.get(self))
            except BaseException as exc:  # noqa: BLE001 - handed to the future's owner
                fut.set_exception(exc)

        threading.Thread(target=_resolve, daemon=True).start()
        return fut
