"""The local scheduler as a state machine: no processes, no sockets, invariants checked."""

import random

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


# -- idle workers beyond the pool, by time --------------------------------------------
def timed(cpus=1, workers=1, **options):
    return LocalScheduler({"CPU": cpus}, workers, validate=True, **options)


def with_an_extra_worker(s, now):
    """A parent on w1 blocks; its child runs on a second worker w2 and finishes."""
    s.worker_starting()
    s.worker_started("w1", now=now)
    assert dispatched(s.task_ready("parent", {"CPU": 1})) == ["parent"]
    s.task_ready("child", {"CPU": 1})
    assert s.worker_blocked("w1", {"CPU": 1}) == [("start_worker",)]
    assert s.worker_started("w2", now=now) == [("dispatch", "child", "w2")]
    return s.task_finished("w2", {"CPU": 1}, now=None if now is None else now + 0.25)


def test_extra_idle_worker_retires_after_idle_timeout_not_at_once():
    s = timed(idle_timeout=1.0)
    assert with_an_extra_worker(s, now=10.0) == []           # kept warm, not retired
    assert s.idle_workers == ["w2"]
    assert s.next_retire_at() == 11.25
    assert s.retire_idle(11.0) == []                         # idle 0.75 s: too early
    assert s.retire_idle(11.25) == [("retire", "w2")]
    assert s.idle_workers == [] and s.num_workers == 1
    assert s.next_retire_at() is None
    assert s.retire_idle(20.0) == []                         # the pool itself never retires


def test_no_timer_when_no_worker_is_beyond_the_pool():
    s = timed(cpus=2, workers=2)
    for w in ("w1", "w2"):
        s.worker_starting()
        s.worker_started(w, now=1.0)
    assert len(s.idle_workers) == 2
    assert s.next_retire_at() is None                        # an idle node arms nothing
    assert s.retire_idle(100.0) == []
    kept = timed(max_idle_extra=1)                           # one extra kept for good
    with_an_extra_worker(kept, now=0.0)
    assert kept.next_retire_at() is None
    assert kept.retire_idle(100.0) == []
    assert kept.idle_workers == ["w2"]


def test_an_extra_worker_reused_in_time_stays():
    s = timed(idle_timeout=1.0)
    with_an_extra_worker(s, now=10.0)
    actions = s.task_ready("again", {"CPU": 1})              # w1 is still blocked
    assert actions == [("dispatch", "again", "w2")]
    assert s.next_retire_at() is None                        # nobody idle
    s.task_finished("w2", {"CPU": 1}, now=10.9)
    assert s.retire_idle(11.25) == []                        # its idle time restarted
    assert s.next_retire_at() == 11.9
    assert s.retire_idle(11.9) == [("retire", "w2")]


def two_extra_workers(**options):
    """Target pool 1 on 2 CPUs: a parent on w1 blocks, its two children run on w2 and w3,
    which go idle at 0.2 and 0.4."""
    s = timed(cpus=2, workers=1, idle_timeout=1.0, **options)
    s.worker_starting()
    s.worker_started("w1", now=0.0)
    s.task_ready("parent", {"CPU": 1})
    assert s.task_ready("c1", {"CPU": 1}) == [("start_worker",)]   # the free CPU
    assert s.task_ready("c2", {"CPU": 1}) == []
    assert s.worker_blocked("w1", {"CPU": 1}) == [("start_worker",)]
    assert s.num_starting == 2
    assert s.worker_started("w2", now=0.1) == [("dispatch", "c1", "w2")]
    assert s.worker_started("w3", now=0.15) == [("dispatch", "c2", "w3")]
    s.task_finished("w2", {"CPU": 1}, now=0.2)
    s.task_finished("w3", {"CPU": 1}, now=0.4)
    return s


def test_longest_idle_retires_first():
    s = two_extra_workers()
    assert s.idle_workers == ["w2", "w3"]
    assert s.next_retire_at() == 1.2
    assert s.retire_idle(1.3) == [("retire", "w2")]
    assert s.next_retire_at() == 1.4
    assert s.retire_idle(1.4) == [("retire", "w3")]
    assert s.next_retire_at() is None


