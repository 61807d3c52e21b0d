"""Lineage pinning (runtime/lineage.py): what a chain keeps, and what the counting costs.

For chains x_i = step.remote(x_{i-1}) of N links of which the program holds only x_N
(one node, `python benchmarks/lineage_pins.py`): the specs kept (the owner's count and the
GCS tasks table's), the owner's memory for them, and the time the release cascade takes
once x_N is dropped; then a chain whose tasks cannot be re-run (max_retries=0), which
keeps one. Last, the bookkeeping per task on the submit path: LineagePins.submitted and
freed of a one-argument task, in microseconds (timeit, best of 5).
"""

from __future__ import annotations

import sys
import time
import timeit
import tracemalloc

import hpcray
from hpcray import context, ids
from hpcray.runtime.lineage import LineagePins
from hpcray.runtime.specs import NORMAL_TASK, TaskSpec
from hpcray.util.state import object_store_stats


@hpcray.remote(max_retries=3)
def step(x):
    return x + 1


def kept() -> tuple[int, int, int]:
    """(specs the owner keeps, of them kept only for a task downstream, specs in the GCS)."""
    stats = object_store_stats()["cluster"]
    node = context.client.nm
    with node.lock:
        node.task_events.flush()
        in_gcs = sum(1 for t in node.network.gcs_shard.tasks.values() if t.spec is not None)
    return stats["lineage_tasks"], stats["lineage_only"], in_gcs


def chain(fn, links: int):
    x = fn.remote(0)
    for _ in range(links - 1):
        x = fn.remote(x)
    assert hpcray.get(x) == links
    return x


def pin_bytes() -> int:
    """The owner's memory for its pins (tracemalloc of the table's _Pin objects)."""
    node = context.client.nm
    snapshot = tracemalloc.take_snapshot()
    stats = snapshot.filter_traces([tracemalloc.Filter(True, "*lineage.py")]).statistics("filename")
    del node
    return sum(stat.size for stat in stats)


def bookkeeping_us() -> list:
    class _Events:
        def deleted(self, task_id):
            pass

    pins = LineagePins(_Events())
    specs = []
    previous = None
    for _ in range(10_000):
        task_id = ids.new_task_id()
        ret = ids.object_id_for(task_id, 1)
        contained = [previous] if previous else []
        specs.append(TaskSpec(task_id, NORMAL_TASK, b"f", "f", ("inline", b""), contained,
                              contained, [ret], {}, 3))
        previous = ret

    def run():
        for spec in specs:
            pins.submitted(spec)
        for spec in reversed(specs):
            pins.freed(spec.return_ids[0])

    live: dict = {}

    def counts_only():  # what it replaces: a count of each task's returns not yet freed
        for spec in specs:
            live[spec.task_id] = len(spec.return_ids)
        for spec in reversed(specs):
            task_id = spec.return_ids[0][:ids.TASK_ID_SIZE]
            left = live.get(task_id)
            if left > 1:
                live[task_id] = left - 1
            else:
                del live[task_id]

    per_task = [min(timeit.repeat(fn, number=1, repeat=5)) / len(specs) * 1e6
                for fn in (run, counts_only)]
    return per_task


def main() -> None:
    tracemalloc.start()
    hpcray.init(num_cpus=2)
    print(f"{'links':>7} {'kept':>6} {'only':>6} {'in GCS':>7} {'owner KiB':>10} "
          f"{'release ms':>11} {'kept after':>11}")
    for links in (10, 100, 1000, 5000):
        base = pin_bytes()
        x = chain(step, links)
        owner, only, in_gcs = kept()
        size = pin_bytes() - base
        start = time.perf_counter()
        del x
        after = kept()
        elapsed = (time.perf_counter() - start) * 1000
        print(f"{links:>7} {owner:>6} {only:>6} {in_gcs:>7} {size / 1024:>10.1f} "
              f"{elapsed:>11.1f} {after[0]:>11}")
    x = chain(step.options(max_retries=0), 1000)
    print(f"max_retries=0, 1000 links: kept {kept()[0]}, in GCS {kept()[2]}")
    del x
    hpcray.shutdown()
    pins_us, counts_us = bookkeeping_us()
    print(f"bookkeeping per task (submitted + freed): {pins_us:.2f} us; the count of live "
          f"returns it replaces: {counts_us:.2f} us")


if __name__ == "__main__":
    sys.exit(main())
