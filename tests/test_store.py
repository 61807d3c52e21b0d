"""Tests of the node object store: the C test program, and the Cython binding
hpcray._store across processes (zero copy, pins, LRU eviction, a killed lock
holder, pins of a killed reader, threaded copies, a multiprocess stress run).
Imports only hpcray._store."""
import gc
import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Loads hpcray._store even while hpcray/__init__.py (written by others) does not
# import: the extension module needs nothing from its package.
_LOADER = f"""
import glob, importlib.machinery, importlib.util, os, sys
if {REPO!r} not in sys.path:
    sys.path.insert(0, {REPO!r})
try:
    from hpcray import _store
except Exception:
    _path = sorted(glob.glob(os.path.join({REPO!r}, "hpcray", "_store*.so")))[0]
    _loader = importlib.machinery.ExtensionFileLoader("hpcray._store", _path)
    _spec = importlib.util.spec_from_loader("hpcray._store", _loader)
    _store = importlib.util.module_from_spec(_spec)
    _loader.exec_module(_store)
    sys.modules["hpcray._store"] = _store
"""
_namespace: dict = {}
exec(_LOADER, _namespace)
_store = _namespace["_store"]
Store = _store.Store
StoreError = _store.StoreError
ObjectExistsError = _store.ObjectExistsError
StoreFullError = _store.StoreFullError
ObjectTooLargeError = _store.ObjectTooLargeError
TooManyPinsError = _store.TooManyPinsError
copy_into = _store.copy_into
ID_SIZE = _store.ID_SIZE

PREFIX = f"hpcray-test-{os.getpid()}-"
KiB = 1024
MiB = 1024 * KiB


def oid(n: int) -> bytes:
    return n.to_bytes(8, "little") + b"\xa5" * (ID_SIZE - 8)


def put(store, object_id: bytes, data: bytes) -> None:
    view = store.create_object(object_id, len(data))
    view[:] = data
    store.seal(object_id)


def leftover_segments():
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(PREFIX))