def test_only_workers_beyond_the_kept_extras_retire():
    s = two_extra_workers(max_idle_extra=1)
    assert s.retire_idle(5.0) == [("retire", "w2")]          # w3 is the one kept extra
    assert s.idle_workers == ["w3"] and s.next_retire_at() is None


def test_time_never_runs_backwards():
    s = timed()
    with_an_extra_worker(s, now=10.0)
    s.worker_died("w2", None)
    s.worker_starting()
    s.worker_started("w3", now=5.0)                          # a stale `now`
    assert s.clock == 10.25


def test_without_a_clock_extras_retire_at_once_as_before():
    s = make(cpus=1, workers=1)
    assert with_an_extra_worker(s, now=None) == [("retire", "w2")]
    assert s.next_retire_at() is None


# -- worker starts in flight -----------------------------------------------------------
def test_several_worker_starts_in_flight_for_lent_cpus():
    s = make(cpus=2, workers=2)
    for w in ("w1", "w2"):
        s.worker_starting()
        s.worker_started(w)
    s.task_ready("p1", {"CPU": 1})
    s.task_ready("p2", {"CPU": 1})
    for i in range(5):
        assert s.task_ready(f"c{i}", {"CPU": 1}) == []       # the node is full
    assert s.worker_blocked("w1", {"CPU": 1}) == [("start_worker",)]
    assert s.worker_blocked("w2", {"CPU": 1}) == [("start_worker",)]
    assert s.num_starting == 2                               # before: one at a time
    assert s.worker_started("w3") == [("dispatch", "c0", "w3")]
    assert s.num_starting == 1                               # 1 CPU free, 1 on its way
    s.worker_started("w4")
    assert s.num_starting == 0 and s.available["CPU"] == 0


def test_worker_starts_bounded_by_free_resources_and_cap():
    s = make(cpus=8, workers=8)
    actions = s.reschedule()
    for i in range(20):
        actions += s.task_ready(i, {"CPU": 2})
    assert actions.count(("start_worker",)) == 4             # 8 CPUs fit four tasks
    assert s.num_starting == 4
    capped = LocalScheduler({"CPU": 8}, 8, 0, True, max_starting=3)
    actions = [a for i in range(20) for a in capped.task_ready(i, {"CPU": 0})]
    assert actions.count(("start_worker",)) == 3             # zero-CPU tasks: the cap
    assert capped.max_starting == 3 and make(cpus=8, workers=8).max_starting == 8


def test_prestarted_workers_count_as_starts_in_flight():
    s = make()
    s.worker_starting(), s.worker_starting()
    assert s.task_ready("a", {"CPU": 1}) == []
    assert s.task_ready("b", {"CPU": 1}) == []
    assert s.num_starting == 2


def test_random_nested_workload_keeps_invariants_and_finishes():
    rng = random.Random(7)
    s = timed(cpus=2, workers=2, idle_timeout=0.05)
    now = 0.0
    starts = 0                                               # start_worker actions pending
    running = {}                                             # worker -> task
    children_left = {}                                       # parent -> children not done
    next_worker = iter(range(10 ** 6))

    def run(actions):
        nonlocal starts
        for action in actions:
            if action[0] == "start_worker":
                starts += 1
            elif action[0] == "dispatch":
                running[action[2]] = action[1]
            elif action[0] == "retire":
                assert action[1] not in running
                s.worker_died(action[1], None)
    for p in range(12):
        run(s.task_ready(("parent", p), {"CPU": 1}))
    finished = 0
    while finished < 12 * 4:
        now += rng.choice([0.001, 0.01, 0.03])
        choice = rng.random()
        if starts and choice < 0.4:
            starts -= 1
            run(s.worker_started(next(next_worker), now=now))
        elif running and choice < 0.9:
            worker = rng.choice(sorted(running))
            task = running[worker]
            if task[0] == "parent" and task not in children_left:
                children_left[task] = 3
                for c in range(3):
                    run(s.task_ready(("child", task[1], c), {"CPU": 1}))
                run(s.worker_blocked(worker, {"CPU": 1}))
            elif task[0] == "parent" and children_left[task] > 0:
                continue                                     # still blocked in get
            else:
                del running[worker]
                if task[0] == "child":
                    parent = ("parent", task[1])
                    children_left[parent] -= 1
                    if children_left[parent] == 0:
                        holder = next(w for w, t in running.items() if t == parent)
                        s.worker_unblocked(holder, {"CPU": 1})
                run(s.task_finished(worker, {"CPU": 1}, now=now))
                finished += 1
        else:
            run(s.retire_idle(now))
            at = s.next_retire_at()
            assert at is None or at > now
        assert s.num_starting == starts
        assert s.num_starting <= s.max_starting
    run(s.retire_idle(now + 1.0))
    assert s.num_queued == 0 and not running
    assert s.num_workers - s.num_starting == 2               # back to the pool size
    assert s.next_retire_at() is None


