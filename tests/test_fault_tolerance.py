"""Tasks whose worker dies, and tasks that raise: retries, errors, and a runtime that goes on."""

import os
import signal
import time

import psutil
import pytest

import hpcray
from hpcray.exceptions import RayTaskError, WorkerCrashedError
from hpcray.util.state import list_workers


@hpcray.remote
def plain(x):
    return x * 10


def _still_works():
    assert hpcray.get(plain.remote(4), timeout=30) == 40
    assert hpcray.get([plain.remote(i) for i in range(6)], timeout=30) == [i * 10 for i in range(6)]


def _wait_for_file(path: str, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


@hpcray.remote
def die_first_time(marker):
    """Kills its own worker on the first attempt; returns its attempt record afterwards."""
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)
    return ("second", os.getpid())


@pytest.mark.timeout(60)
def test_worker_death_is_retried(ray_shared, tmp_path):
    marker = str(tmp_path / "attempt1")
    status, pid = hpcray.get(die_first_time.remote(marker), timeout=45)
    assert status == "second"
    with open(marker) as f:
        assert int(f.read()) != pid  # ran again in another worker
    _still_works()


@pytest.mark.timeout(60)
def test_worker_death_retried_with_explicit_max_retries(ray_shared, tmp_path):
    marker = str(tmp_path / "attempt1")
    ref = die_first_time.options(max_retries=1).remote(marker)
    assert hpcray.get(ref, timeout=45)[0] == "second"
    _still_works()


@pytest.mark.timeout(60)
def test_worker_death_without_retries_raises_worker_crashed(ray_shared, tmp_path):
    marker = str(tmp_path / "attempt1")
    ref = die_first_time.options(max_retries=0).remote(marker)
    with pytest.raises(WorkerCrashedError):
        hpcray.get(ref, timeout=45)
    assert os.path.exists(marker)
    _still_works()


@pytest.mark.timeout(60)
def test_worker_crashes_every_time_runs_out_of_retries(ray_shared, tmp_path):
    @hpcray.remote(max_retries=2)
    def always_die(directory):
        with open(os.path.join(directory, f"attempt-{os.getpid()}"), "w"):
            pass
        os._exit(1)

    with pytest.raises(WorkerCrashedError):
        hpcray.get(always_die.remote(str(tmp_path)), timeout=45)
    assert len(os.listdir(tmp_path)) == 3  # the first run and two retries
    _still_works()


@pytest.mark.timeout(60)
def test_dependent_task_sees_retried_value(ray_shared, tmp_path):
    marker = str(tmp_path / "attempt1")
    first = die_first_time.remote(marker)

    @hpcray.remote
    def consume(value):
        return value[0] + "-consumed"

    assert hpcray.get(consume.remote(first), timeout=45) == "second-consumed"
    _still_works()


@pytest.mark.timeout(60)
def test_retry_exceptions_true_retries(ray_shared, tmp_path):
    @hpcray.remote(retry_exceptions=True, max_retries=2)
    def flaky(marker):
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise ValueError("first attempt fails")
        return "recovered"

    marker = str(tmp_path / "raised-once")
    assert hpcray.get(flaky.remote(marker), timeout=45) == "recovered"
    _still_works()


@pytest.mark.timeout(60)
def test_retry_exceptions_via_options(ray_shared, tmp_path):
    @hpcray.remote
    def flaky(marker):
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise KeyError("first attempt fails")
        return "recovered"

    marker = str(tmp_path / "raised-once")
    ref = flaky.options(retry_exceptions=[KeyError], max_retries=1).remote(marker)
    assert hpcray.get(ref, timeout=45) == "recovered"


