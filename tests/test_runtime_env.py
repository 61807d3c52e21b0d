"""Ray API pieces its documentation programs use: a job's runtime_env env_vars reach
every worker (tasks and actors, on every node) and not the driver; get_or_create; the
OwnerDiedError name."""

import os
import subprocess
import sys
import textwrap

import pytest

import hpcray
from hpcray import exceptions
from tests.multinode.test_multinode import run_mpi

PROGRAM = """
    import os, hpcray as ray
    ray.init(runtime_env={"env_vars": {"HPCRAY_TEST_FOO": "bar"}})
    @ray.remote
    def f():
        return os.environ.get("HPCRAY_TEST_FOO"), ray.get_runtime_context().get_node_id()
    @ray.remote
    class A:
        def g(self):
            return os.environ.get("HPCRAY_TEST_FOO")
    got = ray.get([f.options(scheduling_strategy="SPREAD").remote() for _ in range(6)])
    assert {value for value, _ in got} == {"bar"}, got
    print("nodes", len({node for _, node in got}))
    assert ray.get(A.remote().g.remote()) == "bar"
    assert os.environ.get("HPCRAY_TEST_FOO") is None  # the driver's own is left alone
    ray.shutdown()
    print("OK")
"""


@pytest.mark.timeout(120)
def test_job_env_vars_reach_every_worker_not_the_driver(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(PROGRAM))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=100, cwd=tmp_path)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.multinode
@pytest.mark.timeout(200)
def test_job_env_vars_reach_workers_on_every_rank(tmp_path):
    out = run_mpi(tmp_path, 3, PROGRAM)
    assert "OK" in out and "nodes 3" in out, out


def test_bad_runtime_env_is_refused_at_init():
    with pytest.raises(TypeError, match="env_vars"):
        hpcray.init(num_cpus=1, runtime_env={"env_vars": {"A": 1}})
    with pytest.raises(TypeError, match="runtime_env must be a dict"):
        hpcray.init(num_cpus=1, runtime_env=["env_vars"])
    assert not hpcray.is_initialized()


def test_runtime_env_fields_that_would_install_warn():
    with pytest.warns(UserWarning, match="pip"):
        hpcray.init(num_cpus=1, runtime_env={"pip": ["requests"]})
    hpcray.shutdown()


def test_get_or_create_returns_the_live_actor():
    hpcray.init(num_cpus=1)
    try:
        @hpcray.remote
        class Greeter:
            def __init__(self, value):
                self.value = value

            def say(self):
                return self.value

        first = Greeter.options(name="g1").get_or_create("Hi Alice")
        again = Greeter.options(name="g1").get_or_create("Hi Dave")  # arguments ignored
        assert hpcray.get(again.say.remote()) == "Hi Alice"
        assert first._actor_id == again._actor_id
        with pytest.raises(ValueError, match="needs a name"):
            Greeter.options().get_or_create("x")
    finally:
        hpcray.shutdown()


def test_owner_died_error_is_an_object_lost_error():
    assert issubclass(exceptions.OwnerDiedError, exceptions.ObjectLostError)
    assert os.environ.get("HPCRAY_TEST_FOO") is None
