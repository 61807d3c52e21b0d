"""`ray.util.multiprocessing`: Python's `multiprocessing.Pool` API on hpcray actors.

`Pool` runs a program written for `multiprocessing.Pool` on the job's nodes: each of its
processes is an actor, spread over every node of a multi-rank job. The parts, one a file:

- pool.py: `Pool`, the API (apply, map, starmap, imap, close, terminate, join).
- dispatcher.py: which actor runs each chunk of work, and the threads that collect what
  the actors return.
- pool_actor.py: the actor, which runs the initializer once and then chunks of calls.
- namespace.py: the module namespace an actor keeps for functions shipped by value, so
  that what an initializer sets in its globals is seen by the functions mapped later.
- async_result.py, imap_iterator.py: what apply_async/map_async and imap/imap_unordered
  hand back.

Not for: sharing memory or queues between processes (use `hpcray.util.queue.Queue`);
`TimeoutError` and `JoinableQueue` are the standard library's, re-exported as Ray does.
"""

from multiprocessing import JoinableQueue, TimeoutError  # noqa: A004 - Ray's names

from hpcray.util.multiprocessing.async_result import AsyncResult
from hpcray.util.multiprocessing.imap_iterator import IMapIterator
from hpcray.util.multiprocessing.pool import Pool

__all__ = ["AsyncResult", "IMapIterator", "JoinableQueue", "Pool", "TimeoutError"]
