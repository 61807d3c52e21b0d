"""The rank guardian (runtime/guardian.py): the board of what each worker runs, and its
part in ending a job under Hydra: with its
rank dead it closes the rank's PMI connection while still alive, so Hydra's proxy sees
the close before it reaps the guardian (test_signals.py runs the whole job)."""

import os
import socket

from hpcray.runtime import guardian


def _pmi_pair():
    ours, launchers = socket.socketpair()
    return ours.detach(), launchers


def test_under_hydra_the_guardian_closes_the_pmi_connection_before_it_exits(monkeypatch):
    monkeypatch.setattr(guardian, "_HYDRA_KILL_WAIT_S", 0.0)
    fd, launchers = _pmi_pair()
    guardian._let_hydra_end_the_job({"PMI_FD": str(fd), "HYDI_CONTROL_FD": "7"})
    launchers.settimeout(5)
    assert launchers.recv(1) == b""  # the proxy's side reads the close
    launchers.close()


def test_without_hydra_the_pmi_connection_is_left_alone(monkeypatch):
    monkeypatch.setattr(guardian, "_HYDRA_KILL_WAIT_S", 0.0)
    fd, launchers = _pmi_pair()
    try:
        guardian._let_hydra_end_the_job({"PMI_FD": str(fd)})  # srun --mpi=pmi2
        os.fstat(fd)  # still open
        read, write = os.pipe()
        guardian._let_hydra_end_the_job({"PMI_FD": str(read), "HYDI_CONTROL_FD": "7"})
        os.fstat(read)  # not a socket: not the launcher's connection
        os.close(read)
        os.close(write)
    finally:
        os.close(fd)
        launchers.close()


def test_the_board_names_what_each_worker_runs_now():
    board = guardian.ActivityBoard()
    board.running(1, "f")
    board.running(1, "f")  # its next task of the same function
    board.running(2, "actor Holder")
    assert sorted(board.names()) == ["actor Holder", "f"]
    board.running(1, "g")
    board.idle(2)
    assert board.names() == ["g"]
    board.idle(1)
    board.running(1, "g")  # written again after idle
    assert board.names() == ["g"]
    board.reset()
    assert board.names() == []
