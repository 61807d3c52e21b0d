"""What a node sends its workers during one pass of its event loop (worker_processes.py):
the tasks for one worker are held and written together at the pass's end, after
anything sent to that worker before them and before anything sent after them."""

import socket
import struct

import pytest

from hpcray.runtime import protocol
from hpcray.runtime.messages import wire, RunTask, ExitWorker
from hpcray.runtime.worker_processes import EventSources, WorkerHandle, WorkerProcesses


class _NoForkServer(WorkerProcesses):
    def _start_forkserver(self, job: dict) -> None:
        self.forkserver = None


@pytest.fixture
def node_and_worker():
    sources = EventSources(0)
    processes = _NoForkServer(0, sources, None, {}, None, None)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker = WorkerHandle(1, protocol.NonBlockingConnection(ours), {})
    yield processes, worker, theirs
    worker.conn.close()
    theirs.close()
    sources.close()


def _reads(sock) -> list:
    """Each receive the worker would make, as the messages it carried."""
    sock.setblocking(False)
    reads = []
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            return reads
        messages = []
        while chunk:
            (size,) = struct.unpack_from("<I", chunk)
            messages.append(protocol.decode(chunk[:4 + size]))
            chunk = chunk[4 + size:]
        reads.append([message[1] if message[0] == RunTask.CODE else "exit"
                      for message in messages])


def test_a_pass_writes_a_workers_tasks_in_one_write(node_and_worker):
    processes, worker, theirs = node_and_worker
    processes.hold_tasks()
    for task in ("a", "b", "c"):
        processes.send_task(worker, wire(RunTask, task, None, [], ()))
    assert _reads(theirs) == []  # nothing until the pass ends
    processes.release_tasks()
    assert _reads(theirs) == [["a", "b", "c"]]
    processes.send_task(worker, wire(RunTask, "d", None, [], ()))  # outside a pass: now
    assert _reads(theirs) == [["d"]]


def test_a_message_sent_during_the_pass_goes_after_the_tasks_held_before_it(
        node_and_worker):
    processes, worker, theirs = node_and_worker
    processes.hold_tasks()
    processes.send_task(worker, wire(RunTask, "a", None, [], ()))
    processes.send(worker, wire(ExitWorker))
    processes.send_task(worker, wire(RunTask, "b", None, [], ()))
    processes.release_tasks()
    assert [m for read in _reads(theirs) for m in read] == ["a", "exit", "b"]
