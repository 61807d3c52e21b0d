"""The report page of a batch job: one self-contained HTML file written at shutdown.

`init(report="job.html")` or HPCRAY_REPORT=job.html: when the driver shuts down, it
gathers every node's records (runtime/recorder.py, the same StateQuery as
`hpcray.timeline()`; the CPU/GPU/store readings of runtime/sampler.py) and writes a
page with no outside reference: its script (report_page.js, inlined) draws SVG from
the data embedded in the page; nothing is fetched when it is opened.

    summary        tasks, actor calls and constructors run, failures, retries, actor
                   restarts, worker deaths, reconstructions, spills, transfers, wall
                   time; every other counter a node recorded; the slowest task kinds
                   (by total time)
    Gantt          a row per node and worker, a bar per task attempt (failed: red)
    utilization    CPU (and GPU, where a node has one) use per node over time
    object store   bytes used per node over time
    transfers      bytes pulled between nodes, as a from x to table
    objects        the references still held when the page was written (the driver's,
                   workers', pending tasks'), as `summarize_objects()` groups them: by
                   call site with RAY_record_ref_creation_sites=1, else one group

The summary is written as HTML (readable without the script), each figure with a
`data-key`; the script draws the plots. Not for: live monitoring (it is written once).
"""

from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path

from hpcray.runtime import clock
from hpcray.runtime.recorder import KINDS

log = logging.getLogger("hpcray.report")

MAX_DRAWN_SPANS = 20_000  # the Gantt draws at most this many (the longest); counts are all
SLOWEST_KINDS = 10


def write_report(path: str, parts: list[dict], actors: list, started: float,
                 ended: float | None = None, objects: dict | None = None) -> dict:
    """Write the page to `path` from every node's Recorder.rows(), the GCS actor rows
    ([(actor id, ActorInfo)]) and summarize_objects()'s "cluster" part; -> the summary
    it shows."""
    ended = clock.now() if ended is None else ended
    data = report_data(parts, actors, started, ended)
    objects = objects or {"summary": {}, "total_objects": 0, "total_size_mb": 0.0}
    data["summary"]["objects_referenced_at_end"] = objects["total_objects"]
    script = (Path(__file__).with_name("report_page.js")).read_text()
    page = _PAGE.format(
        title=html.escape(f"hpcray job {os.path.basename(path)}"),
        summary=_summary_html(data["summary"]), slowest=_slowest_html(data["slowest"]),
        transfers=_transfers_html(data["transfers"], len(data["nodes"])),
        objects=_objects_html(objects),
        notes=_notes_html(data["notes"]),
        data=json.dumps(data, separators=(",", ":")).replace("</", "<\\/"),
        script=script.replace("</", "<\\/"))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as out:
        out.write(page)
    os.replace(tmp, path)
    return data["summary"]


