"""Helpers shared by hpcray's benchmarks: timed loops, process CPU accounting, tables.

What this module is for: the parts of a benchmark that do not depend on which runtime
(hpcray or Ray) is under test, so that every benchmark measures and reports the same way.
What it is not for: anything that calls a runtime's API; that stays in the benchmark.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

try:
    import psutil
except ImportError:  # idle-CPU accounting then reports itself as unavailable
    psutil = None


# --------------------------------------------------------------------------- sizes

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}


def parse_size(text: str) -> int:
    """A size as given on a command line: 512, 10K (10^3), 64Mi (2^20), 1GiB."""
    text = text.strip().upper().removesuffix("B")
    digits = text.rstrip("KMGI")
    return int(float(digits) * _UNITS[text[len(digits):]])


# --------------------------------------------------------------------------- timing


@dataclass
class Rate:
    """Operations per second over several trials; `value` is the median trial."""

    value: float
    trials: list[float] = field(default_factory=list)
    ops: int = 0


def timed_rate(step: Callable[[], int], duration_s: float, trials: int, warmup_s: float) -> Rate:
    """Run `step` (which returns how many operations it did) repeatedly.

    Warm up for `warmup_s`, then do `trials` trials, each running whole steps until
    `duration_s` has passed (at least one step). The median trial is the figure: on a
    shared machine the best trial flatters and the mean is dragged by one bad trial.
    """
    deadline = time.perf_counter() + warmup_s
    while True:
        step()
        if time.perf_counter() >= deadline:
            break
    rates = []
    total_ops = 0
    for _ in range(trials):
        ops = 0
        start = time.perf_counter()
        while True:
            ops += step()
            elapsed = time.perf_counter() - start
            if elapsed >= duration_s:
                break
        rates.append(ops / elapsed)
        total_ops += ops
    return Rate(statistics.median(rates), rates, total_ops)


# --------------------------------------------------------------------------- CPU


def _cpu_seconds(proc) -> float:
    # children_user/children_system are left out on purpose: a reaped child's time
    # lands there, and live children are counted on their own.
    times = proc.cpu_times()
    return times.user + times.system


def _key(proc) -> tuple[int, float]:
    # (pid, create_time) so that a reused pid is never mistaken for the old process.
    return proc.pid, proc.create_time()


def runtime_processes(root_pid: int, also: Callable[[object], bool] | None = None) -> dict:
    """The processes of a runtime: `root_pid`, its descendants, and any process `also` accepts.

    `also` exists for runtimes that daemonize helpers away from the driver's tree (Ray):
    it is called with each other process on the machine and should accept only that
    runtime's own processes.
    """
    if psutil is None:
        return {}
    found = {}
    try:
        root = psutil.Process(root_pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                found[_key(proc)] = proc
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    if also is not None:
        for proc in psutil.process_iter():
            try:
                key = _key(proc)
                if key not in found and also(proc):
                    found[key] = proc
                    for child in proc.children(recursive=True):
                        found.setdefault(_key(child), child)
            except psutil.Error:
                pass
    return found


def measure_idle_cpu(
    root_pid: int, seconds: float, also: Callable[[object], bool] | None = None
) -> dict:
    """CPU used by a runtime's processes while the driver sleeps, as % of one core.

    Processes alive at both ends count their difference; processes born during the
    window count all their time; processes that died during it are lost (their count
    is reported so that a surprising figure can be explained).
    """
    if psutil is None:
        return {"error": "psutil is not installed (pip install psutil)"}
    before = {}
    for key, proc in runtime_processes(root_pid, also).items():
        try:
            before[key] = _cpu_seconds(proc)
        except psutil.Error:
            pass
    start = time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - start
    after_procs = runtime_processes(root_pid, also)
    used = 0.0
    per_process = []
    for key, proc in after_procs.items():
        try:
            now = _cpu_seconds(proc)
            name = " ".join(proc.cmdline()).strip()[:80] or proc.name()
        except psutil.Error:
            continue
        delta = now - before.get(key, 0.0)
        used += delta
        per_process.append((delta, key[0], name))
    per_process.sort(reverse=True)
    return {
        "percent": 100.0 * used / wall,
        "wall_s": wall,
        "processes": len(after_procs),
        "died_during_window": len(set(before) - set(after_procs)),
        "top": [
            {"pid": pid, "cpu_s": round(delta, 4), "cmd": name}
            for delta, pid, name in per_process[:5]
        ],
    }


def alive(keys: Iterable[tuple[int, float]]) -> list:
    """The processes among (pid, create_time) keys that still exist."""
    if psutil is None:
        return []
    left = []
    for pid, created in keys:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.Error:
            pass
    return left


def end_processes(procs: list) -> list[str]:
    """Kill the given processes (ones this benchmark started); say which they were."""
    report = []
    for proc in procs:
        try:
            report.append(f"{proc.pid} {' '.join(proc.cmdline())[:100]}")
            proc.kill()
        except psutil.Error:
            pass  # it ended on its own meanwhile, which is all we wanted
    return report


def machine_facts() -> dict:
    facts = {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}
    if psutil is not None:
        facts["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    return facts


# --------------------------------------------------------------------------- tables


def fmt_number(value: float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells):
        padded = (str(cell).ljust(width) for cell, width in zip(cells, widths))
        return "| " + " | ".join(padded) + " |"

    separator = "| " + " | ".join("-" * width for width in widths) + " |"
    return "\n".join([line(header), separator, *(line(row) for row in rows)])
