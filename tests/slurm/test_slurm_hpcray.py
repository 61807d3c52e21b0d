"""hpcray itself under the one-machine Slurm, started as a user on a cluster would:
`srun --mpi=pmi2 -n N python -m hpcray app.py`, `... -m module`, and sbatch of
slurm/sbatch-template.sh. Every rank is a node with its own store and workers.

Each app asserts what it checks and prints OK; the test then waits until Slurm has ended
the job (Epilog included) and checks that nothing is left: no process that carries the
test's HPCRAY_TEST_RUN marker in its environment (tasks, fork servers, workers, even those
that left their parent), no store segment of the app's hpcray job, no MPICH segment of the
cluster's jobs. A hang fails by the subprocess timeout, never blocks the suite.
"""

import re
import signal
import subprocess
import textwrap
import time
import uuid

import pytest
from localslurm import (
    REPO,
    VENV_PYTHON,
    describe,
    hpcray_segments,
    mpich_segments,
    processes_with,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(120)]

STEP_TIMEOUT_S = 90
# Every app prints its hpcray job id first, so the test can find its segments afterwards.
PRELUDE = """\
import os, sys
import hpcray as ray
ray.init()
print("HPCRAY_JOB", ray.get_runtime_context().get_job_id(), flush=True)
"""


@pytest.fixture
def run_app(slurm_cluster, tmp_path):
    """run_app(script, ranks, *srun_args, expect_ok=True) -> (returncode, output): the script
    (PRELUDE + script) under `srun --mpi=pmi2 -n ranks ... python -m hpcray app.py`, then the
    checks that the job left nothing behind."""
    marker = uuid.uuid4().hex
    env = dict(slurm_cluster.env, HPCRAY_TEST_RUN=marker)
    outputs = []

    def run(script, ranks, *srun_args, argv=None):
        app = tmp_path / "app.py"
        app.write_text(PRELUDE + textwrap.dedent(script))
        command = argv or [VENV_PYTHON, "-m", "hpcray", str(app)]
        try:
            done = subprocess.run(
                ["srun", "--mpi=pmi2", "-n", str(ranks), *srun_args, *command],
                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"srun did not end in {STEP_TIMEOUT_S} s; output:\n{exc.stdout}"
                        f"{exc.stderr}")
        output = done.stdout + done.stderr
        outputs.append(output)
        return done.returncode, output

    yield run, env, outputs
    assert_nothing_left(slurm_cluster, marker, "".join(outputs))


def assert_nothing_left(cluster, marker: str, output: str) -> None:
    cluster.wait_until_no_jobs()
    # Processes may take a moment to be reaped after their step is over: wait for that, with
    # a deadline, rather than guess how long it takes.
    deadline = time.monotonic() + 30
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = processes_with(marker)
    assert not left, f"processes left: {describe(left)}"
    for job_id in re.findall(r"HPCRAY_JOB (\w+)", output):
        assert not hpcray_segments(job_id), f"store segments left: {hpcray_segments(job_id)}"
    assert not mpich_segments(cluster.state_dir)


