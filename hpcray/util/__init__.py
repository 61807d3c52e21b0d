"""Helpers on top of the core API, as `ray.util`.

`ActorPool` is here at once; the submodules (`queue`, `scheduling_strategies`, `state`,
`actor_pool`, `multiprocessing`) load on first use, so `hpcray.util.queue.Queue` works
after a plain `import hpcray` (as `ray.util.queue` does after `import ray`) and `import hpcray` pays
for none of them until then. `progress(refs)` and `as_completed(refs)` (progress_bar.py:
how far a batch has come) and `on_drain(callback)`, `draining()`, `DrainExit` (a job
drained by a signal before its allocation ends: runtime/drain.py) load on first use too,
and so does `inspect_serializability` (check_serialize.py). `register_serializer` and
`deregister_serializer` are hpcray.serialization's (a class's serializer, per process).
The placement group calls are here at once, as in Ray: `hpcray.util.placement_group`
is the function (the module's name is taken by it, as Ray's is), `from
hpcray.util.placement_group import ...` the module.
"""

import importlib

from hpcray.util.actor_pool import ActorPool
from hpcray.util.placement_group import (get_current_placement_group, get_placement_group,
                                         placement_group, placement_group_table,
                                         remove_placement_group)

_SUBMODULES = ("actor_pool", "multiprocessing", "queue", "scheduling_strategies", "state")
_FROM_PROGRESS_BAR = ("progress", "as_completed")
_FROM_DRAIN = ("on_drain", "draining", "DrainExit")  # runtime/drain.py
_FROM_SERIALIZATION = ("register_serializer", "deregister_serializer")


def __getattr__(name: str):
    if name in _SUBMODULES:
        # import_module binds the submodule on this package, so this runs once per name.
        return importlib.import_module(f"{__name__}.{name}")
    if name in _FROM_PROGRESS_BAR:
        return getattr(importlib.import_module(f"{__name__}.progress_bar"), name)
    if name in _FROM_DRAIN:
        return getattr(importlib.import_module("hpcray.runtime.drain"), name)
    if name in _FROM_SERIALIZATION:
        return getattr(importlib.import_module("hpcray.serialization"), name)
    if name == "inspect_serializability":
        return importlib.import_module(f"{__name__}.check_serialize").inspect_serializability
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_SUBMODULES) | set(_FROM_PROGRESS_BAR) |
                  set(_FROM_DRAIN) | set(_FROM_SERIALIZATION) | {"inspect_serializability"})


__all__ = ["ActorPool", "DrainExit", "as_completed", "draining",
           "get_current_placement_group", "get_placement_group", "on_drain",
           "placement_group", "placement_group_table", "progress",
           "remove_placement_group"]
