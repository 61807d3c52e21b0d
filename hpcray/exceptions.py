"""The exceptions users of hpcray see, with Ray's names and meanings.

`RayTaskError` wraps an exception raised inside a task; `as_instanceof_cause()` makes
an object that is both a `RayTaskError` and an instance of the user's exception class,
so `except ValueError:` around `get` works as it does with Ray.
"""

from __future__ import annotations


class RayError(Exception):
    """Base of every error hpcray raises on behalf of the runtime."""


class RaySystemError(RayError):
    """The runtime itself failed (a bug or a broken installation)."""


class RayTaskError(RayError):
    """A task or actor method raised; `cause` is the original exception."""

    def __init__(self, function_name: str, traceback_str: str, cause: BaseException | None,
                 pid: int | None = None):
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.cause = cause
        self.pid = pid
        super().__init__(self._message())

    def _message(self) -> str:
        where = f" (pid={self.pid})" if self.pid else ""
        kind = type(self.cause).__name__ if self.cause else "Error"
        return f"{kind} in {self.function_name}{where}:\n{self.traceback_str}"

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self):
        return (RayTaskError, (self.function_name, self.traceback_str, self.cause, self.pid))

    def as_instanceof_cause(self) -> RayTaskError:
        """An exception that is both this RayTaskError and an instance of the cause's class."""
        cause_cls = type(self.cause) if self.cause is not None else None
        if (cause_cls is None or isinstance(self.cause, RayTaskError)
                or issubclass(RayTaskError, cause_cls)):
            return self
        try:
            dual = _dual_class(cause_cls)
            err = dual.__new__(dual)
        except TypeError:  # the class cannot be subclassed (a final C type)
            return self
        err.function_name, err.traceback_str = self.function_name, self.traceback_str
        err.cause, err.pid = self.cause, self.pid
        err.args = self.cause.args
        try:
            err.__dict__.update({k: v for k, v in vars(self.cause).items()
                                 if k not in err.__dict__})
        except TypeError:
            pass
        return err


_dual_classes: dict[type, type] = {}


def _dual_class(cause_cls: type) -> type:
    dual = _dual_classes.get(cause_cls)
    if dual is None:
        def _init(self, *args, **kwargs):  # never called: instances are made by as_instanceof_cause
            pass

        dual = type(f"RayTaskError({cause_cls.__name__})", (RayTaskError, cause_cls),
                    {"__init__": _init, "__str__": RayTaskError.__str__,
                     "__reduce__": RayTaskError.__reduce__})
        _dual_classes[cause_cls] = dual
    return dual


class RayActorError(RayError):
    """The actor died (its process exited, it was killed, or its constructor raised)."""

    def __init__(self, message: str = "The actor died unexpectedly before finishing this task."):
        super().__init__(message)


class ActorDiedError(RayActorError):
    """The actor is dead and will not restart."""


class WorkerCrashedError(RayError):
    """The worker running the task died (and the task ran out of retries)."""

    def __init__(self, message: str = "The worker died unexpectedly while executing this task."):
        super().__init__(message)


class NodeDiedError(RayError):
    """The node running the task died (its MPI rank was lost)."""


class GetTimeoutError(RayError, TimeoutError):
    """`get` ran past its timeout."""


class TaskCancelledError(RayError):
    """The task was cancelled with `cancel`."""

    def __init__(self, message: str = "This task or its dependency was cancelled."):
        super().__init__(message)


class ObjectLostError(RayError):
    """The object's value is gone and cannot be recomputed."""


class ObjectReconstructionFailedError(ObjectLostError):
    """Every copy of the object is gone and re-running the task that made it is not
    possible: it was put (no lineage), or the task's retries are used up (Ray's class)."""


class OwnerDiedError(ObjectLostError):
    """The process that owned the object died, and with it what it knew of the object."""


class ObjectFreedError(ObjectLostError):
    """The object was freed (all references dropped) before it was read."""


class ObjectStoreFullError(RayError):
    """The object does not fit in the node's shared-memory store."""


class OufOfBandObjectRefSerializationException(RayError):
    """An ObjectRef was pickled out of band (by the user's pickle or ray.cloudpickle, not
    as part of a task's arguments or results) while
    RAY_allow_out_of_band_object_ref_serialization=0 (Ray's name, typo included)."""


class OutOfMemoryError(RayError):
    """A worker ran out of memory."""


class TaskUnschedulableError(RayError):
    """The task cannot be scheduled (as Ray's): a hard NodeAffinitySchedulingStrategy
    names a node that is not there or cannot run it."""

    def __init__(self, error_message: str):
        super().__init__(error_message)
        self.error_message = error_message

    def __str__(self) -> str:
        return f"The task is not schedulable: {self.error_message}"


class ActorUnschedulableError(RayError):
    """The actor cannot be scheduled (as Ray's): no node can host it (with
    HPCRAY_INFEASIBLE=error), or a hard node affinity cannot hold."""

    def __init__(self, error_message: str):
        super().__init__(error_message)
        self.error_message = error_message

    def __str__(self) -> str:
        return f"The actor is not schedulable: {self.error_message}"


class ResourceInfeasibleError(TaskUnschedulableError, ValueError):
    """No node of the cluster can ever satisfy the task's resource request; raised by its
    refs with HPCRAY_INFEASIBLE=error (by default such a task stays pending, as in Ray)."""


__all__ = [name for name, value in list(globals().items())
           if isinstance(value, type) and issubclass(value, Exception)]