def test_srun_app_uses_every_rank(run_app):
    run, _, _ = run_app
    code, output = run("""
        import numpy as np
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        nodes = ray.nodes()
        assert sorted(n["rank"] for n in nodes) == [0, 1, 2, 3], nodes
        # srun -c 1: each rank's node has the one CPU Slurm gave its task.
        assert [n["Resources"]["CPU"] for n in nodes] == [1, 1, 1, 1], nodes
        assert ray.cluster_resources()["CPU"] == 4
        ids = {n["rank"]: n["NodeID"] for n in nodes}

        @ray.remote
        def where():
            return (ray.get_runtime_context().get_node_id(), int(os.environ["SLURM_PROCID"]),
                    os.environ["SLURM_JOB_ID"])

        # Tasks run on all four nodes, and each node is the Slurm task of its rank.
        spread = ray.get([where.options(scheduling_strategy="SPREAD").remote()
                          for _ in range(8)])
        assert {node for node, _, _ in spread} == set(ids.values()), spread
        for rank, node in ids.items():
            placed = ray.get(where.options(scheduling_strategy=On(node, soft=False)).remote())
            assert placed == (node, rank, os.environ["SLURM_JOB_ID"]), (rank, placed)

        @ray.remote
        class Counter:
            def __init__(self):
                self.count = 0
            def add(self, n):
                self.count += n
                return self.count, ray.get_runtime_context().get_node_id()

        # Actors on the other ranks, called from the driver and from a task on another rank.
        counters = {rank: Counter.options(scheduling_strategy=On(ids[rank], soft=False)).remote()
                    for rank in (1, 2, 3)}
        for rank, counter in counters.items():
            assert ray.get(counter.add.remote(rank)) == (rank, ids[rank])

        @ray.remote
        def call(counter):
            return ray.get(counter.add.remote(10)), ray.get_runtime_context().get_node_id()

        (count, actor_node), caller = ray.get(
            call.options(scheduling_strategy=On(ids[3], soft=False)).remote(counters[2]))
        assert (count, actor_node, caller) == (12, ids[2], ids[3])

        # An object made on rank 3, large enough to live in its store, fetched by the driver.
        @ray.remote
        def make(n):
            return np.arange(n, dtype=np.int64)

        made = make.options(scheduling_strategy=On(ids[3], soft=False)).remote(2_000_000)
        array = ray.get(made)
        assert array.shape == (2_000_000,) and array[-1] == 1_999_999
        # And one the driver puts, read on rank 1.
        @ray.remote
        def total(a):
            return int(a.sum())

        assert ray.get(total.options(scheduling_strategy=On(ids[1], soft=False)).remote(
            ray.put(np.ones(1_000_000)))) == 1_000_000
        ray.shutdown()
        print("OK")
    """, 4, "-c", "1")
    assert code == 0, output
    assert "OK" in output


def test_driver_exception_fails_the_step(run_app):
    run, _, _ = run_app
    code, output = run("""
        @ray.remote
        def f(x):
            return x
        assert ray.get([f.options(scheduling_strategy="SPREAD").remote(i)
                        for i in range(6)]) == list(range(6))
        raise RuntimeError("driver failed on purpose")
    """, 3)
    # srun ends with the highest task status: every rank exits 1, none is left hanging (the
    # step would otherwise run into STEP_TIMEOUT_S).
    assert code == 1, output
    assert "RuntimeError: driver failed on purpose" in output
    assert re.search(r"tasks? 0-2: Exited with exit code 1", output), output