@pytest.mark.timeout(60)
def test_retry_exceptions_list_does_not_retry_other_exceptions(ray_shared, tmp_path):
    @hpcray.remote(retry_exceptions=[KeyError], max_retries=3)
    def raises_value_error(directory):
        with open(os.path.join(directory, f"attempt-{time.monotonic_ns()}"), "w"):
            pass
        raise ValueError("not retried")

    with pytest.raises(ValueError) as info:
        hpcray.get(raises_value_error.remote(str(tmp_path)), timeout=45)
    assert isinstance(info.value, RayTaskError)
    assert len(os.listdir(tmp_path)) == 1
    _still_works()


@pytest.mark.timeout(60)
def test_exceptions_not_retried_by_default(ray_shared, tmp_path):
    @hpcray.remote(max_retries=3)
    def raises(directory):
        with open(os.path.join(directory, f"attempt-{time.monotonic_ns()}"), "w"):
            pass
        raise ValueError("no retry")

    with pytest.raises(ValueError):
        hpcray.get(raises.remote(str(tmp_path)), timeout=45)
    assert len(os.listdir(tmp_path)) == 1


@pytest.mark.timeout(60)
def test_retry_exceptions_gives_up_after_max_retries(ray_shared, tmp_path):
    @hpcray.remote(retry_exceptions=True, max_retries=2)
    def always_raises(directory):
        with open(os.path.join(directory, f"attempt-{time.monotonic_ns()}"), "w"):
            pass
        raise ValueError("always")

    with pytest.raises(ValueError):
        hpcray.get(always_raises.remote(str(tmp_path)), timeout=45)
    assert len(os.listdir(tmp_path)) == 3
    _still_works()


