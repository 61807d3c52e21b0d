"""hpcray.timeline() and the report page of a 3-rank job (mpiexec -n 3 python -m hpcray)."""

import json
import re

import pytest

from tests.browser import render
from tests.multinode.test_multinode import run_mpi
from tests.test_timeline import page_data, summary_of

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(300)]

# Every job here: three nodes of one CPU, and on(rank) to place a task on a rank.
ON_RANKS = """
    import json, os, time, numpy as np, hpcray as ray
    from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
    ray.init(num_cpus=1)
    nodes = {n["rank"]: n["NodeID"] for n in ray.nodes()}
    def on(rank):
        return On(nodes[rank], soft=False)
"""

JOB = ON_RANKS + """
    @ray.remote
    def leaf(i):
        time.sleep(0.01)
        return ray.get_runtime_context().get_node_id(), os.getpid()

    @ray.remote
    def parent():  # on rank 1, its children on rank 2
        return ray.get([leaf.options(scheduling_strategy=on(2)).remote(i)
                        for i in range(3)]), os.getpid()

    @ray.remote
    def total(array):  # pulls the array from rank 0's store
        return float(array.sum()), os.getpid()

    @ray.remote
    class Echo:
        def echo(self, x):
            return os.getpid()

    ran = {"leaf": [ray.get(leaf.options(scheduling_strategy=on(r)).remote(r))
                    for r in range(3)]}
    children, parent_pid = ray.get(parent.options(scheduling_strategy=on(1)).remote())
    array = ray.put(np.ones(4 << 20, dtype=np.uint8))  # 4 MiB, on rank 0
    _sum, total_pid = ray.get(total.options(scheduling_strategy=on(1)).remote(array))
    echo = Echo.options(scheduling_strategy=on(2)).remote()
    echo_pids = set(ray.get([echo.echo.remote(i) for i in range(4)]))

    events = ray.timeline()
    # Every rank runs on this host: one clock, nothing shifted.
    assert [e["args"]["clock_offset"] for e in events if e["name"] == "process_name"] \
        == [0.0, 0.0, 0.0]
    rank_of = {v: k for k, v in nodes.items()}
    X = [e for e in events if e["ph"] == "X"]
    tasks = [e for e in X if e["cat"] == "task"]
    assert len(tasks) == 3 + 1 + 3 + 1, len(tasks)
    for node_id, pid in ran["leaf"] + children:
        assert any(e["pid"] == rank_of[node_id] and e["tid"] == pid for e in tasks), pid
    assert any(e["pid"] == 1 and e["tid"] == parent_pid and e["name"].endswith("parent")
               for e in tasks)
    calls = [e for e in X if e["cat"] == "actor_call"]
    assert len(calls) == 4 and {(e["pid"], e["tid"]) for e in calls} == \\
        {(2, p) for p in echo_pids}
    flows = [e for e in events if e["ph"] in "sf"]
    assert sorted((e["ph"], e["pid"]) for e in flows) == [("f", 2)] * 3 + [("s", 1)] * 3
    assert {e["tid"] for e in flows if e["ph"] == "s"} == {parent_pid}
    moves = [e for e in X if e["cat"] == "transfer"]
    assert [(e["args"]["from"], e["args"]["to"], e["pid"]) for e in moves] == [(0, 1, 1)]
    assert moves[0]["args"]["bytes"] >= 4 << 20
    ray.timeline(filename="trace.json")
    assert len(json.load(open("trace.json"))) == len(events)

    @ray.remote
    def look():  # from a task on another rank: every node's spans, its own being run
        return sum(e["ph"] == "X" and e["cat"] == "task" for e in ray.timeline())
    assert ray.get(look.options(scheduling_strategy=on(2)).remote()) == len(tasks)
    tasks.append("look")
    [constructor] = [e for e in X if e["cat"] == "actor_creation"]
    assert (constructor["pid"], constructor["tid"]) == (2, next(iter(echo_pids)))
    print("RAN", json.dumps({"tasks": len(tasks), "calls": len(calls), "actors": 1,
                             "bytes": moves[0]["args"]["bytes"]}))
    time.sleep(0.5)  # a reading of every node after the work
"""