def srun_until(args: list, env: dict, cwd, marker: str, act) -> tuple:
    """`srun --mpi=pmi2 *args` until it prints a line starting with `marker`, then
    `act(that line)`; -> (its status, its output) once it ended."""
    srun = subprocess.Popen(["srun", "--mpi=pmi2", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in srun.stdout:
            lines.append(line)
            if line.startswith(marker):
                break
        assert lines and lines[-1].startswith(marker), "".join(lines)
        act(lines[-1])
        rest, _ = srun.communicate(timeout=STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        srun.kill()
        rest, _ = srun.communicate()
        pytest.fail(f"the step did not end: {''.join(lines)}{rest}")
    finally:
        if srun.poll() is None:
            srun.kill()
            srun.wait()
    return srun.returncode, "".join(lines) + rest


def test_dead_rank_ends_the_step(run_app, slurm_cluster, tmp_path):
    """A rank's process killed: Slurm ends the step (KillOnBadExit), rank 0 leaves on the
    SIGTERM after waiting at most 1 s for the dead, and every node's segment and workers
    go. (Its guardian is the task srun started; killing it kills the rank with it.)"""
    _, env, outputs = run_app
    app = tmp_path / "app.py"
    app.write_text(PRELUDE + textwrap.dedent("""
        import time
        @ray.remote
        def f():
            return 1
        ray.get([f.options(scheduling_strategy="SPREAD").remote() for _ in range(3)])
        print("READY", flush=True)
        time.sleep(STEP_TIMEOUT_S)
    """).replace("STEP_TIMEOUT_S", str(STEP_TIMEOUT_S)))
    def kill_rank_1(_line):
        rank_1 = [proc for proc in processes_with(env["HPCRAY_TEST_RUN"])
                  if proc.environ().get("SLURM_PROCID") == "1"
                  and proc.parent() is not None and proc.parent().name() == "slurmstepd"]
        assert len(rank_1) == 1, describe(rank_1)
        rank_1[0].send_signal(signal.SIGKILL)

    code, output = srun_until(["-n", "3", VENV_PYTHON, "-m", "hpcray", str(app)], env,
                              tmp_path, "READY", kill_rank_1)
    outputs.append(output)
    assert code != 0, output
    assert "task 1: Killed" in output, output
    # Rank 0 ended by itself on SIGTERM (exit 143), not by the SIGKILL after KillWait
    # (2 s here), and so did rank 2, which waited for rank 0's word ("tasks 0,2").
    assert re.search(r"tasks? 0(,\d+)*: Exited with exit code 143", output), output
    assert "fork server died" not in output, output


def test_srun_python_m_hpcray_m_module(run_app, tmp_path):
    run, _, _ = run_app
    package = tmp_path / "jobpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text(PRELUDE + textwrap.dedent("""
        assert __name__ == "__main__"
        assert sys.argv[1:] == ["--size", "7"], sys.argv
        assert len(ray.nodes()) == 2
        @ray.remote
        def square(x):
            return x * x
        refs = [square.options(scheduling_strategy="SPREAD").remote(i) for i in range(7)]
        print("SUM", sum(ray.get(refs)))
        ray.shutdown()
    """))
    code, output = run("", 2, argv=[VENV_PYTHON, "-m", "hpcray", "-m", "jobpkg.main",
                                    "--size", "7"])
    assert code == 0, output
    assert "SUM 91" in output


def test_srun_without_pmi_fails_loudly(run_app):
    """With no PMI plugin each task would be an MPI world of one: hpcray stops instead."""
    run, _, _ = run_app
    code, output = run("print('NOT REACHED')", 2, "--mpi=none")
    assert code == 1, output
    assert "NOT REACHED" not in output
    assert output.count("each task became a singleton") == 2, output
    assert "Traceback" not in output, output


def test_sbatch_template_runs_an_app(slurm_cluster, tmp_path):
    """slurm/sbatch-template.sh as it is, its node count and CPUs given on sbatch's command
    line (which overrides #SBATCH lines): this cluster has one node and 8 CPUs."""
    marker = uuid.uuid4().hex
    (tmp_path / "app.py").write_text(PRELUDE + textwrap.dedent("""
        nodes = ray.nodes()
        assert len(nodes) == 2, nodes
        assert [n["Resources"]["CPU"] for n in nodes] == [1, 1], nodes
        @ray.remote
        def where():
            return ray.get_runtime_context().get_node_id()
        placed = ray.get([where.options(scheduling_strategy="SPREAD").remote()
                          for _ in range(4)])
        assert set(placed) == {n["NodeID"] for n in nodes}, placed
        ray.shutdown()
        print("TEMPLATE OK on", len(nodes), "nodes")
    """))
    env = dict(slurm_cluster.env, HPCRAY_TEST_RUN=marker)
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={tmp_path}", "-N", "1", "--ntasks-per-node=2",
         "--cpus-per-task=1", "--time=00:05:00", str(REPO / "slurm" / "sbatch-template.sh")],
        env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    job = slurm_cluster.wait_for_job(job_id, timeout=STEP_TIMEOUT_S)
    output_file = tmp_path / f"hpcray-{job_id}.out"
    output = output_file.read_text() if output_file.exists() else "(no output file)"
    assert job["JobState"] == "COMPLETED", (job, output)
    assert job["ExitCode"] == "0:0", (job, output)
    assert "TEMPLATE OK on 2 nodes" in output, output
    assert_nothing_left(slurm_cluster, marker, output)


def test_processes_with_finds_a_marked_process():
    """The leak checks above are only as good as the marker search."""
    marker = uuid.uuid4().hex
    sleeper = subprocess.Popen(["sleep", "60"], env={"HPCRAY_TEST_RUN": marker})
    try:
        assert [proc.pid for proc in processes_with(marker)] == [sleeper.pid]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not processes_with(marker)


def test_scancel_usr1_drains_the_step(run_app, tmp_path):
    """`scancel --signal=USR1` (what --signal=USR1@N sends before the time limit): Slurm
    signals every process of the step, guardians, ranks, fork servers and workers; only
    the driver acts. The running tasks finish, the waiting ones never start, exit 0."""
    _, env, outputs = run_app
    (tmp_path / "started").mkdir()
    app = tmp_path / "app.py"
    app.write_text(PRELUDE + textwrap.dedent("""
        import time
        here = sys.argv[1]

        @ray.remote(num_cpus=1)
        def step(i, here=here):
            open(os.path.join(here, "started", str(i)), "w").close()
            while not os.path.exists(os.path.join(here, "release")):
                time.sleep(0.01)
            return i

        ray.util.on_drain(lambda signum: open(os.path.join(here, "callback"), "w").close())
        refs = [step.options(scheduling_strategy="SPREAD").remote(i) for i in range(6)]
        while len(os.listdir(os.path.join(here, "started"))) < 3:
            time.sleep(0.01)
        try:
            print("RUNNING", os.environ["SLURM_JOB_ID"], flush=True)
            ray.get(refs)
        finally:
            print("finally ran", ray.util.draining(), flush=True)
    """))
    def drain(line):
        subprocess.run(["scancel", "--signal=USR1", line.split()[1]], env=env, check=True,
                       timeout=30)
        deadline = time.monotonic() + 60
        while not (tmp_path / "callback").exists():  # every node holds its waiting tasks
            assert time.monotonic() < deadline, "no drain callback"
            time.sleep(0.05)
        (tmp_path / "release").touch()

    code, output = srun_until(["-n", "3", "--cpus-per-task=1", VENV_PYTHON, "-m", "hpcray",
                               str(app), str(tmp_path)], dict(env, HPCRAY_DRAIN_GRACE="60"),
                              tmp_path, "RUNNING", drain)
    outputs.append(output)
    assert code == 0, output
    assert "hpcray: drained in" in output and "finally ran True" in output, output
    assert len(list((tmp_path / "started").iterdir())) == 3, output


def test_the_templates_batch_signal_drains_the_job(slurm_cluster, tmp_path):
    """slurm/sbatch-template.sh's `--signal=B:USR1@120`: before the time limit Slurm signals
    only the batch script (B:), whose trap passes USR1 on to srun, which signals the step.
    `scancel --batch --signal=USR1` sends what Slurm sends then. The running tasks finish,
    the waiting ones never start, the on_drain callback runs, the job COMPLETES with 0."""
    marker = uuid.uuid4().hex
    (tmp_path / "started").mkdir()
    (tmp_path / "app.py").write_text(PRELUDE + textwrap.dedent("""
        import time
        here = os.getcwd()

        @ray.remote(num_cpus=1)
        def step(i, here=here):
            open(os.path.join(here, "started", str(i)), "w").close()
            while not os.path.exists(os.path.join(here, "release")):
                time.sleep(0.01)
            return i

        ray.util.on_drain(lambda signum: open(os.path.join(here, "callback"), "w").close())
        refs = [step.options(scheduling_strategy="SPREAD").remote(i) for i in range(4)]
        while len(os.listdir(os.path.join(here, "started"))) < 2:
            time.sleep(0.01)
        try:
            print("RUNNING", flush=True)
            ray.get(refs)
        finally:
            print("finally ran", ray.util.draining(), flush=True)
    """))
    env = dict(slurm_cluster.env, HPCRAY_TEST_RUN=marker, HPCRAY_DRAIN_GRACE="60")
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={tmp_path}", "-N", "1", "--ntasks-per-node=2",
         "--cpus-per-task=1", "--time=00:05:00", str(REPO / "slurm" / "sbatch-template.sh")],
        env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    output_file = tmp_path / f"hpcray-{job_id}.out"

    def output() -> str:
        return output_file.read_text() if output_file.exists() else "(no output file)"

    deadline = time.monotonic() + STEP_TIMEOUT_S
    while "RUNNING" not in output():
        assert time.monotonic() < deadline, f"the job did not start its tasks: {output()}"
        time.sleep(0.05)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=env, check=True,
                   timeout=30)
    while not (tmp_path / "callback").exists():  # every node holds its waiting tasks
        assert time.monotonic() < deadline, f"no drain callback: {output()}"
        time.sleep(0.05)
    (tmp_path / "release").touch()
    job = slurm_cluster.wait_for_job(job_id, timeout=STEP_TIMEOUT_S)
    assert job["JobState"] == "COMPLETED", (job, output())
    assert job["ExitCode"] == "0:0", (job, output())
    assert "hpcray: drained in" in output() and "finally ran True" in output(), output()
    assert len(list((tmp_path / "started").iterdir())) == 2, output()
    assert_nothing_left(slurm_cluster, marker, output())
