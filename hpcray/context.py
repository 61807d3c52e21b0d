"""Where this process stands: the driver, a worker, or not initialized yet."""

from __future__ import annotations

from hpcray import exceptions

client = None          # the CoreClient of this process, once init() ran (or in a worker)
worker = None          # the Worker, in a worker process
driver_node = None     # the NodeManager, in the driver
group = None           # the placement group (options.InGroup) the running task or actor is in
env_vars = None        # the running task's or actor's runtime_env env_vars: its children's too


class NotInitializedError(exceptions.RayError, RuntimeError):
    """An API call that needs the runtime came before hpcray.init()."""


def get_client():
    if client is None:
        raise NotInitializedError(
            "hpcray is not initialized: call hpcray.init() (ray.init()) before using the API.")
    return client


def set_worker(the_worker) -> None:
    global client, worker
    worker = the_worker
    client = the_worker.client
