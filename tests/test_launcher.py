"""`python -m hpcray` as a user meets it: --help, --version, and usage errors that
end with one line and exit status 2, never a traceback from inside hpcray."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hpcray

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).with_name("mpiexec")
INTERNAL = {"HPCRAY_FORKSERVER_FD", "HPCRAY_FORKSERVER_JOB"}  # set by hpcray for its own


def launch(*args, cwd=None, launcher=()):
    return subprocess.run([*launcher, sys.executable, "-m", "hpcray", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=90)


def variables_read_by_hpcray() -> set:
    """Every HPCRAY_* name in hpcray's source (a per-rank one as HPCRAY_..._RANK_<r>)."""
    names = set()
    for path in list((ROOT / "hpcray").rglob("*.py")) + list((ROOT / "hpcray").rglob("*.pyx")):
        for name in re.findall(r"HPCRAY_[A-Z_]*[A-Z]", path.read_text()):
            names.add(name + "_<r>" if name.endswith("_RANK") else name)
    return names - INTERNAL


def test_help_explains_how_to_run_and_every_variable():
    proc = launch("--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for needed in ("app.py", "-m module", "mpiexec -n", "srun --mpi=pmi2", "--version",
                   ".venv/bin/mpiexec", "RAY_ENABLE_AUTO_CONNECT", "--num-cpus N",
                   "--num-gpus N", "--object-store-memory BYTES", "--gcs-shards K",
                   "--log-dir DIR", "--report FILE"):
        assert needed in text, needed
    variables = variables_read_by_hpcray()
    assert {"HPCRAY_GCS_SHARDS", "HPCRAY_RESOURCES_RANK_<r>", "HPCRAY_TRACE",
            "HPCRAY_INFEASIBLE", "HPCRAY_OBJECT_STORE_MEMORY"} <= variables
    missing = sorted(name for name in variables if name not in text)
    assert not missing, f"--help does not list {missing}"
    assert launch("-h").stdout == text


