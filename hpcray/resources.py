"""What one node (one MPI rank) offers the scheduler: CPUs, GPUs, memory, custom resources.

For: detection at node-manager start-up, with ``init()`` arguments overriding it, and
the ``CUDA_VISIBLE_DEVICES`` value a worker gets for the GPUs assigned to it.
Not for: accounting (the scheduler's job) or anything that touches a GPU. GPUs are
enumerated through NVML only, loaded with ctypes: no CUDA context is ever created,
because ``cuInit`` is slow, takes GPU memory and breaks CUDA in forked workers, and
no torch/cupy import. A node with no driver simply has zero GPUs, never an error.

This module is standard library only and imports nothing else from hpcray, so the
launcher can use it before the runtime is loaded.

Why workers get UUIDs: ``CUDA_VISIBLE_DEVICES`` indices are CUDA ordinals, and CUDA's
default order (``CUDA_DEVICE_ORDER=FASTEST_FIRST``) differs from NVML's (PCI bus order)
on nodes with mixed GPU models. A UUID names the same device to NVML, CUDA and every
library, whatever ``CUDA_DEVICE_ORDER`` the worker runs with, so
:func:`gpu_visible_devices_value` always hands out UUIDs. The indices that we *read*
(from ``CUDA_VISIBLE_DEVICES`` or Slurm) are taken as NVML indices: right on
homogeneous nodes (CUDA breaks ties by PCI bus id) and under
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, which is what Slurm assumes too.

Environment read here (the defaults are "unset"):

- ``CUDA_VISIBLE_DEVICES``: filters the GPUs, with CUDA's own parsing rules.
- ``SLURM_STEP_GPUS`` / ``SLURM_JOB_GPUS``: filter the GPUs when the former is unset.
- ``SLURM_CPUS_PER_TASK``: caps the CPU count.
- Ranks sharing a host (``MPI_LOCALNRANKS``/``MPI_LOCALRANKID`` from MPICH's Hydra,
  ``OMPI_COMM_WORLD_LOCAL_SIZE``/``_LOCAL_RANK`` from Open MPI, ``SLURM_LOCALID`` with
  ``SLURM_STEP_TASKS_PER_NODE``/``SLURM_NODEID`` from srun): each rank is a node, so
  they split the host instead of each claiming all of it. Memory is divided; CPUs are
  divided when the launcher did not bind the rank to its own CPUs. GPUs are not dealt
  from the environment: at job start the ranks tell rank 0 which GPUs (by UUID) they
  see, and :func:`deal_host_gpus` gives each GPU of a host to one rank only, so a
  ``CUDA_VISIBLE_DEVICES`` that every rank of a node inherits (``srun
  --gpus-per-node``) is split, and GPUs the launcher bound per task stay where they are.
- ``HPCRAY_RESOURCES``: a JSON object of this rank's custom resources, e.g.
  ``'{"special": 2}'``; ``init(resources=...)`` wins key by key.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "GpuDevice",
    "NodeResources",
    "detect_gpus",
    "detect_memory_bytes",
    "detect_node_resources",
    "host_share",
    "detect_num_cpus",
    "deal_host_gpus",
    "gpu_visible_devices_value",
    "list_nvml_devices",
    "parse_visible_devices",
]

# Keys Ray reserves: they are set with num_cpus=/num_gpus= (or detected), never as custom.
_RESERVED_KEYS = ("CPU", "GPU", "memory")


# ---------------------------------------------------------------------------- CPUs


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def detect_num_cpus(environ: Mapping[str, str] = os.environ) -> int:
    """The CPUs this process may run on: its affinity mask, capped by Slurm's
    ``SLURM_CPUS_PER_TASK`` when set; at least 1."""
    try:
        num_cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (macOS)
        num_cpus = os.cpu_count() or 1
    per_task = _int_or_none(environ.get("SLURM_CPUS_PER_TASK"))
    if per_task is not None and per_task > 0:
        num_cpus = min(num_cpus, per_task)
    return max(1, num_cpus)


# ------------------------------------------------------------------ ranks per host


def _tasks_on_node(tasks_per_node: str, node_index: int) -> int | None:
    """Slurm's compressed count list ("2(x3),1") at `node_index`."""
    index = 0
    for item in tasks_per_node.split(","):
        count, _, repeat = item.partition("(x")
        try:
            count_value = int(count)
            times = int(repeat.rstrip(")")) if repeat else 1
        except ValueError:
            return None
        if node_index < index + times:
            return count_value
        index += times
    return None


