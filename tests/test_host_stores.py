"""HostStores (runtime/host_stores.py): a node copying objects out of the store of
another node on its host. Real stores; the holder's objects are made by a forked
process, as a worker of that node makes them; the copy thread's completions go through
a real epoll, as the event loop runs them."""

import os
import subprocess
import sys

import numpy as np
import pytest

from hpcray._store import Store
from hpcray.runtime import host_stores as host_stores_module
from hpcray.runtime.host_stores import HostStores, host_identity, make_copies
from hpcray.runtime.worker_processes import EventSources

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


class Link:
    """What HostStores reads of the cluster: every node's handshake, the dead ones."""

    def __init__(self, nodes: dict):
        self.nodes = nodes
        self.dead_nodes: set = set()


def oid(i: int) -> bytes:
    return i.to_bytes(20, "little")


def make_in_other_process(store_name: str, object_id: bytes, size: int, fill: int) -> None:
    """Create and seal an object in the holder's store from another process."""
    pid = os.fork()
    if pid == 0:
        try:
            store = Store.attach(store_name)
            view = store.create_object(object_id, size)
            np.frombuffer(view, np.uint8)[:] = fill
            view.release()
            store.seal(object_id)
            store.close()
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0


@pytest.fixture
def stores():
    name = f"/hpcray-{os.getpid()}-hoststores"
    holder = Store.create(name + "-n1", 256 * MiB)
    reader = Store.create(name + "-n0", 256 * MiB)
    sources = EventSources(0)
    link = Link({1: {"store_name": holder.name, "host_key": host_identity()},
                 2: {"store_name": name + "-n2", "host_key": "another host"}})
    host = HostStores(0, link, sources, enabled=True, inline_max=2 * MiB)
    yield holder, reader, host, link, sources
    host.close()
    sources.close()
    for store in (holder, reader):
        store.unlink()
        store.close()


def run_loop(sources, done: list, want: int) -> None:
    """The event loop's part: dispatch until `want` copies reported."""
    while len(done) < want:
        sources.dispatch(sources.epoll.poll(5))


def copy(host, reader, rank: int, object_id: bytes, size: int, done: list) -> bool:
    buffer = host.take(rank, object_id, size)
    if buffer is None:
        return False
    view = reader.create_object(object_id, size, populate=True)

    def finished(ok):
        view.release()
        reader.seal(object_id)
        done.append(ok)
    host.copy(buffer, view, finished)
    return True



IDENTITY = [sys.executable, "-c",
            "from hpcray.runtime.host_stores import host_identity; print(host_identity())"]


def test_identity_is_the_same_for_every_process_of_this_host():
    mine = host_identity()
    assert mine and mine.count(":") == 3
    other = subprocess.run(IDENTITY, capture_output=True, text=True, check=True).stdout
    assert other.strip() == mine


def test_a_process_in_another_pid_namespace_is_on_another_host():
    # (its pins' pids would mean other processes to this one: a container)
    unshare = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", *IDENTITY],
                             capture_output=True, text=True)
    if unshare.returncode != 0:
        pytest.skip(f"no new PID namespace here: {unshare.stderr.strip()}")
    theirs = unshare.stdout.strip()
    assert theirs and theirs != host_identity()
    assert theirs.split(":")[0] == host_identity().split(":")[0]  # one kernel boot


@pytest.mark.parametrize("size", [1 * MiB, 24 * MiB], ids=["inline", "copy-thread"])
def test_a_copy_brings_the_bytes_and_gives_the_pin_back(stores, size):
    holder, reader, host, _, sources = stores
    make_in_other_process(holder.name, oid(1), size, 7)
    done: list = []
    assert copy(host, reader, 1, oid(1), size, done)
    if size <= host.inline_max:
        assert done == [True]  # made before copy() returned
    else:
        run_loop(sources, done, 1)
        assert done == [True]
    got = reader.get(oid(1))
    assert len(got) == size and np.all(np.frombuffer(got, np.uint8) == 7)
    got.release()
    assert holder.pins() == []  # the reader's pin in the holder's store went back
    assert holder.contains(oid(1))  # the holder's copy stays


def test_a_batch_is_copied_at_once_up_to_its_budget_the_rest_on_the_thread(stores):
    holder, reader, host, _, sources = stores
    for i in range(10, 13):
        make_in_other_process(holder.name, oid(i), 1 * MiB, i)
    host.begin_batch()
    done: list = []
    for i in range(10, 13):
        assert copy(host, reader, 1, oid(i), 1 * MiB, done)
        assert len(done) == min(i - 9, 2)  # 2 MiB at once (inline_max), then the thread
    run_loop(sources, done, 3)
    host.begin_batch()  # a new batch: at once again
    make_in_other_process(holder.name, oid(13), 1 * MiB, 13)
    assert copy(host, reader, 1, oid(13), 1 * MiB, done) and len(done) == 4
    for i in range(10, 14):
        got = reader.get(oid(i))
        assert np.all(np.frombuffer(got, np.uint8) == i)
        got.release()


