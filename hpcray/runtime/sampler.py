"""A node's low-rate readings of its CPU, GPU and object-store use, for the report page.

Runs only when the job writes a report (`init(report=...)`, HPCRAY_REPORT): a timer of
the node's event loop calls `sample()` every HPCRAY_REPORT_INTERVAL seconds (1 by
default), so it adds one wake-up a second to an idle node and never spins. A reading
is (time, CPU use, store bytes used, GPU use per device or (), store counters):

    CPU use     CPU-seconds the node's processes (its node manager, which on rank 0
                is also the driver, and its workers, read from /proc) used since the
                last reading, over the seconds passed and the node's CPUs: 1.0 = all
    GPU use     each of the node's GPUs' utilization, 0..1, or None where it could not
                be read: from its GPU source, `gpu_utilization(uuids)` (NVML, what
                nvidia-smi reads: the share of the last 1/6 to 1 s a kernel ran); no
                source, no GPUs or no driver: () and the report draws no GPU plot
    counters    the store's counters whose names say spill or evict (spilling adds its
                own; the report shows what it finds)

At most MAX_SAMPLES readings: when full, every other one goes and the interval
doubles, so a long job keeps an even (coarser) picture of its whole run in bounded
memory.
"""

from __future__ import annotations

import ctypes
import logging
import os

from hpcray.runtime import clock

log = logging.getLogger("hpcray.sampler")

MAX_SAMPLES = 1024
_TICKS = os.sysconf("SC_CLK_TCK")


def gpu_utilization(uuids):
    """The GPU source of a node with these GPUs (their NVML UUIDs): an object whose
    `read()` gives a utilization per GPU and `close()` ends it; None when there are none
    or NVML reads none of them (no driver, a MIG instance). The node's one call to make
    the source, so a test can hand the Sampler another."""
    if not uuids:
        return None
    source = NvmlUtilization(uuids)
    if not source.handles:
        source.close()
        return None
    return source


class Sampler:
    def __init__(self, store, num_cpus: float, gpus, interval: float) -> None:
        """`gpus`: the node's GPU source (gpu_utilization), or None."""
        self.store = store
        self.num_cpus = max(1.0, float(num_cpus))
        self.interval = max(0.05, interval)
        self.samples: list[tuple] = []
        times = os.times()
        # pid -> its CPU seconds at the last reading (a worker new since: all of it)
        self.cpu_seen: dict[int, float] = {os.getpid(): times.user + times.system}
        self.last_time = clock.now()
        self.gpus = gpus

    def sample(self, pids) -> None:
        """Read the node now; `pids`: its worker processes."""
        now = clock.now()
        used = 0.0
        seen = {}
        times = os.times()
        for pid, cpu in [(os.getpid(), times.user + times.system)] + [
                (pid, _cpu_seconds(pid)) for pid in pids]:
            if cpu is None:
                continue
            seen[pid] = cpu
            used += max(0.0, cpu - self.cpu_seen.get(pid, 0.0))
        self.cpu_seen = seen
        elapsed = max(1e-3, now - self.last_time)
        self.last_time = now
        stats = self.store.stats()
        counters = {k: v for k, v in stats.items() if "spill" in k or "evict" in k}
        gpu = self.gpus.read() if self.gpus is not None else ()
        self.samples.append((now, min(1.0, used / elapsed / self.num_cpus),
                             stats.get("used_bytes", 0), gpu, counters))
        if len(self.samples) >= MAX_SAMPLES:
            del self.samples[1::2]
            self.interval *= 2

    def rows(self) -> dict:
        return {"interval": self.interval, "cpus": self.num_cpus,
                "capacity": self.store.capacity, "samples": list(self.samples)}

    def close(self) -> None:
        if self.gpus is not None:
            self.gpus.close()


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of `pid` (fields 14 and 15 of /proc/pid/stat), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


class _Utilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class NvmlUtilization:
    """NVML's utilization of the node's GPUs (by UUID); no CUDA context is made."""

    def __init__(self, uuids) -> None:
        self.handles = []
        try:
            self.nvml = ctypes.CDLL("libnvidia-ml.so.1")
            if self.nvml.nvmlInit_v2() != 0:
                self.nvml = None
                return
        except (OSError, AttributeError):  # no library, or one without the symbol
            self.nvml = None
            return
        for uuid in uuids:
            handle = ctypes.c_void_p()
            if self.nvml.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(handle)) == 0:
                self.handles.append(handle)

    def read(self) -> tuple:
        if self.nvml is None:
            return ()
        readings = []
        for handle in self.handles:
            rates = _Utilization()
            status = self.nvml.nvmlDeviceGetUtilizationRates(handle, ctypes.byref(rates))
            readings.append(rates.gpu / 100 if status == 0 else None)
        return tuple(readings)

    def close(self) -> None:
        if self.nvml is not None:
            self.nvml.nvmlShutdown()
            self.nvml = None
