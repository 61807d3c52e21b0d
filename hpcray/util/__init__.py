"""Helpers on top of the core API, as `ray.util`.

`ActorPool` is here at once; the submodules (`queue`, `scheduling_strategies`, `state`,
`actor_pool`) load on first use, so `hpcray.util.queue.Queue` works after a plain
`import hpcray` (as `ray.util.queue` does after `import ray`) and `import hpcray` pays
for none of them until then. `progress(refs)` and `as_completed(refs)` (progress_bar.py:
how far a batch has come) load on first use too.
"""

import importlib

from hpcray.util.actor_pool import ActorPool

_SUBMODULES = ("actor_pool", "queue", "scheduling_strategies", "state")
_FROM_PROGRESS_BAR = ("progress", "as_completed")


def __getattr__(name: str):
    if name in _SUBMODULES:
        # import_module binds the submodule on this package, so this runs once per name.
        return importlib.import_module(f"{__name__}.{name}")
    if name in _FROM_PROGRESS_BAR:
        return getattr(importlib.import_module(f"{__name__}.progress_bar"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_SUBMODULES) | set(_FROM_PROGRESS_BAR))


__all__ = ["ActorPool", "as_completed", "progress"]
