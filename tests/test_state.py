"""Ray's state API on one node (a cluster of one): the tasks table (every task's state,
its lineage kept while its returns may still be asked for, then a bounded history),
actors, nodes, objects and the task summary. tests/multinode runs it across ranks."""

import math
import os
import time

import pytest

import hpcray
from hpcray import context, exceptions
from hpcray.util.state import (list_actors, list_nodes, list_objects, list_tasks,
                               summarize_tasks)


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
    # Freed returns end their task's lineage: the entries go from the lineage table, and
    # list_tasks still shows them (as Ray keeps finished tasks up to a limit).
    del done, running, waiting
    shard = context.driver_node.network.gcs_shard
    wait_for(lambda: not list_tasks() or not shard.tasks, "the lineage to go")
    assert states_by_name() == {"quick": "FINISHED", "running": "FINISHED",
                                "waiting": "FINISHED"}


def test_a_cancelled_task_is_failed_and_bad_filters_raise(ray_start, tmp_path):
    blocker = wait_for_file.options(name="blocker", num_cpus=2).remote(str(tmp_path / "go"))
    queued = quick.options(name="queued", num_cpus=2).remote()
    wait_for(lambda: states_by_name().get("blocker") == "RUNNING", "RUNNING")
    hpcray.cancel(queued)
    wait_for(lambda: states_by_name().get("queued") == "FAILED", "FAILED")
    [row] = list_tasks(filters=[("name", "=", "queued")])
    assert row.error_type == "TASK_CANCELLED"
    assert row.node_id is None  # it never ran
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


def test_a_task_that_raised_is_failed_with_its_error_type(ray_start):
    @hpcray.remote
    def fails():
        raise KeyError("no")

    ref = fails.options(name="fails").remote()
    with pytest.raises(KeyError):
        hpcray.get(ref)
    assert hpcray.get(quick.options(name="fine").remote()) == 1
    wait_for(lambda: len({t.name for t in list_tasks() if t.state != "RUNNING"}) == 2,
             "both ended")
    rows = {t.name: t for t in list_tasks()}
    assert (rows["fails"].state, rows["fails"].error_type) == \
        ("FAILED", "TASK_EXECUTION_EXCEPTION")
    assert (rows["fine"].state, rows["fine"].error_type) == ("FINISHED", None)
    assert [t.name for t in list_tasks(filters=[("state", "=", "FAILED")])] == ["fails"]


@hpcray.remote
class Holder:
    def __init__(self):
        self.kept = None

    def pid(self):
        return os.getpid()

    def keep(self, refs):
        self.kept = refs[0]
        return True

    def fail(self):
        raise ValueError("actor call failed")


def test_actor_creations_and_calls_are_tasks(ray_start):
    holder = Holder.options(name="holder").remote()
    pid = hpcray.get(holder.pid.remote())
    failing = holder.fail.remote()
    with pytest.raises(ValueError):
        hpcray.get(failing)
    actor_id = holder._actor_id.hex()

    def ended():
        rows = list_tasks(detail=True)
        return rows if all(t.state in ("FINISHED", "FAILED") for t in rows) \
            and len(rows) == 3 else None

    rows = {t.name: t for t in wait_for(ended, "the creation and both calls to end")}
    creation, call, failed = rows["Holder"], rows["Holder.pid"], rows["Holder.fail"]
    assert (creation.type, creation.state, creation.actor_id) == \
        ("ACTOR_CREATION_TASK", "FINISHED", actor_id)
    assert (call.type, call.state, call.actor_id, call.worker_pid) == \
        ("ACTOR_TASK", "FINISHED", actor_id, pid)
    assert (failed.state, failed.error_type) == ("FAILED", "TASK_EXECUTION_EXCEPTION")
    node_id = hpcray.get_runtime_context().get_node_id()
    assert {t.node_id for t in rows.values()} == {node_id}
    summary = summarize_tasks()["cluster"]
    assert (summary["total_tasks"], summary["total_actor_tasks"],
            summary["total_actor_scheduled"]) == (0, 2, 1)
    assert summary["summary"]["Holder.fail"] == {
        "func_or_class_name": "Holder.fail", "type": "ACTOR_TASK",
        "state_counts": {"FAILED": 1}}


