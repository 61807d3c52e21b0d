"""Lineage pinning on one node (runtime/lineage.py, LineagePins): the specs that a lost
value would need re-run stay in the GCS tasks table while a value downstream is
referenced, and go with it: counted on the owner (object_store_stats) and in the GCS.
Rebuilding after a loss is tested where values can be lost: tests/sim (test_a_node_dies)
and tests/multinode/test_lost_rank.py."""

import pytest

import hpcray
from hpcray import context
from hpcray.util.state import object_store_stats

pytestmark = pytest.mark.timeout(120)


def lineage() -> dict:
    stats = object_store_stats()["cluster"]
    return {key: stats[key] for key in ("lineage_tasks", "lineage_only", "lineage_released")}


def gcs_specs() -> int:
    """Specs the GCS tasks table keeps (one node: its shard is in this process)."""
    node = context.client.nm
    with node.lock:
        node.task_events.flush()
        return sum(1 for task in node.network.gcs_shard.tasks.values()
                   if task.spec is not None)


@hpcray.remote(max_retries=1)
def step(x):
    return x + 1


@hpcray.remote(max_retries=0)
def step_once(x):
    return x + 1


@hpcray.remote
def add(*xs):
    return sum(xs)


def test_a_chain_keeps_its_lineage_while_its_last_link_is_held(ray_start):
    before = lineage()
    x = step.remote(0)
    for _ in range(99):
        x = step.remote(x)  # the previous link's ref goes: only the task holds it
    assert hpcray.get(x) == 100
    now = lineage()
    # The 99 links before are freed, their specs kept for x (which would need them).
    assert now["lineage_tasks"] - before["lineage_tasks"] == 100
    assert now["lineage_only"] - before["lineage_only"] == 99
    assert gcs_specs() >= 100
    del x
    after = lineage()
    assert after["lineage_tasks"] == before["lineage_tasks"]
    assert after["lineage_released"] - now["lineage_released"] == 100
    assert gcs_specs() == 0


def test_tasks_that_cannot_run_again_keep_no_lineage(ray_start):
    # max_retries=0: nothing would re-run them, so the freed links' specs go at once.
    x = step_once.remote(0)
    for _ in range(99):
        x = step_once.remote(x)
    assert hpcray.get(x) == 100
    assert lineage()["lineage_tasks"] == 1 and lineage()["lineage_only"] == 0
    assert gcs_specs() == 1
    del x
    assert lineage()["lineage_tasks"] == 0 and gcs_specs() == 0


def test_shared_arguments_release_each_spec_once(ray_start):
    # a diamond, an argument taken twice, and a held middle value
    a = step.remote(0)
    b, c = step.remote(a), step.remote(a)
    d = add.remote(b, c, b)
    held = step.remote(c)
    del a, b
    assert hpcray.get(d) == 6 and hpcray.get(held) == 3
    assert lineage()["lineage_tasks"] == 5  # a, b, c, d, held
    assert lineage()["lineage_only"] == 2    # a and b: freed, needed by d (and c)
    del d
    assert lineage()["lineage_tasks"] == 3  # held needs c, which needs a
    assert lineage()["lineage_only"] == 1
    del c
    assert lineage()["lineage_tasks"] == 3 and lineage()["lineage_only"] == 2
    del held
    stats = lineage()
    assert stats["lineage_tasks"] == 0 and stats["lineage_released"] >= 5
    assert gcs_specs() == 0


def test_no_ref_held_keeps_no_lineage(ray_start):
    refs = [step.remote(i) for i in range(200)]
    assert hpcray.get(refs) == list(range(1, 201))
    assert lineage()["lineage_tasks"] == 200
    del refs
    assert lineage()["lineage_tasks"] == 0 and gcs_specs() == 0
