"""The one-machine Slurm of slurm/local-cluster.sh: srun, MPI under srun, sbatch, a failing
rank, and a stop that leaves nothing behind.

These tests check the cluster that hpcray's multi-node tests will run on, not hpcray itself.
Each cluster lives in its own state dir on its own ports, so a cluster a developer started by
hand (default dir and ports) is left alone. The module is skipped only when the machine
cannot install or run Slurm (local-cluster.sh exits 2: not root, no apt-get, no registry).
"""

import socket
import time
import uuid

import psutil
import pytest
from localslurm import (
    VENV_PYTHON,
    LocalCluster,
    describe,
    living,
    mpich_segments,
    processes_of,
)

pytestmark = pytest.mark.slurm

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
    job = slurm_cluster.wait_for_job(job_id)
    assert job["JobState"] == "COMPLETED", job
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
    # The ranks that were killed never reached MPI_Finalize, where MPICH's segment is
    # unlinked: the cluster's Epilog removes it when the job ends.
    slurm_cluster.wait_until_no_jobs()
    assert not mpich_segments(slurm_cluster.state_dir)


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
