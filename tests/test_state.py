"""The tasks table (`hpcray.util.state.list_tasks`), on one node: every task's state,
kept while its returns may still be asked for."""

import os
import time

import pytest

import hpcray
from hpcray.util.state import list_tasks


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def states_by_name() -> dict:
    return {task.name: task.state for task in list_tasks()}


@hpcray.remote
def quick():
    return 1


@hpcray.remote
def wait_for_file(path):
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return 2


def test_list_tasks_follows_a_task_from_submission_to_free(ray_start, tmp_path):
    go = tmp_path / "go"
    done = quick.options(name="quick").remote()
    assert hpcray.get(done) == 1
    running = wait_for_file.options(name="running").remote(str(go))
    waiting = wait_for_file.options(name="waiting", num_cpus=2).remote(str(go))
    wait_for(lambda: states_by_name().get("running") == "RUNNING", "RUNNING")
    states = states_by_name()
    assert states == {"quick": "FINISHED", "running": "RUNNING", "waiting": "PENDING"}, states
    rows = list_tasks(filters=[("state", "=", "RUNNING")])
    assert [row.name for row in rows] == ["running"]
    assert rows[0]["node_id"] == hpcray.get_runtime_context().get_node_id()
    assert rows[0].task_id == running.task_id().hex()
    assert len(list_tasks(limit=2)) == 2
    go.touch()
    assert hpcray.get([running, waiting]) == [2, 2]
    wait_for(lambda: set(states_by_name().values()) == {"FINISHED"}, "all FINISHED")
    # Freed returns end their task's lineage: the entries go.
    del done, running, waiting
    wait_for(lambda: not list_tasks(), "the entries to go")


def test_a_cancelled_task_is_failed_and_bad_filters_raise(ray_start, tmp_path):
    blocker = wait_for_file.options(name="blocker", num_cpus=2).remote(str(tmp_path / "go"))
    queued = quick.options(name="queued", num_cpus=2).remote()
    wait_for(lambda: states_by_name().get("blocker") == "RUNNING", "RUNNING")
    hpcray.cancel(queued)
    wait_for(lambda: states_by_name().get("queued") == "FAILED", "FAILED")
    (tmp_path / "go").touch()
    hpcray.get(blocker)
    with pytest.raises(ValueError, match="predicate"):
        list_tasks(filters=[("state", "~", "x")])
    with pytest.raises(ValueError, match="Unknown task field"):
        list_tasks(filters=[("colour", "=", "x")])


def test_list_tasks_from_a_task(ray_start):
    @hpcray.remote
    def who_runs():
        return [(task.name, task.state) for task in list_tasks()]

    assert hpcray.get(who_runs.options(name="me").remote()) == [("me", "RUNNING")]
