"""Turning values into bytes and back: inline in messages, or laid out in the store.

Values are pickled with protocol 5 (cloudpickle, so lambdas and classes of `__main__`
travel) with out-of-band buffers: a numpy array's data is not copied into the pickle
but written once into the store, and read back as a read-only array that views the
segment. The ids of the `ObjectRef`s a value contains are collected while pickling, so
the node manager can keep them alive as long as the value lives.

The copy into the store is `copy_into`: large buffers are copied by several threads
with the GIL released (one thread's memcpy is well below what memory can move).

Store layout of one object (offsets from the object's 64-byte aligned start):
    u32 magic | u32 buffer count n | u64 pickle length | n x u64 buffer lengths
    pickle bytes | each buffer, starting on a 64-byte boundary
"""

from __future__ import annotations

import collections
import io
import sys
import pickle
import struct
import types

import cloudpickle

from hpcray._store import copy_into
from hpcray.exceptions import RayError
from hpcray.object_ref import begin_collecting_refs, end_collecting_refs

_MAGIC = 0x48505259  # "HPRY"
_HEAD = struct.Struct("<IIQ")
_LEN = struct.Struct("<Q")
_ALIGN = 64
_PLAIN_TYPES = (int, float, str, bytes, bool, type(None))


def _code_reduce_keeping_filename(code: types.CodeType):
    """cloudpickle's reduction of a code object, with the code's own file name:
    cloudpickle >= 3.1 writes "<dynamic-code>" instead, and a remote traceback would
    then name no file and show no source line (Ray's bundled cloudpickle keeps it)."""
    rebuild, args = _CLOUDPICKLE_CODE_REDUCE(code)
    return rebuild, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)


_CLOUDPICKLE_CODE_REDUCE = getattr(getattr(cloudpickle, "cloudpickle", None),
                                   "_code_reduce", None)


class _CallablePickler(cloudpickle.Pickler):
    if _CLOUDPICKLE_CODE_REDUCE is not None:
        dispatch_table = collections.ChainMap({types.CodeType: _code_reduce_keeping_filename},
                                              cloudpickle.Pickler.dispatch_table)


def dumps_callable(obj) -> bytes:
    """Pickle a task's function or an actor's class (by value where cloudpickle would),
    keeping the file names of its code for tracebacks, with this process's sys.path:
    loads_callable puts what a worker lacks of it on the worker's (as Ray ships the
    driver's sys.path), so a module the driver imported from a folder it added at run
    time imports in every worker, on every node, started before or after."""
    out = io.BytesIO()
    _CallablePickler(out, protocol=5).dump(obj)
    return pickle.dumps((tuple(sys.path), out.getvalue()), protocol=5)


def loads_callable(data: bytes):
    """The function or class of dumps_callable(), once its sys.path is on this one's."""
    paths, pickled = pickle.loads(data)
    known = set(sys.path)
    sys.path.extend(path for path in paths if path not in known)
    return cloudpickle.loads(pickled)


# This process's serializers for classes it cannot change (`ray.util.register_serializer`):
# class -> reducer. Per process, as in Ray: a worker that needs one registers it itself.
_registered: dict = {}


class _ValuePickler(cloudpickle.Pickler):
    dispatch_table = collections.ChainMap(_registered, cloudpickle.Pickler.dispatch_table)


def dumps_value(value, buffer_callback=None) -> bytes:
    """cloudpickle with protocol 5, and this process's registered serializers."""
    if not _registered:
        return cloudpickle.dumps(value, protocol=5, buffer_callback=buffer_callback)
    out = io.BytesIO()
    _ValuePickler(out, protocol=5, buffer_callback=buffer_callback).dump(value)
    return out.getvalue()


def register_serializer(cls: type, *, serializer, deserializer) -> None:
    """Pickle instances of `cls` as `deserializer(serializer(obj))` in this process (Ray's
    `ray.util.register_serializer`); a second call for a class replaces the first."""
    if not isinstance(cls, type):
        raise TypeError(f"register_serializer takes a class, not {cls!r}")
    _registered[cls] = lambda obj: (deserializer, (serializer(obj),))


def deregister_serializer(cls: type) -> None:
    """Forget `cls`'s serializer in this process (nothing happens if it has none)."""
    _registered.pop(cls, None)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


