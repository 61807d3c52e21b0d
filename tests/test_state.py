"""Ray's state API on one node (a cluster of one): the tasks table (every task's state,
its lineage kept while its returns may still be asked for, then a bounded history),
actors, nodes, objects and the task summary. tests/multinode runs it across ranks."""

import math
import os
import time

import pytest

import hpcray
from hpcray import context, exceptions
from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from hpcray.util.state import (RayStateApiException, get_actor, get_log, get_node,
                               get_objects, get_task, get_worker, list_actors, list_logs,
                               list_nodes, list_objects, list_tasks, list_workers,
                               summarize_actors, summarize_objects, summarize_tasks)


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
    # On this node, behind "running" (on several ranks another node's 2 free CPUs would
    # run it whenever the forward arrived: RUNNING or PENDING by timing).
    here = NodeAffinitySchedulingStrategy(hpcray.get_runtime_context().get_node_id(),
                                          soft=False)
    waiting = wait_for_file.options(name="waiting", num_cpus=2,
                                    scheduling_strategy=here).remote(str(go))
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
    # Ray's errors, with Ray's messages.
    with pytest.raises(ValueError, match="Unsupported filter predicate ~ is given"):
        list_tasks(filters=[("state", "~", "x")])
    with pytest.raises(RayStateApiException, match="filter column colour is not supported"):
        list_tasks(filters=[("colour", "=", "x")])
    with pytest.raises(RayStateApiException, match="required_resources is not supported"):
        list_tasks(filters=[("required_resources", "=", "x")])  # Ray filters not on it


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
        (holder._actor_id.hex(), "Holder", "keeper", pid, None)  # detail only, as Ray
    assert list_actors(detail=True)[0].num_restarts == 0
    assert row.node_id == hpcray.get_runtime_context().get_node_id()
    assert row.death_cause is None
    hpcray.kill(holder)
    with pytest.raises(exceptions.RayActorError):
        hpcray.get(holder.pid.remote())
    [row] = wait_for(lambda: [a for a in list_actors(detail=True) if a.state == "DEAD"],
                     "DEAD")
    assert "kill" in row.death_cause
    assert list_actors(filters=[("state", "=", "ALIVE")]) == []
    with pytest.raises(RayStateApiException, match="filter column colour"):
        list_actors(filters=[("colour", "=", "x")])


@pytest.mark.one_node
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


@pytest.mark.one_node
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


def test_filters_compare_as_ray_does_and_limit_caps(ray_start):
    hpcray.get([quick.remote() for _ in range(5)])
    wait_for(lambda: len(list_tasks(filters=[("state", "=", "FINISHED")])) == 5, "5 done")
    # A string column ignores case; an int column takes the value as text or a number.
    assert len(list_tasks(filters=[("state", "=", "finished")])) == 5
    assert list_tasks(filters=[("state", "!=", "FINISHED")]) == []
    assert len(list_tasks(limit=2)) == 2
    pid = list_tasks()[0].worker_pid
    assert list_tasks(filters=[("worker_pid", "=", str(pid))]) == \
        list_tasks(filters=[("worker_pid", "=", pid)]) != []
    assert len(list_tasks(filters=[("type", "=", "normal_task"), ("worker_pid", "!=", pid)])) == \
        5 - len(list_tasks(filters=[("worker_pid", "=", pid)]))


def test_list_workers_and_how_they_ended(ray_start):
    @hpcray.remote(max_retries=0)
    def crash():
        os._exit(7)

    holder = Holder.remote()
    actor_pid = hpcray.get(holder.pid.remote())
    with pytest.raises(exceptions.WorkerCrashedError):
        hpcray.get(crash.remote())
    hpcray.kill(holder)
    node_id = hpcray.get_runtime_context().get_node_id()

    def ended(pid):
        return [w for w in list_workers(detail=True) if w.pid == pid and w.exit_type]

    [actor] = wait_for(lambda: ended(actor_pid), "the actor's worker to end")
    assert (actor.is_alive, actor.worker_type, actor.exit_type, actor.node_id) == \
        (False, "WORKER", "INTENDED_USER_EXIT", node_id)
    assert "kill()" in actor.exit_detail and actor.end_time_ms >= actor.start_time_ms
    [crashed] = wait_for(lambda: list_workers(filters=[("exit_type", "=", "SYSTEM_ERROR")]),
                         "the crashed worker")
    assert crashed.exit_detail is None  # detail only
    [crashed] = list_workers(filters=[("pid", "=", crashed.pid)], detail=True)
    assert "exited with status 7 while running task" in crashed.exit_detail
    [driver] = list_workers(filters=[("worker_type", "=", "DRIVER")])
    assert (driver.pid, driver.is_alive) == (os.getpid(), True)
    alive = list_workers(filters=[("is_alive", "=", "true"), ("worker_type", "=", "WORKER")])
    assert len(alive) >= 1 and all(w.exit_type is None for w in alive)
    with pytest.raises(RayStateApiException, match="exit_detail is not supported"):
        list_workers(filters=[("exit_detail", "=", "x")])


