"""init() returns once its node's fork server is ready to fork workers.

The fork server imports what workers need (a second or two on a loaded host). If init
returned before that, the first actor a program creates waited for those imports after
init, and Ray's actors.py ("wait until the task is scheduled": sleep 1 s, then cancel)
cancelled its first call before it ran. Here the fork server is made slow on purpose
(a sitecustomize that sleeps in it alone), so the order is certain, not a race.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.multinode.test_multinode import MPIEXEC

pytestmark = pytest.mark.timeout(150)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW_START_S = 1.5  # init itself returns in milliseconds after starting it

# Runs at the start of every interpreter with this folder on its path; sleeps only in a
# fork server (the one process started with HPCRAY_FORKSERVER_JOB), then leaves a mark.
SITECUSTOMIZE = textwrap.dedent(f"""
    import os, time
    if "HPCRAY_FORKSERVER_JOB" in os.environ:
        time.sleep({SLOW_START_S})
        open(os.path.join(os.environ["MARKS"], f"imported-{{os.getpid()}}"), "w").close()
""")

DRIVER = textwrap.dedent("""
    import os, time
    import hpcray as ray

    ray.init()
    node = ray.context.driver_node
    server = node.processes.forkserver.pid
    ready = os.path.exists(os.path.join(os.environ["MARKS"], f"imported-{server}"))
    print("fork server ready when init returned:", ready, flush=True)


    @ray.remote
    class Actor:
        def now(self):
            return time.monotonic()


    ray.get(Actor.remote().now.remote())
    print("OK", flush=True)
""")


def run_driver(tmp_path, argv_prefix):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (tmp_path / "driver.py").write_text(DRIVER)
    marks = tmp_path / "marks"
    marks.mkdir()
    # (not the variables of an MPI job this pytest runs in: its own job, or none)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "OMPI_", "PRTE_", "MPI_LOCAL"))}
    env.update(MARKS=str(marks), PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))
    return subprocess.run(argv_prefix + ["driver.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_init_returns_once_the_fork_server_is_ready(tmp_path):
    proc = run_driver(tmp_path, [sys.executable])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fork server ready when init returned: True" in proc.stdout, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


@pytest.mark.multinode
def test_init_of_a_three_rank_job_returns_once_its_fork_server_is_ready(tmp_path):
    proc = run_driver(tmp_path, [str(MPIEXEC), "-n", "3", sys.executable, "-m", "hpcray"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fork server ready when init returned: True" in proc.stdout, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


def test_workers_leave_what_they_inherit_out_of_their_collections(ray_start):
    # The fork server freezes what it imported before it forks (forkserver.py): a
    # worker's garbage collections then neither walk nor write those objects, whose
    # pages stay shared with the server (a worker's private memory 9.3 -> 3.2 MiB).
    import hpcray

    @hpcray.remote
    def frozen():
        import gc
        return gc.get_freeze_count()

    assert hpcray.get(frozen.remote()) > 1000
