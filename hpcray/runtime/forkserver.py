"""The fork server: a clean, single-threaded, pre-imported process that forks workers.

The driver may have threads and any library loaded, so it never forks itself; at
`init` it starts this process, which imports the worker's modules once and then forks
a worker in a few milliseconds for each request (what makes creating 100 actors fast).
Each request (messages.ForkWorker) carries the worker's socket and its stdout/stderr
pipes (SCM_RIGHTS); it tells the node how each worker ended (WorkerExited), so a crash
is logged with its signal or exit status (job_logs.py).

Each worker leads its own process group, and when it ends, however it ends (SIGKILL
included), whatever is left in that group is killed: the processes the user's code started
and did not wait for (Ray's per-worker process groups, `RAY_process_group_cleanup_enabled`,
on by default; a process that calls setsid() leaves the group and is left alone, as in Ray).

It is also the job's undertaker: when the driver goes away (its socket closes, even
after SIGKILL), it kills every worker it made, unlinks the node's store segment and
removes its spill folder, so no process, /dev/shm segment or spill file outlives the job.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import socket
import sys
import time

from hpcray.runtime import messages, protocol
from hpcray.runtime.messages import wire

_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(libc, signum: int) -> None:
    try:
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (AttributeError, OSError):
        pass


def _reap(children: set, control: socket.socket | None = None) -> None:
    """Reap exited workers; tell the node on `control` how each ended (WorkerExited)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _kill_group(pid)
        if control is not None:
            try:  # never block in a signal handler: the node reads its socket promptly
                control.send(protocol.encode(wire(messages.WorkerExited, pid, status)),
                             socket.MSG_DONTWAIT)
            except OSError:
                pass


def _kill_group(pid: int) -> None:
    """Kill what is left of the process group of a worker that ended (reaped: `pid`).
    Safe after the reap: the kernel hands out no pid that is still a group's id, so the
    group is the worker's, or there is none (ESRCH: it died before its setpgid, or no
    process was left in it)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_all(children: set) -> None:
    for sig, grace in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                children.discard(pid)
        deadline = time.monotonic() + grace
        while children and time.monotonic() < deadline:
            _reap(children)
            time.sleep(0.01)
        if not children:
            return


def main() -> None:
    job = json.loads(os.environ.pop("HPCRAY_FORKSERVER_JOB"))
    control = socket.socket(fileno=int(os.environ.pop("HPCRAY_FORKSERVER_FD")))
    control.setblocking(True)
    os.setsid()  # the terminal's Ctrl-C goes to the driver, not to every worker
    libc = ctypes.CDLL(None, use_errno=True)
    # The node's end is the driver's socket (never inherited): its close, or the
    # driver's death however it dies, is the EOF that starts the clean-up below. No
    # signal does: a parent-death signal comes when the thread that started this
    # process ends (os._exit ends the driver's threads one by one: the first came while
    # the driver still lived, a second one in the middle of the clean-up), and Slurm
    # sends SIGTERM to every process of a step, while its node may still need it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    children: set = set()
    # Slurm signals every process of a step (scancel -s, --signal, srun's forwarding):
    # these are for the rank to act on, and must not end this server or its workers
    # (which inherit the dispositions; a worker sets its own SIGINT handler for cancel).
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    # A SIGTERM that drains the job (HPCRAY_DRAIN_SIGNALS=USR1,TERM) must not end the
    # tasks the drain lets finish; otherwise a worker keeps SIGTERM's default.
    from hpcray.config import drain_signals
    worker_sigterm = signal.SIG_IGN if signal.SIGTERM in drain_signals() else signal.SIG_DFL
    try:
        if os.getppid() != job["driver_pid"]:
            return  # the driver died before we got here: nobody else will clean up
        os.environ.update(job["config"].get("env_vars") or {})  # runtime_env: every worker's
        # What every worker needs, imported once here instead of once per worker.
        import cloudpickle  # noqa: F401
        try:
            import numpy  # noqa: F401
        except ImportError:
            pass
        from hpcray.runtime import worker as worker_module
        setup_hook = _load_setup_hook(job["config"].get("setup_hook"))
        from hpcray.runtime import proctitle
        proctitle.measure(["-m", "hpcray.runtime.forkserver"])  # its workers' titles
        # What every worker inherits stays out of its collections (never garbage: modules,
        # classes, numpy's): a worker's collection walks its own objects only, and does
        # not write the inherited pages (copy-on-write).
        gc.freeze()

        control.send(protocol.encode(wire(messages.ForkServerReady, os.getpid())))
        signal.signal(signal.SIGCHLD, lambda *_: _reap(children, control))
        server_pid = os.getpid()
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(control, 65536, 3)
            except InterruptedError:
                continue
            if not data:
                break
            if len(fds) != 3:
                for fd in fds:
                    os.close(fd)
                continue
            request = messages.record(protocol.decode(data))
            key, is_actor = request.key, request.is_actor
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.setpgid(0, 0)  # its own group, killed when it ends (_kill_group)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.signal(signal.SIGTERM, worker_sigterm)
                    _set_parent_death_signal(libc, signal.SIGKILL)
                    if os.getppid() != server_pid:  # it died before the signal was set
                        os._exit(1)
                    control.close()
                    os.dup2(fds[1], 1)
                    os.dup2(fds[2], 2)
                    os.close(fds[1])
                    os.close(fds[2])
                    if setup_hook is not None:
                        _run_setup_hook(setup_hook)
                    code = worker_module.main(fds[0], job, key, is_actor)
                except SystemExit as exc:  # user code called sys.exit(): it ends, quietly (Ray)
                    code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
                except BaseException:  # noqa: BLE001 - say why on its stderr, which the node reads
                    import traceback
                    traceback.print_exc()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            children.add(pid)
    except (ConnectionResetError, OSError):
        pass
    finally:
        # The driver is gone: the segment's name goes first (workers keep their mappings).
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _unlink_store(job)
        _kill_all(children)


def _unlink_store(job: dict) -> None:
    try:
        from hpcray._store import Store
        Store.unlink_name(job["store_name"])
    except Exception:  # noqa: BLE001 - best effort at the very end
        pass
    if job.get("spill_dir"):
        import shutil
        shutil.rmtree(job["spill_dir"], ignore_errors=True)


def _load_setup_hook(encoded: str | None):
    """The job's worker_process_setup_hook (api.job_setup_hook), loaded once here; one
    that cannot be loaded (its module is missing here) raises in each worker instead."""
    if not encoded:
        return None
    import base64
    import cloudpickle
    try:
        hook = cloudpickle.loads(base64.b64decode(encoded))
        if isinstance(hook, str):
            import importlib
            module, _, name = hook.rpartition(".")
            hook = getattr(importlib.import_module(module), name)
        return hook
    except Exception as exc:  # noqa: BLE001 - said by each worker (_run_setup_hook)
        error = exc

        def unloadable():
            raise error
        unloadable.__name__ = "(the hook could not be loaded)"
        return unloadable


def _run_setup_hook(hook) -> None:
    """In each worker, before its first task. One that raises is said on the worker's
    stderr, which reaches the driver's terminal, and the worker goes on (its tasks may
    still run)."""
    try:
        hook()
    except Exception:  # noqa: BLE001 - the user's hook: reported, not fatal
        import traceback
        print(f"worker_process_setup_hook {getattr(hook, '__name__', hook)!r} raised:",
              file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()


if __name__ == "__main__":
    main()
    # Its clean-up is done (main's finally): skip the interpreter's teardown of what it
    # imported for the workers (40-80 ms of each shutdown, which waits for this exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
