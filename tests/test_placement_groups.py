"""Placement groups on one node, as Ray has them: bundles reserved all or none, tasks and
actors scheduled into them use the bundles' resources and nothing else, a group that
cannot be created stays pending (and is created once resources free up), removal kills
its actors and fails its tasks and frees its resources; the table, names, capture of
child tasks, and the argument errors."""

import logging
import os
import sys
import time

import pytest

import hpcray
from hpcray import exceptions
from hpcray.util.placement_group import (get_current_placement_group, get_placement_group,
                                         placement_group, placement_group_table,
                                         remove_placement_group)
from hpcray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def four_cpus():
    hpcray.init(num_cpus=4, num_gpus=0, object_store_memory=128 * 1024 * 1024)
    try:
        yield hpcray
    finally:
        hpcray.shutdown()


@hpcray.remote(num_cpus=1)
def current_group():
    group = get_current_placement_group()
    return None if group is None else group.id.hex()


def into(group, index=-1, capture=None):
    return PlacementGroupSchedulingStrategy(group, index, capture)


@pytest.mark.one_node
def test_bundles_are_reserved_and_only_their_tasks_use_them(four_cpus):
    group = placement_group([{"CPU": 1}, {"CPU": 2}], strategy="STRICT_PACK", name="pair")
    assert hpcray.get(group.ready(), timeout=30) == group
    assert group.wait(5)
    assert hpcray.available_resources()["CPU"] == 1.0
    row = placement_group_table(group)
    assert row["state"] == "CREATED" and row["strategy"] == "STRICT_PACK"
    assert row["bundles"] == {0: {"CPU": 1.0}, 1: {"CPU": 2.0}}
    assert set(row["bundles_to_node_id"].values()) == {hpcray.get_runtime_context().node_id}
    assert group.id.hex() in placement_group_table()
    assert get_placement_group("pair") == group
    # Inside the group, each bundle index and any bundle.
    for strategy in (into(group, 0), into(group, 1), into(group)):
        assert hpcray.get(current_group.options(scheduling_strategy=strategy).remote(),
                          timeout=30) == group.id.hex()
    assert hpcray.get(current_group.remote(), timeout=30) is None
    # 2 CPUs are reserved: a 2-CPU task outside waits; in bundle 1 it runs.
    outside = current_group.options(num_cpus=2).remote()
    inside = current_group.options(num_cpus=2, scheduling_strategy=into(group, 1)).remote()
    assert hpcray.get(inside, timeout=30) == group.id.hex()
    ready, _ = hpcray.wait([outside], timeout=0.5)
    assert not ready
    remove_placement_group(group)
    assert hpcray.get(outside, timeout=30) is None  # the freed CPUs run it
    assert placement_group_table(group)["state"] == "REMOVED"
    with pytest.raises(ValueError, match="Failed to look up placement group"):
        get_placement_group("pair")


def test_a_bundle_runs_no_more_than_it_holds(four_cpus, tmp_path):
    group = placement_group([{"CPU": 1}])
    assert group.wait(30)

    @hpcray.remote(num_cpus=1)
    def overlap(marker):
        path = tmp_path / "running"
        assert not path.exists(), "two tasks ran at once in a 1-CPU bundle"
        path.write_text(marker)
        time.sleep(0.05)
        path.unlink()
        return marker

    refs = [overlap.options(scheduling_strategy=into(group, 0)).remote(str(i))
            for i in range(4)]
    assert hpcray.get(refs, timeout=60) == ["0", "1", "2", "3"]
    remove_placement_group(group)


@pytest.mark.one_node
def test_an_infeasible_group_stays_pending_then_removed(four_cpus, caplog):
    caplog.set_level(logging.WARNING, logger="hpcray.placement_groups")
    group = placement_group([{"CPU": 3}, {"CPU": 3}], strategy="STRICT_PACK")
    assert not group.wait(0.5)
    assert placement_group_table(group)["state"] == "PENDING"
    assert any("cannot be created" in r.getMessage() for r in caplog.records)
    waiting = current_group.options(scheduling_strategy=into(group, 0)).remote()
    ready, _ = hpcray.wait([waiting, group.ready()], num_returns=1, timeout=0.5)
    assert not ready
    assert hpcray.available_resources()["CPU"] == 4.0  # nothing reserved
    remove_placement_group(group)
    with pytest.raises(exceptions.TaskUnschedulableError, match="placement group"):
        hpcray.get(waiting, timeout=30)
    assert placement_group_table(group)["state"] == "REMOVED"
    # A task submitted into a removed group fails too.
    with pytest.raises(exceptions.TaskUnschedulableError):
        hpcray.get(current_group.options(scheduling_strategy=into(group)).remote(), timeout=30)


