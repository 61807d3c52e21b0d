#!/bin/bash
# An hpcray job for Slurm. Copy it, edit the #SBATCH lines and the last line, then:
#   sbatch sbatch-template.sh
#
# hpcray starts like an MPI program: srun launches one task per node, each task is one hpcray
# node (task 0 also runs app.py as the driver; the others serve it), and each node starts its own
# worker processes on the CPUs and GPUs Slurm gave it. So ask Slurm for whole nodes' worth of
# CPUs per task, not for one task per core.

# Nodes in the job = hpcray nodes.
#SBATCH -N 2
# One task (one hpcray node) per node; more would split a node's CPUs between two runtimes.
#SBATCH --ntasks-per-node=1
# The CPUs each hpcray node may use for workers: the node's cores on a whole-node allocation.
#SBATCH --cpus-per-task=32
# GPUs per node, one per GPU worker; hpcray reads CUDA_VISIBLE_DEVICES as Slurm sets it.
# Uncomment on a GPU partition (some sites spell it --gres=gpu:4).
##SBATCH --gpus-per-node=4
#SBATCH --time=01:00:00
#SBATCH --job-name=hpcray
#SBATCH --output=hpcray-%j.out
# Ending before the time limit (a drain): 120 s before it Slurm sends SIGUSR1 to this script,
# which passes it to the step (the trap below): no new task starts, running ones get
# HPCRAY_DRAIN_GRACE seconds (30) to finish, callbacks registered with
# hpcray.util.on_drain run (save a checkpoint), then the program ends with status 0.
#SBATCH --signal=B:USR1@120

set -euo pipefail

# Your environment: the Python with hpcray installed, built against the MPI srun will start
# (the site's MPI on a cluster, e.g. `module load mpich`; not the PyPI mpich wheel).
# source ~/venvs/hpcray/bin/activate

# What the job leaves behind, in the directory you submitted from: hpcray-<job id>.out (the
# driver's output and every worker's lines, prefixed "(pid=..., rank=r)") and the folder
# hpcray-logs/<job id>/: node-<rank>.log (each node's log: starts, warnings, workers that
# crashed and what they ran, tasks that failed) and node-<rank>-worker-<pid>.out/.err.
# A status line (tasks done/running/queued, CPUs, store, bytes moved) every minute:
# export HPCRAY_STATUS_INTERVAL=60

# --mpi=pmi2 starts MPICH (and MPICH-based MPIs: Cray MPICH, Intel MPI, MVAPICH). With Open MPI
# use --mpi=pmix instead (`srun --mpi=list` shows what the site's Slurm offers). With no or the
# wrong plugin every task comes up as an MPI world of size 1, and hpcray stops with an error.
# --cpus-per-task again: since Slurm 22.05 srun does not inherit it from sbatch, and each task
# would be given (and, with task/affinity, bound to) one CPU.
# In the background, so this script can pass the drain signal on (bash runs a trap only
# between commands, and `wait` returns when one comes).
srun --mpi=pmi2 --cpus-per-task="$SLURM_CPUS_PER_TASK" python -m hpcray app.py &
srun_pid=$!
trap 'kill -USR1 "$srun_pid"' USR1
status=0
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid" && status=0 || status=$?
done
exit "$status"
