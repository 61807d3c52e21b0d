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


def _started(num_gpus: int):
    hpcray.init(num_cpus=4, num_gpus=num_gpus, object_store_memory=128 * 1024 * 1024)
    try:
        yield hpcray
    finally:
        hpcray.shutdown()


@pytest.fixture
def four_cpus():
    yield from _started(0)


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


def test_what_no_bundle_can_hold_is_refused_at_the_call(four_cpus):
    # As Ray: a ValueError from .remote(), not a task that waits forever.
    group = placement_group([{"CPU": 1}, {"CPU": 2}])
    assert group.wait(30)
    with pytest.raises(ValueError, match=r"resource request \{'CPU': 3\} cannot fit into "
                                         "any bundles"):
        current_group.options(num_cpus=3, scheduling_strategy=into(group)).remote()
    # A named bundle must hold it (Ray checks any bundle, then waits forever).
    with pytest.raises(ValueError, match="cannot fit into bundle 0"):
        current_group.options(num_cpus=2, scheduling_strategy=into(group, 0)).remote()

    @hpcray.remote
    class Default:  # placed with 1 CPU, as Ray places an actor without num_cpus
        def group(self):
            return get_current_placement_group().id.hex()

    no_cpu = placement_group([{"memory": 1000}])
    assert no_cpu.wait(30)
    with pytest.raises(ValueError, match="actor requires 1 CPU for creation"):
        Default.options(scheduling_strategy=into(no_cpu)).remote()
    held = Default.options(num_cpus=0, scheduling_strategy=into(no_cpu)).remote()
    assert hpcray.get(held.group.remote(), timeout=30) == no_cpu.id.hex()

    @hpcray.remote(num_cpus=1)
    def parent():  # its captured child asks more than the group's bundles hold
        return hpcray.get(current_group.options(num_cpus=3).remote())

    with pytest.raises(exceptions.RayTaskError, match="cannot fit into any bundles"):
        hpcray.get(parent.options(scheduling_strategy=into(group, capture=True)).remote(),
                   timeout=30)
    # What fits still runs.
    assert hpcray.get(current_group.options(num_cpus=2, scheduling_strategy=into(group, 1))
                      .remote(), timeout=30) == group.id.hex()


@pytest.fixture
def four_fake_gpus():
    # GPUs declared with no hardware: ids 0..3, which workers see in CUDA_VISIBLE_DEVICES.
    yield from _started(4)


@hpcray.remote(num_cpus=0, num_gpus=1)
def gpu_ids():
    ids = hpcray.get_gpu_ids()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(str(i) for i in ids)
    return ids


@pytest.mark.one_node
def test_tasks_and_actors_in_a_gpu_bundle_get_the_bundles_gpus(four_fake_gpus):
    # As Ray: a bundle's GPUs are fixed ids, and what runs in the bundle sees those ids.
    group = placement_group([{"GPU": 1}, {"GPU": 2}], strategy="STRICT_PACK")
    assert group.wait(30)
    first = hpcray.get([gpu_ids.options(scheduling_strategy=into(group, 0)).remote()
                        for _ in range(3)], timeout=60)
    assert len(first[0]) == 1 and first == [first[0]] * 3
    second = hpcray.get(gpu_ids.options(num_gpus=2, scheduling_strategy=into(group, 1))
                        .remote(), timeout=60)
    assert len(second) == 2 and not set(second) & set(first[0])
    # Outside the group: the one GPU no bundle holds.
    outside = hpcray.get(gpu_ids.remote(), timeout=60)
    assert set(outside) == {0, 1, 2, 3} - set(first[0]) - set(second)
    # Any bundle (index -1), a fraction of a GPU, and an actor.
    anywhere = hpcray.get(gpu_ids.options(scheduling_strategy=into(group)).remote(),
                          timeout=60)
    assert set(anywhere) <= set(first[0]) | set(second)
    half = hpcray.get(gpu_ids.options(num_gpus=0.5, scheduling_strategy=into(group, 0))
                      .remote(), timeout=60)
    assert half == first[0]

    @hpcray.remote(num_cpus=0, num_gpus=2)
    class Trainer:
        def ids(self):
            return hpcray.get_gpu_ids()

    trainer = Trainer.options(scheduling_strategy=into(group, 1)).remote()
    assert sorted(hpcray.get(trainer.ids.remote(), timeout=60)) == sorted(second)
    # Removal gives the ids back: a task outside may now take all four.
    remove_placement_group(group)
    assert sorted(hpcray.get(gpu_ids.options(num_gpus=4).remote(), timeout=60)) == [0, 1, 2, 3]


@pytest.mark.one_node
def test_list_placement_groups_has_rays_fields(four_cpus):
    from hpcray.util.state import get_placement_group as state_of, list_placement_groups

    kept = placement_group([{"CPU": 1}, {"CPU": 2}], strategy="PACK", name="kept")
    assert kept.wait(30)
    never = placement_group([{"CPU": 8}], name="never")
    gone = placement_group([{"CPU": 1}])
    assert gone.wait(30)
    remove_placement_group(gone)
    deadline = time.monotonic() + 30
    while placement_group_table(gone)["state"] != "REMOVED":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rows = {row.placement_group_id: row for row in list_placement_groups()}
    job_id = hpcray.get_runtime_context().get_job_id()
    assert {rows[g.id.hex()].state for g in (kept, never, gone)} == \
        {"CREATED", "PENDING", "REMOVED"}
    assert rows[kept.id.hex()].name == "kept" and rows[kept.id.hex()].creator_job_id == job_id
    assert rows[kept.id.hex()].bundles is None  # a detail field, as in Ray
    assert [row.name for row in list_placement_groups(filters=[("state", "=", "PENDING")])] \
        == ["never"]
    detail = state_of(kept.id.hex())
    node_id = hpcray.get_runtime_context().get_node_id()
    assert detail.bundles == [
        {"bundle_id": {"placement_group_id": kept.id.hex(), "bundle_index": 0},
         "unit_resources": {"CPU": 1.0}, "node_id": node_id},
        {"bundle_id": {"placement_group_id": kept.id.hex(), "bundle_index": 1},
         "unit_resources": {"CPU": 2.0}, "node_id": node_id}]
    assert detail.is_detached is False and detail.stats["scheduling_state"] == "FINISHED"
    assert detail["state"] == "CREATED"  # rows read as dicts too
    assert state_of("00" * 18) is None
    remove_placement_group(never)