def report_data(parts: list[dict], actors: list, started: float, ended: float) -> dict:
    parts = sorted(parts, key=lambda p: p["rank"])
    names: dict[str, int] = {}
    spans = []
    last_attempt: dict[bytes, tuple] = {}  # task id -> (start, kind, failed) of its last
    per_name: dict[str, list] = {}         # name -> [attempts, seconds, longest]
    counters: dict[str, int] = {}
    transfers: dict[tuple, list] = {}
    notes = []
    for part in parts:
        rank = part["rank"]
        for task_id, name, kind, pid, start, end, failed in part["spans"]:
            index = names.setdefault(name, len(names))
            spans.append([rank, pid, round(start - started, 6), round(end - start, 6), index,
                          kind, 1 if failed else 0])
            seen = last_attempt.get(task_id)
            if seen is None or seen[0] <= start:
                last_attempt[task_id] = (start, kind, failed)
            stats = per_name.setdefault(name, [0, 0.0, 0.0])
            stats[0] += 1
            stats[1] += end - start
            stats[2] = max(stats[2], end - start)
        for name, value in part["counters"].items():
            counters[name] = counters.get(name, 0) + value
        for _oid, source, dest, size, _start, _end in part["transfers"]:
            moved = transfers.setdefault((source, dest), [0, 0])
            moved[0] += size
            moved[1] += 1
        for name, value in part["store"].items():
            if "spill" in name:
                counters[name] = counters.get(name, 0) + value
        dropped = {k: v for k, v in part["dropped"].items() if v}
        if dropped:
            notes.append(f"node {rank} kept only its last {len(part['spans'])} task "
                         f"records: it dropped {dropped} (HPCRAY_TIMELINE_EVENTS)")
    if len(spans) > MAX_DRAWN_SPANS:
        notes.append(f"the Gantt chart draws the {MAX_DRAWN_SPANS} longest of "
                     f"{len(spans)} task attempts")
        drawn = sorted(spans, key=lambda s: -s[3])[:MAX_DRAWN_SPANS]
    else:
        drawn = spans
    ran = [kind for _start, kind, _failed in last_attempt.values()]
    summary = {
        "tasks": sum(1 for kind in ran if KINDS.get(kind) == "task"),
        "actor_calls": sum(1 for kind in ran if KINDS.get(kind) == "actor_call"),
        "actor_creations": sum(1 for kind in ran if KINDS.get(kind) == "actor_creation"),
        "attempts": len(spans),
        "failures": sum(1 for _s, _k, failed in last_attempt.values() if failed),
        "retries": counters.pop("retries", 0),
        "actor_restarts": max(counters.pop("actor_restarts", 0),
                              sum(getattr(info, "num_restarts", 0) or 0
                                  for _id, info in actors)),
        "actors": len(actors),
        "worker_deaths": counters.pop("worker_deaths", 0),
        "reconstructions": counters.pop("reconstructions", 0),
        "spills": sum(v for k, v in counters.items() if "spill" in k and "byte" not in k),
        "transfers": sum(count for _bytes, count in transfers.values()),
        "bytes_moved": sum(size for size, _count in transfers.values()),
        "nodes": len(parts),
        "wall_time_s": round(ended - started, 3),
    }
    summary.update({k: v for k, v in counters.items() if k not in summary})
    slowest = sorted(([name, count, round(total, 6), round(total / count, 6),
                       round(longest, 6)]
                      for name, (count, total, longest) in per_name.items()),
                     key=lambda row: -row[2])[:SLOWEST_KINDS]
    nodes = []
    samples = {}
    for part in parts:
        sampled = part.get("samples") or {}
        nodes.append({"rank": part["rank"], "host": part["host"],
                      "cpus": sampled.get("cpus"), "capacity": sampled.get("capacity",
                      part["store"].get("capacity"))})
        samples[part["rank"]] = [[round(t - started, 3), round(cpu, 4), used, list(gpu)]
                                 for t, cpu, used, gpu, _counters
                                 in sampled.get("samples", ())]
    return {"started": started, "wall": ended - started, "nodes": nodes,
            "names": list(names), "spans": drawn, "samples": samples,
            "transfers": [[s, d, b, c] for (s, d), (b, c) in sorted(transfers.items())],
            "summary": summary, "slowest": slowest, "notes": notes}


_LABELS = {"tasks": "tasks", "actor_calls": "actor calls",
           "actor_creations": "actors constructed", "attempts": "attempts run",
           "failures": "failed (tasks and calls)", "retries": "retries",
           "actor_restarts": "actor restarts", "actors": "actors",
           "worker_deaths": "worker deaths", "reconstructions": "reconstructions",
           "spills": "spills", "transfers": "object transfers",
           "bytes_moved": "bytes moved between nodes", "nodes": "nodes",
           "wall_time_s": "wall time (s)", "tasks_run": "attempts ended",
           "bytes_pulled": "bytes pulled by nodes", "bytes_sent": "bytes sent by nodes",
           "objects_referenced_at_end": "objects referenced at the end"}


def _summary_html(summary: dict) -> str:
    rows = "".join(f'<tr><th>{html.escape(_LABELS.get(key, key))}</th>'
                   f'<td data-key="{html.escape(key)}">{value}</td></tr>'
                   for key, value in summary.items())
    return f'<table class="summary" id="summary">{rows}</table>'