def test_summarize_actors_and_objects(ray_start):
    holders = [Holder.remote() for _ in range(2)]
    hpcray.get([h.pid.remote() for h in holders])
    hpcray.kill(holders[1])
    wait_for(lambda: summarize_actors()["cluster"]["summary"].get("Holder", {}).get(
        "state_counts") == {"ALIVE": 1, "DEAD": 1}, "one alive, one dead")
    assert summarize_actors()["cluster"]["total_actors"] == 2
    refs = [hpcray.put(b"x" * 2**20), hpcray.put(1)]
    summary = summarize_objects()["cluster"]
    assert summary["total_objects"] == 2 and summary["callsite_enabled"] is False
    group = summary["summary"]["disabled"]
    assert group["ref_type_counts"] == {"LOCAL_REFERENCE": 2}
    assert group["task_state_counts"] == {"NIL": 2}
    assert (group["total_num_workers"], group["total_num_nodes"]) == (1, 1)
    assert 1.0 <= summary["total_size_mb"] < 1.1
    del refs


CALL_SITES_JOB = """\
import json, sys, hpcray as ray
from hpcray.util.state import list_objects, summarize_objects
ray.init(num_cpus=1)

@ray.remote
def make():
    return b"y" * 300_000

@ray.remote
class Keeper:
    def keep(self):
        self.kept = ray.put(7)  # line 12, held by the actor's worker
        return 1

put_refs = [ray.put(i) for i in range(3)]  # line 15
made = make.remote()  # line 16
keeper = Keeper.remote()
ray.get([made, keeper.keep.remote()])  # line 18
print("SUMMARY", json.dumps(summarize_objects()))
print("SITES", json.dumps(sorted((o.call_site, o.type) for o in list_objects())))
"""


@pytest.mark.timeout(120)
def test_summarize_objects_groups_by_call_site_when_recorded(tmp_path):
    import json
    import re
    import subprocess
    import sys
    script = tmp_path / "sites.py"
    script.write_text(CALL_SITES_JOB)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=100, cwd=tmp_path,
                          env=dict(os.environ, RAY_record_ref_creation_sites="1"))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(re.search(r"^SUMMARY (.*)$", done.stdout, re.M).group(1))["cluster"]
    assert summary["callsite_enabled"] is True and summary["summary_by"] == "callsite"
    where = str(script)
    put_site = f"(put object) | {where}:15:<listcomp> | {where}:15:<module>"
    groups = summary["summary"]
    assert groups[put_site]["total_objects"] == 3
    assert groups[put_site]["task_state_counts"] == {"NIL": 3}
    made_site = f"(task call) | {where}:16:<module>"
    assert groups[made_site]["total_objects"] == 1
    assert groups[made_site]["task_state_counts"] == {"FINISHED": 1}
    assert 0.28 < groups[made_site]["total_size_mb"] < 0.3
    kept_site = f"(put object) | {where}:12:keep"
    assert groups[kept_site]["total_objects"] == 1
    assert groups[kept_site]["total_num_workers"] == 1
    sites = json.loads(re.search(r"^SITES (.*)$", done.stdout, re.M).group(1))
    assert [kept_site, "WORKER"] in sites and [put_site, "DRIVER"] in sites
    assert summary["total_objects"] == sum(g["total_objects"] for g in groups.values())


def test_get_log_by_pid_actor_task_and_file(ray_start):
    @hpcray.remote
    def talk():
        print("from a task")
        print("to stderr", file=__import__("sys").stderr)
        return os.getpid()

    @hpcray.remote
    class Talker:
        def say(self, text):
            print(text)
            return os.getpid()

    ref = talk.remote()
    pid = hpcray.get(ref)
    talker = Talker.remote()
    actor_pid = hpcray.get([talker.say.remote("one"), talker.say.remote("two")])[1]
    node_id = hpcray.get_runtime_context().get_node_id()
    wait_for(lambda: "from a task" in list(get_log(node_id=node_id, pid=pid)), "the file")
    assert list(get_log(node_id=node_id, pid=pid, suffix="err")) == ["to stderr"]
    wait_for(lambda: list(get_log(actor_id=talker._actor_id.hex())) == ["one", "two"],
             "the actor's lines")
    assert list(get_log(actor_id=talker._actor_id.hex(), tail=1)) == ["two"]
    task_id = ref.task_id().hex()
    wait_for(lambda: "from a task" in list(get_log(task_id=task_id)), "the task's worker")
    files = list_logs(node_id=node_id)
    assert files["node"] == ["node-0.log"]
    assert f"node-0-worker-{pid}.out" in files["worker"]
    assert f"node-0-worker-{actor_pid}.out" in files["worker"]
    node_log = list(get_log(node_id=node_id, filename="node-0.log"))
    assert any("hpcray.launch: node" in line for line in node_log)
    with pytest.raises(ValueError, match="node_id or node_ip must be provided"):
        list(get_log(filename="node-0.log"))
    with pytest.raises(RayStateApiException, match="does not exist"):
        list(get_log(node_id=node_id, filename="nothing.log"))


