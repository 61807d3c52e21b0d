"""Ray's own core documentation programs, run unmodified with `import ray` answered by hpcray.

Each program in programs.tsv runs as a subprocess twice: on one node (`python prog.py`)
and as a 3-rank job (`mpiexec -n 3 python -m hpcray prog.py`), with shim/ first on
PYTHONPATH so that `import ray` is hpcray (shim/ray/__init__.py maps names and nothing
else). A program passes when it exits 0, prints no Python traceback, prints what Ray's
documentation says it prints where that is listed in EXPECTED_OUTPUT, and leaves no
shared-memory segment behind.

The programs are Ray's (Apache-2.0) and are not kept in this repository: fetch_programs.sh
writes the measured versions into ray/ from a clone of ray-project/ray, or
HPCRAY_RAY_DOC_PROGRAMS names a folder holding them. Where they are absent every test
here skips, saying so. README.md beside this file lists what was collected, what was
not and why, and the gaps below.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.multinode.test_multinode import MPIEXEC, segment_leaks

HERE = Path(__file__).resolve().parent
SHIM = HERE / "shim"
PROGRAMS = Path(os.environ.get("HPCRAY_RAY_DOC_PROGRAMS", HERE / "ray"))
HEADER = "# Source: ray-project/ray "
RUN_TIMEOUT = 120

ONE, RANKS3 = "one node", "3 ranks"

# Programs that fail today because hpcray lacks something Ray has: (program, variant or
# None for both) -> the gap. strict: a fix turns the test into a failure (XPASS) until
# its line here is removed, except for the programs in RACY, which fail only some of the
# time (a pass there proves nothing; remove the line once they pass every time).
GAPS: dict = {}

RACY: set = set()

# What Ray's documentation says the program prints (in its comments or text), where a
# program would otherwise exit 0 with a wrong result.
EXPECTED_OUTPUT = {
    "actors.py": ["Actor task canceled.", "Actor task was cancelled"],
    "actor_creator_failure.py": ["Failed to submit actor call", "detached_actor.ping: hello"],
    "actor_restart.py": ["FAILURE"],
    "actor-repr.py": ["(MyActor(index=1) pid=", "(MyActor(index=2) pid="],  # the repr names it
    "app_logging.py": [") task", ") actor"],  # each worker's print, prefixed with its pid
    "gotchas.py": ["myenv is bar"],
    "pattern_async_actor.py": ["get_num_executed_tasks didn't finish in 5 seconds"],
    "task_exceptions.py": ['task_exceptions.py", line'],
    "tasks.py": ["Object reference was cancelled."],
    "tasks_fault_tolerance.py": ["FAILED AS EXPECTED"],
    "t.py": ["INFO:root:abc"],  # the actor's logging, set up by worker_process_setup_hook
    "tqdm.py": [") task 1: 100/100", ") task 2: 100/100"],  # each task's bar, drawn
}

# Programs that run for minutes by design (sleeps, 100M random samples, an 8M-element
# quicksort). Tests marked slow are skipped unless `-m` names slow.
LONG = {"getting_started.py", "pattern_tree_of_tasks.py", "streaming_generator.py"}

# Programs whose actors hold more CPUs than a small machine has: they wait forever for
# room, in Ray too.
CPUS_NEEDED = {"pattern_tree_of_actors.py": 8}

# Programs that fail under Ray too where this runs.
RAY_FAILS_TOO = {
    "anti_pattern_ray_get_ray_wait_async.py": (
        sys.version_info >= (3, 11),
        "asyncio.wait() takes only futures since Python 3.11; Ray's ObjectRef fails here "
        "too (ray-project/ray#31606)"),
    "anti_pattern_out_of_band_object_ref_serialization.py": (
        True,
        "its second call sets RAY_allow_out_of_band_object_ref_serialization=0 outside a "
        "try: Ray 2.60 raises OufOfBandObjectRefSerializationException there (run "
        "2026-12-05), as hpcray does"),
}


def manifest() -> list[tuple[str, str, str, str]]:
    rows = []
    for line in (HERE / "programs.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            name, path, commit, sha = line.split("\t")
            rows.append((name, path, commit, sha))
    return rows


def cluster_cpus(variant: str) -> int:
    cpus = len(os.sched_getaffinity(0))
    return cpus if variant == ONE else 3 * max(1, cpus // 3)


def cases():
    for name, _path, _commit, _sha in manifest():
        for variant in (ONE, RANKS3):
            marks = []
            gap = GAPS.get((name, variant)) or GAPS.get((name, None))
            if gap:
                marks.append(pytest.mark.xfail(strict=name not in RACY, reason=gap))
            if variant == RANKS3:
                marks.append(pytest.mark.multinode)
            if name in LONG:
                marks.append(pytest.mark.slow)
            suffix = "1node" if variant == ONE else "3ranks"
            yield pytest.param(name, variant, marks=marks, id=f"{name[:-3]}-{suffix}")


def program_text(name: str, commit: str, sha: str) -> str:
    path = PROGRAMS / name
    if not path.exists():
        pytest.skip(f"Ray's program {name} is not in {PROGRAMS}: run "
                    "tests/doc_programs/fetch_programs.sh RAY_CHECKOUT")
    data = path.read_bytes()
    if data.startswith(HEADER.encode()):
        body = data.split(b"\n", 1)[1]
    else:
        body = data
    got = hashlib.sha256(body).hexdigest()
    assert got == sha, f"{path} is not the version measured ({commit}): SHA-256 {got}"
    return data.decode()


def run(argv: list[str], cwd: Path, stderr_apart: bool = False):
    """Run a program with `import ray` answered by hpcray: (exit status, output), or with
    stderr_apart (exit status, stdout, stderr)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SHIM)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # `python` is this interpreter, as in the venv (or notebook kernel) a user runs from.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE if stderr_apart else subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        output, errors = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, errors = proc.communicate()
        pytest.fail(f"{' '.join(argv[-2:])} ran over {RUN_TIMEOUT} s; output:\n{output}"
                    f"{errors or ''}")
    if stderr_apart:
        return proc.returncode, output, errors
    return proc.returncode, output


