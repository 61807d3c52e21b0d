"""`get_runtime_context()`: which job, task, actor and node the caller runs in."""

from __future__ import annotations

from hpcray import context


class RuntimeContext:
    def get_job_id(self) -> str:
        return context.get_client().job_id.hex()

    def get_node_id(self) -> str:
        return context.get_client().node_id.hex()

    def get_task_id(self) -> str | None:
        worker = context.worker
        if worker is None or worker.current_task_id is None:
            return None
        return worker.current_task_id.hex()

    def get_actor_id(self) -> str | None:
        worker = context.worker
        if worker is None or worker.actor_id is None:
            return None
        return worker.actor_id.hex()

    def is_canceled(self) -> bool:
        """Whether the calling task or actor method was cancelled (`cancel`): a method
        of a sync or threaded actor, which a cancel does not interrupt, polls this to
        stop. RuntimeError in the driver and in async actors, as in Ray."""
        worker = context.worker
        if worker is None:
            raise RuntimeError("is_canceled() is only available inside a task or an actor "
                               "method, not in the driver.")
        return worker.is_canceled()

    def get_worker_id(self) -> str:
        import os
        return f"{os.getpid():016x}"

    def get_accelerator_ids(self) -> dict:
        from hpcray.api import get_gpu_ids
        return {"GPU": [str(i) for i in get_gpu_ids()]}

    @property
    def job_id(self) -> str:
        return self.get_job_id()

    @property
    def node_id(self) -> str:
        return self.get_node_id()

    @property
    def task_id(self) -> str | None:
        return self.get_task_id()

    @property
    def actor_id(self) -> str | None:
        return self.get_actor_id()

    @property
    def namespace(self) -> str:
        return "default"


def get_runtime_context() -> RuntimeContext:
    """The caller's context; starts a local runtime when none runs, as Ray does."""
    from hpcray.api import client_or_init
    client_or_init()
    return RuntimeContext()
