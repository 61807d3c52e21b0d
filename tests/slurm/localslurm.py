"""A one-machine Slurm (slurm/local-cluster.sh) driven from tests, and what a test needs to
check that a job left nothing behind: its processes, hpcray's segments, MPICH's segments."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "slurm" / "local-cluster.sh"
# The interpreter running the tests is the venv's: its mpi4py is built against the venv's
# MPICH, which srun starts through PMI-2.
VENV_PYTHON = sys.executable
START_TIMEOUT_S = 300  # includes apt-get install on a fresh machine (~20 s measured)
LOCAL_CLUSTER_UNAVAILABLE = 2


def free_port_pair() -> int:
    """A port p with p and p+1 free: slurmctld takes p, slurmd p+1."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports")


class LocalCluster:
    """One slurm/local-cluster.sh cluster: its state dir, ports and client environment."""

    def __init__(self):
        # Not pytest's tmp_path: that is 0700 and munged, running as user munge, must reach
        # its socket inside.
        self.state_dir = Path(tempfile.mkdtemp(prefix="hpcray-slurm-test-"))
        self.script_env = {
            **os.environ,
            "HPCRAY_SLURM_DIR": str(self.state_dir),
            "HPCRAY_SLURM_PORT": str(free_port_pair()),
        }
        # A test run inside a Slurm job (a cluster's CI) must not have srun join that job.
        client_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PMIX_"))
        }
        venv_bin = str(Path(VENV_PYTHON).parent)
        client_env["PATH"] = os.pathsep.join([venv_bin, client_env.get("PATH", ""), "/usr/sbin"])
        client_env["SLURM_CONF"] = str(self.state_dir / "slurm.conf")
        self.env = client_env

    def script(self, action: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(LOCAL_CLUSTER), action],
            env=self.script_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> float:
        """Starts the cluster (skips the test when this machine cannot); returns seconds."""
        began = time.monotonic()
        done = self.script("start", timeout=START_TIMEOUT_S)
        elapsed = time.monotonic() - began
        if done.returncode == LOCAL_CLUSTER_UNAVAILABLE:
            self.stop()
            pytest.skip(f"no local Slurm on this machine: {done.stderr.strip()}")
        if done.returncode != 0:
            logs = self.log_tails()
            self.stop()
            pytest.fail(f"local-cluster.sh start failed ({done.returncode}):\n{done.stderr}{logs}")
        return elapsed

    def stop(self) -> subprocess.CompletedProcess:
        done = self.script("stop")
        if done.returncode == 0:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return done

    def log_tails(self) -> str:
        tails = []
        for log in sorted(self.state_dir.glob("**/*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            tails.append(f"\n--- {log} ---\n" + "\n".join(lines))
        return "".join(tails)

    def run(self, args, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def jobs(self) -> list:
        """Ids of the jobs in the queue, those completing (Epilog running) included."""
        shown = self.run(["squeue", "-h", "-o", "%i"])
        assert shown.returncode == 0, shown.stderr
        return shown.stdout.split()

    def wait_until_no_jobs(self, timeout: float = 60) -> None:
        """Until every job has ended, its Epilog included (it leaves the queue after)."""
        deadline = time.monotonic() + timeout
        while self.jobs():
            if time.monotonic() > deadline:
                pytest.fail(f"jobs still in the queue after {timeout} s: {self.jobs()}")
            time.sleep(0.1)

    def job(self, job_id: str) -> dict:
        """scontrol's fields of one job (finished jobs stay visible for MinJobAge)."""
        shown = self.run(["scontrol", "-o", "show", "job", job_id])
        assert shown.returncode == 0, shown.stderr
        return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)

    def wait_for_job(self, job_id: str, timeout: float = 60) -> dict:
        """A batch job's fields once it has ended (sbatch --wait polls every 2-10 s)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                return job
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} still {job['JobState']} after {timeout} s")
            time.sleep(0.2)

    def daemon_pids(self) -> dict:
        """name -> pid of the daemons the pid files name."""
        pid_files = {
            "munged": self.state_dir / "munge" / "munged.pid",
            "slurmctld": self.state_dir / "slurmctld.pid",
            "slurmd": self.state_dir / "slurmd.pid",
        }
        return {name: int(path.read_text()) for name, path in pid_files.items() if path.exists()}


def living(proc: psutil.Process) -> bool:
    """Still running: a zombie has exited and only waits for init, which reaps lazily here."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def serves(proc: psutil.Process, state_dir: Path) -> bool:
    """A slurmstepd of this cluster: it listens on a socket in the cluster's spool dir (its
    command line, "slurmstepd: [job.step]", names no cluster)."""
    try:
        sockets = proc.net_connections(kind="unix")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(str(sock.laddr).startswith(str(state_dir)) for sock in sockets)


def processes_of(state_dir: Path, marker: str) -> list:
    """Live processes of the cluster in state_dir: daemons started with a path inside it, its
    step daemons, processes whose command line carries marker (job tasks), and everything
    below them."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(state_dir) in cmdline or marker in cmdline:
            found.append(proc)
        elif proc.info["name"] == "slurmstepd" and serves(proc, state_dir):
            found.append(proc)
    for proc in list(found):
        try:
            found += proc.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    return [proc for proc in {p.pid: p for p in found}.values() if living(proc)]


def describe(procs: list) -> list:
    described = []
    for proc in procs:
        try:
            described.append((proc.pid, " ".join(proc.cmdline())))
        except psutil.Error:
            described.append((proc.pid, "?"))
    return described




# How many of a cluster's jobs, and steps per job, the MPICH segment check covers.
CHECKED_JOBS = 1000
CHECKED_STEPS = 16


def fnv1a32(text: str) -> str:
    """MPICH's HASH_FNV of text, as it prints it in segment names (hex, no padding)."""
    value = 2166136261
    for byte in text.encode():
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return f"{value:x}"


def mpich_segments(state_dir: Path) -> list:
    """MPICH's segments of this cluster's job steps still in /dev/shm: under srun --mpi=pmi2
    they are named mpich_shm_<FNV-1a of "<job>.<step>">_<node> (slurm/local-cluster.sh,
    clean-mpich)."""
    first_job_id = int((state_dir / "first-job-id").read_text())
    ours = {fnv1a32(f"{job}.{step}")
            for job in range(first_job_id, first_job_id + CHECKED_JOBS)
            for step in range(CHECKED_STEPS)}
    found = []
    for name in os.listdir("/dev/shm"):
        parts = name.split("_")
        if len(parts) == 4 and parts[0] == "mpich" and parts[2] in ours:
            found.append(name)
    return sorted(found)


def hpcray_segments(job_id: str) -> list:
    """The store segments of hpcray job `job_id` (hex) on any rank: /hpcray-<pid>-<job>-n<rank>."""
    return sorted(name for name in os.listdir("/dev/shm")
                  if name.startswith("hpcray-") and f"-{job_id}-n" in name)


def processes_with(marker: str) -> list:
    """Live processes whose environment carries HPCRAY_TEST_RUN=marker: a job's tasks and
    everything they started (node managers, fork servers, workers), even those that left
    their parent."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("HPCRAY_TEST_RUN") == marker and living(proc):
                found.append(proc)
        except psutil.Error:
            continue
    return found