def test_detail_adds_times_resources_and_language(ray_start):
    @hpcray.remote
    def my_pid():
        return os.getpid()

    before = math.floor(time.time() * 1000)  # rows round to the millisecond
    pid = hpcray.get(my_pid.options(name="p", num_cpus=2).remote())
    row = wait_for(lambda: next((t for t in list_tasks(detail=True)
                                 if t.state == "FINISHED"), None), "FINISHED")
    after = math.ceil(time.time() * 1000)
    assert row.worker_pid == pid
    assert before <= row.creation_time_ms <= row.start_time_ms <= row.end_time_ms <= after
    assert (row.required_resources, row.language) == ({"CPU": 2.0}, "PYTHON")
    assert row.job_id == hpcray.get_runtime_context().get_job_id()
    plain = list_tasks()[0]
    assert (plain.start_time_ms, plain.required_resources, plain.worker_pid) == \
        (None, None, pid)


def test_list_actors_follows_an_actor_to_its_death(ray_start):
    holder = Holder.options(name="keeper").remote()
    pid = hpcray.get(holder.pid.remote())
    [row] = wait_for(lambda: [a for a in list_actors() if a.state == "ALIVE"], "ALIVE")
    assert (row.actor_id, row.class_name, row.name, row.pid, row.num_restarts) == \
        (holder._actor_id.hex(), "Holder", "keeper", pid, 0)
    assert row.node_id == hpcray.get_runtime_context().get_node_id()
    assert row.death_cause is None
    hpcray.kill(holder)
    with pytest.raises(exceptions.RayActorError):
        hpcray.get(holder.pid.remote())
    [row] = wait_for(lambda: [a for a in list_actors(detail=True) if a.state == "DEAD"],
                     "DEAD")
    assert "kill" in row.death_cause
    assert list_actors(filters=[("state", "=", "ALIVE")]) == []
    with pytest.raises(ValueError, match="Unknown actor field"):
        list_actors(filters=[("colour", "=", "x")])


def test_list_nodes_is_this_node(ray_start):
    [node] = list_nodes()
    assert node.node_id == hpcray.get_runtime_context().get_node_id()
    assert (node.state, node.is_head_node, node.rank) == ("ALIVE", True, 0)
    assert node.resources_total["CPU"] == 2.0
    assert node["node_name"] == hpcray.nodes()[0]["NodeName"]


def test_list_objects_one_row_per_reference(ray_start):
    small = hpcray.put(5)
    large = hpcray.put(b"x" * 300_000)
    holder = Holder.remote()
    actor_pid = hpcray.get(holder.pid.remote())
    assert hpcray.get(holder.keep.remote([large]))  # the actor keeps a ref to `large`
    outer = hpcray.put([small])  # `small` inside another value

    def rows_of(object_id: str):
        return {(row.type, row.reference_type, row.pid)
                for row in list_objects(filters=[("object_id", "=", object_id)])}

    driver = os.getpid()
    small_hex, large_hex = small.hex(), large.hex()
    assert rows_of(small_hex) == {("DRIVER", "LOCAL_REFERENCE", driver),
                                  (None, "CAPTURED_IN_OBJECT", None)}
    wait_for(lambda: rows_of(large_hex) == {("DRIVER", "LOCAL_REFERENCE", driver),
                                            ("WORKER", "LOCAL_REFERENCE", actor_pid)},
             "the driver's and the actor's references")
    [row] = [r for r in list_objects() if r.object_id == large_hex and r.pid == driver]
    assert row.object_size >= 300_000 and row.task_status == "NIL"
    node_id = hpcray.get_runtime_context().get_node_id()
    assert (row.node_id, row.owner_node_id, row.call_site) == (node_id, node_id, "disabled")
    del small  # now only `outer` holds it
    assert rows_of(small_hex) == {(None, "CAPTURED_IN_OBJECT", None)}
    hpcray.kill(holder)
    del large, outer
    wait_for(lambda: not list_objects(), "no reference left")


def test_state_from_inside_a_task(ray_start):
    @hpcray.remote
    def look():
        ref = hpcray.put(7)
        return ([a.class_name for a in list_actors()], len(list_nodes()),
                [o.type for o in list_objects(filters=[("object_id", "=", ref.hex())])],
                os.getpid())

    holder = Holder.remote()
    hpcray.get(holder.pid.remote())
    actors, nodes, types, _pid = hpcray.get(look.remote())
    assert (actors, nodes, types) == (["Holder"], 1, ["WORKER"])