def test_invariant_check_catches_corruption():
    s = make()
    s.idle_workers.extend(["w", "w"])
    with pytest.raises(AssertionError):
        s.check_invariants()


def test_invariant_check_catches_an_idle_worker_beside_a_ready_task():
    s = make()
    s.task_ready("t", {"CPU": 1})
    s.idle_workers.append("w")                               # missed by a dispatch pass
    with pytest.raises(AssertionError, match="idles while a ready task fits"):
        s.check_invariants()


def test_invariant_check_catches_idle_times_out_of_step():
    s = timed()
    with_an_extra_worker(s, now=1.0)
    s.check_invariants()
    s.idle_since["ghost"] = 1.0
    with pytest.raises(AssertionError, match="idle times"):
        s.check_invariants()
    del s.idle_since["ghost"]
    s.idle_since["w2"] = 5.0                                 # after the clock
    with pytest.raises(AssertionError, match="after the clock"):
        s.check_invariants()


# -- the global scheduler ---------------------------------------------------------------
from hpcray._scheduler import (VIEW_TTL, GlobalScheduler, SpillPolicy,  # noqa: E402
                               overloaded)


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


def test_global_keeps_a_task_on_its_source_until_it_is_overloaded():
    g = cluster(n=4, cpus=1)
    for rank in range(4):
        g.report(rank, {"CPU": 0}, 8, 0, True)  # every node submits tasks of its own
    assert [g.place({"CPU": 1}, None, None, source) for source in (2, 3)] == [2, 3]
    # Node 3 is the busiest now, but by less than SPILL_RATIO x the least + the slack
    # (2 x 8 + 2 = 18): its tasks stay (the old rule sent the 10th to node 0).
    assert [g.place({"CPU": 1}, None, None, 3) for _ in range(9)] == [3] * 9
    assert g.queued[3] == 18
    assert g.place({"CPU": 1}, None, None, 3) == 0  # overloaded
    # Against nodes that only run what is placed on them: the least + the slack.
    g = cluster(n=4, cpus=1)
    for rank in range(4):
        g.report(rank, {"CPU": 0}, 8, 0, rank == 3)
    assert [g.place({"CPU": 1}, None, None, 3) for _ in range(3)] == [3, 3, 0]
    # A node with room beats a busy source; so do its arguments elsewhere.
    g.report(1, {"CPU": 1}, 0, 0)
    assert g.place({"CPU": 1}, None, None, 3) == 1
    assert g.place({"CPU": 1}, {2: 1000}, None, 3) == 2


