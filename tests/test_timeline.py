"""hpcray.timeline() and the report page on one node (3 ranks: tests/multinode/
test_timeline_multinode.py)."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

import hpcray
from tests.browser import render


def spans(events, cat=None):
    return [e for e in events if e["ph"] == "X" and (cat is None or e["cat"] == cat)]


@pytest.mark.one_node
def test_timeline_has_every_task_and_call_with_its_worker_and_flows(ray_start, tmp_path):
    @hpcray.remote
    def leaf(seconds):
        time.sleep(seconds)
        return os.getpid()

    @hpcray.remote
    def parent(n):
        return hpcray.get([leaf.remote(0.02) for _ in range(n)]), os.getpid()

    @hpcray.remote
    def fails():
        raise ValueError("no")

    @hpcray.remote
    class Counter:
        def add(self, x):
            return os.getpid()

    leaf_pids, parent_pid = hpcray.get(parent.remote(4))
    with pytest.raises(ValueError):
        hpcray.get(fails.remote())
    counter = Counter.remote()
    actor_pids = set(hpcray.get([counter.add.remote(i) for i in range(5)]))

    events = hpcray.timeline()
    tasks = spans(events, "task")
    by_name = {}
    for event in tasks:
        by_name.setdefault(event["name"].rsplit(".", 1)[-1], []).append(event)
    assert len(by_name["leaf"]) == 4 and len(by_name["parent"]) == 1
    assert sorted(e["tid"] for e in by_name["leaf"]) == sorted(leaf_pids)
    assert by_name["parent"][0]["tid"] == parent_pid
    assert all(e["dur"] >= 20_000 for e in by_name["leaf"])  # microseconds
    assert all(e["pid"] == 0 and e["args"]["node"] == 0 for e in tasks)
    assert [e["args"]["failed"] for e in by_name["fails"]] == [True]
    assert not any(e["args"]["failed"] for e in by_name["leaf"])
    # The parent's slice encloses its children's.
    p = by_name["parent"][0]
    assert all(p["ts"] <= e["ts"] and e["ts"] + e["dur"] <= p["ts"] + p["dur"]
               for e in by_name["leaf"])
    calls = spans(events, "actor_call")
    assert len(calls) == 5 and {e["tid"] for e in calls} == actor_pids
    [constructor] = spans(events, "actor_creation")
    assert constructor["tid"] in actor_pids and constructor["ts"] <= min(e["ts"] for e in calls)
    # One arrow per child, from the parent's worker to the child's.
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert len(starts) == 4 and starts.keys() == ends.keys()
    assert {e["tid"] for e in starts.values()} == {parent_pid}
    assert sorted(e["tid"] for e in ends.values()) == sorted(leaf_pids)
    names = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names[(0, parent_pid)] == f"worker {parent_pid}"

    path = tmp_path / "trace.json"
    assert hpcray.timeline(filename=str(path)) is None
    written = json.loads(path.read_text())
    assert len(spans(written)) == len(spans(events)) + 0  # nothing ran in between


def test_timeline_before_init_raises():
    with pytest.raises(RuntimeError):
        hpcray.timeline()


def run_script(tmp_path, script, env):
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(script))
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=dict(os.environ, **env))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.timeout(200)
def test_records_past_the_bound_are_dropped_and_said(tmp_path):
    out = run_script(tmp_path, """
        import json, hpcray as ray
        ray.init(num_cpus=1)
        @ray.remote
        def f(i):
            return i
        ray.get([f.remote(i) for i in range(12)])
        events = ray.timeline()
        print("SPANS", sum(e["ph"] == "X" for e in events))
        print("NOTES", json.dumps([e["name"] for e in events if e["ph"] == "i"]))
        ray.shutdown()
    """, {"HPCRAY_TIMELINE_EVENTS": "5", "HPCRAY_REPORT": "report.html"})
    assert "SPANS 5" in out
    assert "dropped its oldest records: {'spans': 7}" in out
    page = (tmp_path / "report.html").read_text()
    assert "dropped {&#x27;spans&#x27;: 7}" in page


@pytest.mark.timeout(200)
def test_zero_events_switches_recording_off_but_keeps_the_counts(tmp_path):
    out = run_script(tmp_path, """
        import hpcray as ray
        from hpcray import context
        ray.init(num_cpus=1)
        @ray.remote
        def f(i):
            return ray.get(g.remote(i))
        @ray.remote
        def g(i):
            return i
        assert ray.get([f.remote(i) for i in range(6)]) == list(range(6))
        events = ray.timeline()
        print("SPANS", sum(e["ph"] == "X" for e in events), "FLOWS",
              sum(e["ph"] == "s" for e in events))
        recorder = context.driver_node.recorder
        print("RUN", recorder.counts()["tasks_run"], "KEPT", len(recorder.spans))
        ray.shutdown()
    """, {"HPCRAY_TIMELINE_EVENTS": "0"})
    assert "SPANS 0 FLOWS 0" in out
    assert "RUN 12 KEPT 0" in out


def page_data(page: str) -> dict:
    return json.loads(re.search(r'id="hpcray-data">(.*?)</script>', page, re.S)
                      .group(1).replace("<\\/", "</"))


def summary_of(page: str) -> dict:
    return {key: float(value) for key, value in
            re.findall(r'<td data-key="([a-z_]+)">([0-9.]+)</td>', page)}


@pytest.mark.timeout(300)
def test_report_page_renders_in_a_browser_with_the_jobs_numbers(tmp_path):
    out = run_script(tmp_path, """
        import time, hpcray as ray
        ray.init(num_cpus=2, report="job.html")
        @ray.remote
        def work(i):
            time.sleep(0.01)
            return i
        @ray.remote
        def broken():
            raise KeyError("x")
        @ray.remote
        class Actor:
            def call(self):
                return 1
        ray.get([work.remote(i) for i in range(30)])
        try:
            ray.get(broken.remote())
        except KeyError:
            pass
        actor = Actor.remote()
        ray.get([actor.call.remote() for _ in range(7)])
        kept = ray.put(b"z" * 300_000)  # still referenced when the page is written
        start = time.process_time()  # 1.2 CPU-seconds for the sampler to see, however
        while time.process_time() - start < 1.2:  # long a loaded machine takes to give them
            pass
        print("DONE")
    """, {"HPCRAY_REPORT_INTERVAL": "0.2"})
    assert "DONE" in out
    page_path = tmp_path / "job.html"
    page = page_path.read_text()
    summary = summary_of(page)
    assert summary["tasks"] == 31 and summary["actor_calls"] == 7
    assert summary["actor_creations"] == 1
    assert summary["failures"] == 1 and summary["actors"] == 1 and summary["nodes"] == 1
    assert summary["wall_time_s"] > 1.2
    assert summary["objects_referenced_at_end"] == 1
    assert re.search(r'<td class="site">disabled</td><td class="count">1</td><td>0.286</td>',
                     page)
    # Nothing to fetch: no src/href, no CSS url() or @import.
    assert not re.search(r"\b(src|href)\s*=|url\(|@import", page)
    samples = page_data(page)["samples"]["0"]
    # The readings add up to at least the driver's busy CPU-seconds (fractions of 2 CPUs).
    cpu_seconds = sum(s[1] * (s[0] - before[0]) * 2 for before, s in zip(samples, samples[1:]))
    assert cpu_seconds > 0.9, samples

    dom, pixels = render(page_path, tmp_path)
    assert 'data-rendered="1"' in dom
    assert re.search(r'id="gantt-svg"[^>]*data-spans="39"', dom), dom[:2000]
    assert dom.count('class="span') == 39 and dom.count('class="span failed"') == 1
    assert re.search(r'id="cpu-svg"[^>]*data-series="1"', dom)
    assert re.search(r'id="store-svg"[^>]*data-series="1"', dom)
    # Not blank: many pixels are neither the page's white nor one flat colour.
    flat = pixels.reshape(-1, 3)
    assert (flat != 255).any(axis=1).mean() > 0.05
    assert len({tuple(p) for p in flat[::97]}) > 20


@pytest.mark.timeout(200)
def test_report_counts_retries_worker_deaths_and_actor_restarts(tmp_path):
    run_script(tmp_path, """
        import os, hpcray as ray
        ray.init(num_cpus=1, report="job.html")
        @ray.remote(max_retries=2)
        def dies_once(marker):
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return 1
        @ray.remote(max_restarts=1, max_task_retries=1)
        class Fragile:
            def crash_once(self, marker):
                if not os.path.exists(marker):
                    open(marker, "w").close()
                    os._exit(1)
                return 2
        assert ray.get(dies_once.remote("task.marker")) == 1
        actor = Fragile.remote()
        assert ray.get(actor.crash_once.remote("actor.marker")) == 2
    """, {})
    page = (tmp_path / "job.html").read_text()
    summary = summary_of(page)
    assert summary["retries"] == 2 and summary["worker_deaths"] == 2
    assert summary["actor_restarts"] == 1 and summary["actor_creations"] == 1
    assert summary["tasks"] == 1 and summary["actor_calls"] == 1
    assert summary["failures"] == 0
    # The attempt whose worker died is a failed bar, the retry a good one.
    data = page_data(page)
    name = data["names"].index("__main__.dies_once")
    assert sorted(s[6] for s in data["spans"] if s[4] == name) == [0, 1]


@pytest.mark.timeout(300)
def test_report_draws_gpu_use_from_the_nodes_gpu_source(tmp_path):
    # No GPU here: the node's GPU source (sampler.gpu_utilization, NVML's on a GPU node)
    # is replaced by one that reads a script; the Sampler, the node's timer, the gather,
    # the page and the browser are the real ones. On hardware: tests/gpu.
    out = run_script(tmp_path, """
        import json, time, hpcray as ray
        from hpcray.runtime import sampler

        class TwoScriptedGpus:
            def __init__(self):
                self.reads = 0
            def read(self):
                self.reads += 1  # the first climbs 10% a reading; the second is unreadable once
                return (min(1.0, self.reads / 10), None if self.reads == 2 else 0.5)
            def close(self):
                print("CLOSED", self.reads)

        source = TwoScriptedGpus()
        sampler.gpu_utilization = lambda uuids: source
        ray.init(num_cpus=1, report="job.html")
        deadline = time.monotonic() + 60
        while source.reads < 6 and time.monotonic() < deadline:  # every 0.1 s
            time.sleep(0.01)
    """, {"HPCRAY_REPORT_INTERVAL": "0.1"})
    closed = int(re.search(r"^CLOSED (\d+)$", out, re.M).group(1))
    page_path = tmp_path / "job.html"
    samples = page_data(page_path.read_text())["samples"]["0"]
    gpus = [s[3] for s in samples]
    # Every reading up to the report's gather reached the page, in order (the node may
    # read once more before it closes the source).
    assert 5 <= len(gpus) <= closed
    assert gpus == [[min(1.0, i / 10), None if i == 2 else 0.5]
                    for i in range(1, len(gpus) + 1)]
    dom, pixels = render(page_path, tmp_path)
    assert '<div id="gpu">' in dom  # the section the script adds when a node has GPUs
    match = re.search(r'<svg[^>]*id="gpu-svg"[^>]*data-series="1".*?</svg>', dom, re.S)
    assert match, dom[:3000]
    [line] = re.findall(r'<polyline points="([^"]+)"', match.group(0))
    assert len(line.split()) == len(gpus)  # a point per reading: its readable GPUs' mean


@pytest.mark.timeout(200)
def test_report_has_no_gpu_plot_without_gpus(tmp_path):
    run_script(tmp_path, """
        import hpcray as ray
        from hpcray.runtime import sampler
        assert sampler.gpu_utilization([]) is None  # no GPU: no source
        ray.init(num_cpus=1, report="job.html")
    """, {"HPCRAY_REPORT_INTERVAL": "0.1"})
    page_path = tmp_path / "job.html"
    samples = page_data(page_path.read_text())["samples"]["0"]
    assert samples and all(s[3] == [] for s in samples)
    dom, _pixels = render(page_path, tmp_path)
    assert 'data-rendered="1"' in dom and 'id="cpu-svg"' in dom
    assert '<div id="gpu">' not in dom and 'id="gpu-svg"' not in dom
    # Nothing in the store: its plot's scale still reads as one (0 B, 1 B, 1 B, ... before).
    store_svg = re.search(r'<svg[^>]*id="store-svg".*?</svg>', dom, re.S).group(0)
    ticks = re.findall(r">([\d.]+ (?:B|KiB|MiB|GiB|TiB))</text>", store_svg)
    assert len(ticks) == 5 and len(set(ticks)) == 5, ticks


def test_recorder_keeps_the_last_records_in_order_and_counts_the_rest():
    """The packed rings (recorder.py): growth past their first allocation, wrap-around,
    names, failure flags and what was dropped."""
    from hpcray.runtime.recorder import Recorder
    from hpcray.runtime.specs import NORMAL_TASK, TaskSpec
    from hpcray.serialization import error_bytes

    def spec(i):
        return TaskSpec(i.to_bytes(16, "big"), NORMAL_TASK, None, f"f{i % 3}", (), (), (),
                        (), {}, 0, False, None, None, {})

    failed = [(b"r" * 20, error_bytes(ValueError("no")), (), 0)]
    ok = [(b"r" * 20, b"\x80\x05K\x01.", (), 0)]
    for limit, count in ((1000, 700), (300, 700)):
        recorder = Recorder(0, limit)
        for i in range(count):
            recorder.ran(spec(i), 100 + i, float(i), i + 0.5, failed if i % 7 == 0 else ok)
            recorder.submitted((i + 1).to_bytes(16, "big"), i.to_bytes(16, "big"))
        recorder.died(spec(count), 99, None)
        rows = recorder.rows({})
        kept = min(limit, count + 1)
        assert len(rows["spans"]) == kept and len(rows["submits"]) == min(limit, count)
        assert rows["dropped"] == {"spans": count + 1 - kept,
                                   "submits": count - min(limit, count), "transfers": 0}
        first = count + 1 - kept
        for i, (task_id, name, kind, pid, start, end, fail) in enumerate(rows["spans"][:-1],
                                                                         first):
            assert (task_id, name, kind, pid, start, end, fail) == (
                i.to_bytes(16, "big"), f"f{i % 3}", NORMAL_TASK, 100 + i, float(i), i + 0.5,
                i % 7 == 0)
        assert rows["spans"][-1][1:4] == (f"f{count % 3}", NORMAL_TASK, 99)
        assert rows["spans"][-1][6] is True
        parent, child, _ = rows["submits"][-1]
        assert (parent, child) == (count.to_bytes(16, "big"), (count - 1).to_bytes(16, "big"))