class ErrorValue:
    """What a failed task stores in place of its result; `get` raises `error`."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error

    def __reduce__(self):
        return (ErrorValue, (self.error,))


def make_error_value(error: BaseException) -> ErrorValue:
    """An ErrorValue that is sure to pickle: an unpicklable cause is replaced by its text."""
    try:
        dumps_value(error)
        return ErrorValue(error)
    except Exception:  # noqa: BLE001 - any pickling failure
        from hpcray.exceptions import RayTaskError
        if isinstance(error, RayTaskError):
            cause = RayError(f"{type(error.cause).__name__}: {error.cause} (not picklable)")
            return ErrorValue(RayTaskError(error.function_name, error.traceback_str, cause,
                                           error.pid))
        return ErrorValue(RayError(f"{type(error).__name__}: {error} (not picklable)"))


def error_bytes(error: BaseException) -> bytes:
    """An inline value that makes `get` raise `error`."""
    return dumps_value(make_error_value(error))


class SerializedValue:
    """A pickled value: the pickle stream, its out-of-band buffers, the refs inside it."""

    __slots__ = ("pickled", "buffers", "contained")

    def __init__(self, pickled: bytes, buffers: list, contained: list):
        self.pickled = pickled
        self.buffers = buffers
        self.contained = contained

    @property
    def is_small(self) -> bool:
        return not self.buffers

    @property
    def store_size(self) -> int:
        """Its size laid out in the store (computed when asked: most values go inline)."""
        size = _align(_HEAD.size + _LEN.size * len(self.buffers) + len(self.pickled))
        for buf in self.buffers:
            size = _align(size + buf.nbytes)
        return size

    def write_into(self, dest: memoryview) -> None:
        """Lay the value out in `dest` (a store allocation of `store_size` bytes)."""
        n = len(self.buffers)
        _HEAD.pack_into(dest, 0, _MAGIC, n, len(self.pickled))
        pos = _HEAD.size
        for buf in self.buffers:
            _LEN.pack_into(dest, pos, buf.nbytes)
            pos += _LEN.size
        copy_into(dest, pos, self.pickled)
        pos = _align(pos + len(self.pickled))
        for buf in self.buffers:
            copy_into(dest, pos, buf)  # the one copy of the value's data
            pos = _align(pos + buf.nbytes)


def plain_call_args(args: tuple, kwargs: dict) -> bytes | None:
    """A call's (args, kwargs) pickled, when every one is a plain value (pickle alone
    does: no cloudpickle, no refs inside, no buffers); else None. A task's call is most
    often this, and cloudpickle's pickler is ~40% of a `.remote()` of a float."""
    plain = _PLAIN_TYPES
    for value in args:
        if type(value) not in plain:
            return None
    if kwargs:
        for value in kwargs.values():
            if type(value) not in plain:
                return None
    return pickle.dumps((args, kwargs), protocol=5)


def serialize(value, inline_threshold: int) -> SerializedValue:
    """Pickle `value`; buffers larger than a few KiB stay out of band when it is large."""
    if type(value) in _PLAIN_TYPES:
        return SerializedValue(pickle.dumps(value, protocol=5), [], [])
    contained = begin_collecting_refs()
    try:
        buffers: list = []
        pickled = dumps_value(value, buffers.append)
    finally:
        end_collecting_refs()
    buffers = [b.raw() for b in buffers]
    if buffers and sum(b.nbytes for b in buffers) + len(pickled) < inline_threshold:
        # Small arrays: in-band is cheaper than a store round trip.
        pickled = dumps_value(value)
        buffers = []
    return SerializedValue(pickled, buffers, contained)


def deserialize_inline(data: bytes):
    return pickle.loads(data)


def deserialize_from_store(view: memoryview):
    """Rebuild a value laid out by `write_into`; arrays in it view `view` (zero copies)."""
    magic, n, pickled_len = _HEAD.unpack_from(view, 0)
    if magic != _MAGIC:
        raise RayError("corrupt object in the store (bad magic)")
    pos = _HEAD.size
    lengths = []
    for _ in range(n):
        lengths.append(_LEN.unpack_from(view, pos)[0])
        pos += _LEN.size
    pickled = view[pos:pos + pickled_len]
    pos = _align(pos + pickled_len)
    buffers = []
    for length in lengths:
        buffers.append(view[pos:pos + length])
        pos = _align(pos + length)
    return pickle.loads(pickled, buffers=buffers), n > 0
