"""hpcray: Ray's core API (tasks, actors, a shared-memory object store) for HPC clusters.

`import hpcray as ray` runs Ray programs. `python app.py` runs one node with no MPI;
`mpirun -n N python -m hpcray app.py` runs N nodes.
"""

from hpcray import exceptions
from hpcray.runtime import rank_child  # noqa: F401 - read before this process opens sockets
from hpcray.actor import ActorClass, ActorHandle, method
from hpcray.api import (available_resources, cancel, cluster_resources, get, get_actor,
                        get_gpu_ids, init, is_initialized, kill, nodes, put, remote, shutdown,
                        timeline, wait)
from hpcray.object_ref import ObjectRef
from hpcray.object_ref_generator import DynamicObjectRefGenerator, ObjectRefGenerator
from hpcray.runtime_context import get_runtime_context

__version__ = "0.1.0"


def __getattr__(name: str):
    # `ray.util`, `ray.cloudpickle`, `ray._private` and `ray.experimental` are there after
    # `import ray`; here each loads on first use, which keeps `import hpcray` from paying
    # for them (the import binds it, so this runs once).
    if name in ("util", "cloudpickle", "_private", "experimental"):
        import importlib
        return importlib.import_module("hpcray." + name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["ActorClass", "ActorHandle", "DynamicObjectRefGenerator", "ObjectRef",
           "ObjectRefGenerator", "available_resources", "cancel",
           "cluster_resources", "exceptions", "get", "get_actor", "get_gpu_ids",
           "get_runtime_context", "init", "is_initialized", "kill", "method", "nodes", "put",
           "remote", "shutdown", "timeline", "util", "wait"]