def host_share(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(this rank's index among the ranks on its host, how many there are), as the
    launcher tells it; (0, 1) when it does not, and in a process a rank started (which
    inherits the launcher's variables but shares the host with nobody)."""
    from hpcray.runtime.rank_child import child_of_a_rank
    if child_of_a_rank(environ):
        return 0, 1
    for rank_key, size_key in (("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
                               ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")):
        local_rank = _int_or_none(environ.get(rank_key))
        local_size = _int_or_none(environ.get(size_key))
        if local_rank is not None and local_size:
            return local_rank, local_size
    local_rank = _int_or_none(environ.get("SLURM_LOCALID"))
    node_index = _int_or_none(environ.get("SLURM_NODEID"))
    tasks = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if local_rank is not None and node_index is not None and tasks:
        local_size = _tasks_on_node(tasks, node_index)
        if local_size:
            return local_rank, local_size
    return 0, 1


def _unbound(environ: Mapping[str, str]) -> bool:
    """True when this rank may run on every CPU of the host (no binding, no Slurm cap)."""
    try:
        bound = len(os.sched_getaffinity(0)) < (os.cpu_count() or 1)
    except (AttributeError, OSError):
        bound = False
    return not bound and not environ.get("SLURM_CPUS_PER_TASK")


# -------------------------------------------------------------------------- memory


def _read_limit(path: str) -> int | None:
    """A cgroup memory limit file's value; None when absent, unreadable or "max"."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return _int_or_none(text)  # "max" (no limit) -> None


def _cgroup_memory_limit(proc_self_cgroup: str, root: str = "/sys/fs/cgroup") -> int | None:
    """The smallest memory limit over this process's cgroup and its ancestors.

    cgroup v2 (``0::/path`` -> ``root/path/memory.max``), else v1's memory controller
    (``memory.limit_in_bytes``, whose "unlimited" is a huge number that min() ignores
    against physical memory). A limit on a parent cgroup binds as well, hence the walk
    up. Inside a container the path in /proc/self/cgroup may not exist in the mounted
    tree (the container sees its own cgroup as the root): those paths are skipped.
    """
    v2_path = v1_path = None
    for line in proc_self_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    candidates = []
    if v2_path is not None and os.path.exists(os.path.join(root, "cgroup.controllers")):
        candidates.append((root, v2_path, "memory.max"))
    if v1_path is not None:
        candidates.append((os.path.join(root, "memory"), v1_path, "memory.limit_in_bytes"))
    limits = []
    for base, path, name in candidates:
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            limit = _read_limit(os.path.join(base, *parts[:depth], name))
            if limit is not None and limit > 0:
                limits.append(limit)
    return min(limits) if limits else None


def detect_memory_bytes() -> int:
    """Physical memory available to this process: the machine's RAM, or the cgroup
    memory limit where that is set and smaller."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        physical = 0
    try:
        with open("/proc/self/cgroup") as f:
            limit = _cgroup_memory_limit(f.read())
    except OSError:
        limit = None
    if limit is not None and (physical <= 0 or limit < physical):
        return limit
    return max(physical, 0)


# ---------------------------------------------------------------------------- GPUs


@dataclass(frozen=True)
class GpuDevice:
    """One GPU as NVML reports it. ``index`` is the NVML index (for a MIG instance:
    its parent GPU's); ``uuid`` is ``GPU-...`` (or ``MIG-...``); memory in bytes."""

    index: int
    uuid: str
    name: str
    memory_total: int


class _NvmlMemory(ctypes.Structure):
    _fields_ = [
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


class _NvmlError(Exception):
    pass


_NVML_SUCCESS = 0
_NVML_ERROR_NOT_FOUND = 6
_NVML_DEVICE_MIG_ENABLE = 1
_NVML_BUFFER_SIZE = 96  # NVML_DEVICE_NAME_V2_BUFFER_SIZE, >= NVML_DEVICE_UUID_V2_BUFFER_SIZE


def _nvml_call(nvml: ctypes.CDLL, name: str, *args) -> None:
    status = getattr(nvml, name)(*args)
    if status != _NVML_SUCCESS:
        raise _NvmlError(f"{name} returned NVML status {status}")


def _nvml_describe(nvml: ctypes.CDLL, handle: ctypes.c_void_p, index: int) -> GpuDevice:
    name = ctypes.create_string_buffer(_NVML_BUFFER_SIZE)
    uuid = ctypes.create_string_buffer(_NVML_BUFFER_SIZE)
    memory = _NvmlMemory()
    _nvml_call(nvml, "nvmlDeviceGetName", handle, name, ctypes.c_uint(_NVML_BUFFER_SIZE))
    _nvml_call(nvml, "nvmlDeviceGetUUID", handle, uuid, ctypes.c_uint(_NVML_BUFFER_SIZE))
    _nvml_call(nvml, "nvmlDeviceGetMemoryInfo", handle, ctypes.byref(memory))
    return GpuDevice(
        index=index,
        uuid=uuid.value.decode("ascii", "replace"),
        name=name.value.decode("utf-8", "replace"),
        memory_total=int(memory.total),
    )


def _nvml_mig_instances(
    nvml: ctypes.CDLL, handle: ctypes.c_void_p, index: int
) -> list[GpuDevice] | None:
    """The MIG instances of a MIG-enabled GPU, or None when MIG is off or unsupported
    (drivers before R450 lack the calls; non-A100-class GPUs say NOT_SUPPORTED).

    CUDA cannot run on a MIG-enabled GPU as a whole, only on its instances, so these
    replace the parent in the device list.
    """
    current, pending = ctypes.c_uint(0), ctypes.c_uint(0)
    try:
        _nvml_call(nvml, "nvmlDeviceGetMigMode", handle, ctypes.byref(current),
                   ctypes.byref(pending))
    except (_NvmlError, AttributeError):
        return None
    if current.value != _NVML_DEVICE_MIG_ENABLE:
        return None
    max_count = ctypes.c_uint(0)
    _nvml_call(nvml, "nvmlDeviceGetMaxMigDeviceCount", handle, ctypes.byref(max_count))
    instances = []
    for slot in range(max_count.value):
        mig_handle = ctypes.c_void_p()
        status = nvml.nvmlDeviceGetMigDeviceHandleByIndex(
            handle, ctypes.c_uint(slot), ctypes.byref(mig_handle))
        if status == _NVML_ERROR_NOT_FOUND:  # an empty slot
            continue
        if status != _NVML_SUCCESS:
            raise _NvmlError(f"nvmlDeviceGetMigDeviceHandleByIndex returned {status}")
        instances.append(_nvml_describe(nvml, mig_handle, index))
    return instances


def list_nvml_devices() -> list[GpuDevice]:
    """Every GPU NVML reports, in NVML order, ignoring ``CUDA_VISIBLE_DEVICES``.

    A MIG-enabled GPU appears as its MIG instances (uuid ``MIG-...``, index of the
    parent). Returns [] when the library is missing, the driver is not loaded, or any
    NVML call fails: never raises, never creates a CUDA context.
    """
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        _nvml_call(nvml, "nvmlInit_v2")
    except (OSError, AttributeError, _NvmlError):
        return []
    try:
        count = ctypes.c_uint(0)
        _nvml_call(nvml, "nvmlDeviceGetCount_v2", ctypes.byref(count))
        devices: list[GpuDevice] = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            _nvml_call(nvml, "nvmlDeviceGetHandleByIndex_v2", ctypes.c_uint(index),
                       ctypes.byref(handle))
            instances = _nvml_mig_instances(nvml, handle, index)
            if instances is None:
                devices.append(_nvml_describe(nvml, handle, index))
            else:
                devices.extend(instances)
        return devices
    except (OSError, AttributeError, _NvmlError):
        return []
    finally:
        try:
            nvml.nvmlShutdown()
        except (OSError, AttributeError):
            pass


def _strtoul_prefix(entry: str) -> int:
    """The integer an entry starts with, as CUDA's strtoul-like parse reads it
    (``"1gpu"`` is 1); -1 when it starts with no digits or is negative."""
    digits = 0
    start = 1 if entry[:1] in ("+", "-") else 0
    while start + digits < len(entry) and entry[start + digits].isdigit():
        digits += 1
    if digits == 0 or entry.startswith("-"):
        return -1
    return int(entry[start:start + digits])


def _match_uuid_prefix(entry: str, devices: list[GpuDevice]) -> GpuDevice | None:
    """The one device whose uuid starts with entry; None if none or several do."""
    matches = [d for d in devices if d.uuid.startswith(entry)]
    return matches[0] if len(matches) == 1 else None


def parse_visible_devices(value: str | None, devices: list[GpuDevice]) -> list[GpuDevice]:
    """The devices a CUDA program would see under ``CUDA_VISIBLE_DEVICES=value``.

    CUDA's rules, as the driver applies them (and as PyTorch's NVML-based device
    count reproduces them):

    - None (unset): every device. ``""``: none.
    - Comma-separated entries, in the order given (that order is the new numbering).
      What the first entry is decides what the list holds: NVML indices, GPU UUIDs
      (``GPU-...``) or MIG ids (``MIG-...``); UUIDs and MIG ids may be abbreviated to
      any prefix that names exactly one device. An index entry is read like strtoul
      (``"1abc"`` is 1); whitespace around entries is ignored.
    - Parsing stops at the first invalid entry: a negative or non-numeric index, an
      index with no device, an unknown or ambiguous prefix, an entry of another kind
      (``0,2,-1,1`` gives devices 0 and 2).
    - A device named twice makes the whole list empty (CUDA then sees no device at
      all; this is the driver's behaviour, not a documented rule).
    """
    if value is None:
        return list(devices)
    entries = [e.strip() for e in value.split(",")]
    if not entries[0]:
        return []
    if entries[0].startswith("GPU-"):
        kind = "GPU-"
    elif entries[0].startswith("MIG-"):
        kind = "MIG-"
    else:
        kind = ""
    # An index names the GPU; for a MIG-enabled GPU, its first instance.
    by_index: dict[int, GpuDevice] = {}
    for device in devices:
        by_index.setdefault(device.index, device)
    candidates = [d for d in devices if kind and d.uuid.startswith(kind)]
    visible: list[GpuDevice] = []
    for entry in entries:
        if kind:
            device = _match_uuid_prefix(entry, candidates) if entry.startswith(kind) else None
        else:
            device = by_index.get(_strtoul_prefix(entry))
        if device is None:
            break
        if device in visible:
            return []
        visible.append(device)
    return visible


def _slurm_gpu_filter(value: str, devices: list[GpuDevice]) -> list[GpuDevice]:
    """Devices named by a Slurm GPU list (NVML indices, e.g. ``"0,2"``)."""
    wanted = [_int_or_none(e.strip()) for e in value.split(",") if e.strip()]
    selected = [d for d in devices if d.index in wanted]
    if len(selected) < len(wanted) and len(devices) == len(wanted):
        # With ConstrainDevices the device cgroup already hides the other GPUs and
        # NVML renumbers what is left from 0, while Slurm still lists the node-wide
        # indices: NVML sees exactly the allocation.
        return list(devices)
    return selected


def detect_gpus(environ: Mapping[str, str] = os.environ) -> list[GpuDevice]:
    """The GPUs this process may use: NVML's list filtered by ``CUDA_VISIBLE_DEVICES``,
    or, when that is unset, by Slurm's ``SLURM_STEP_GPUS`` / ``SLURM_JOB_GPUS``."""
    devices = list_nvml_devices()
    if not devices:
        return []
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return parse_visible_devices(visible, devices)
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        slurm_gpus = environ.get(name)
        if slurm_gpus and slurm_gpus.strip():
            return _slurm_gpu_filter(slurm_gpus, devices)
    return devices


def gpu_visible_devices_value(devices: list[GpuDevice]) -> str:
    """What a worker's ``CUDA_VISIBLE_DEVICES`` is set to for these GPUs: their UUIDs
    (see the module docstring for why not indices). An empty list hides every GPU."""
    return ",".join(device.uuid for device in devices)


# --------------------------------------------------------------------------- node


@dataclass
class NodeResources:
    """What one node offers. ``gpus`` are the devices behind ``num_gpus``; it may be
    shorter when the user asserted more GPUs than were detected."""

    num_cpus: float
    num_gpus: float
    memory: int
    gpus: list[GpuDevice] = field(default_factory=list)
    custom: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Ray-style resource names: ``CPU``, ``GPU`` (omitted when 0), ``memory``,
        then the custom ones."""
        resources: dict[str, float] = {"CPU": float(self.num_cpus)}
        if self.num_gpus:
            resources["GPU"] = float(self.num_gpus)
        resources["memory"] = float(self.memory)
        resources.update(self.custom)
        return resources


def _check_quantity(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # ValueError as Ray raises for bad resource values: callers catch one type.
        raise ValueError(f"{what} must be a number, got {value!r}")  # noqa: TRY004
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must not be negative, got {value!r}")
    return float(value)


def _check_custom(resources: Mapping, source: str) -> dict[str, float]:
    if not isinstance(resources, Mapping):
        raise ValueError(f"{source} must be a dict of resource name to quantity, "  # noqa: TRY004
                         f"got {type(resources).__name__}")
    checked = {}
    for name, quantity in resources.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{source}: resource names must be non-empty strings, "
                             f"got {name!r}")
        if name in _RESERVED_KEYS:
            raise ValueError(f"{source}: {name!r} cannot be a custom resource; "
                             "use num_cpus=/num_gpus= (memory is detected)")
        checked[name] = _check_quantity(f"{source}[{name!r}]", quantity)
    return checked


def _env_custom_resources(environ: Mapping[str, str]) -> dict[str, float]:
    text = environ.get("HPCRAY_RESOURCES")
    if text is None or not text.strip():
        return {}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"HPCRAY_RESOURCES is not valid JSON ({e}): {text!r}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"HPCRAY_RESOURCES must be a JSON object such as "  # noqa: TRY004
                         f"'{{\"special\": 2}}', got {text!r}")
    return _check_custom(parsed, "HPCRAY_RESOURCES")


def detect_node_resources(
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    resources: Mapping[str, float] | None = None,
    environ: Mapping[str, str] = os.environ,
    gpu_uuids: list[str] | None = None,
) -> NodeResources:
    """This node's resources: detected, with explicit arguments overriding.

    ``num_gpus`` may exceed the detected devices (the user asserts them, as Ray
    allows); the extra GPUs then have no device. When it is smaller, the first
    ``ceil(num_gpus)`` detected devices back it. Custom resources come from
    ``HPCRAY_RESOURCES`` and ``resources=``, the latter winning key by key.
    ``gpu_uuids``: the GPUs dealt to this rank (:func:`deal_host_gpus`); None keeps
    every detected GPU. Raises ValueError on negative or non-numeric quantities, and on
    ``CPU``, ``GPU`` or ``memory`` given as custom resources.
    """
    custom = _env_custom_resources(environ)
    if resources is not None:
        custom.update(_check_custom(resources, "resources"))

    _, local_size = host_share(environ)
    if num_cpus is None:
        cpus = detect_num_cpus(environ)
        if local_size > 1 and _unbound(environ):
            cpus = max(1, cpus // local_size)
        cpus = float(cpus)
    else:
        cpus = _check_quantity("num_cpus", num_cpus)

    gpus = detect_gpus(environ)
    if gpu_uuids is not None:
        gpus = [gpu for gpu in gpus if gpu.uuid in gpu_uuids]
    if num_gpus is None:
        gpu_count = float(len(gpus))
    else:
        gpu_count = _check_quantity("num_gpus", num_gpus)
        gpus = gpus[: math.ceil(gpu_count)] if gpu_count else []

    return NodeResources(
        num_cpus=cpus,
        num_gpus=gpu_count,
        memory=detect_memory_bytes() // local_size,
        gpus=gpus,
        custom=custom,
    )


def deal_host_gpus(views: list[tuple[str, list[str]]]) -> list[list[str]]:
    """The GPUs each rank gets, from what each sees: ``views[rank] = (hostname, GPU
    UUIDs it sees)``. A GPU goes to one rank only, among the ranks of its host that see
    it: the one holding fewest so far, the lowest rank on ties. So ranks that all see a
    node's GPUs get them round-robin (local rank i: GPUs i, i+n, ...), surplus ranks get
    none, and GPUs the launcher bound to each rank stay with it."""
    dealt: list[list[str]] = [[] for _ in views]
    seen_by: dict[tuple[str, str], list[int]] = {}
    for rank, (host, uuids) in enumerate(views):
        for uuid in uuids:
            seen_by.setdefault((host, uuid), []).append(rank)
    for (_host, uuid), ranks in seen_by.items():
        owner = min(ranks, key=lambda r: (len(dealt[r]), r))
        dealt[owner].append(uuid)
    return dealt