def _slowest_html(slowest: list) -> str:
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{count}</td><td>{total:.3f}</td>"
                   f"<td>{mean * 1000:.2f}</td><td>{longest * 1000:.2f}</td></tr>"
                   for name, count, total, mean, longest in slowest)
    return ('<table class="slowest" id="slowest"><tr><th>task kind</th><th>attempts</th>'
            '<th>total s</th><th>mean ms</th><th>max ms</th></tr>' + rows + "</table>")


def _transfers_html(transfers: list, num_nodes: int) -> str:
    moved = {(s, d): (b, c) for s, d, b, c in transfers}
    head = "".join(f"<th>to {d}</th>" for d in range(num_nodes))
    body = ""
    for s in range(num_nodes):
        cells = ""
        for d in range(num_nodes):
            size, count = moved.get((s, d), (0, 0))
            cells += (f'<td data-from="{s}" data-to="{d}" data-bytes="{size}">'
                      f'{_size(size)}<small> ({count})</small></td>' if count else "<td>-</td>")
        body += f"<tr><th>from {s}</th>{cells}</tr>"
    return f'<table class="transfers" id="transfers"><tr><th></th>{head}</tr>{body}</table>'


def _objects_html(objects: dict) -> str:
    rows = "".join(
        f'<tr><td class="site">{html.escape(site)}</td>'
        f'<td class="count">{group["total_objects"]}</td>'
        f'<td>{group["total_size_mb"]:.3f}</td><td>{group["total_num_workers"]}</td>'
        f'<td>{group["total_num_nodes"]}</td>'
        f'<td>{html.escape(_counts(group["task_state_counts"]))}</td>'
        f'<td>{html.escape(_counts(group["ref_type_counts"]))}</td></tr>'
        for site, group in sorted(objects["summary"].items(),
                                  key=lambda item: -item[1]["total_size_mb"]))
    return ('<table class="objects" id="objects"><tr><th>call site</th><th>references'
            '</th><th>MiB</th><th>processes</th><th>nodes</th><th>task states</th>'
            '<th>reference types</th></tr>' + rows + "</table>")


def _counts(counts: dict) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))


def _notes_html(notes: list) -> str:
    return "".join(f'<p class="note">{html.escape(note)}</p>' for note in notes)


def _size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 16px; color: #222; background: #fff; }}
h1 {{ font-size: 18px; }} h2 {{ font-size: 15px; margin-top: 24px; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 2px 8px; text-align: right; }}
table.summary th, table.slowest td:first-child, td.site {{ text-align: left; }}
tr:nth-child(even) {{ background: #f3f3f3; }} .note {{ color: #a33; }}
svg {{ display: block; border: 1px solid #ddd; background: #fcfcfc; }}
svg text {{ font-size: 10px; fill: #444; }} .legend span {{ margin-right: 12px; }}
</style></head><body>
<h1>{title}</h1>
{notes}
<h2>Summary</h2>{summary}
<h2>Slowest task kinds</h2>{slowest}
<h2>Tasks per node and worker</h2><div id="gantt"></div>
<h2>CPU use per node</h2><div id="cpu"></div>
<div id="gpu-section"></div>
<h2>Object store use per node</h2><div id="store"></div>
<h2>Bytes moved between nodes</h2>{transfers}
<h2>Objects still referenced at the end, by call site</h2>
<p>As <code>hpcray.util.state.summarize_objects()</code> groups them; call sites are
recorded with <code>RAY_record_ref_creation_sites=1</code>, else one group, "disabled".</p>
{objects}
<script type="application/json" id="hpcray-data">{data}</script>
<script>{script}</script>
</body></html>
"""


GATHER_TIMEOUT = 60.0


def write_job_report(client, node) -> None:
    """At the driver's shutdown, while every node still runs: gather and write the page
    to the job's config.report. A failure is logged, never raised: the job's own
    outcome must not depend on its report."""
    from hpcray.util.state import summarize_objects
    path = node.config.report
    try:
        parts = client.list_state("timeline", timeout=GATHER_TIMEOUT)
        actors = client.list_state("actors", timeout=GATHER_TIMEOUT)
        objects = summarize_objects(timeout=GATHER_TIMEOUT)["cluster"]
        summary = write_report(path, parts, actors, node.recorder.started,
                               objects=objects)
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("the job's report page could not be written to %s", path)
        return
    log.info("report page written to %s: %s", path, summary)