def test_spill_policy_keeps_unless_overloaded_or_room_elsewhere():
    policy = SpillPolicy(2)
    cpu = {"CPU": 1}
    assert policy.keep(0, True, cpu, 0.0)           # it can start now
    assert not policy.keep(50, True, cpu, 0.0)      # free CPUs, but 50 ahead of it
    # No view yet: as before, it waits here only behind nothing.
    assert policy.keep(0, False, cpu, 0.0) and not policy.keep(1, False, cpu, 0.0)
    policy.update(100.0, 0.0, 150.0, 1.0)           # every node busy, this one 1.5x
    assert policy.keep(300, False, cpu, 1.01)       # the view's loads decide, not 300
    policy.update(100.0, 0.0, 202.0, 1.0)           # 2 x 100 + 2 per CPU: overloaded
    assert not policy.keep(0, False, cpu, 1.01)
    policy.update(100.0, 0.0, 150.0, 1.0, False)    # that node submits nothing itself:
    assert not policy.keep(300, False, cpu, 1.01)   # 100 + 2 is the limit
    policy.update(0.0, 1.0, 0.0, 1.0)               # another node has a CPU free
    assert not policy.keep(1, False, cpu, 1.01)
    assert policy.keep(1, False, {"CPU": 2}, 1.01)  # no room for 2 CPUs there
    policy.update(100.0, 0.0, 100.0, 1.0)
    assert not policy.keep(1, False, cpu, 1.0 + VIEW_TTL + 0.01)  # too old: as before
    assert not policy.keep(1, False, {"CPU": 1, "GPU": 1}, 1.01)  # not a CPU queue
    assert overloaded(4.0, 1.0) and not overloaded(3.9, 1.0)
    assert overloaded(3.0, 1.0, False) and not overloaded(2.9, 1.0, False)


def spread(sources_per_round, nodes=4, rounds=400, report_every=25, fair_share=0.0):
    """Nodes (1 CPU each, busy) route their own tasks with SpillPolicy, the forwarded
    ones placed by GlobalScheduler; nothing drains. `sources_per_round`: the nodes that
    submit one task each round. Loads are reported and views answered every
    `report_every` rounds (stale between). Returns {source: [tasks run on each node]}."""
    g = cluster(n=nodes, cpus=1)
    policies = [SpillPolicy(1, fair_share) for _ in range(nodes)]
    queued = [0] * nodes
    ran = {source: [0] * nodes for source in sources_per_round}
    for step in range(rounds):
        if step % report_every == 0:
            for rank in range(nodes):
                g.report(rank, {"CPU": 0}, queued[rank], None, rank in sources_per_round)
            for rank in range(nodes):
                least, free, own, least_submits = g.view_for(rank)
                policies[rank].update(least, free, own, 0.0, least_submits)
        for source in sources_per_round:
            rank = source
            if not policies[source].keep(queued[source], False, {"CPU": 1}, 0.0):
                rank = g.place({"CPU": 1}, None, None, source)
            queued[rank] += 1
            ran[source][rank] += 1
    return ran


def test_equally_loaded_submitters_keep_their_tasks():
    # A submitter on every node, each node as busy as the others: the old rules (keep
    # only behind an empty queue; the global scheduler returned a task to its source
    # only between exact equals) kept ~1/nodes of each node's tasks there.
    ran = spread([0, 1, 2, 3])
    for source, counts in ran.items():
        assert counts[source] >= 0.95 * sum(counts), ran


def test_one_overloaded_node_spreads_its_tasks():
    # The others only run what is placed on them: the queues are balanced (within the
    # slack), not within SPILL_RATIO.
    ran = spread([2])[2]
    assert min(ran) >= 0.22 * sum(ran) and ran[2] <= 0.28 * sum(ran), ran


def test_a_node_keeps_its_fair_share_of_its_burst():
    # Without the floor the burst is split by queue lengths; a node that drains slower
    # (here: reports that say the others drained everything) would keep little.
    policy = SpillPolicy(1, 0.25)
    policy.update(0.0, 0.0, 10.0, 0.0)               # overloaded against every other
    kept = [policy.keep(1 + i, False, {"CPU": 1}, 0.0) for i in range(400)]
    assert sum(kept) == 100, sum(kept)
    assert policy.keep(0, False, {"CPU": 1}, 0.0)    # queue empty: a new burst
    assert (policy.burst_routed, policy.burst_kept) == (1, 1)
    ran = spread([2], fair_share=0.25)[2]
    assert 0.25 * sum(ran) <= ran[2] <= 0.45 * sum(ran), ran


def test_take_newest_leaves_what_must_stay():
    s = LocalScheduler({"CPU": 1, "GPU": 1}, 1)
    for i in range(6):
        s.task_ready(f"t{i}", {"CPU": 1})
    s.task_ready("g", {"CPU": 1, "GPU": 1})            # not a CPU-only task
    assert s.take_newest(3, lambda key: key != "t4") == ["t5", "t3", "t2"]
    assert [key for key, _ in s.queues[(True, (("CPU", 1.0),), False)]] == ["t0", "t1", "t4"]
    assert s.num_queued == 4  # and "g" still queued
    s.check_invariants()