@pytest.fixture
def make_store():
    """Factory of uniquely named stores; closes and unlinks them all after the
    test and checks nothing with this test's prefix stays in /dev/shm."""
    made = []

    def make(capacity=1 * MiB, **kwargs):
        name = f"/{PREFIX}{len(made)}"
        Store.unlink_name(name)
        store = Store.create(name, capacity, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()
        store.unlink()
    gc.collect()
    assert leftover_segments() == []


def run_child(code: str, *args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-c", _LOADER + textwrap.dedent(code), *map(str, args)],
        cwd=REPO, **kwargs)


@pytest.mark.timeout(120)
def test_c_program(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "test_store"
    csrc = os.path.join(REPO, "csrc")
    sources = [os.path.join(csrc, f"{name}.c") for name in ("test_store", "store", "allocator",
                                                            "copy")]
    subprocess.run(
        [cc, "-Wall", "-Wextra", "-Werror", "-std=c11", "-D_GNU_SOURCE", "-O2", "-I", csrc,
         *sources, "-lrt", "-lpthread", "-o", str(exe)],
        check=True)
    with subprocess.Popen([str(exe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        out, err = proc.communicate(timeout=100)
    assert proc.returncode == 0, out + err
    assert "all checks passed" in out
    assert not os.path.exists(f"/dev/shm/hpcray-ctest-{proc.pid}")  # its segment


@pytest.mark.timeout(30)
def test_round_trip(make_store):
    store = make_store(1 * MiB)
    assert ID_SIZE == 20
    assert store.capacity >= 1 * MiB and store.name.startswith(f"/{PREFIX}")
    data = bytes(range(256)) * 40
    view = store.create_object(oid(1), len(data))
    assert len(view) == len(data) and not view.readonly
    assert store.get(oid(1)) is None and not store.contains(oid(1))
    assert store.objects() == [(oid(1), len(data), "CREATED", 1)]
    view[:] = data
    store.seal(oid(1))
    assert store.contains(oid(1))
    with pytest.raises(StoreError):
        store.seal(oid(1))
    with pytest.raises(ObjectExistsError):
        store.create_object(oid(1), 10)

    buf = store.get(oid(1))
    assert buf.size == len(data) and buf.object_id == oid(1) and len(buf) == len(data)
    mv = memoryview(buf)
    assert mv.readonly and mv.format == "B" and mv.nbytes == len(data) and mv.tobytes() == data
    assert store.objects() == [(oid(1), len(data), "SEALED", 1)]
    assert store.stats()["num_pinned"] == 1
    mv.release()
    buf.release()
    buf.release()  # idempotent
    assert store.stats()["num_pinned"] == 0
    with pytest.raises(BufferError):
        memoryview(buf)

    empty = store.create_object(oid(2), 0)
    assert len(empty) == 0
    store.seal(oid(2))
    assert memoryview(store.get(oid(2))).tobytes() == b""

    store.create_object(oid(3), 100)
    store.abort(oid(3))
    assert not store.contains(oid(3)) and store.get(oid(3)) is None
    assert store.delete(oid(1)) and store.delete(oid(2))
    assert not store.delete(oid(1))
    assert store.get(oid(99)) is None
    with pytest.raises(ValueError):
        store.get(b"short")
    stats = store.stats()
    assert {k: stats[k] for k in ("used_bytes", "num_objects", "num_pinned")} == {
        "used_bytes": 0, "num_objects": 0, "num_pinned": 0}
    assert store._debug_check()


@pytest.mark.timeout(30)
def test_segment_is_private_and_attachable(make_store):
    store = make_store(64 * KiB)
    path = "/dev/shm" + store.name
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(StoreError) as exc:
        Store.create(store.name, 64 * KiB)
    assert exc.value.errno == 17  # EEXIST
    put(store, oid(1), b"hello")
    other = Store.attach(store.name)
    try:
        assert other.capacity == store.capacity
        assert memoryview(other.get(oid(1))).tobytes() == b"hello"
        assert other.stats()["num_pinned"] == 0  # the buffer above was dropped
    finally:
        other.close()
    with pytest.raises(StoreError) as exc:
        Store.attach(f"/{PREFIX}missing")
    assert exc.value.errno == 2  # ENOENT
    junk = f"/{PREFIX}junk"
    with open("/dev/shm" + junk, "wb") as f:
        f.write(b"x" * 8192)
    try:
        with pytest.raises(StoreError):
            Store.attach(junk)
    finally:
        Store.unlink_name(junk)
    Store.unlink_name(junk)  # absent: no error


@pytest.mark.timeout(30)
def test_zero_copy(make_store):
    store = make_store(64 * MiB)
    arr = np.arange(4 * MiB, dtype=np.float64)  # 32 MiB
    view = store.create_object(oid(1), arr.nbytes)
    writable = np.frombuffer(view, dtype=np.uint8)
    assert writable.ctypes.data % 64 == 0
    tracemalloc.start()
    try:
        view[:] = memoryview(arr).cast("B")  # the one memcpy of a put
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 * MiB
    store.seal(oid(1))

    buf = store.get(oid(1))
    got = np.frombuffer(buf, dtype=np.float64)
    assert not got.flags.writeable
    with pytest.raises(ValueError):
        got[0] = 1.0
    assert np.array_equal(got, arr)
    assert got.ctypes.data == writable.ctypes.data
    assert np.shares_memory(got, writable)
    writable[:8] = np.frombuffer(np.float64(42.0).tobytes(), dtype=np.uint8)
    assert got[0] == 42.0  # the same bytes, seen through the segment

    # The array keeps the StoreBuffer, and so the pin, alive.
    del buf
    gc.collect()
    assert store.stats()["num_pinned"] == 1
    del got
    gc.collect()
    assert store.stats()["num_pinned"] == 0

    # Pickle protocol 5 out-of-band buffers view the segment too.
    value = {"a": np.arange(1000, dtype=np.int32), "b": "text"}
    buffers = []
    meta = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    raw = buffers[0].raw()
    view = store.create_object(oid(2), raw.nbytes)
    view[:] = raw
    store.seal(oid(2))
    buf = store.get(oid(2))
    loaded = pickle.loads(meta, buffers=[memoryview(buf)[:raw.nbytes]])
    assert np.array_equal(loaded["a"], value["a"]) and loaded["b"] == "text"
    assert np.shares_memory(loaded["a"], np.frombuffer(view, dtype=np.uint8))
    del buf, loaded, view, writable
    gc.collect()
    assert store.stats()["num_pinned"] == 0


@pytest.mark.timeout(30)
def test_pins_block_eviction_and_delete_pending(make_store):
    store = make_store(64 * KiB)
    for i in range(16):
        put(store, oid(i), bytes([i]) * 4096)
    pinned = store.get(oid(0))  # the least recently used, but pinned
    for i in range(100, 116):
        put(store, oid(i), bytes([i]) * 4096)
    # 0 became the least recently used again, yet 100 went instead.
    assert store.contains(oid(0)) and not store.contains(oid(1))
    assert not store.contains(oid(100)) and store.contains(oid(101))
    assert memoryview(pinned).tobytes() == b"\x00" * 4096

    assert store.delete(oid(0))
    assert not store.contains(oid(0)) and store.get(oid(0)) is None
    assert (oid(0), 4096, "DELETE_PENDING", 1) in store.objects()
    with pytest.raises(ObjectExistsError):
        store.create_object(oid(0), 10)
    before = store.stats()
    assert before["num_objects"] == 16 and before["used_bytes"] == 64 * KiB
    assert memoryview(pinned).tobytes() == b"\x00" * 4096  # still intact
    pinned.release()
    after = store.stats()
    assert after["num_objects"] == 15 and after["used_bytes"] == 60 * KiB
    assert after["num_pinned"] == 0
    assert store._debug_check()


@pytest.mark.timeout(30)
def test_lru_eviction_order(make_store):
    store = make_store(64 * KiB)
    for i in range(16):
        put(store, oid(i), bytes([i]) * 4096)
    for i in (3, 0, 7, 1):  # now 2, 4, 5, 6, 8, ... are the oldest
        store.get(oid(i)).release()
    evicted = []
    for k in range(6):
        present = {i for i in range(16) if store.contains(oid(i))}
        put(store, oid(100 + k), b"n" * 4096)
        evicted += sorted(present - {i for i in range(16) if store.contains(oid(i))})
    assert evicted == [2, 4, 5, 6, 8, 9]
    assert store.stats()["num_evictions"] == 6
    # One bigger object evicts the next oldest, in order, until it fits.
    put(store, oid(200), b"b" * 3 * 4096)
    assert [i for i in range(16) if store.contains(oid(i))] == [0, 1, 3, 7, 13, 14, 15]
    for i in (0, 1, 3, 7, 13, 14, 15):
        assert memoryview(store.get(oid(i))).tobytes() == bytes([i]) * 4096
    assert store._debug_check()


@pytest.mark.timeout(30)
def test_too_large_and_full(make_store):
    store = make_store(64 * KiB)
    with pytest.raises(ObjectTooLargeError):
        store.create_object(oid(1), store.capacity + 1)
    assert issubclass(ObjectTooLargeError, StoreFullError)
    for i in range(8):
        put(store, oid(i), b"x" * 8192)
    held = [store.get(oid(i)) for i in range(8)]
    with pytest.raises(StoreFullError) as exc:
        store.create_object(oid(50), 1)
    assert not isinstance(exc.value, ObjectTooLargeError)
    assert store.stats()["num_evictions"] == 0
    # Unsealed objects are never evicted either.
    for b in held[:4]:
        b.release()
    store.create_object(oid(60), 4 * 8192)
    with pytest.raises(StoreFullError):
        store.create_object(oid(61), 1)
    store.abort(oid(60))
    # The store still works after every failure.
    for b in held[4:]:
        b.release()
    put(store, oid(70), b"y" * store.capacity)
    assert memoryview(store.get(oid(70))).tobytes() == b"y" * store.capacity
    assert store.stats()["num_objects"] == 1
    assert store._debug_check()


@pytest.mark.timeout(30)
def test_table_full_evicts(make_store):
    store = make_store(1 * MiB, table_capacity=1024)
    assert store.stats()["table_capacity"] == 1024
    for i in range(2000):
        put(store, oid(i), b"z")
    stats = store.stats()
    assert stats["num_objects"] < 1024 and stats["num_evictions"] > 0
    assert store.contains(oid(1999)) and not store.contains(oid(0))
    assert store._debug_check()


@pytest.mark.timeout(30)
def test_close(make_store):
    store = make_store(64 * KiB)
    put(store, oid(1), b"abc")
    buf = store.get(oid(1))
    view = memoryview(buf)
    store.close()
    store.close()
    with pytest.raises(StoreError):
        store.get(oid(1))
    with pytest.raises(StoreError):
        store.stats()
    assert view.tobytes() == b"abc"  # still mapped: the buffer defers the unmap
    view.release()
    buf.release()  # works after close, so pins do not leak
    other = Store.attach(store.name)
    try:
        assert other.stats()["num_pinned"] == 0
    finally:
        other.close()
    del buf
    gc.collect()


@pytest.mark.timeout(120)
def test_threads_share_one_handle(make_store):
    store = make_store(4 * MiB)
    errors = []

    def work(t):
        try:
            for i in range(1500):
                object_id = oid(t * 100000 + i)
                data = bytes([t]) * (i * 13 % 5000)
                put(store, object_id, data)
                buf = store.get(object_id)
                if buf is not None:  # another thread's put may have evicted it
                    assert memoryview(buf).tobytes() == data
                    buf.release()
                if i % 2:
                    store.delete(object_id)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.stats()["num_pinned"] == 0
    assert store._debug_check()
    for object_id, *_ in store.objects():
        assert store.delete(object_id)
    assert store.stats()["used_bytes"] == 0


_ABANDON_CHILD = """
import os, sys
store = _store.Store.attach(sys.argv[1])
view = store.create_object(bytes(20), 5000)
view[:10] = b"incomplete"
os._exit(0)
"""


@pytest.mark.timeout(60)
def test_abort_dead_creators(make_store):
    store = make_store(64 * KiB)
    mine = store.create_object(oid(1), 100)
    child = run_child(_ABANDON_CHILD, store.name)
    assert child.wait(timeout=30) == 0
    assert sorted(state for *_, state, _ in store.objects()) == ["CREATED", "CREATED"]
    assert store.abort_dead_creators() == 1
    assert store.objects() == [(oid(1), 100, "CREATED", 1)]  # its creator lives
    assert store.abort_dead_creators() == 0
    mine.release()
    store.abort(oid(1))
    assert store.stats()["used_bytes"] == 0


_STRESS_CHILD = """
import json, hashlib, random, sys, zlib
name, seed, count, nprocs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
store = _store.Store.attach(name)
rng = random.Random(seed)

def oid(proc, i):
    return proc.to_bytes(4, "little") + i.to_bytes(4, "little") + b"\\x5a" * 12

def content(object_id):
    size = int.from_bytes(hashlib.blake2b(object_id, digest_size=4).digest(), "little") % 32768
    block = hashlib.blake2b(object_id, digest_size=64).digest()
    return (block * (size // 64 + 1))[:size]

created, verified, missing, deleted, full = 0, 0, 0, 0, 0
mine, held = [], []
for i in range(count):
    object_id = oid(seed, i)
    data = content(object_id)
    try:
        view = store.create_object(object_id, len(data))
    except _store.StoreFullError:
        full += 1
        continue
    view[:] = data
    view.release()
    store.seal(object_id)
    created += 1
    mine.append(i)
    for _ in range(2):
        other = oid(rng.randrange(nprocs), rng.randrange(max(i - 100, 0), i + 1))
        buf = store.get(other)
        if buf is None:
            missing += 1
            continue
        expected = content(other)
        got = memoryview(buf)
        if zlib.crc32(got) != zlib.crc32(expected) or got.nbytes != len(expected):
            print("corrupt", other.hex(), file=sys.stderr)
            sys.exit(3)
        got.release()
        verified += 1
        held.append(buf)
        if len(held) > 4:
            held.pop(rng.randrange(len(held))).release()
    if rng.random() < 0.3 and mine:
        deleted += store.delete(oid(seed, mine.pop(rng.randrange(len(mine)))))
for buf in held:
    buf.release()
for i in mine:
    deleted += store.delete(oid(seed, i))
print(json.dumps(dict(created=created, verified=verified, missing=missing,
                      deleted=deleted, full=full)))
store.close()
"""


@pytest.mark.timeout(300)
def test_multiprocess_stress(make_store):
    nprocs, count = 4, 5000
    store = make_store(16 * MiB)
    children = [run_child(_STRESS_CHILD, store.name, seed, count, nprocs,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for seed in range(nprocs)]
    results = []
    for child in children:
        out, err = child.communicate(timeout=280)
        assert child.returncode == 0, err
        results.append(json.loads(out))
    assert all(r["created"] == count and r["full"] == 0 for r in results), results
    assert sum(r["verified"] for r in results) > 1000, results
    stats = store.stats()
    assert stats["num_evictions"] > 0
    assert stats["num_objects"] == 0 and stats["used_bytes"] == 0, stats
    assert stats["num_pinned"] == 0 and stats["num_recoveries"] == 0
    assert store._debug_check()


_HOLD_LOCK_CHILD = """
import sys
store = _store.Store.attach(sys.argv[1])
store._debug_hold_lock(int(sys.argv[2]))
"""


def wait_for_byte(fd: int, timeout: float) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "child never reported"
    return os.read(fd, 1)


@pytest.mark.timeout(60)
def test_killed_lock_holder(make_store):
    store = make_store(1 * MiB)
    put(store, oid(1), b"before")
    for round_ in range(3):
        r, w = os.pipe()
        try:
            child = run_child(_HOLD_LOCK_CHILD, store.name, w, pass_fds=[w])
            os.close(w)
            assert wait_for_byte(r, 30) == b"L"  # the child holds the lock now
        finally:
            os.close(r)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
        put(store, oid(10 + round_), b"after")
        buf = store.get(oid(1))
        assert memoryview(buf).tobytes() == b"before"
        buf.release()
        assert store.delete(oid(10 + round_))
        assert store.stats()["num_recoveries"] == round_ + 1
        assert store._debug_check()


_CHURN_CHILD = """
import os, sys
store = _store.Store.attach(sys.argv[1])
notify = int(sys.argv[2])
i = 0
held = []
while True:
    object_id = os.getpid().to_bytes(4, "little") + i.to_bytes(8, "little") + bytes(8)
    view = store.create_object(object_id, (i * 7919) % 20000)
    if i % 5:
        store.seal(object_id)
        held.append(store.get(object_id))
        if len(held) > 3:
            held.pop(0).release()
        store.delete(object_id)
    else:
        store.abort(object_id)
    i += 1
    if i == 200:
        os.write(notify, b"R")
"""


@pytest.mark.timeout(120)
def test_killed_while_churning(make_store):
    """A client killed at an arbitrary point of its work (inside the lock or
    not) leaves a store that is consistent and usable; what it held or
    half-made is given back once it is known dead."""
    store = make_store(2 * MiB)
    for round_ in range(5):
        r, w = os.pipe()
        try:
            child = run_child(_CHURN_CHILD, store.name, w, pass_fds=[w])
            os.close(w)
            assert wait_for_byte(r, 60) == b"R"
        finally:
            os.close(r)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
        assert store._debug_check()
        put(store, oid(round_), b"ok")
        assert memoryview(store.get(oid(round_))).tobytes() == b"ok"
        # Clean up what the dead client left: its unsealed objects are
        # aborted; objects it pinned are delete-pending until its pins go.
        store.abort_dead_creators()
        assert all(state != "CREATED" for _, _, state, _ in store.objects())
        for object_id, _, state, _ in store.objects():
            if state == "SEALED":
                store.delete(object_id)
        assert all(state == "DELETE_PENDING" for _, _, state, _ in store.objects())
        assert {pid for _, pid, _ in store.pins()} <= {child.pid}
        store.release_dead_pins()
        assert store.objects() == [] and store.pins() == []
        assert store.stats()["used_bytes"] == 0
        assert store._debug_check()


_CRASH_CHILD = """
import sys
store = _store.Store.attach(sys.argv[1])
store._debug_crash_after(int(sys.argv[2]))
for i in range(60):
    object_id = i.to_bytes(4, "little") + bytes(16)
    view = store.create_object(object_id, 1000 + i)
    view[:] = bytes([i]) * (1000 + i)
    store.seal(object_id)
    if i % 3 == 0:
        store.get(object_id)  # a pin that dies with this process
    elif i % 3 == 1:
        store.delete(object_id)
"""


@pytest.mark.timeout(120)
def test_death_at_crash_points(make_store):
    """A client dies inside a mutation, holding the lock, at chosen points
    (csrc/test_store.c walks every point): the next caller repairs, sealed
    objects keep their bytes, and the store keeps working."""
    for steps in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 10**6):
        store = make_store(64 * KiB, table_capacity=32)
        child = run_child(_CRASH_CHILD, store.name, steps)
        code = child.wait(timeout=60)
        assert code in (0, 77)
        assert store._debug_check()
        assert store.stats()["num_recoveries"] == (code == 77)
        for object_id, size, state, _ in store.objects():
            i = int.from_bytes(object_id[:4], "little")
            if state == "SEALED":
                assert size == 1000 + i
                assert memoryview(store.get(object_id)).tobytes() == bytes([i]) * size
        for i in range(100, 160):
            put(store, oid(i), bytes([i]) * 999)
        assert store._debug_check()
        # The dead client's pins (every third object) are given back.
        store.abort_dead_creators()
        store.release_dead_pins()
        assert store.stats()["num_pinned"] == 0 and store.pins() == []
        assert store._debug_check()
        store.close()
        store.unlink()
    assert code == 0  # the last run had more steps than the workload


_READER_CHILD = """
import os, signal, sys
import numpy as np
store = _store.Store.attach(sys.argv[1])
held = [store.get(bytes.fromhex(h)) for h in sys.argv[3:]]
views = [np.frombuffer(buf, dtype=np.uint8) for buf in held]  # zero-copy views
os.write(int(sys.argv[2]), b"P")
while True:
    signal.pause()
"""


def spawn_reader(store, *object_ids):
    """A process that pins `object_ids` (one pin per mention), reports, waits to die."""
    r, w = os.pipe()
    try:
        child = run_child(_READER_CHILD, store.name, w, *(o.hex() for o in object_ids),
                          pass_fds=[w])
        os.close(w)
        assert wait_for_byte(r, 30) == b"P"
    finally:
        os.close(r)
    return child


def kill(child):
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL


@pytest.mark.timeout(60)
def test_pins_of_killed_reader(make_store):
    """A reader SIGKILLed while it holds zero-copy views leaves its pins;
    release_dead_pins gives them back: its objects become evictable, and a
    deleted one is freed. Live processes' pins are untouched."""
    store = make_store(64 * KiB)  # 16 objects of 4 KiB
    for i in range(16):
        put(store, oid(i), bytes([i]) * 4096)
    mine = store.get(oid(15))
    reader = spawn_reader(store, oid(1), oid(1), oid(2), oid(15))
    assert sorted(store.pins()) == sorted([
        (oid(1), reader.pid, 2), (oid(2), reader.pid, 1), (oid(15), reader.pid, 1),
        (oid(15), os.getpid(), 1)])
    assert store.release_dead_pins() == 0  # alive
    kill(reader)
    assert store.stats()["num_pinned"] == 3
    assert store.delete(oid(1))  # pending: the dead reader still pins it
    with pytest.raises(StoreFullError):  # objects 1 and 2 split the room
        store.create_object(oid(100), 52 * KiB)
    assert store.release_dead_pins() == 4
    assert store.release_dead_pins() == 0
    assert store.pins() == [(oid(15), os.getpid(), 1)]
    assert all(object_id != oid(1) for object_id, *_ in store.objects())  # freed
    assert store.stats()["num_pinned"] == 1
    store.create_object(oid(100), 52 * KiB)  # evicts 2: only this process's pin stays
    assert not store.contains(oid(2)) and store.contains(oid(15))
    assert memoryview(mine).tobytes() == bytes([15]) * 4096
    mine.release()
    store.abort(oid(100))
    assert store._debug_check()


@pytest.mark.timeout(60)
def test_release_pins_of(make_store):
    """The node manager, knowing which worker it reaped, releases its pins by pid."""
    store = make_store(64 * KiB)
    put(store, oid(1), b"x" * 100)
    reader = spawn_reader(store, oid(1))
    kill(reader)
    assert store.release_pins_of(reader.pid + 1) == 0
    assert store.stats()["num_pinned"] == 1
    assert store.release_pins_of(reader.pid) == 1
    assert store.stats()["num_pinned"] == 0 and store.pins() == []
    assert store.delete(oid(1)) and store.objects() == []
    assert store._debug_check()


@pytest.mark.timeout(60)
def test_clean_up_after_a_death_follows_the_counts(make_store):
    """The store counts each process's pins and unsealed objects: the clean-up
    after a process that held nothing has nothing to find, and after one that
    held something it finds it all."""
    store = make_store(64 * KiB)
    put(store, oid(1), b"x" * 100)
    put(store, oid(2), b"y" * 100)
    assert store.stats()["num_holders"] == 0
    mine = store.create_object(oid(3), 100)
    assert {k: store.stats()[k] for k in ("num_created", "num_holders")} == {
        "num_created": 1, "num_holders": 1}
    reader = spawn_reader(store, oid(1), oid(2), oid(2))
    creator = run_child(_ABANDON_CHILD, store.name)
    assert creator.wait(timeout=30) == 0
    kill(reader)
    stats = store.stats()
    assert (stats["num_created"], stats["num_holders"], stats["holders_overflow"]) == (2, 3, 0)
    assert store.release_pins_of(creator.pid) == 0          # it pinned nothing
    assert store.release_pins_of(reader.pid) == 3
    assert store.abort_dead_creators() == 1                 # the abandoned one, not mine
    assert store.abort_dead_creators() == 0
    assert store.release_dead_pins() == 0
    assert {k: store.stats()[k] for k in ("num_created", "num_holders", "num_pin_records")} \
        == {"num_created": 1, "num_holders": 1, "num_pin_records": 0}
    mine.release()
    store.seal(oid(3))
    assert store.stats()["num_holders"] == 0 and store.stats()["num_created"] == 0
    assert store._debug_check()


@pytest.mark.timeout(60)
def test_clean_up_of_a_process_that_held_nothing_walks_no_table(make_store):
    """A worker that exits holding nothing costs no walk of tables sized by the
    store (at 1 Mi slots a walk of both, 96 MiB, takes milliseconds), while one that
    held pins or unsealed objects is walked for."""
    store = make_store(64 * MiB, table_capacity=1 << 20)
    put(store, oid(1), b"x")
    held = store.get(oid(1))                                # a live holder: this process
    unsealed = store.create_object(oid(2), 10)
    for _ in range(3):
        assert store.release_pins_of(os.getpid() + 1_000_000) == 0
        assert store.abort_dead_creators() == 0
        assert store.release_dead_pins() == 0
    assert store.stats()["cleanup_walks"] == 0
    holder = run_child("""
import sys
store = _store.Store.attach(sys.argv[1])
view = store.get(bytes.fromhex(sys.argv[2]))
unsealed = store.create_object(bytes.fromhex(sys.argv[3]), 10)
import os; os._exit(0)  # dies holding both
""", store.name, oid(1).hex(), oid(3).hex())
    assert holder.wait(timeout=30) == 0
    assert store.release_pins_of(holder.pid) == 1 and store.abort_dead_creators() == 1
    assert store.stats()["cleanup_walks"] == 2
    held.release()
    unsealed.release()
    store.abort(oid(2))
    assert store._debug_check()


@pytest.mark.timeout(60)
def test_pin_table_full(make_store):
    store = make_store(1 * MiB, table_capacity=1024)
    assert store.stats()["pin_table_capacity"] == 1024
    for i in range(896):  # as many objects as the table takes
        put(store, oid(i), b"")
    held = [store.get(oid(i)) for i in range(896)]
    reader = run_child("""
import sys
store = _store.Store.attach(sys.argv[1])
try:
    store.get(bytes.fromhex(sys.argv[2]))
except _store.TooManyPinsError:
    sys.exit(0)
sys.exit(1)
""", store.name, oid(5).hex())
    assert reader.wait(timeout=30) == 0
    extra = store.get(oid(5))  # a second pin on one record needs no room
    assert store.stats()["num_pin_records"] == 896
    for buf in [*held, extra]:
        buf.release()
    assert store.stats()["num_pin_records"] == 0 and store.stats()["num_pinned"] == 0
    assert store._debug_check()


@pytest.mark.timeout(60)
def test_copy_into(make_store):
    """copy_into lands every byte, for small and large (threaded) copies, into
    a store object, a slice of one, or any writable buffer."""
    store = make_store(64 * MiB)
    assert store.copy_threads >= 1
    data = np.random.default_rng(1).integers(0, 256, 20 * MiB + 13, dtype=np.uint8)
    for threads in (1, 2, 3, 0):
        store.copy_threads = threads
        assert store.copy_threads == threads or threads == 0
        view = store.create_object(oid(threads), data.nbytes + 200)
        copy_into(view, 0, b"head")
        copy_into(view, 64, data)
        copy_into(view[100:], data.nbytes - 36, b"tail")  # a slice: offsets add up
        view.release()
        store.seal(oid(threads))
        got = memoryview(store.get(oid(threads)))
        assert got[:4] == b"head" and got[64 + data.nbytes:68 + data.nbytes] == b"tail"
        assert np.array_equal(np.frombuffer(got[64:64 + data.nbytes], np.uint8), data)
        got.release()
        assert store.delete(oid(threads))
    with pytest.raises(ValueError):
        store.copy_threads = -1
    target = bytearray(10)
    copy_into(target, 2, b"abc")
    assert target == b"\0\0abc" + bytes(5)
    with pytest.raises(ValueError):
        copy_into(target, 8, b"abc")
    with pytest.raises(BufferError):
        copy_into(b"read-only", 0, b"x")


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(
    os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") < 4 << 30
    or shutil.disk_usage("/dev/shm").free < 2 << 30,
    reason="needs 4 GiB of free memory and 2 GiB in /dev/shm")
def test_put_one_gib_is_one_copy(make_store):
    arr = np.ones(1 << 27, dtype=np.float64)  # 1 GiB
    store = make_store(arr.nbytes + 1 * MiB)
    view = store.create_object(oid(1), arr.nbytes)
    tracemalloc.start()
    try:
        view[:] = memoryview(arr).cast("B")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 * MiB
    store.seal(oid(1))
    del view
    got = np.frombuffer(store.get(oid(1)), dtype=np.float64)
    assert got.shape == arr.shape and got[-1] == 1.0 and not got.flags.writeable
    del got
    gc.collect()
    assert store.delete(oid(1))


@pytest.mark.timeout(30)
def test_unclaimed_objects_wait_for_their_first_get(make_store):
    """A value sealed for the node to take in is not evicted before the node's get."""
    store = make_store(64 * KiB)
    for i in range(8):
        store.create_object(oid(i), 8192).release()
        store.seal(oid(i), unclaimed=True)
    with pytest.raises(StoreFullError):
        store.create_object(oid(50), 8192)
    assert all(store.contains(oid(i)) for i in range(8))
    store.get(oid(3)).release()  # taken in, then let go: evictable as usual
    store.create_object(oid(50), 8192).release()
    assert not store.contains(oid(3))
    assert all(store.contains(oid(i)) for i in range(8) if i != 3)
    assert store.delete(oid(5))  # a delete still frees it at once
    assert store._debug_check()


@pytest.mark.timeout(30)
def test_release_if_sole(make_store):
    store = make_store(64 * KiB)
    put(store, oid(1), b"a" * 4096)
    mine = store.get(oid(1))
    reader = store.get(oid(1))
    assert not mine.release_if_sole()  # another pin: nothing changes
    assert store.contains(oid(1)) and memoryview(reader).tobytes() == b"a" * 4096
    reader.release()
    assert mine.release_if_sole()
    assert not store.contains(oid(1))
    assert store.stats()["num_objects"] == 0
    assert not mine.release_if_sole()  # released: no second drop
    with pytest.raises(BufferError):
        memoryview(mine)
    assert store._debug_check()


@pytest.mark.timeout(30)
def test_sole_pinned_lists_least_recently_read_first(make_store):
    store = make_store(256 * KiB)
    for i in range(6):
        put(store, oid(i), bytes([i]) * (1000 + i))
    pins = [store.get(oid(i)) for i in range(6)]
    extra = store.get(oid(2))  # two pins: not listed
    store.get(oid(4)).release()  # read again: the newest
    assert store.sole_pinned() == [(oid(i), 1000 + i) for i in (0, 1, 3, 5, 4)]
    extra.release()
    del pins
    assert store.sole_pinned() == []
    assert store._debug_check()


# A tmpfs of its own over /dev/shm, in a mount namespace of the test's own (root, as in CI).
_SMALL_SHM = ["unshare", "--mount", "sh", "-c",
              'mount -t tmpfs -o size=96m tmpfs /dev/shm && exec "$0" "$@"']


@pytest.mark.timeout(60)
def test_a_full_dev_shm_fails_a_create_instead_of_killing_its_writer():
    """tmpfs allocates pages on first touch, and a touch when /dev/shm is full is a SIGBUS.
    Another job filling /dev/shm after the store was made used to kill the next process
    that wrote an object; the create now fails, and the store works on."""
    probe = subprocess.run([*_SMALL_SHM, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here: {probe.stderr.strip()}")
    child = _LOADER + textwrap.dedent(f"""
        from hpcray._store import SharedMemoryFullError, Store
        MiB = 1 << 20
        store = Store.create("/{PREFIX}full", 64 * MiB)
        filler = "/dev/shm/another-jobs-file"
        free = os.statvfs("/dev/shm").f_bavail * 4096
        with open(filler, "wb") as f:  # leaves 6 MiB
            f.write(bytes(free - 6 * MiB))
        try:
            store.create_object(b"a" * 20, 32 * MiB)
            print("created")
        except SharedMemoryFullError as exc:
            print("refused", exc.errno == errno.ENOSPC, "/dev/shm has no room" in str(exc))
        print("stats", store.stats()["num_objects"])
        view = store.create_object(b"b" * 20, 1 * MiB)  # in the runs backed already
        view[:] = bytes([7]) * MiB
        view.release()
        store.seal(b"b" * 20)
        print("small", bytes(memoryview(store.get(b"b" * 20))[:2]))
        os.unlink(filler)
        view = store.create_object(b"a" * 20, 32 * MiB)
        view[:] = bytes([9]) * (32 * MiB)
        view.release()
        store.seal(b"a" * 20)
        print("large", memoryview(store.get(b"a" * 20))[-1])
        store.close()
        store.unlink()
    """)
    proc = subprocess.run([*_SMALL_SHM, sys.executable, "-c", "import errno\n" + child],
                          cwd=REPO, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split("\n")[:4] == ["refused True True", "stats 0", "small b'\\x07\\x07'",
                                           "large 9"], proc.stdout + proc.stderr


@pytest.mark.timeout(60)
def test_a_full_dev_shm_never_faults_the_tables():
    """On tmpfs even a read of a page never touched allocates it: a probe of the object
    table or the pin table (under the lock) with /dev/shm full was a SIGBUS. Their pages
    are allocated with the segment, so small objects in the data run already allocated
    are made, sealed and read with /dev/shm full, and a larger one is refused."""
    probe = subprocess.run([*_SMALL_SHM, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here: {probe.stderr.strip()}")
    child = _LOADER + textwrap.dedent(f"""
        from hpcray._store import SharedMemoryFullError, Store
        MiB = 1 << 20
        # 2^19 slots: 32 MiB of object table and 16 MiB of pin table, probed at random.
        store = Store.create("/{PREFIX}tables", 8 * MiB, table_capacity=1 << 19)
        free = os.statvfs("/dev/shm").f_bavail * 4096
        with open("/dev/shm/another-jobs-file", "wb") as f:
            f.write(bytes(free))
        for n in range(2000):
            oid = n.to_bytes(20, "little")
            view = store.create_object(oid, 64)
            view[:1] = b"x"
            view.release()
            store.seal(oid)
            store.get(oid).release()
        print("objects", store.stats()["num_objects"])
        try:
            store.create_object(b"z" * 20, 4 * MiB)
        except SharedMemoryFullError:
            print("refused")
        os.unlink("/dev/shm/another-jobs-file")
        store.close()
        store.unlink()
    """)
    proc = subprocess.run([*_SMALL_SHM, sys.executable, "-c", child],
                          cwd=REPO, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["objects 2000", "refused"], proc.stdout + proc.stderr