def argv_for(name: str, variant: str) -> list[str]:
    """How a program runs: on one node, or as a 3-rank job."""
    if variant == ONE:
        return [sys.executable, name]
    return [str(MPIEXEC), "-n", "3", sys.executable, "-m", "hpcray", name]


@pytest.mark.timeout(RUN_TIMEOUT + 60)
@pytest.mark.parametrize(("name", "variant"), list(cases()))
def test_ray_doc_program(name, variant, tmp_path, request):
    commit, sha = {row[0]: row[2:] for row in manifest()}[name]
    text = program_text(name, commit, sha)
    if cluster_cpus(variant) < CPUS_NEEDED.get(name, 0):
        pytest.skip(f"its actors hold {CPUS_NEEDED[name]} CPUs; this cluster has "
                    f"{cluster_cpus(variant)} (Ray waits forever here too)")
    fails_in_ray, why = RAY_FAILS_TOO.get(name, (False, ""))
    if fails_in_ray:
        pytest.skip(why)
    if (request.node.get_closest_marker("slow")
            and "slow" not in request.config.getoption("markexpr")):
        pytest.skip("slow: run with -m slow")
    program = tmp_path / name
    program.write_text(text)
    before = set(os.listdir("/dev/shm"))
    code, output = run(argv_for(name, variant), tmp_path)
    assert code == 0, f"exit status {code}; output:\n{output}"
    assert "Traceback (most recent call last)" not in output, output
    for expected in EXPECTED_OUTPUT.get(name, ()):
        assert expected in output, f"Ray's documentation prints {expected!r}; got:\n{output}"
    assert not segment_leaks(before), f"segments left: {segment_leaks(before)}"


def test_shim_maps_ray_names_to_hpcray_modules(tmp_path):
    # Runs without Ray's programs: the mapping the programs rely on, and that it leaves
    # hpcray's modules as they were.
    (tmp_path / "probe.py").write_text(textwrap.dedent("""
        import ray, ray.util.queue
        import ray.exceptions as rex
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        from ray.util import ActorPool
        import hpcray, hpcray.util.queue, hpcray.util.scheduling_strategies as hss
        assert ray is hpcray and ray.util.queue is hpcray.util.queue and rex is hpcray.exceptions
        assert NodeAffinitySchedulingStrategy is hss.NodeAffinitySchedulingStrategy
        assert ActorPool is hpcray.util.ActorPool
        assert hpcray.util.queue.__spec__.name == "hpcray.util.queue"
        try:
            import ray.util.no_such_module
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError("a module hpcray lacks was found")
        print("OK")
    """))
    code, output = run([sys.executable, "probe.py"], tmp_path)
    assert code == 0 and output.strip() == "OK", output