# ---------------------------------------------------------------- pipelining
def test_a_pipelinable_task_goes_to_the_busy_worker_of_its_class():
    s = make(cpus=1, workers=1)
    s.worker_starting()
    s.worker_started("w")
    assert dispatched(s.task_ready("a", {"CPU": 1}, True, True)) == ["a"]
    assert s.task_ready("b", {"CPU": 1}, True, True) == [("pipeline", "b", "w")]
    assert s.task_ready("c", {"CPU": 1}, True, True) == []     # depth 1: one per worker
    assert s.task_ready("d", {"CPU": 1}) == []                 # not pipelinable: queued
    # a ends: b runs on a's CPU, c is pipelined behind it
    assert s.task_finished("w", {"CPU": 1}) == [("pipeline", "c", "w")]
    assert s.available["CPU"] == 0 and s.pipelined == {"w": [("c", {"CPU": 1})]}
    assert s.task_finished("w", {"CPU": 1}) == []              # b ends, c runs
    assert dispatched(s.task_finished("w", {"CPU": 1})) == ["d"]  # c ends


def test_nothing_is_pipelined_behind_a_task_that_is_not_pipelinable():
    s = make(cpus=1, workers=1)
    s.worker_starting()
    s.worker_started("w")
    assert dispatched(s.task_ready("a", {"CPU": 1})) == ["a"]
    assert s.task_ready("b", {"CPU": 1}, True, True) == []
    assert s.task_ready("g", {"CPU": 1, "GPU": 1}, True, True) == []  # GPUs: never
    assert not s.pipelined


def running_a_with_b_pipelined_and_c_queued():
    s = make(cpus=1, workers=1)
    s.worker_starting()
    s.worker_started("w")
    s.task_ready("a", {"CPU": 1}, True, True)
    s.task_ready("b", {"CPU": 1}, True, True)
    s.task_ready("c", {"CPU": 1}, True, True)
    assert s.pipelined == {"w": [("b", {"CPU": 1})]} and s.num_queued == 1
    return s


def test_a_blocked_worker_gives_back_its_pipelined_task_first_in_line():
    s = running_a_with_b_pipelined_and_c_queued()
    actions = s.worker_blocked("w", {"CPU": 1})
    assert actions[0] == ("revoke", "b", "w")
    assert ("start_worker",) in actions                        # its CPU is lent to b
    s.worker_started("w2")
    assert s.running_class["w2"] and s.pipelined == {"w2": [("c", {"CPU": 1})]}


def test_a_dead_worker_pipelined_task_is_queued_again_first():
    s = running_a_with_b_pipelined_and_c_queued()
    assert s.worker_died("w", {"CPU": 1}) == [("start_worker",)]
    assert s.worker_started("w2") == [("dispatch", "b", "w2"), ("pipeline", "c", "w2")]


def test_a_deeper_pipeline_runs_in_order_and_gives_everything_back():
    s = LocalScheduler({"CPU": 1}, 1, validate=True, pipeline_depth=3)
    s.worker_starting()
    s.worker_started("w")
    assert dispatched(s.task_ready("a", {"CPU": 1}, True, True)) == ["a"]
    for key in "bcd":
        assert s.task_ready(key, {"CPU": 1}, True, True) == [("pipeline", key, "w")]
    assert s.task_ready("e", {"CPU": 1}, True, True) == []     # three at most
    assert s.num_waiting == 4 and s.num_queued == 1
    # a ends: b runs, e joins the pipeline behind d
    assert s.task_finished("w", {"CPU": 1}) == [("pipeline", "e", "w")]
    assert [key for key, _ in s.pipelined["w"]] == ["c", "d", "e"]
    # b blocks in get: c, d, e come back, first in line, in their order
    actions = s.worker_blocked("w", {"CPU": 1})
    assert actions[:3] == [("revoke", "c", "w"), ("revoke", "d", "w"), ("revoke", "e", "w")]
    assert [key for key, _ in s.queues[s.running_class["w"]]] == ["c", "d", "e"]
    s.worker_started("w2")  # the CPU b lent: c runs there, d and e behind it
    assert [key for key, _ in s.pipelined["w2"]] == ["d", "e"]
    assert s.worker_died("w2", {"CPU": 1}) == [("start_worker",)]  # d, e queued again
    assert s.worker_started("w3") == [("dispatch", "d", "w3"), ("pipeline", "e", "w3")]


