"""`ray._private.internal_api`: `memory_summary`, as `ray memory --stats-only` prints it,
and `free`.

Only the aggregate object-store stats (spilling included) exist here: hpcray keeps no
call sites, so the per-reference table of `ray memory` is list_objects()'s job.
"""

from __future__ import annotations

from hpcray.util.state import object_store_stats

_MIB = 1024 * 1024


def memory_summary(address=None, group_by: str = "NODE_ADDRESS",
                   sort_by: str = "OBJECT_SIZE", units: str = "B", line_wrap: bool = True,
                   stats_only: bool = False, num_entries=None) -> str:
    """The cluster's object store use and what was spilled and restored, in Ray's words.
    The arguments are Ray's; only the stats are printed, whatever `stats_only` says."""
    totals = object_store_stats()["cluster"]
    used, capacity = totals["used_bytes"], totals["capacity"] or 1
    lines = ["--- Aggregate object store stats across all nodes ---",
             f"Plasma memory usage {used // _MIB} MiB, {totals['num_objects']} objects, "
             f"{100.0 * used / capacity:.1f}% full"]
    if totals["spilled_objects"]:
        lines.append(f"Spilled {totals['spilled_bytes'] // _MIB} MiB, "
                     f"{totals['spilled_objects']} objects, avg write throughput "
                     f"{_rate(totals['written_bytes'], totals['spill_seconds'])} MiB/s")
    if totals["restored_objects"]:
        lines.append(f"Restored {totals['restored_bytes'] // _MIB} MiB, "
                     f"{totals['restored_objects']} objects, avg read throughput "
                     f"{_rate(totals['restored_bytes'], totals['restore_seconds'])} MiB/s")
    return "\n".join(lines) + "\n"


def free(object_refs, local_only: bool = False) -> None:
    """Let go of what this process holds of `object_refs` beyond its own refs: the pins
    of refs it pickled out of band (ray.cloudpickle.dump). Ray's `free` deletes the
    objects from every store at once, even while refs to them live; here an object goes
    when its last ref does, as any other."""
    from hpcray.object_ref import ObjectRef, release_out_of_band
    if isinstance(object_refs, ObjectRef):
        object_refs = [object_refs]
    if not all(isinstance(ref, ObjectRef) for ref in object_refs):
        raise TypeError("free() expects a list of ObjectRefs, got "
                        f"{[type(ref).__name__ for ref in object_refs]}.")
    release_out_of_band([ref.binary() for ref in object_refs])


def _rate(nbytes: int, seconds: float) -> int:
    return int(nbytes / _MIB / seconds) if seconds > 0 else 0
