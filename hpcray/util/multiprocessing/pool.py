"""`Pool`: Python's `multiprocessing.Pool` whose processes are hpcray actors.

A drop-in for `multiprocessing.Pool` and `ray.util.multiprocessing.Pool`: the same
methods, arguments, errors and close/terminate/join life cycle. What differs from a
pool of local processes:

- The processes are actors spread over the job's nodes (`scheduling_strategy="SPREAD"`),
  `processes` defaulting to the CPUs of the whole cluster. As in Ray, an actor holds no
  CPU (`num_cpus=0`) unless `ray_remote_args` asks for some; those options
  (`num_cpus`, `num_gpus`, `resources`, `scheduling_strategy`, ...) apply to every actor.
- The pool starts hpcray when nothing did (`ray_address` goes to `init`, which knows no
  address but "auto" and "local": the job's nodes come from the launcher), and waits
  for every actor to be up, so an initializer that raises fails `Pool()` itself.
- `context` is accepted and ignored, with a warning, as Ray does.
- A failed call raises its own exception at `get()`, the remote traceback as its cause,
  as Python's pool does (not a RayTaskError).
"""

from __future__ import annotations

import threading
import warnings
import weakref

import hpcray
from hpcray.util.multiprocessing.async_result import AsyncResult
from hpcray.util.multiprocessing.dispatcher import Chunk, Dispatcher
from hpcray.util.multiprocessing.imap_iterator import IMapIterator
from hpcray.util.multiprocessing.pool_actor import PoolActor

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"
# imap keeps this many chunks per actor out at a time (sent, or back and not yet taken).
IMAP_CHUNKS_PER_ACTOR = 2