@pytest.mark.parametrize("depth", [1, 3])
def test_random_pipelined_workload_keeps_invariants_and_runs_each_task_once(depth):
    for seed in range(40):
        pipelined_schedule(seed, depth)


def pipelined_schedule(seed, depth):
    rng = random.Random(seed)
    s = timed(cpus=2, workers=2, idle_timeout=0.05, pipeline_depth=depth)
    now, starts, names = 0.0, 0, iter(range(10 ** 6))
    running, pipelined, blocked, ran = {}, {}, set(), []
    submitted = 60

    def run(actions):
        nonlocal starts
        for action in actions:
            if action[0] == "start_worker":
                starts += 1
            elif action[0] == "dispatch":
                assert action[2] not in running
                running[action[2]] = action[1]
            elif action[0] == "pipeline":
                waiting = pipelined.setdefault(action[2], [])
                assert action[2] in running and len(waiting) < depth
                waiting.append(action[1])
            elif action[0] == "revoke":  # all of them, in the order sent
                assert pipelined[action[2]].pop(0) == action[1]
                if not pipelined[action[2]]:
                    del pipelined[action[2]]
            elif action[0] == "retire":
                assert action[1] not in running
                s.worker_died(action[1], None)
    for t in range(submitted):
        run(s.task_ready(t, {"CPU": 1}, True, rng.random() < 0.7))
    while len(ran) < submitted:
        now += 0.001
        choice = rng.random()
        if starts and choice < 0.3:
            starts -= 1
            run(s.worker_started(next(names), now=now))
        elif running and choice < 0.8:
            worker = rng.choice(sorted(running))
            if worker in blocked:
                blocked.discard(worker)
                s.worker_unblocked(worker, {"CPU": 1})
            ran.append(running.pop(worker))
            if pipelined.get(worker):
                running[worker] = pipelined[worker].pop(0)
                if not pipelined[worker]:
                    del pipelined[worker]
            run(s.task_finished(worker, {"CPU": 1}, now=now))
        elif running and choice < 0.9:
            worker = rng.choice(sorted(running))
            if worker not in blocked:
                blocked.add(worker)
                run(s.worker_blocked(worker, {"CPU": 1}))
                assert worker not in pipelined  # every task pipelined to it came back
        elif running and choice < 0.93:                    # a worker dies
            worker = rng.choice(sorted(running))
            blocked.discard(worker)
            pipelined.pop(worker, None)                    # queued again by the scheduler
            ran.append(running.pop(worker))                # (its task: failed, done)
            run(s.worker_died(worker, {"CPU": 1}))
        elif not running and not starts:
            run(s.reschedule())
        s.check_invariants()
        assert {w: [key for key, _ in waiting] for w, waiting in s.pipelined.items()} \
            == pipelined
    assert sorted(ran) == list(range(submitted)), seed
    assert not s.pipelined and s.num_queued == 0


def test_a_short_queue_is_pipelined_to_every_busy_worker_in_turn():
    # Three tasks for two busy workers: one each, then the third; never all behind one
    # (the other would then go idle while they wait).
    s = LocalScheduler({"CPU": 2}, 2, validate=True, pipeline_depth=4)
    for worker in ("w1", "w2"):
        s.worker_starting()
        s.worker_started(worker)
    assert sorted(dispatched(s.task_ready(k, {"CPU": 1}, True, True)) for k in "ab") == \
        [["a"], ["b"]]
    for key in "cde":  # they arrive while both run
        s.task_ready(key, {"CPU": 1}, True, True)
    assert sorted(len(waiting) for waiting in s.pipelined.values()) == [1, 2]
    assert s.num_queued == 0
