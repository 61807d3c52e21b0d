"""Helpers on top of the core API, as `ray.util`.

`ActorPool` is here at once; the submodules (`queue`, `scheduling_strategies`, `state`,
`actor_pool`) load on first use, so `hpcray.util.queue.Queue` works after a plain
`import hpcray` (as `ray.util.queue` does after `import ray`) and `import hpcray` pays
for none of them until then.
"""

import importlib

from hpcray.util.actor_pool import ActorPool

_SUBMODULES = ("actor_pool", "queue", "scheduling_strategies", "state")


def __getattr__(name: str):
    if name in _SUBMODULES:
        # import_module binds the submodule on this package, so this runs once per name.
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_SUBMODULES))


__all__ = ["ActorPool"]