class Pool:
    """A pool of actor processes running functions in parallel, as multiprocessing.Pool.

    Args:
        processes: how many actors; the cluster's CPUs when None.
        initializer: called with `initargs` once in each actor when it starts; what it
            assigns to its module's globals is seen by the functions the pool runs.
        initargs: the initializer's arguments.
        maxtasksperchild: after this many chunks an actor is replaced by a fresh one.
        context: ignored (a warning), as in Ray.
        ray_address: passed to `hpcray.init()` when hpcray is not running yet.
        ray_remote_args: actor options for every process (`num_cpus`, `resources`, ...).
    """

    def __init__(self, processes: int | None = None, initializer=None, initargs=(),
                 maxtasksperchild: int | None = None, context=None,
                 ray_address: str | None = None, ray_remote_args: dict | None = None):
        if processes is not None and (not isinstance(processes, int) or processes < 1):
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
                not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if context is not None:
            warnings.warn("Pool's 'context' argument is ignored by hpcray (as by Ray): "
                          "its processes are actors.", stacklevel=2)
        self._state = RUN  # set first: __del__ and __repr__ read it
        if not hpcray.is_initialized():
            hpcray.init(address=ray_address)
        if processes is None:
            processes = max(1, int(hpcray.cluster_resources().get("CPU", 1)))
        actor_options = {"num_cpus": 0, "scheduling_strategy": "SPREAD",
                         **(ray_remote_args or {})}
        actor_class = PoolActor.options(**actor_options)
        initargs = tuple(initargs or ())

        def new_actor():
            return actor_class.remote(initializer, initargs)

        self._dispatcher = Dispatcher(new_actor, processes, maxtasksperchild)
        self._processes = processes
        self._iterators: weakref.WeakSet = weakref.WeakSet()  # imap ones still feeding
        self._callback_lock = threading.Lock()  # callbacks run one at a time
        try:
            hpcray.get([actor.__ray_ready__.remote() for actor in self._dispatcher.actors])
        except BaseException:
            self.terminate()
            raise

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.Pool state={self._state} pool_size={self._processes}>"

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or "
                                  "pickled")

    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _submit(self, func, items: list, owner, index: int) -> None:
        self._dispatcher.submit(Chunk(func, items, owner, index))

    # ------------------------------------------------------------------ one call
    def apply(self, func, args=(), kwds=None, *, kwargs=None):
        """func(*args, **kwds) on one of the actors; its result."""
        return self.apply_async(func, args, kwds, kwargs=kwargs).get()

    def apply_async(self, func, args=(), kwds=None, callback=None, error_callback=None, *,
                    kwargs=None) -> AsyncResult:
        """func(*args, **kwds) on one of the actors; an AsyncResult. (`kwargs=` is Ray's
        name for `kwds`.)"""
        self._check_running()
        if kwargs is not None:
            if kwds is not None:
                raise TypeError("apply_async() got both kwds and kwargs")
            kwds = kwargs
        result = AsyncResult(1, callback, error_callback, single=True,
                             callback_lock=self._callback_lock)
        self._submit(func, [(tuple(args or ()), dict(kwds or {}))], result, 0)
        return result

    # ------------------------------------------------------------------ map, starmap
    def map(self, func, iterable, chunksize: int | None = None) -> list:
        """[func(x) for x in iterable], in chunks spread over the actors."""
        return self._map_async(func, iterable, chunksize, False, None, None).get()

    def map_async(self, func, iterable, chunksize: int | None = None, callback=None,
                  error_callback=None) -> AsyncResult:
        return self._map_async(func, iterable, chunksize, False, callback, error_callback)

    def starmap(self, func, iterable, chunksize: int | None = None) -> list:
        """[func(*args) for args in iterable]."""
        return self._map_async(func, iterable, chunksize, True, None, None).get()

    def starmap_async(self, func, iterable, chunksize: int | None = None, callback=None,
                      error_callback=None) -> AsyncResult:
        return self._map_async(func, iterable, chunksize, True, callback, error_callback)

    def _map_async(self, func, iterable, chunksize, unpack: bool, callback,
                   error_callback) -> AsyncResult:
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        if chunksize is None:
            # Python's rule: about four chunks per process.
            chunksize, extra = divmod(len(iterable), self._processes * 4)
            chunksize += 1 if extra else 0
        if len(iterable) and chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize}")
        items = [(tuple(x), {}) if unpack else ((x,), {}) for x in iterable]
        chunks = [items[i:i + chunksize] for i in range(0, len(items), chunksize or 1)]
        result = AsyncResult(len(chunks), callback, error_callback,
                             callback_lock=self._callback_lock)
        for index, chunk in enumerate(chunks):
            self._submit(func, chunk, result, index)
        return result

    # ------------------------------------------------------------------ imap
    def imap(self, func, iterable, chunksize: int = 1) -> IMapIterator:
        """func(x) for x in iterable, lazily, in the iterable's order."""
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func, iterable, chunksize: int = 1) -> IMapIterator:
        """func(x) for x in iterable, lazily, in the order they finish."""
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(self, func, iterable, chunksize: int, ordered: bool) -> IMapIterator:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        iterator = IMapIterator(self._submit, func, iterable, chunksize, ordered,
                                window=IMAP_CHUNKS_PER_ACTOR * self._processes)
        self._iterators.add(iterator)
        return iterator

    # ------------------------------------------------------------------ life cycle
    def close(self) -> None:
        """No more work: what was given (imap's whole input too) still runs; join() waits."""
        if self._state != RUN:
            return
        for iterator in list(self._iterators):
            iterator.submit_all()
        self._state = CLOSE
        self._dispatcher.stop(kill=False)

    def terminate(self) -> None:
        """End the actors now; results not in yet fail (RayActorError)."""
        if self._state == TERMINATE:
            return
        self._state = TERMINATE
        self._dispatcher.stop(kill=True)

    def join(self) -> None:
        """Wait for the work of a closed or terminated pool, then end its actors."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        self._dispatcher.release()

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, *exc_info) -> None:
        self.terminate()  # as Python's and Ray's pools
