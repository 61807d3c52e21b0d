"""Requests no node can satisfy, as Ray treats them: `.remote()` returns, the task (or
actor) stays pending with one warning per request shape, `wait` and `get(timeout=)`
behave, `cancel` (or `kill`) frees it, feasible work runs meanwhile, and a driver that
exits with it pending leaves nothing behind. HPCRAY_INFEASIBLE=error fails it at once
through its refs instead. Invalid options still raise at the call site."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import psutil
import pytest

import hpcray
from hpcray import exceptions
from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARNING = "cannot be scheduled right now"


@hpcray.remote
def identity(x):
    return x


def infeasible_warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records
            if r.name == "hpcray.node" and WARNING in r.getMessage()]


@pytest.mark.one_node
def test_infeasible_task_stays_pending_and_warns_once_per_shape(ray_start, caplog):
    caplog.set_level(logging.WARNING, logger="hpcray.node")
    big = [identity.options(num_cpus=3).remote(i) for i in range(3)]
    special = identity.options(resources={"special": 1}).remote(0)
    # Feasible work is not held up behind them.
    assert hpcray.get([identity.remote(i) for i in range(20)], timeout=60) == list(range(20))
    ready, not_ready = hpcray.wait(big + [special], num_returns=1, timeout=0.2)
    assert ready == [] and len(not_ready) == 4
    with pytest.raises(exceptions.GetTimeoutError):
        hpcray.get(big[0], timeout=0.2)
    warnings = infeasible_warnings(caplog)
    assert len(warnings) == 2, warnings  # one per shape, not one per task
    assert "{'CPU': 3.0}" in warnings[0] and "identity" in warnings[0]
    assert "'CPU': 2.0" in warnings[0]  # what the cluster has
    assert "'special': 1.0" in warnings[1]
    for ref in big + [special]:
        hpcray.cancel(ref)
    for ref in big + [special]:
        with pytest.raises(exceptions.TaskCancelledError):
            hpcray.get(ref, timeout=30)
    assert len(infeasible_warnings(caplog)) == 2
    # The same shape again: pending, and no second warning.
    again = identity.options(num_cpus=3).remote(9)
    assert hpcray.wait([again], timeout=0.1)[0] == []
    assert len(infeasible_warnings(caplog)) == 2
    hpcray.cancel(again)
    with pytest.raises(exceptions.TaskCancelledError):
        hpcray.get(again, timeout=30)


def test_a_task_waiting_on_an_infeasible_one_is_cancelled_with_it(ray_start):
    pending = identity.options(num_cpus=3).remote(1)
    dependent = identity.remote(pending)
    assert hpcray.wait([dependent], timeout=0.2)[0] == []
    hpcray.cancel(pending)
    with pytest.raises(exceptions.TaskCancelledError):
        hpcray.get(dependent, timeout=30)


def test_infeasible_task_submitted_from_a_task(ray_start):
    @hpcray.remote
    def submits_one():
        ref = identity.options(num_cpus=8).remote(1)
        ready, _ = hpcray.wait([ref], timeout=0.2)
        try:
            hpcray.get(ref, timeout=0.1)
            timed_out = False
        except exceptions.GetTimeoutError:
            timed_out = True
        hpcray.cancel(ref)
        try:
            hpcray.get(ref, timeout=30)
        except exceptions.TaskCancelledError:
            return ready, timed_out, "cancelled"
        return ready, timed_out, "ran"

    assert hpcray.get(submits_one.remote(), timeout=60) == ([], True, "cancelled")


def test_infeasible_actor_stays_pending_until_killed(ray_start, caplog):
    caplog.set_level(logging.WARNING, logger="hpcray.node")

    @hpcray.remote(num_gpus=1)
    class NeedsGpu:
        def ping(self):
            return "pong"

    actor = NeedsGpu.remote()
    call = actor.ping.remote()
    assert hpcray.wait([call], timeout=0.2)[0] == []
    assert hpcray.get(identity.remote(5), timeout=60) == 5
    warnings = infeasible_warnings(caplog)
    assert len(warnings) == 1 and "NeedsGpu" in warnings[0] and "{'GPU': 1.0}" in warnings[0]
    hpcray.kill(actor)
    with pytest.raises(exceptions.RayActorError):
        hpcray.get(call, timeout=30)


def test_invalid_requests_still_raise_at_the_call_site(ray_start):
    with pytest.raises(ValueError, match="num_cpus"):
        identity.options(num_cpus=-1).remote(1)
    with pytest.raises(ValueError, match="resources"):
        identity.options(resources={"special": -2}).remote(1)
    with pytest.raises(ValueError, match="num_cpus"):
        identity.options(resources={"CPU": 1}).remote(1)


def test_hard_node_affinity_that_cannot_hold_fails_through_the_ref(ray_start):
    missing = NodeAffinitySchedulingStrategy(node_id=f"{7:08x}" + "0" * 48, soft=False)
    ref = identity.options(scheduling_strategy=missing).remote(1)
    with pytest.raises(exceptions.TaskUnschedulableError, match="soft=False"):
        hpcray.get(ref, timeout=30)
    here = NodeAffinitySchedulingStrategy(node_id=hpcray.nodes()[0]["NodeID"], soft=False)
    with pytest.raises(exceptions.TaskUnschedulableError, match="CPU"):
        hpcray.get(identity.options(scheduling_strategy=here, num_cpus=3).remote(1),
                   timeout=30)
    assert hpcray.get(identity.options(scheduling_strategy=here).remote(2), timeout=30) == 2


@pytest.mark.one_node
def test_error_mode_fails_infeasible_requests_through_their_refs(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="hpcray.node")
    monkeypatch.setenv("HPCRAY_INFEASIBLE", "error")
    hpcray.init(num_cpus=2, num_gpus=0, object_store_memory=128 * 1024 * 1024)
    try:
        ref = identity.options(num_cpus=3).remote(1)
        with pytest.raises(exceptions.ResourceInfeasibleError) as raised:
            hpcray.get(ref, timeout=30)
        message = str(raised.value)
        assert "{'CPU': 3.0}" in message and "'CPU': 2.0" in message, message

        @hpcray.remote(resources={"special": 1})
        class Special:
            def ping(self):
                return "pong"

        with pytest.raises(exceptions.ActorUnschedulableError, match="special"):
            hpcray.get(Special.remote().ping.remote(), timeout=30)
        assert hpcray.get(identity.remote(3), timeout=30) == 3
        assert infeasible_warnings(caplog) == []
    finally:
        hpcray.shutdown()


def test_unknown_infeasible_mode_is_rejected(monkeypatch):
    monkeypatch.setenv("HPCRAY_INFEASIBLE", "sometimes")
    with pytest.raises(ValueError, match="HPCRAY_INFEASIBLE"):
        hpcray.init(num_cpus=1)
    assert not hpcray.is_initialized()


DRIVER = textwrap.dedent('''
    import json, os, psutil
    import hpcray

    hpcray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024)

    @hpcray.remote
    def f(x):
        return x

    @hpcray.remote(num_cpus=16)
    class TooBig:
        pass

    pending = [f.options(num_cpus=16).remote(i) for i in range(3)]
    actor = TooBig.remote()
    assert hpcray.get(f.remote(1), timeout=60) == 1
    node = hpcray.context.driver_node
    print(json.dumps({"store": node.store_name, "forkserver": node.processes.forkserver.pid,
                      "children": [p.pid for p in psutil.Process().children(recursive=True)]}),
          flush=True)
    # Exits with the three tasks and the actor still pending.
''')


@pytest.mark.timeout(60)
def test_driver_exits_cleanly_with_infeasible_work_pending(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                          text=True, timeout=45)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.splitlines()[-1])
    assert proc.stderr.count(WARNING) == 2, proc.stderr  # the tasks' shape, the actor's
    assert not os.path.exists(os.path.join("/dev/shm", info["store"].lstrip("/")))
    left = [pid for pid in info["children"] if psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {left}"