def test_timeline_and_report_cover_every_rank(tmp_path):
    out = run_mpi(tmp_path, 3, JOB, env={"HPCRAY_REPORT": "job.html",
                                         "HPCRAY_REPORT_INTERVAL": "0.25"})
    ran = json.loads(re.search(r"^RAN (.*)$", out, re.M).group(1))
    page_path = tmp_path / "job.html"
    page = page_path.read_text()
    summary = summary_of(page)
    assert summary["tasks"] == ran["tasks"] and summary["actor_calls"] == ran["calls"]
    assert summary["actor_creations"] == summary["actors"] == ran["actors"]
    assert summary["nodes"] == 3 and summary["failures"] == 0
    assert summary["transfers"] == 1 and summary["bytes_moved"] == ran["bytes"]
    assert re.search(rf'data-from="0" data-to="1" data-bytes="{ran["bytes"]}"', page)
    data = page_data(page)
    assert sorted(data["samples"]) == ["0", "1", "2"]
    assert all(len(samples) >= 2 for samples in data["samples"].values())
    assert {span[0] for span in data["spans"]} == {0, 1, 2}

    dom, pixels = render(page_path, tmp_path)
    spans = ran["tasks"] + ran["calls"] + ran["actors"]
    assert re.search(rf'id="gantt-svg"[^>]*data-spans="{spans}"', dom)
    assert dom.count('class="span"') == spans
    assert re.search(r'id="cpu-svg"[^>]*data-series="3"', dom)
    assert re.search(r'id="store-svg"[^>]*data-series="3"', dom)
    flat = pixels.reshape(-1, 3)
    assert (flat != 255).any(axis=1).mean() > 0.05
    assert len({tuple(p) for p in flat[::97]}) > 20


SKEWED_JOB = ON_RANKS + """
    @ray.remote
    def leaf(i):
        return i

    @ray.remote
    def parent():  # on rank 1, its children on rank 2
        return ray.get([leaf.options(scheduling_strategy=on(2)).remote(i) for i in range(3)])

    @ray.remote
    def make():  # on rank 2: a value large enough to go through the store
        return np.ones(1 << 20, dtype=np.uint8)

    @ray.remote
    def total(array):  # on rank 1: pulls it from rank 2
        return int(array.sum())

    assert ray.get(parent.options(scheduling_strategy=on(1)).remote()) == [0, 1, 2]
    made = make.options(scheduling_strategy=on(2)).remote()
    assert ray.get(total.options(scheduling_strategy=on(1)).remote(made)) == 1 << 20
    ray.timeline(filename="trace.json")
    print("DONE")
"""


def test_timeline_aligns_ranks_whose_clocks_are_off(tmp_path):
    # Rank 1's clock runs 30 s ahead, rank 2's 20 s behind, rank 0's 7 s ahead: unaligned,
    # the children on rank 2 would start ~50 s before rank 1 submitted them.
    skews = [7.0, 30.0, -20.0]
    out = run_mpi(tmp_path, 3, SKEWED_JOB, env={"HPCRAY_REPORT": "job.html"},
                  rank_env=[{"HPCRAY_TEST_CLOCK_SKEW": skew} for skew in skews])
    assert "DONE" in out
    events = json.loads((tmp_path / "trace.json").read_text())
    clock = {e["pid"]: (e["args"]["clock_offset"], e["args"]["clock_bound"])
             for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    for rank in (1, 2):  # measured against rank 0's clock, within the stated bound
        offset, bound = clock[rank]
        assert bound < 0.5 and abs(offset - (skews[rank] - skews[0])) <= bound + 1e-3, clock
    assert clock[0] == (0.0, 0.0)

    def slack(*ranks):  # seconds the aligned clocks of these ranks may still differ by
        return sum(clock[rank][1] for rank in ranks) * 1e6  # microseconds
    X = {}
    for e in events:
        if e["ph"] == "X":
            X.setdefault(e["name"].rsplit(".", 1)[-1], []).append(e)
    [parent], leaves = X["parent"], X["leaf"]
    assert parent["pid"] == 1 and {e["pid"] for e in leaves} == {2} and len(leaves) == 3
    # A child never starts before its parent submitted it, and ends before the parent
    # (which waited for it) ends.
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert len(starts) == 3 and starts.keys() == ends.keys()
    for flow_id, submitted in starts.items():
        assert submitted["pid"] == 1 and ends[flow_id]["pid"] == 2
        assert parent["ts"] <= submitted["ts"] <= ends[flow_id]["ts"] + slack(1, 2)
    for leaf in leaves:
        assert leaf["ts"] + leaf["dur"] <= parent["ts"] + parent["dur"] + slack(1, 2)
    # The array is pulled by rank 1 after rank 2 made it; the pull ends after it starts.
    [made] = X["make"]
    [pull] = [e for e in events if e["ph"] == "X" and e["cat"] == "transfer"]
    assert (pull["pid"], pull["args"]["from"]) == (1, 2) and made["pid"] == 2
    assert pull["ts"] + slack(1, 2) >= made["ts"] + made["dur"]
    assert pull["dur"] >= 0
    [consumer] = X["total"]
    assert consumer["ts"] >= pull["ts"] + pull["dur"]  # one node: one clock
    # The report's bars are on the job's time line too: within its wall time.
    data = page_data((tmp_path / "job.html").read_text())
    wall = data["summary"]["wall_time_s"]
    assert all(0 <= span[2] and span[2] + span[3] <= wall for span in data["spans"]), \
        (wall, data["spans"])
    assert all(0 <= sample[0] <= wall + 0.5 for samples in data["samples"].values()
               for sample in samples)