@pytest.mark.timeout(60)
def test_worker_sigkilled_from_outside_is_retried(ray_shared, tmp_path):
    pid_file = str(tmp_path / "pid")
    release = str(tmp_path / "release")

    @hpcray.remote
    def victim(pid_file, release):
        if not os.path.exists(pid_file):
            with open(pid_file + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(pid_file + ".tmp", pid_file)
            _wait_for_file(release, 40)  # the test kills us while we wait here
            return "not killed"
        return ("retried", os.getpid())

    ref = victim.remote(pid_file, release)
    _wait_for_file(pid_file)
    with open(pid_file) as f:
        pid = int(f.read())
    os.kill(pid, signal.SIGKILL)
    status, new_pid = hpcray.get(ref, timeout=45)
    assert status == "retried"
    assert new_pid != pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    _still_works()


@pytest.mark.timeout(60)
def test_worker_sigkilled_from_outside_without_retries(ray_shared, tmp_path):
    pid_file = str(tmp_path / "pid")

    @hpcray.remote(max_retries=0)
    def victim(pid_file):
        with open(pid_file + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(pid_file + ".tmp", pid_file)
        time.sleep(40)
        return "not killed"

    ref = victim.remote(pid_file)
    _wait_for_file(pid_file)
    with open(pid_file) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    with pytest.raises(WorkerCrashedError):
        hpcray.get(ref, timeout=45)
    _still_works()


@pytest.mark.timeout(60)
def test_many_worker_deaths_in_a_row(ray_shared, tmp_path):
    refs = [die_first_time.remote(str(tmp_path / f"m{i}")) for i in range(6)]
    assert [r[0] for r in hpcray.get(refs, timeout=50)] == ["second"] * 6
    _still_works()


def test_pins_of_a_killed_reader_are_released(ray_shared):
    # An actor holding a zero-copy view of an object is SIGKILLed: its pins go with it,
    # so the object is freed once the driver drops it (not left pinned by a dead pid).
    import gc

    import numpy as np

    from hpcray import context

    @hpcray.remote
    class Reader:
        def hold(self, refs):
            self.view = hpcray.get(refs[0])
            return os.getpid()

    x = hpcray.put(np.ones(1 << 20))
    object_id = x.binary()
    reader = Reader.remote()
    pid = hpcray.get(reader.hold.remote([x]))
    store = context.get_client().store
    assert any(oid == object_id and pins >= 2 for oid, _, _, pins in store.objects())
    os.kill(pid, signal.SIGKILL)
    del x
    gc.collect()
    deadline = time.monotonic() + 30
    while any(oid == object_id for oid, _, _, _ in store.objects()):
        assert time.monotonic() < deadline, store.objects()
        time.sleep(0.02)


@pytest.mark.parametrize("ray_start_custom", [{"num_cpus": 1}], indirect=True)
def test_workers_that_cannot_start_fail_the_task_with_their_error(ray_start_custom):
    # The store segment removed behind the runtime's back (a /dev/shm cleaner): a new
    # worker cannot attach it. The task must fail with that reason, not wait forever
    # while the node restarts workers in a loop.
    from hpcray import context
    from hpcray._store import Store

    @hpcray.remote
    def pid():
        return os.getpid()

    worker_pid = hpcray.get(pid.remote())
    Store.unlink_name(context.driver_node.store_name)
    os.kill(worker_pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashedError, match="No such file or directory"):
        hpcray.get(pid.remote(), timeout=60)


def test_refs_held_by_a_killed_worker_are_released(ray_shared):
    # An actor keeps a ref (nested in a list) and is SIGKILLed: a crash never reports
    # its drops, so the node drops its holds itself and the object is freed once the
    # driver lets go too.
    import gc

    import numpy as np

    from hpcray import context

    @hpcray.remote
    class Keeper:
        def keep(self, refs):
            self.refs = refs
            return os.getpid()

    x = hpcray.put(np.ones(1 << 20))
    object_id = x.binary()
    keeper = Keeper.remote()
    pid = hpcray.get(keeper.keep.remote([x]))
    os.kill(pid, signal.SIGKILL)
    del x
    gc.collect()
    store = context.get_client().store
    deadline = time.monotonic() + 30
    while any(oid == object_id for oid, _, _, _ in store.objects()):
        assert time.monotonic() < deadline, "the killed actor's ref kept the object"
        time.sleep(0.02)


@pytest.mark.timeout(90)
def test_a_retried_task_lends_its_cpu_again_when_it_blocks(ray_start, tmp_path):
    # A task's first attempt blocked in get (lending its CPU) and was killed there; its
    # retry blocked in get too. The retry must lend its CPU as well: the record still
    # said "blocked", so the node kept the CPU, and with both CPUs held by such retries
    # their children waited forever (the chaos test hung on it, 1 run in 4 under load).
    gate = str(tmp_path / "gate")

    @hpcray.remote
    def child(i, gate):
        open(os.path.join(os.path.dirname(gate), f"child-{i}"), "w").close()
        _wait_for_file(gate, 60)
        return i

    @hpcray.remote
    def quick(i):
        return i

    @hpcray.remote(max_retries=1)
    def parent(i, gate):
        pid_file = os.path.join(os.path.dirname(gate), f"parent-{i}")
        if not os.path.exists(pid_file):  # the first attempt: blocked until killed
            with open(pid_file + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(pid_file + ".tmp", pid_file)
            return hpcray.get(child.remote(i, gate))
        return hpcray.get(quick.remote(i)) * 10  # the retry blocks, with both CPUs held

    refs = [parent.remote(i, gate) for i in range(2)]
    for i in range(2):  # both first attempts wait in get, their children hold the CPUs
        _wait_for_file(str(tmp_path / f"child-{i}"))
    pids = []
    for i in range(2):
        with open(tmp_path / f"parent-{i}") as f:
            pids.append(int(f.read()))
        os.kill(pids[-1], signal.SIGKILL)
    deadline = time.monotonic() + 30  # the node has seen both deaths (still blocked then)
    while time.monotonic() < deadline and any(
            w.is_alive for w in list_workers(limit=10_000) if w.pid in pids):
        time.sleep(0.01)
    open(gate, "w").close()  # the children end; the retries start and block in get
    assert hpcray.get(refs, timeout=40) == [0, 10]
    _still_works()