def test_deferred_copies_are_left_to_the_caller(stores):
    # A driver's get: whatever the size, nothing is copied under the node's lock and no
    # copy thread is started; the caller makes the copies, then runs their ends.
    holder, reader, host, _, _ = stores
    make_in_other_process(holder.name, oid(20), 1 * MiB, 4)
    make_in_other_process(holder.name, oid(21), 24 * MiB, 5)
    host.defer_copies()
    done: list = []
    assert copy(host, reader, 1, oid(20), 1 * MiB, done)
    assert copy(host, reader, 1, oid(21), 24 * MiB, done)
    copies = host.take_deferred()
    assert done == [] and len(copies) == 2 and host.copier is None
    assert len(holder.pins()) == 2  # pinned until copied
    results, interrupted = make_copies(copies)
    assert interrupted is None and [copied for _, copied in results] == [True, True]
    assert holder.pins() == []
    for on_done, copied in results:
        on_done(copied)
    assert done == [True, True]
    for i, fill in ((20, 4), (21, 5)):
        got = reader.get(oid(i))
        assert np.all(np.frombuffer(got, np.uint8) == fill)
        got.release()
    assert host.take_deferred() == []  # and the next copies are made as before
    make_in_other_process(holder.name, oid(22), 1 * MiB, 6)
    host.begin_batch()
    assert copy(host, reader, 1, oid(22), 1 * MiB, done) and done == [True, True, True]


def test_an_interrupted_deferred_copy_leaves_the_rest_to_mpi(stores, monkeypatch):
    # Ctrl-C during the caller's copies: every pin goes back, the copies not made report
    # False (pulled over MPI instead), and the interruption is handed back to re-raise.
    holder, reader, host, _, _ = stores
    for i in (30, 31):
        make_in_other_process(holder.name, oid(i), 1 * MiB, i)
    host.defer_copies()
    done: list = []
    assert copy(host, reader, 1, oid(30), 1 * MiB, done)
    assert copy(host, reader, 1, oid(31), 1 * MiB, done)

    def interrupted(dest, offset, src):
        raise KeyboardInterrupt
    monkeypatch.setattr(host_stores_module, "copy_into", interrupted)
    results, error = make_copies(host.take_deferred())
    assert isinstance(error, KeyboardInterrupt)
    assert [copied for _, copied in results] == [False, False]
    assert holder.pins() == []
    for on_done, copied in results:
        on_done(copied)
    assert done == [False, False]


def test_a_delete_at_the_holder_waits_for_the_copy(stores):
    holder, reader, host, _, sources = stores
    make_in_other_process(holder.name, oid(2), 16 * MiB, 3)
    buffer = host.take(1, oid(2), 16 * MiB)
    assert holder.delete(oid(2))  # pending: the reader pins it
    assert not holder.contains(oid(2))
    assert holder.stats()["num_objects"] == 1
    view = reader.create_object(oid(2), 16 * MiB)
    done: list = []
    host.copy(buffer, view, done.append)
    run_loop(sources, done, 1)
    assert np.all(np.frombuffer(view, np.uint8) == 3)
    view.release()
    assert holder.stats()["num_objects"] == 0  # freed with the last pin


def test_what_cannot_be_copied_here_is_left_to_mpi(stores):
    holder, reader, host, link, _ = stores
    assert host.take(1, oid(3), 1024) is None  # not in the holder's store
    view = holder.create_object(oid(4), 1024)  # made, not sealed yet
    assert host.take(1, oid(4), 1024) is None
    view.release()
    holder.seal(oid(4))
    assert host.take(1, oid(4), 999) is None  # not the size the owner said
    assert holder.pins() == []
    assert host.take(2, oid(4), 1024) is None  # another host
    assert host.take(0, oid(4), 1024) is None  # this node itself
    assert host.take(7, oid(4), 1024) is None  # not in the handshake
    link.nodes[3] = {"store_name": "/hpcray-no-such-store", "host_key": host.identity}
    assert host.take(3, oid(4), 1024) is None  # this host, but its store cannot be mapped
    buffer = host.take(1, oid(4), 1024)
    assert buffer is not None
    buffer.release()


def test_off_reads_nothing(stores):
    holder, _, _, link, sources = stores
    make_in_other_process(holder.name, oid(5), 1024, 1)
    off = HostStores(0, link, sources, enabled=False)
    assert off.identity == "" and off.take(1, oid(5), 1024) is None


def start_large_copy(stores, i: int, size: int, fill: int):
    """An object made in the holder's store, its copy handed to the copy thread: (the
    reader's buffer, the list its end is reported to)."""
    holder, reader, host, _, _ = stores
    make_in_other_process(holder.name, oid(i), size, fill)
    buffer = host.take(1, oid(i), size)
    view = reader.create_object(oid(i), size)
    done: list = []
    host.copy(buffer, view, done.append)
    return view, done


def test_a_dead_holders_store_is_read_no_more_and_copies_in_flight_end(stores):
    holder, _, host, link, sources = stores
    view, done = start_large_copy(stores, 6, 32 * MiB, 9)
    link.dead_nodes.add(1)
    host.forget(1)           # the mapping stays until the copy lets go of it
    holder.unlink()          # as the survivors of a host do (node_failures.py)
    run_loop(sources, done, 1)
    assert done == [True] and np.all(np.frombuffer(view, np.uint8) == 9)
    view.release()
    assert host.take(1, oid(6), 32 * MiB) is None


def test_close_waits_for_the_copies_in_flight_and_lets_go_of_their_buffers(stores):
    holder, reader, host, _, _ = stores
    view, done = start_large_copy(stores, 7, 24 * MiB, 5)
    host.close()             # the node shuts down: no event loop pass runs any more
    assert done == [] and holder.pins() == []
    with pytest.raises(ValueError):
        view[0]              # released: the store can be unmapped
    reader.abort(oid(7))