def test_version():
    proc = launch("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"hpcray {hpcray.__version__} ")


@pytest.mark.parametrize("args, says", [
    (["status"], "no such file 'status' (hpcray has no subcommands)"),
    (["--cpus", "4", "app.py"], "unknown option '--cpus'"),
    (["--num-cpus", "4", "--cpus", "4", "app.py"], "unknown option '--cpus'"),
    (["--num-cpus", "four", "app.py"], "--num-cpus 'four': N must be a number of 0 or more"),
    (["--gcs-shards=0", "app.py"], "--gcs-shards '0': K must be a whole number above 0"),
    (["app.py", "--report"], None),  # the program's own argument: it runs
    (["--report"], "--report needs a value (FILE)"),
    (["missing.py"], "no such file 'missing.py'"),
    (["-m"], "-m needs a module name"),
    (["-m", "no_such_module_here"], "no module named 'no_such_module_here'"),
    ([], "no program to run"),
])
def test_usage_errors_are_one_line_and_status_2(tmp_path, args, says):
    (tmp_path / "app.py").write_text("print('ran')\n")
    proc = launch(*args, cwd=tmp_path)
    if says is None:
        assert (proc.returncode, proc.stdout) == (0, "ran\n"), proc.stderr
        return
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("python -m hpcray: error: ") and says in lines[0], lines[0]
    assert "--help" in lines[0]


def test_a_program_and_a_module_still_run(tmp_path):
    (tmp_path / "app.py").write_text("import sys\nprint('ran', sys.argv[1:])\n")
    proc = launch("app.py", "--version", "x", cwd=tmp_path)  # its args are the program's
    assert (proc.returncode, proc.stdout) == (0, "ran ['--version', 'x']\n"), proc.stderr
    proc = launch("-m", "json.tool", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "json.tool" in proc.stdout


NODE_SIZE_JOB = """
import hpcray as ray
ray.init({args})
print("SIZE", ray.cluster_resources().get("CPU"), ray.cluster_resources().get("GPU", 0),
      len(ray.nodes()))
"""


@pytest.mark.parametrize("env, args, says", [
    ({"HPCRAY_NUM_CPUS": "3", "HPCRAY_NUM_GPUS": "2"}, "", "SIZE 3.0 2.0 1"),
    ({"HPCRAY_NUM_CPUS": "3", "HPCRAY_NUM_GPUS": "2"}, "num_cpus=1, num_gpus=0",
     "SIZE 1.0 0 1"),  # init() wins
])
def test_cpus_and_gpus_per_node_from_the_environment(tmp_path, env, args, says):
    (tmp_path / "app.py").write_text(NODE_SIZE_JOB.format(args=args))
    proc = subprocess.run([sys.executable, "-m", "hpcray", "app.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=90,
                          env=dict(os.environ, **env))
    assert proc.returncode == 0, proc.stderr
    assert says in proc.stdout, proc.stdout


OPTIONS_JOB = """
import os, hpcray as ray
ray.init()
print("SIZE", ray.cluster_resources().get("CPU"), ray.cluster_resources().get("GPU", 0),
      len(ray.nodes()), ray.available_resources()["object_store_memory"])
ray.shutdown()
print("REPORT", os.path.exists("job.html"), "LOGS", sorted(os.listdir("logs")))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ranks", [1, pytest.param(3, marks=pytest.mark.multinode)])
def test_launcher_options_set_each_nodes_size_logs_and_report(tmp_path, ranks):
    """The issue's launcher options, as their HPCRAY_* variables would: on every rank."""
    if ranks > 1 and not MPIEXEC.exists():
        pytest.skip(f"no {MPIEXEC}")
    (tmp_path / "app.py").write_text(OPTIONS_JOB)
    launcher = (str(MPIEXEC), "-n", str(ranks)) if ranks > 1 else ()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCRAY_")}
    proc = subprocess.run([*launcher, sys.executable, "-m", "hpcray", "--num-cpus", "2",
                           "--num-gpus=1", "--object-store-memory", str(100 << 20),
                           "--gcs-shards", "1", "--log-dir", "logs", "--report=job.html",
                           "app.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=110, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"SIZE {2.0 * ranks} {1.0 * ranks} {ranks} {float(ranks * (100 << 20))}" \
        in proc.stdout, proc.stdout
    assert "REPORT True" in proc.stdout and all(
        f"'node-{rank}.log'" in proc.stdout for rank in range(ranks)), proc.stdout


@pytest.mark.multinode
@pytest.mark.timeout(120)
@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no {MPIEXEC}")
def test_cpus_per_node_from_the_environment_on_every_rank(tmp_path):
    (tmp_path / "app.py").write_text(NODE_SIZE_JOB.format(args=""))
    proc = subprocess.run([str(MPIEXEC), "-n", "3", sys.executable, "-m", "hpcray", "app.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=110,
                          env=dict(os.environ, HPCRAY_NUM_CPUS="2"))
    assert proc.returncode == 0, proc.stderr
    assert "SIZE 6.0 0 3" in proc.stdout, proc.stdout


@pytest.mark.multinode
@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no {MPIEXEC}")
def test_a_usage_error_under_mpiexec_is_said_once(tmp_path):
    proc = launch("status", cwd=tmp_path, launcher=(str(MPIEXEC), "-n", "2"))
    assert proc.returncode == 2
    assert proc.stderr.count("python -m hpcray: error:") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_launcher_option_names_the_mpiexec_to_use(tmp_path):
    (tmp_path / "app.py").write_text("print('ran')\n")
    proc = launch("-n", "4", "app.py", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "-n is an option of the MPI launcher" in proc.stderr
    assert f"Run `{MPIEXEC} -n 4 {sys.executable} -m hpcray app.py`." in proc.stderr


def test_no_mpiexec_says_how_to_get_one(tmp_path):
    """A Python with no mpiexec beside it and none on PATH (hpcray installed without the
    `mpi` extra): the error says how to get one."""
    import os
    import site
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + site.getsitepackages())}
    proc = subprocess.run([str(bare / "python"), "-m", "hpcray", "-n", "2", "app.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 2, proc.stderr
    assert f"No mpiexec was found beside {bare / 'python'} or on PATH" in proc.stderr
    assert "pip install mpich" in proc.stderr


def _alone_in_mpi(tmp_path, env: dict):
    """Start `python -m hpcray app.py` with what a launcher sets for its rank 0; mpi4py's
    MPI then starts as a singleton, as it does under a launcher it cannot talk to."""
    import os
    (tmp_path / "app.py").write_text("print('NOT REACHED')\n")
    # Not what this process's own launcher set, if the suite runs under one (mpirun -n 3
    # ... -m pytest): the program must look started by the launcher `env` describes.
    inherited = {name: value for name, value in os.environ.items()
                 if not name.startswith(("PMI_", "PMIX_", "HYDI_", "MPI_LOCAL", "OMPI_",
                                         "SLURM_", "HPCRAY_RANK_PID"))}
    proc = subprocess.run([sys.executable, "-m", "hpcray", "app.py"], cwd=tmp_path,
                          env=dict(inherited, **env), capture_output=True, text=True,
                          timeout=90)
    assert proc.returncode == 1 and "NOT REACHED" not in proc.stdout, proc.stdout
    return proc.stderr


def test_srun_without_the_mpi_plugin_names_the_plugin(tmp_path):
    said = _alone_in_mpi(tmp_path, {"SLURM_NTASKS": "3", "SLURM_STEP_ID": "0",
                                    "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"})
    assert "srun started 3 tasks but MPI sees one: each task became a singleton" in said
    assert "Launch with `srun --mpi=pmi2` (MPICH" in said, said  # the venv's MPI is MPICH
    assert "Traceback" not in said


def test_a_launcher_of_another_mpi_names_the_right_mpiexec(tmp_path):
    said = _alone_in_mpi(tmp_path, {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})
    assert ("the launcher started 2 processes (OMPI_COMM_WORLD_SIZE=2) but MPI sees one in "
            "each: that launcher belongs to another MPI than the one mpi4py uses (MPICH") in said
    assert f"Run `{MPIEXEC} -n 2 {sys.executable} -m hpcray app.py`." in said
    assert "Traceback" not in said
