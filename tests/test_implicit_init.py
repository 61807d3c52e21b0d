"""Ray's implicit init(): the first call that needs a runtime starts a local one.

Each test runs a fresh `python -c` program that never calls init(), so no fixture or
earlier test has started a runtime in the process that is checked.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)


def run_program(body: str, env: dict | None = None) -> str:
    """Run `body` in a new interpreter; it must exit 0 and leave no segment behind."""
    program = textwrap.dedent("""
        import os, sys
        import hpcray as ray
        print("PID", os.getpid(), flush=True)
    """) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=100, env=dict(os.environ, **(env or {})))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    pid = output.split("PID ", 1)[1].split()[0]
    left = [name for name in os.listdir("/dev/shm") if name.startswith(f"hpcray-{pid}-")]
    assert not left, f"segments left: {left}\n{output}"
    return output


@pytest.mark.parametrize("first_call", [
    "ray.put(1)",
    "ray.get(ray.put(1))",
    "ray.wait([ray.put(1)])",
    "ray.get_runtime_context().get_node_id()",
    "ray.get_gpu_ids()",
    "Square.remote(2)",
    "Counter.remote()",
    "Square.options(num_cpus=1).remote(2)",
    "Counter.options(name='c').remote()",
])
def test_first_call_starts_a_runtime(first_call):
    out = run_program(f"""
        @ray.remote
        def square(x):
            return x * x
        Square = square

        @ray.remote
        class Counter:
            def __init__(self):
                self.n = 0
            def add(self, k):
                self.n += k
                return self.n

        assert not ray.is_initialized()
        {first_call}
        assert ray.is_initialized()
        assert ray.get(square.remote(3)) == 9
        assert ray.get(Counter.remote().add.remote(5)) == 5
        print("OK")
    """)
    assert "OK" in out


def test_get_actor_kill_and_cancel_start_a_runtime():
    out = run_program("""
        try:
            ray.get_actor("nobody")
        except ValueError:
            pass
        assert ray.is_initialized()

        @ray.remote
        class Actor:
            def ping(self):
                return "pong"
        actor = Actor.remote()
        assert ray.get(actor.ping.remote()) == "pong"
        ref = ray.put(1)
        ray.shutdown()
        # Handles and refs made before a shutdown belong to no runtime; kill and cancel
        # start a new one (as in Ray), which knows neither.
        try:
            ray.kill(actor)
        except ValueError as exc:
            assert "unknown actor" in str(exc)
        assert ray.is_initialized()
        ray.shutdown()
        ray.cancel(ref)
        assert ray.is_initialized()
        try:
            ray.get(ref, timeout=5)
        except ray.exceptions.ObjectLostError:
            pass
        else:
            raise AssertionError("a ref of the previous runtime resolved")
        print("OK")
    """)
    assert "OK" in out


def test_shutdown_then_a_call_starts_a_new_runtime():
    out = run_program("""
        job = ray.get_runtime_context().get_job_id()
        assert ray.get(ray.put("first")) == "first"
        ray.shutdown()
        assert not ray.is_initialized()
        assert ray.get(ray.put("second")) == "second"
        assert ray.is_initialized()
        assert ray.get_runtime_context().get_job_id() != job
        print("OK")
    """)
    assert "OK" in out


def test_implicit_init_has_the_defaults_of_init():
    out = run_program("""
        ray.put(0)
        from hpcray.resources import detect_node_resources
        assert ray.cluster_resources()["CPU"] == detect_node_resources().num_cpus
        try:
            ray.init()
        except RuntimeError as exc:  # as Ray: init() after the implicit one is a reinit
            print("REINIT", exc)
        ray.init(ignore_reinit_error=True)
        print("OK")
    """)
    assert "REINIT" in out and "OK" in out


def test_state_calls_do_not_start_a_runtime():
    # As Ray: cluster_resources, available_resources and nodes need init() first.
    out = run_program("""
        for call in (ray.cluster_resources, ray.available_resources, ray.nodes):
            try:
                call()
            except ray.exceptions.RayError as exc:
                assert "init" in str(exc)
            else:
                raise AssertionError(f"{call.__name__} ran without a runtime")
        assert not ray.is_initialized()
        print("OK")
    """)
    assert "OK" in out


def test_auto_connect_off_keeps_the_error():
    out = run_program("""
        for call in (lambda: ray.put(1), ray.get_runtime_context):
            try:
                call()
            except ray.exceptions.RayError as exc:
                assert "init" in str(exc)
            else:
                raise AssertionError("the runtime started with RAY_ENABLE_AUTO_CONNECT=0")
        assert not ray.is_initialized()
        print("OK")
    """, env={"RAY_ENABLE_AUTO_CONNECT": "0"})
    assert "OK" in out


def test_threads_racing_to_the_first_call_share_one_runtime():
    out = run_program("""
        import threading
        nodes = []
        def first():
            ray.get(ray.put(1))
            nodes.append(ray.get_runtime_context().get_node_id())
        threads = [threading.Thread(target=first) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(nodes) == 8 and len(set(nodes)) == 1, nodes
        print("OK")
    """)
    assert "OK" in out


def test_ray_util_and_its_submodules_after_a_plain_import():
    out = run_program("""
        assert "hpcray.util" not in sys.modules  # import hpcray does not pay for it
        strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy("00", soft=True)
        assert strategy.soft
        assert callable(ray.util.state.list_tasks)
        assert ray.util.ActorPool is ray.util.actor_pool.ActorPool
        assert issubclass(ray.util.queue.Empty, __import__("queue").Empty)
        assert not ray.is_initialized()  # touching ray.util starts nothing
        try:
            ray.util.no_such_thing
        except AttributeError:
            pass
        else:
            raise AssertionError("ray.util.no_such_thing")
        q = ray.util.queue.Queue()  # this one does: it makes an actor
        q.put(1)
        assert q.get() == 1 and ray.is_initialized()
        print("OK")
    """)
    assert "OK" in out
