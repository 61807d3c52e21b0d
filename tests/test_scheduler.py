"""The local scheduler as a state machine: no processes, no sockets, invariants checked."""

import pytest

from hpcray._scheduler import LocalScheduler


def make(cpus=2, workers=2, **extra):
    return LocalScheduler({"CPU": cpus, **extra}, workers, 0, True)


def dispatched(actions):
    return [a[1] for a in actions if a[0] == "dispatch"]


def test_task_waits_for_a_worker_then_dispatches():
    s = make()
    actions = s.task_ready("t1", {"CPU": 1})
    assert actions == [("start_worker",)]
    assert s.worker_started("w1") == [("dispatch", "t1", "w1")]
    assert s.available["CPU"] == 1


def test_resources_bound_concurrency_and_come_back():
    s = make()
    s.worker_starting(), s.worker_starting()
    s.worker_started("w1"), s.worker_started("w2")
    s.worker_starting()
    s.worker_started("w3")
    assert dispatched(s.task_ready("a", {"CPU": 1})) == ["a"]
    assert dispatched(s.task_ready("b", {"CPU": 1})) == ["b"]
    assert dispatched(s.task_ready("c", {"CPU": 1})) == []   # node full, c queued
    assert s.num_queued == 1
    worker_of_a = next(w for w in s.busy_workers)
    actions = s.task_finished(worker_of_a, {"CPU": 1})
    assert dispatched(actions) == ["c"]


def test_two_cpu_task_runs_alone():
    s = make()
    for w in ("w1", "w2"):
        s.worker_starting()
        s.worker_started(w)
    assert dispatched(s.task_ready("big", {"CPU": 2})) == ["big"]
    assert dispatched(s.task_ready("small", {"CPU": 1})) == []
    assert s.available["CPU"] == 0


def test_blocked_worker_lends_its_cpu_and_takes_it_back():
    s = make(cpus=1, workers=1)
    s.worker_starting()
    s.worker_started("w1")
    assert dispatched(s.task_ready("parent", {"CPU": 1})) == ["parent"]
    assert s.task_ready("child", {"CPU": 1}) == []          # no CPU, no new worker
    actions = s.worker_blocked("w1", {"CPU": 1})
    assert actions == [("start_worker",)]                   # CPU lent: start a worker for child
    assert s.worker_started("w2") == [("dispatch", "child", "w2")]
    actions = s.task_finished("w2", {"CPU": 1})
    assert actions == [("retire", "w2")]                    # back to the pool size of 1
    s.worker_unblocked("w1", {"CPU": 1})
    assert s.available["CPU"] == 0
    s.task_finished("w1", {"CPU": 1})
    assert s.available["CPU"] == 1


def test_custom_resources_and_feasibility():
    s = make(special=1)
    assert s.is_feasible({"special": 1})
    assert not s.is_feasible({"special": 2})
    assert not s.is_feasible({"GPU": 1})
    for w in ("w1", "w2"):
        s.worker_starting()
        s.worker_started(w)
    assert dispatched(s.task_ready("x", {"CPU": 0.5, "special": 1})) == ["x"]
    assert dispatched(s.task_ready("y", {"CPU": 0.5, "special": 1})) == []


def test_placement_without_worker_for_actors():
    s = make()
    assert s.task_ready("actor", {"CPU": 2}, False) == [("place", "actor")]
    assert s.available["CPU"] == 0
    s.release({"CPU": 2})
    assert s.available["CPU"] == 2


def test_cancel_removes_a_queued_task():
    s = make()
    s.task_ready("t", {"CPU": 1})
    assert s.cancel("t") is True
    assert s.cancel("t") is False
    assert s.num_queued == 0


def test_dead_worker_returns_resources():
    s = make()
    s.worker_starting()
    s.worker_started("w1")
    s.task_ready("t", {"CPU": 2})
    s.worker_died("w1", {"CPU": 2})
    assert s.available["CPU"] == 2
    assert s.num_workers == 0


def test_many_queued_tasks_dispatch_in_bounded_passes():
    s = make()
    for w in ("w1", "w2"):
        s.worker_starting()
        s.worker_started(w)
    for i in range(20000):
        s.task_ready(i, {"CPU": 1})
    s.validate = False
    done = 0
    while s.num_queued or s.busy_workers:
        worker = next(iter(s.busy_workers))
        done += 1
        s.task_finished(worker, {"CPU": 1})
    assert done == 20000
    s.check_invariants()


def test_invariant_check_catches_corruption():
    s = make()
    s.idle_workers.extend(["w", "w"])
    with pytest.raises(AssertionError):
        s.check_invariants()


# -- the global scheduler ---------------------------------------------------------------
from hpcray._scheduler import GlobalScheduler  # noqa: E402


def cluster(n=4, cpus=2, extra=None):
    g = GlobalScheduler()
    for rank in range(n):
        total = {"CPU": cpus}
        total.update((extra or {}).get(rank, {}))
        g.add_node(rank, total)
    return g


def test_global_spreads_a_burst_by_load():
    g = cluster()
    placed = [g.place({"CPU": 1}) for _ in range(400)]
    counts = [placed.count(r) for r in range(4)]
    assert min(counts) >= 90, counts


def test_global_prefers_the_node_holding_the_arguments():
    g = cluster()
    assert g.place({"CPU": 1}, {2: 100 << 20}) == 2
    # ... unless that node lacks the resources.
    g2 = cluster(extra={3: {"special": 1}})
    assert g2.place({"CPU": 1, "special": 1}, {2: 100 << 20}) == 3


def test_global_infeasible_and_affinity():
    g = cluster()
    assert g.place({"CPU": 3}) == -1
    assert g.place({"GPU": 1}) == -1
    assert g.place({"CPU": 1}, None, ("node", 1, False)) == 1
    g.remove_node(1)
    assert g.place({"CPU": 1}, None, ("node", 1, False)) == -1
    assert g.place({"CPU": 1}, None, ("node", 1, True)) in (0, 2, 3)


def test_global_spread_round_robins():
    g = cluster()
    assert [g.place({"CPU": 0.1}, None, "SPREAD") for _ in range(8)] == [0, 1, 2, 3] * 2


def test_global_reports_replace_estimates():
    g = cluster(n=2)
    for _ in range(10):
        g.place({"CPU": 1})
    g.report(0, {"CPU": 2}, 0)
    g.report(1, {"CPU": 0}, 50)
    assert g.place({"CPU": 1}) == 0


def test_global_counts_placements_a_report_has_not_seen():
    # Node 1 reports "idle, 0 received" while 20 tasks placed on it are still on their
    # way: they must still count, or the next burst piles onto node 1 as well.
    g = cluster(n=2, cpus=1)
    placed = [g.place({"CPU": 1}) for _ in range(40)]
    assert placed.count(1) == 20
    g.report(1, {"CPU": 1}, 0, 0)
    g.report(0, {"CPU": 0}, 19, 20)
    assert g.queued[1] == 20 and g.available[1]["CPU"] == -19
    more = [g.place({"CPU": 1}) for _ in range(10)]
    assert more.count(0) >= 4, more  # not all onto the node that "looked idle"
    g.report(1, {"CPU": 0}, 25, 20 + more.count(1))  # it got them all
    assert g.queued[1] == 25


def test_global_keeps_a_task_on_its_source_between_equals():
    g = cluster(n=4, cpus=1)
    for rank in range(4):
        g.report(rank, {"CPU": 0}, 8, 0)
    assert [g.place({"CPU": 1}, None, None, source) for source in (2, 3)] == [2, 3]
    assert g.place({"CPU": 1}, None, None, 3) != 3  # node 3 is now the busiest
