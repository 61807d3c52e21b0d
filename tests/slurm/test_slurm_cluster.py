"""The one-machine Slurm of slurm/local-cluster.sh: srun, MPI under srun, sbatch, a failing
rank, and a stop that leaves nothing behind.

These tests check the cluster that hpcray's multi-node tests will run on, not hpcray itself.
Each cluster lives in its own state dir on its own ports, so a cluster a developer started by
hand (default dir and ports) is left alone. The module is skipped only when the machine
cannot install or run Slurm (local-cluster.sh exits 2: not root, no apt-get, no registry).
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slurm

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

    def daemon_pids(self) -> dict:
        """name -> pid of the daemons the pid files name."""
        pid_files = {
            "munged": self.state_dir / "munge" / "munged.pid",
            "slurmctld": self.state_dir / "slurmctld.pid",
            "slurmd": self.state_dir / "slurmd.pid",
        }
        return {name: int(path.read_text()) for name, path in pid_files.items() if path.exists()}


@pytest.fixture(scope="module")
def slurm_cluster():
    cluster = LocalCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


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


@pytest.mark.timeout(120)
def test_srun_hostname(slurm_cluster):
    done = slurm_cluster.run(["srun", "-n", "2", "hostname"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [socket.gethostname()] * 2


@pytest.mark.timeout(120)
def test_srun_pmi2_starts_mpi_world(slurm_cluster):
    code = "from mpi4py import MPI; c = MPI.COMM_WORLD; print(c.rank, c.size)"
    done = slurm_cluster.run(["srun", "--mpi=pmi2", "-n", "4", VENV_PYTHON, "-c", code])
    assert done.returncode == 0, done.stderr
    # Four singletons ("0 1" four times) would mean PMI-2 did not reach MPICH.
    assert sorted(done.stdout.splitlines()) == [f"{rank} 4" for rank in range(4)]


@pytest.mark.timeout(120)
def test_sbatch_job_writes_its_output(slurm_cluster, tmp_path):
    batch_script = tmp_path / "job.sh"
    batch_script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --ntasks=2\n"
        "#SBATCH --output=job-%j.out\n"
        "srun bash -c 'echo \"task $SLURM_PROCID of $SLURM_NTASKS\"'\n"
    )
    submitted = slurm_cluster.run(
        ["sbatch", "--parsable", f"--chdir={tmp_path}", str(batch_script)]
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    # Polling scontrol: sbatch --wait polls every 2-10 s; there is no sacct (no accounting).
    deadline = time.monotonic() + 60
    job = {}
    while time.monotonic() < deadline:
        shown = slurm_cluster.run(["scontrol", "-o", "show", "job", job_id])
        assert shown.returncode == 0, shown.stderr
        job = dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)
        if job["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            break
        time.sleep(0.2)
    assert job.get("JobState") == "COMPLETED", job
    assert job["ExitCode"] == "0:0", job
    output = (tmp_path / f"job-{job_id}.out").read_text()
    assert sorted(output.splitlines()) == ["task 0 of 2", "task 1 of 2"]


RANK_1_FAILS = {
    "shell": ["bash", "-c", 'if [ "$SLURM_PROCID" = 1 ]; then exit 1; fi; sleep 300'],
    # os._exit: sys.exit(1) would run MPI_Finalize at exit, which waits for the other ranks
    # and so never exits at all (python -m mpi4py turns it into MPI_Abort instead).
    "mpi4py": [
        VENV_PYTHON,
        "-c",
        "import os\n"
        "from mpi4py import MPI\n"
        "if MPI.COMM_WORLD.rank == 1:\n"
        "    os._exit(1)\n"
        "MPI.COMM_WORLD.Barrier()\n",
    ],
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("task", sorted(RANK_1_FAILS))
def test_failing_rank_ends_the_step(slurm_cluster, task):
    began = time.monotonic()
    done = slurm_cluster.run(["srun", "--mpi=pmi2", "-n", "4", *RANK_1_FAILS[task]])
    elapsed = time.monotonic() - began
    assert done.returncode != 0, done.stderr
    assert "task 1: Exited with exit code 1" in done.stderr, done.stderr
    # KillOnBadExit=1 ends the step in well under a second; without it the others wait forever.
    assert elapsed < 15, f"srun took {elapsed:.1f} s to end the step"


@pytest.mark.timeout(120)
def test_stop_leaves_nothing_running():
    """Its own cluster: start twice, a job left running, stop twice; nothing may survive."""
    cluster = LocalCluster()
    marker = f"hpcray-slurm-test-{uuid.uuid4().hex}"
    sleeper = f"import time; time.sleep(300)  # {marker}"
    daemon_pids = {}
    try:
        cluster.start()
        cluster.start()  # idempotent
        daemon_pids = cluster.daemon_pids()
        assert sorted(daemon_pids) == ["munged", "slurmctld", "slurmd"]
        status = cluster.script("status")
        assert status.returncode == 0, status.stdout + status.stderr

        batch = cluster.run(
            [
                "sbatch",
                "--parsable",
                "-n",
                "2",
                "-o",
                "/dev/null",
                f"--wrap=srun {VENV_PYTHON} -c '{sleeper}'",
            ]
        )
        assert batch.returncode == 0, batch.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            tasks = [
                proc
                for proc in processes_of(cluster.state_dir, marker)
                if proc.cmdline() == [VENV_PYTHON, "-c", sleeper]
            ]
            if len(tasks) == 2:
                break
            time.sleep(0.2)
        assert len(tasks) == 2, f"the job's two tasks never started: {describe(tasks)}"
        running = processes_of(cluster.state_dir, marker)
        assert any(proc.name() == "slurmstepd" for proc in running), describe(running)
    finally:
        stopped = cluster.stop()
    assert stopped.returncode == 0, stopped.stderr

    left = processes_of(cluster.state_dir, marker)
    for pid in daemon_pids.values():
        try:
            daemon = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        if living(daemon):
            left.append(daemon)
    assert not left, f"still running after stop: {describe(left)}"
    again = cluster.stop()
    assert again.returncode == 0, again.stderr
    assert cluster.script("status").returncode == 3
