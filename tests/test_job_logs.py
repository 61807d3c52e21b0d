"""The job's log folder (hpcray/runtime/job_logs.py): node-<rank>.log with the rank on
every record, node-<rank>-worker-<pid>.out/.err, crashes logged with the task or actor they hit,
the default folder and its name; on one node and under mpiexec -n 3.

Each case runs a real driver (a subprocess, real workers, real signals) and reads what
it left behind.
"""

import os
import re
import subprocess
import sys

import pytest

from tests.multinode.test_multinode import run_mpi

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = '''
import os, signal, sys
import hpcray

hpcray.init(num_cpus=2)

@hpcray.remote
def talk():
    print("said on stdout")
    print("said on stderr", file=sys.stderr)
    return os.getpid()

@hpcray.remote(max_retries=0)
def crash():
    os.kill(os.getpid(), signal.SIGKILL)

class Escape(BaseException):  # not an Exception: it leaves the worker's loop
    pass

@hpcray.remote(max_retries=0)
def escape():
    raise Escape("out of the worker loop")

@hpcray.remote(max_restarts=0)
class Doomed:
    def pid(self):
        return os.getpid()
    def leave(self):
        os._exit(3)

talker = hpcray.get(talk.remote())
try:
    hpcray.get(crash.remote())
except hpcray.exceptions.WorkerCrashedError:
    print("CRASH SEEN")
try:
    hpcray.get(escape.remote())
except hpcray.exceptions.WorkerCrashedError:
    print("ESCAPE SEEN")
doomed = Doomed.remote()
doomed_pid = hpcray.get(doomed.pid.remote())
try:
    hpcray.get(doomed.leave.remote())
except hpcray.exceptions.RayActorError:
    print("ACTOR DIED")
hpcray.shutdown()
print(f"TALKER={talker} DOOMED={doomed_pid}")
'''


def _run(tmp_path, env: dict, cwd) -> subprocess.CompletedProcess:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    # A job of its own: neither this job's settings nor its launcher's (Open MPI's would
    # make the driver wait to join this pytest's job)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(
        ("HPCRAY_", "SLURM_", "PMI_", "PMIX_", "OMPI_", "PRTE_", "HYDRA_", "MPI_LOCAL"))}
    full_env.update(env, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, str(script)], cwd=str(cwd), env=full_env,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.timeout(120)
def test_node_log_and_worker_files_outlive_the_job(tmp_path):
    folder = tmp_path / "logs"
    proc = _run(tmp_path, {"HPCRAY_LOG_DIR": str(folder)}, tmp_path)
    talker, doomed = map(int, re.search(r"TALKER=(\d+) DOOMED=(\d+)", proc.stdout).groups())
    assert all(seen in proc.stdout for seen in ("CRASH SEEN", "ESCAPE SEEN", "ACTOR DIED"))
    # The terminal still gets every line, prefixed as Ray does: the task's name and pid.
    assert f"(talk pid={talker}) said on stdout" in proc.stdout.splitlines()
    assert f"(talk pid={talker}) said on stderr" in proc.stderr.splitlines()
    assert ":task_name:" not in proc.stdout + proc.stderr
    assert "logs in" not in proc.stderr  # a folder the user chose is not announced
    # Warnings still reach stderr (logging's last resort), the INFO records only the file.
    assert re.search(r"^worker pid=\d+ was killed by signal 9", proc.stderr, re.M), proc.stderr
    assert "node stopped" not in proc.stderr
    # Each worker's output, whole, in its own files, with Ray's line before each task's.
    assert (folder / f"node-0-worker-{talker}.out").read_text() == \
        ":task_name:talk\nsaid on stdout\n"
    log = (folder / "node-0.log").read_text()
    # escape() may run in the talker's worker (workers are reused): its traceback then follows.
    escaper = int(re.search(r"worker pid=(\d+) exited with status 1 while running task "
                            r"'__main__.escape'", log).group(1))
    talker_err = (folder / f"node-0-worker-{talker}.err").read_text()
    assert talker_err.startswith(":task_name:talk\nsaid on stderr\n"), talker_err
    assert escaper == talker or talker_err == ":task_name:talk\nsaid on stderr\n", talker_err
    escaper_err = (folder / f"node-0-worker-{escaper}.err").read_text()
    assert escaper_err.endswith("Escape: out of the worker loop\n"), escaper_err
    lines = log.splitlines()
    assert lines and all(" rank 0 " in line for line in lines if line[:4].isdigit()), log
    assert "hpcray.launch: node" in log and "node stopped" in log
    # The crashes, each with what it was running.
    assert re.search(r"WARNING hpcray.node: worker pid=\d+ was killed by signal 9 \(SIGKILL\) "
                     r"while running task '__main__.crash' \(task id [0-9a-f]+\)", log), log
    assert re.search(r"INFO hpcray.tasks: task '__main__.crash' \(task id [0-9a-f]+\) failed: "
                     r"WORKER_DIED", log), log
    assert re.search(rf"INFO hpcray.node: worker pid={doomed} started \(actor Doomed", log), log
    # An exception that escaped the worker's loop: its last line, and where the rest is.
    assert re.search(r"WARNING hpcray.node: worker pid=(\d+) exited with status 1 while running "
                     r"task '__main__.escape' \(task id [0-9a-f]+\); its stderr ended with: "
                     r"Escape: out of the worker loop; its output: "
                     r"node-0-worker-\1.out/.err", log), log
    assert re.search(rf"WARNING hpcray.node: worker pid={doomed} exited with status 3 while "
                     r"running actor Doomed \(actor id [0-9a-f]+\)", log), log
    assert not (tmp_path / "hpcray-logs").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("level", ["WARNING", "INFO"])
