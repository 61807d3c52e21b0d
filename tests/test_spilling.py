"""Spilling on one node: more referenced objects than the store holds go to disk and
come back (runtime/spilling.py), with what Ray promises: contents intact, zero-copy
views never spilled, files removed when freed and at exit, a clear error only for an
object larger than the store."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import hpcray
from hpcray import context, exceptions
from hpcray._private.internal_api import memory_summary
from hpcray.runtime import client
from hpcray.util.report import report_data
from hpcray.util.state import object_store_stats

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
STORE = 80 * MiB
BLOCK = 8 * MiB  # 30 of them: 3x the store
COUNT = 3 * STORE // BLOCK


def block(i: int) -> np.ndarray:
    return np.full(BLOCK // 8, i, dtype=np.int64)


def spill_folders(base) -> list:
    return sorted(name for name in os.listdir(base) if name.startswith("hpcray-spill-"))


def spill_files(base) -> list:
    return [name for folder in spill_folders(base) for name in os.listdir(base / folder)]


@pytest.fixture
def spilling_node(tmp_path):
    base = tmp_path / "spill"
    base.mkdir()
    hpcray.init(num_cpus=2, object_store_memory=STORE, object_spilling_directory=str(base))
    yield base
    hpcray.shutdown()
    assert spill_folders(base) == []  # removed at shutdown


def test_puts_of_three_times_the_store_come_back(spilling_node):
    refs = [hpcray.put(block(i)) for i in range(COUNT)]
    stats = object_store_stats()["cluster"]
    assert stats["spilled_objects"] >= COUNT - STORE // BLOCK
    assert len(spill_files(spilling_node)) == stats["files"] > 0
    for i, ref in enumerate(refs):  # each read restores it, spilling others
        value = hpcray.get(ref)
        assert value[0] == i and value[-1] == i and value.sum() == i * (BLOCK // 8)
        del value
    for i, ref in reversed(list(enumerate(refs))):
        assert hpcray.get(ref)[BLOCK // 16] == i
    stats = object_store_stats()["cluster"]
    assert stats["restored_objects"] >= COUNT - STORE // BLOCK
    assert stats["restored_bytes"] >= stats["restored_objects"] * BLOCK
    summary = memory_summary(stats_only=True)
    assert "Spilled " in summary and "Restored " in summary, summary
    # The report page's summary counts them as "spills" (util/report.py).
    parts = context.get_client().list_state("timeline")
    data = report_data(parts, [], min(p["started"] for p in parts), time.time())
    assert data["summary"]["spills"] == object_store_stats()["cluster"]["spilled_objects"] > 0


def test_task_results_of_three_times_the_store_come_back(spilling_node):
    @hpcray.remote
    def make(i):
        return block(1000 + i)

    @hpcray.remote
    def check(i, value):  # the argument is restored for the worker if it was spilled
        return bool(value[0] == 1000 + i and value[-1] == 1000 + i)

    refs = [make.remote(i) for i in range(COUNT)]
    hpcray.wait(refs, num_returns=COUNT, timeout=None)
    assert object_store_stats()["cluster"]["spilled_objects"] > 0
    assert hpcray.get([check.remote(i, ref) for i, ref in enumerate(refs)]) == [True] * COUNT
    for i, ref in enumerate(refs):
        assert hpcray.get(ref)[7] == 1000 + i


def test_a_task_puts_three_times_the_store(spilling_node):
    @hpcray.remote
    def put_many(n):
        refs = [hpcray.put(block(i)) for i in range(n)]  # the worker asks its node for room
        return refs, [int(hpcray.get(ref)[3]) for ref in refs]

    refs, seen = hpcray.get(put_many.remote(COUNT))
    assert seen == list(range(COUNT))
    assert [int(hpcray.get(ref)[-1]) for ref in refs] == list(range(COUNT))


def test_a_value_in_use_is_never_spilled(spilling_node, monkeypatch):
    kept = hpcray.get(hpcray.put(block(7)))  # a zero-copy view into the store
    address = kept.__array_interface__["data"][0]
    refs = [hpcray.put(block(i)) for i in range(COUNT)]
    assert kept.__array_interface__["data"][0] == address
    assert kept[0] == 7 and kept[-1] == 7 and kept.sum() == 7 * (BLOCK // 8)
    assert [int(hpcray.get(ref)[1]) for ref in refs] == list(range(COUNT))
    # Views of every object the store holds: nothing can go, and the error says so.
    views = []
    # Nothing here releases a view: a short grace proves the error as well as the 5 s
    # that lets a real reader finish (client._FULL_GRACE_S); the gets before it need none.
    with monkeypatch.context() as patch, \
            pytest.raises(exceptions.ObjectStoreFullError, match="in use"):
        patch.setattr(client, "_FULL_GRACE_S", 0.3)
        for ref in refs:
            views.append(hpcray.get(ref))
    assert len(views) < STORE // BLOCK
    del views
    assert int(hpcray.get(hpcray.put(block(5)))[0]) == 5  # room again once they go


def test_freeing_a_spilled_object_removes_its_file(spilling_node):
    refs = [hpcray.put(block(i)) for i in range(COUNT)]
    assert len(spill_files(spilling_node)) > 0
    del refs
    # A state query applies the driver's dropped refs first (else the node's loop does
    # at its next event).
    assert object_store_stats()["cluster"]["files"] == 0
    assert spill_files(spilling_node) == []


def test_an_object_larger_than_the_store_names_both_sizes(spilling_node):
    too_big = np.zeros(STORE // 8 + 1024, dtype=np.int64)
    with pytest.raises(exceptions.ObjectStoreFullError) as error:
        hpcray.put(too_big)
    message = str(error.value)
    size = too_big.nbytes
    assert "larger than this node's whole object store" in message
    assert f"({STORE} bytes)" in message  # the store's size
    assert any(str(n) in message for n in range(size, size + 4096)), message


def test_spill_folder_goes_when_the_driver_is_killed(tmp_path):
    """SIGKILL: no shutdown runs; the fork server (the node's undertaker) removes it."""
    base = tmp_path / "spill"
    base.mkdir()
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys, numpy as np, hpcray
        hpcray.init(num_cpus=1, object_store_memory={STORE})
        refs = [hpcray.put(np.full({BLOCK} // 8, i)) for i in range({COUNT})]
        print("SPILLED", flush=True)
        sys.stdin.read(1)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    env = dict(os.environ, HPCRAY_SPILL_DIR=str(base),
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    with subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout.readline().strip() == "SPILLED"
            assert spill_files(base)
            proc.stdin.write("x")
            proc.stdin.flush()
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
    deadline = time.monotonic() + 30
    while spill_folders(base) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spill_folders(base) == []


def test_no_room_on_disk_is_an_error_naming_the_sizes(tmp_path):
    """A spill file that cannot be written (here: a file size limit, as a full disk or a
    quota would) makes the put fail with the sizes and the folder, and nothing breaks."""
    base = tmp_path / "spill"
    base.mkdir()
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import resource, numpy as np, hpcray
        from hpcray import exceptions
        hpcray.init(num_cpus=1, object_store_memory={STORE})
        resource.setrlimit(resource.RLIMIT_FSIZE, ({BLOCK} // 2, resource.RLIM_INFINITY))
        refs = []
        try:
            for i in range({COUNT}):
                refs.append(hpcray.put(np.full({BLOCK} // 8, i)))
        except exceptions.ObjectStoreFullError as error:
            print("ERROR", error)
        assert len(refs) < {COUNT}
        assert [int(hpcray.get(ref)[0]) for ref in refs] == list(range(len(refs)))
        hpcray.shutdown()
        print("OK")
    """))
    # Its own log folder: the suite's (conftest.py) has grown past the file size limit.
    env = dict(os.environ, HPCRAY_SPILL_DIR=str(base), HPCRAY_LOG_DIR=str(tmp_path / "logs"),
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    error = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")][0]
    assert f"({STORE} bytes) is full" in error and str(base) in error, error
    assert "File too large" in error and " bytes) cannot be spilled to make room for " in error
    assert spill_folders(base) == []


def test_rays_older_spilling_config_is_taken(tmp_path):
    config = {"object_spilling_config": json.dumps(
        {"type": "filesystem", "params": {"directory_path": str(tmp_path)}})}
    hpcray.init(num_cpus=1, object_store_memory=STORE, _system_config=config)
    try:
        refs = [hpcray.put(block(i)) for i in range(STORE // BLOCK + 2)]
        assert spill_files(tmp_path)
        assert int(hpcray.get(refs[0])[0]) == 0
    finally:
        hpcray.shutdown()
    assert spill_folders(tmp_path) == []


def test_a_rerun_replaces_a_copy_its_node_never_took_in(spilling_node):
    """A task's value written by a run that died before its node pinned it (sealed
    unclaimed: never evicted) is replaced when the re-run writes the same id."""
    client = context.get_client()
    object_id = os.urandom(20)
    client.encode_value(object_id, block(1))  # the first run: sealed, then it died
    assert client.store.contains(object_id)
    client.encode_value(object_id, block(2))  # the re-run
    buffer = client.store.get(object_id)
    assert np.frombuffer(memoryview(buffer)[-8:], dtype=np.int64)[0] == 2
    buffer.release()
    assert client.store.delete(object_id)


@pytest.mark.parametrize("variables", [("SLURM_TMPDIR", "TMPDIR"), ("TMPDIR",)])
def test_default_spill_folder_is_under_slurm_tmpdir_else_tmpdir(tmp_path, variables):
    """No HPCRAY_SPILL_DIR: the node spills under $SLURM_TMPDIR (node-local, emptied by
    Slurm), else $TMPDIR, and removes its folder at exit."""
    bases = {name: tmp_path / name.lower() for name in variables}
    for base in bases.values():
        base.mkdir()
    expected = bases[variables[0]]
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import os, numpy as np, hpcray
        hpcray.init(num_cpus=1, object_store_memory={STORE})
        refs = [hpcray.put(np.full({BLOCK} // 8, i)) for i in range({COUNT})]
        folders = [name for name in os.listdir({str(expected)!r})
                   if name.startswith("hpcray-spill-")]
        assert len(folders) == 1 and os.listdir(os.path.join({str(expected)!r}, folders[0]))
        assert [int(hpcray.get(ref)[0]) for ref in refs] == list(range({COUNT}))
        hpcray.shutdown()
        print("OK")
    """))
    env = {k: v for k, v in os.environ.items()
           if k not in ("HPCRAY_SPILL_DIR", "SLURM_TMPDIR", "TMPDIR")}
    env.update({name: str(base) for name, base in bases.items()},
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    for base in bases.values():
        assert spill_folders(base) == [], base