def test_get_apis_and_following_a_log(ray_start, tmp_path):
    @hpcray.remote
    class Talker:
        def say(self, text):
            print(text, flush=True)
            return os.getpid()

    talker = Talker.remote()
    pid = hpcray.get(talker.say.remote("first"))
    actor_id = talker._actor_id.hex()
    actor = wait_for(lambda: get_actor(actor_id), "the actor")
    assert (actor.pid, actor.num_restarts) == (pid, 0)  # a get API fills every field
    assert get_actor("00" * 16) is None
    ref = quick.remote()
    hpcray.get(ref)
    [task] = wait_for(lambda: get_task(ref), "the task")
    assert task.task_id == ref.task_id().hex() and task.language == "PYTHON"
    assert get_task(task.task_id) == [task] and get_task("ff" * 16) is None
    node_id = hpcray.get_runtime_context().get_node_id()
    assert get_node(node_id).rank == 0 and get_node("x") is None
    [worker] = list_workers(filters=[("pid", "=", pid)])
    assert get_worker(worker.worker_id).pid == pid
    big = hpcray.put(b"x" * 200_000)
    assert [(o.object_id, o.type) for o in get_objects(big.hex())] == [(big.hex(), "DRIVER")]
    # follow: what is there, then each line as it comes (the actor says one more only
    # after we read the first, so the second is read by following the file).
    lines = get_log(actor_id=actor_id, follow=True, _interval=0.05)
    assert next(lines) == "first"
    talker.say.remote("second")
    assert next(lines) == "second"
    lines.close()


# Ray 2.60's columns (ray/util/state/common.py), in its order; hpcray's own come after.
RAY_COLUMNS = {
    "TaskState": ["task_id", "attempt_number", "name", "state", "job_id", "actor_id", "type",
                  "func_or_class_name", "parent_task_id", "node_id", "worker_id",
                  "worker_pid", "error_type", "language", "required_resources",
                  "runtime_env_info", "placement_group_id", "events", "profiling_data",
                  "creation_time_ms", "start_time_ms", "end_time_ms", "task_log_info",
                  "error_message", "is_debugger_paused", "call_site", "label_selector",
                  "fallback_strategy"],
    "ActorState": ["actor_id", "class_name", "state", "job_id", "name", "node_id", "pid",
                   "ray_namespace", "serialized_runtime_env", "required_resources",
                   "death_cause", "is_detached", "placement_group_id", "repr_name",
                   "num_restarts", "num_restarts_due_to_lineage_reconstruction",
                   "num_restarts_due_to_node_preemption", "call_site", "label_selector",
                   "fallback_strategy"],
    "ObjectState": ["object_id", "object_size", "task_status", "attempt_number",
                    "reference_type", "call_site", "type", "pid", "ip"],
    "NodeState": ["node_id", "node_ip", "is_head_node", "state", "state_message",
                  "node_name", "resources_total", "labels", "start_time_ms", "end_time_ms"],
    "WorkerState": ["worker_id", "is_alive", "worker_type", "exit_type", "node_id", "ip",
                    "pid", "exit_detail", "worker_launch_time_ms", "worker_launched_time_ms",
                    "start_time_ms", "end_time_ms", "debugger_port", "num_paused_threads"],
    "PlacementGroupState": ["placement_group_id", "name", "creator_job_id", "state",
                            "bundles", "is_detached", "stats", "topology_strategy",
                            "topology_assignments"],
}
HPCRAY_COLUMNS = {"TaskState": ["owner_node_id"], "ObjectState": ["node_id", "owner_node_id"],
                  "NodeState": ["rank"]}


def test_rows_have_rays_columns_in_rays_order(ray_start):
    import dataclasses

    from hpcray.util import state
    for name, columns in RAY_COLUMNS.items():
        got = [field.name for field in dataclasses.fields(getattr(state, name))]
        assert got == columns + HPCRAY_COLUMNS.get(name, []), name
    hpcray.get(quick.remote())
    [task] = [t for t in list_tasks(detail=True) if t.name.endswith("quick")]
    assert (task.call_site, task.label_selector, task.fallback_strategy) == (None, {}, None)
    assert list_tasks()[0].label_selector is None  # a detail column, as in Ray
    kept = hpcray.put(1)
    rows = list_objects(filters=[("attempt_number", "=", 0)])
    assert kept.hex() in {row.object_id for row in rows}
    assert all(row.attempt_number == 0 for row in rows)
