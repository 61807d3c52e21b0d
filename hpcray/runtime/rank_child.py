"""Whether this process only inherited a rank's launcher variables: a program that a
driver or a task started as a subprocess (PMI_*, SLURM_NTASKS, MPI_LOCALNRANKS came with
its environment) is no rank, starts a runtime of its own and shares its host with
nobody (launch.under_launcher, resources.host_share).

Under a PMI-1/2 launcher (MPICH's Hydra, srun --mpi=pmi2) a rank has PMI_FD open, a
socket to its launcher, and a process it starts has not (subprocess closes it; a rank
makes it non-inheritable): exact, also for an mpiexec started from inside a job, whose
ranks have their own. It is read once, at `import hpcray`, before this process opens
sockets of its own (one could take PMI_FD's number). Without PMI_FD (PMIx: Open MPI)
HPCRAY_RANK_PID tells: each rank sets it to its pid for its children.
"""

from __future__ import annotations

import os
import stat

RANK_PID_VARIABLE = "HPCRAY_RANK_PID"


def _inherited(environ) -> bool:
    fd = environ.get("PMI_FD")
    if fd is not None and fd.isdigit():
        try:
            return not stat.S_ISSOCK(os.fstat(int(fd)).st_mode)
        except OSError:
            return True
    rank_pid = environ.get(RANK_PID_VARIABLE)
    return rank_pid is not None and rank_pid != str(os.getpid())


_AT_IMPORT = _inherited(os.environ)


def child_of_a_rank(environ=os.environ) -> bool:
    """True in a process a rank started (see the module's docstring)."""
    if environ is os.environ:
        return _AT_IMPORT or _inherited_by_pid(environ)
    return _inherited(environ)


def _inherited_by_pid(environ) -> bool:
    # A fork of this process after import (the guardian's rank is the guardian's fork
    # and keeps PMI_FD: not a child), or a rank's pid set since: what it says now.
    rank_pid = environ.get(RANK_PID_VARIABLE)
    return "PMI_FD" not in environ and rank_pid is not None and rank_pid != str(os.getpid())