def test_a_users_logging_setup_sees_what_it_saw_before(tmp_path, level):
    """A driver that configured logging (root at WARNING or INFO, its own format) gets
    hpcray's warnings through its handler, not the INFO records the node log takes (as
    Ray's logger keeps its own)."""
    folder = tmp_path / "logs"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.replace("import hpcray\n", "import hpcray, logging\n"
                                     f"logging.basicConfig(level=logging.{level}, "
                                     "format='USER %(name)s %(message)s')\n", 1))
    env = dict(os.environ, HPCRAY_LOG_DIR=str(folder), PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^USER hpcray.node worker pid=\d+ was killed by signal 9", proc.stderr,
                     re.M), proc.stderr
    assert "node stopped" not in proc.stderr and "hpcray.launch" not in proc.stderr
    assert "node stopped" in (folder / "node-0.log").read_text()


@pytest.mark.timeout(120)
def test_a_folder_that_cannot_be_written_is_a_warning_not_a_failure(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = _run(tmp_path, {"HPCRAY_LOG_DIR": str(blocker / "logs")}, tmp_path)
    assert "CRASH SEEN" in proc.stdout
    assert f"rank 0 cannot write the job's logs to {blocker / 'logs'}" in proc.stderr
    assert "set HPCRAY_LOG_DIR to a folder every node can write" in proc.stderr


@pytest.mark.timeout(120)
def test_default_folder_is_named_and_said_once(tmp_path):
    proc = _run(tmp_path, {}, tmp_path)
    jobs = os.listdir(tmp_path / "hpcray-logs")
    assert len(jobs) == 1 and re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{8}", jobs[0]), jobs
    folder = tmp_path / "hpcray-logs" / jobs[0]
    said = [line for line in proc.stderr.splitlines() if "logs in" in line]
    assert said == [f"hpcray: job {jobs[0]}: logs in {folder}"]
    assert (folder / "node-0.log").exists()


@pytest.mark.timeout(120)
def test_slurm_job_id_names_the_folder_in_the_submit_dir(tmp_path):
    submit = tmp_path / "submitted-here"
    submit.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _run(tmp_path, {"SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(submit)},
                elsewhere)
    assert (submit / "hpcray-logs" / "4242" / "node-0.log").exists()
    assert not (elsewhere / "hpcray-logs").exists()
    assert "logs in" not in proc.stderr


@pytest.mark.multinode
@pytest.mark.timeout(200)
def test_every_rank_writes_its_node_log_and_its_workers_output(tmp_path):
    folder = tmp_path / "logs"
    out = run_mpi(tmp_path, 3, """
        import os, signal, hpcray as ray
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}
        @ray.remote
        def talk():
            print("hello from", ray.get_runtime_context().get_node_id())
            return os.getpid()
        @ray.remote(max_retries=0)
        def crash():
            os.kill(os.getpid(), signal.SIGKILL)
        pid = ray.get(talk.options(scheduling_strategy=On(ids[1], soft=False)).remote())
        try:
            ray.get(crash.options(scheduling_strategy=On(ids[2], soft=False)).remote())
        except ray.exceptions.WorkerCrashedError:
            print("CRASH SEEN")
        ray.shutdown()
        print(f"TALKER={pid} NODE1={ids[1]}")
    """, env={"HPCRAY_LOG_DIR": str(folder)})
    talker, node1 = re.search(r"TALKER=(\d+) NODE1=(\w+)", out).groups()
    assert "CRASH SEEN" in out
    assert f"(talk pid={talker}, rank=1) hello from {node1}" in out.splitlines(), out
    assert (folder / f"node-1-worker-{talker}.out").read_text() == \
        f":task_name:talk\nhello from {node1}\n"
    for rank in range(3):
        log = (folder / f"node-{rank}.log").read_text()
        records = [line for line in log.splitlines() if line[:4].isdigit()]
        assert records and all(f" rank {rank} " in line for line in records), log
    assert re.search(r"worker pid=\d+ was killed by signal 9 \(SIGKILL\) while running task "
                     r"'__main__.crash'", (folder / "node-2.log").read_text())


def test_repo_has_no_log_folder_from_tests():
    """The suite's jobs write under a temporary HPCRAY_LOG_DIR (tests/conftest.py)."""
    assert os.environ.get("HPCRAY_LOG_DIR")
    with open(os.path.join(REPO, ".gitignore")) as ignored:
        assert "hpcray-logs/" in ignored.read().split()
