"""Requests no node of a 3-rank job can satisfy (tests/test_infeasible.py has one node):
pending with a warning, or failed through their refs with HPCRAY_INFEASIBLE=error; a
request only another rank can satisfy runs there; the job ends cleanly with some still
pending. Rank 2 alone has the custom resource "special"."""

import pytest

from tests.multinode.test_multinode import run_mpi

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(200)]

SPECIAL_ON_RANK_2 = {"HPCRAY_RESOURCES_RANK_2": '{"special": 1}'}


def test_pending_on_three_ranks(tmp_path):
    out = run_mpi(tmp_path, 3, """
        import hpcray as ray
        from hpcray import exceptions
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}

        @ray.remote
        def where():
            return ray.get_runtime_context().get_node_id()

        @ray.remote(num_gpus=1)
        class NeedsGpu:
            def ping(self):
                return "pong"

        # Only rank 2 can: it runs there.
        assert ray.get(where.options(resources={"special": 1}).remote(), timeout=60) == ids[2]
        # No rank can: pending, one warning for the shape.
        pending = [where.options(resources={"special": 2}).remote() for _ in range(2)]
        actor = NeedsGpu.remote()
        call = actor.ping.remote()
        spread = [where.options(scheduling_strategy="SPREAD").remote() for _ in range(6)]
        assert set(ray.get(spread, timeout=60)) == set(ids.values())
        assert ray.wait(pending + [call], num_returns=1, timeout=0.2)[0] == []
        try:
            ray.get(pending[0], timeout=0.2)
            raise AssertionError("an infeasible task ran")
        except exceptions.GetTimeoutError:
            pass

        @ray.remote
        def submits_one():
            ref = where.options(num_cpus=4).remote()
            ready, _ = ray.wait([ref], timeout=0.2)
            ray.cancel(ref)
            try:
                ray.get(ref, timeout=30)
                return ready, "ran"
            except exceptions.TaskCancelledError:
                return ready, "cancelled", ray.get_runtime_context().get_node_id()

        on_1 = On(ids[1], soft=False)
        assert ray.get(submits_one.options(scheduling_strategy=on_1).remote(), timeout=60) \\
            == ([], "cancelled", ids[1])
        # A hard affinity to a rank that cannot fails at once; a soft one runs elsewhere.
        try:
            ray.get(where.options(resources={"special": 1}, scheduling_strategy=on_1).remote(),
                    timeout=30)
            raise AssertionError("ran on a node without the resource")
        except exceptions.TaskUnschedulableError as exc:
            assert "soft=False" in str(exc), exc
        soft_1 = On(ids[1], soft=True)
        assert ray.get(where.options(resources={"special": 1}, scheduling_strategy=soft_1)
                       .remote(), timeout=60) == ids[2]
        for ref in pending:
            ray.cancel(ref)
            try:
                ray.get(ref, timeout=30)
                raise AssertionError("a cancelled task ran")
            except exceptions.TaskCancelledError:
                pass
        ray.kill(actor)
        try:
            ray.get(call, timeout=30)
            raise AssertionError("a call of a killed actor ran")
        except exceptions.RayActorError:
            pass
        # The job ends with these still pending: no hang, nothing left behind.
        left = [where.options(num_gpus=2).remote(), NeedsGpu.remote()]
        print("OK", flush=True)
    """, env=SPECIAL_ON_RANK_2, timeout=150)
    assert "OK" in out, out
    assert out.count("It requires {'CPU': 1.0, 'special': 2.0}") == 1, out
    assert out.count("It requires {'GPU': 1.0}") == 1, out  # the actor, created twice
    assert "cluster has {'CPU': 3.0" in out, out


def test_error_mode_on_three_ranks(tmp_path):
    out = run_mpi(tmp_path, 3, """
        import hpcray as ray
        from hpcray import exceptions
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        ray.init(num_cpus=1)
        ids = {n["rank"]: n["NodeID"] for n in ray.nodes()}

        @ray.remote
        def where():
            return ray.get_runtime_context().get_node_id()

        @ray.remote
        def submits_one():
            try:
                ray.get(where.options(num_cpus=4).remote(), timeout=30)
                return "ran"
            except exceptions.ResourceInfeasibleError as exc:
                return str(exc)

        @ray.remote(resources={"special": 2})
        class TooSpecial:
            def ping(self):
                return "pong"

        try:
            ray.get(where.options(resources={"special": 2}).remote(), timeout=30)
            raise AssertionError("an infeasible task ran")
        except exceptions.ResourceInfeasibleError as exc:
            assert "'special': 2.0" in str(exc) and "'special': 1.0" in str(exc), exc
        message = ray.get(submits_one.options(scheduling_strategy=On(ids[1], soft=False))
                          .remote(), timeout=60)
        assert "{'CPU': 4.0}" in message and "'CPU': 3.0" in message, message
        try:
            ray.get(TooSpecial.remote().ping.remote(), timeout=30)
            raise AssertionError("an infeasible actor ran")
        except exceptions.ActorUnschedulableError as exc:
            assert "special" in str(exc), exc
        assert ray.get(where.options(resources={"special": 1}).remote(), timeout=60) == ids[2]
        print("OK", flush=True)
    """, env=dict(SPECIAL_ON_RANK_2, HPCRAY_INFEASIBLE="error"), timeout=150)
    assert "OK" in out, out
    assert "cannot be scheduled right now" not in out, out