@pytest.mark.one_node
def test_a_group_that_fits_later_is_created(four_cpus):
    @hpcray.remote(num_cpus=3)
    class Hog:
        def ping(self):
            return "up"

    hog = Hog.remote()
    assert hpcray.get(hog.ping.remote(), timeout=30) == "up"
    group = placement_group([{"CPU": 2}])
    assert not group.wait(0.5)
    assert placement_group_table(group)["state"] == "PENDING"
    hpcray.kill(hog)
    assert group.wait(30)
    assert placement_group_table(group)["state"] == "CREATED"


@pytest.mark.one_node
def test_removal_kills_its_actors_and_running_tasks_and_frees_resources(four_cpus, tmp_path):
    group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    assert group.wait(30)

    @hpcray.remote(num_cpus=1)
    class InGroup:
        def pid(self):
            return os.getpid()

    @hpcray.remote(num_cpus=1, max_retries=3)
    def sleeper(path):
        open(path, "w").close()
        time.sleep(600)

    actor = InGroup.options(scheduling_strategy=into(group, 0)).remote()
    pid = hpcray.get(actor.pid.remote(), timeout=30)
    started = tmp_path / "started"
    running = sleeper.options(scheduling_strategy=into(group, 1)).remote(str(started))
    while not started.exists():
        hpcray.wait([running], timeout=0.05)
    remove_placement_group(group)
    with pytest.raises(exceptions.RayActorError):
        hpcray.get(actor.pid.remote(), timeout=30)
    with pytest.raises(exceptions.WorkerCrashedError):
        hpcray.get(running, timeout=30)
    with pytest.raises(ProcessLookupError):
        for _ in range(600):  # its process is gone (reaped by the fork server)
            os.kill(pid, 0)
            time.sleep(0.05)
    for _ in range(200):
        if hpcray.available_resources().get("CPU") == 4.0:
            break
        time.sleep(0.05)
    resources = hpcray.available_resources()
    assert resources["CPU"] == 4.0
    assert not [name for name in resources if "_group_" in name]


def test_capture_child_tasks(four_cpus):
    group = placement_group([{"CPU": 2}])
    assert group.wait(30)

    @hpcray.remote(num_cpus=1)
    def parent():
        return hpcray.get(current_group.remote())

    captured = parent.options(scheduling_strategy=into(group, capture=True)).remote()
    assert hpcray.get(captured, timeout=30) == group.id.hex()
    not_captured = parent.options(scheduling_strategy=into(group)).remote()
    assert hpcray.get(not_captured, timeout=30) is None

    @hpcray.remote(num_cpus=1)
    def opted_out():
        return hpcray.get(current_group.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(None)).remote())

    assert hpcray.get(opted_out.options(scheduling_strategy=into(group, capture=True))
                      .remote(), timeout=30) is None
    # A parent that holds its whole 1-CPU bundle lends it while it waits in get: its
    # captured child runs in the same bundle (no other has room), as nested tasks do.
    small = placement_group([{"CPU": 1}])
    assert small.wait(30)
    assert hpcray.get(parent.options(scheduling_strategy=into(small, 0, True)).remote(),
                      timeout=30) == small.id.hex()
    # The legacy options say the same.
    assert hpcray.get(parent.options(placement_group=group,
                                     placement_group_capture_child_tasks=True).remote(),
                      timeout=30) == group.id.hex()


def test_actor_without_cpus_and_detached_group(four_cpus):
    group = placement_group([{"CPU": 1}], lifetime="detached", name="kept")
    assert group.wait(30)

    @hpcray.remote
    class Where:
        def group(self):
            return get_current_placement_group().id.hex()

    actor = Where.options(scheduling_strategy=into(group, 0)).remote()
    assert hpcray.get(actor.group.remote(), timeout=30) == group.id.hex()
    assert placement_group_table(group)["is_detached"] is True
    assert get_current_placement_group() is None  # the driver is in none


def test_argument_errors(four_cpus):
    with pytest.raises(ValueError, match="Invalid placement group strategy"):
        placement_group([{"CPU": 1}], strategy="TIGHT")
    with pytest.raises(ValueError, match="Bundles cannot be an empty dictionary"):
        placement_group([{}])
    with pytest.raises(ValueError, match="non-empty list"):
        placement_group([])
    with pytest.raises(ValueError, match="lifetime"):
        placement_group([{"CPU": 1}], lifetime="forever")
    group = placement_group([{"CPU": 1}])
    with pytest.raises(ValueError, match="placement_group_bundle_index"):
        current_group.options(scheduling_strategy=into(group, 1)).remote()
    # `hpcray.util.placement_group` is the function; the module is importable as well.
    assert hpcray.util.placement_group is placement_group
    assert sys.modules["hpcray.util.placement_group"].placement_group is placement_group
