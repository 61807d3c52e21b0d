#!/bin/bash
# Issue 12 item 7 (and the GPU tests) on a lent 16-core GPU machine, in one short run.
#
#   bash benchmarks/device_run.sh [OUT]        # results under OUT (default $OUT or /tmp/devout)
#
# The machine is bare and offline: its image's python (3.12, with numpy, cloudpickle, Cython,
# psutil, pytest) gets a venv that also sees those, plus the wheels carried in .whl/
# (mpich, mpi4py, pytest-mpi, pytest-timeout, setuptools). A checkout of the old tree in
# .oldtree/ (if carried) is built too, for load_balance's A/B. benchmarks/device_prepare.sh
# makes both here first; then one call: run(command="bash benchmarks/device_run.sh $OUT",
# carry=[".whl", ".oldtree"], timeout_s=590). The steps come in the order of what issue 12
# item 7 needs most (the transfer table, then weak scaling): a call cut at 10 minutes
# still brings back the logs of the steps that ran. Every step has its own timeout and
# writes its log under OUT: 8 steps, as at most 8 files land in OUT (what the device tool
# brings back).
set -u
OUT=${1:-${OUT:-/tmp/devout}}
mkdir -p "$OUT"
step() {  # step NAME SECONDS COMMAND...: run, keep the log in OUT, print its tail
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "=== $name: rc $rc, $((SECONDS - t0)) s"
}

# The packages live in the image's venv (/opt/torch/.venv), not in the system python3's
# site: the new venv reads that venv's site-packages through a .pth file.
PY=$(command -v /opt/torch/.venv/bin/python3 || command -v python3)
python3 -m venv /tmp/dv || exit 1
$PY -c 'import site; print("\n".join(site.getsitepackages()))' \
    > "$(/tmp/dv/bin/python -c 'import site; print(site.getsitepackages()[0])')/image.pth"
/tmp/dv/bin/python -m pip install -q --no-index --no-deps .whl/*.whl || exit 1
export PATH=/tmp/dv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
unset PYTHONDONTWRITEBYTECODE
machine() {
    python -VV; nproc; free -g | head -2; nvidia-smi -L; uname -r
    cat /sys/kernel/mm/transparent_hugepage/shmem_enabled /proc/sys/kernel/yama/ptrace_scope
    df -h /dev/shm | tail -1
    python setup.py build_ext --inplace && python -m compileall -q hpcray benchmarks
    if [ -d .oldtree ]; then
        (cd .oldtree && python setup.py build_ext --inplace && python -m compileall -q hpcray)
    fi
}
export -f machine
step build 150 bash -c machine

# The transfer table: a remote get against raw MPI, CMA on and off, 1 MiB to 1 GiB, copied
# from the holder's store (the one-host path) and over MPI; then where a 1 MiB get's time
# goes over MPI (HPCRAY_TRACE_HOPS stamps).
step remote_get 200 bash -c 'python benchmarks/remote_get.py --sizes 1Mi,8Mi,64Mi,256Mi,1Gi \
    --rounds 1 --repeat 10 --timeout 100 &&
    python benchmarks/remote_get.py --sizes 1Mi --cma on --paths mpi --rounds 1 --repeat 20 --hops &&
    echo "# objects of 32 MiB and up without staging (HPCRAY_STAGED_SENDS=0): is it still worth it here?" &&
    HPCRAY_STAGED_SENDS=0 python benchmarks/remote_get.py --sizes 64Mi,256Mi,1Gi \
    --cma on --paths mpi --rounds 1 --repeat 10 --timeout 100'
step transfer 40 mpiexec -n 2 python benchmarks/transfer_bandwidth.py --sizes 1M,100M,1G
# What any pull costs when the holder looks every 100 us (and 20 us: Network.expect_pull),
# with cores to spare: the floor of issue 12 items 1-2 on this machine; then a task and a
# get of its result, round after round, over MPI without CMA.
step pull_floor 120 bash -c 'for cma in 1 0; do for sleep in 1e-4 2e-5; do
    MPIR_CVAR_CH4_CMA_ENABLE=$cma mpiexec -n 2 python benchmarks/pull_floor.py --sizes 1Mi,8Mi \
    --repeat 100 --holder-sleep $sleep; done; done &&
    python benchmarks/task_and_get.py --sizes 1Mi,8Mi,64Mi --rounds 2 --cma off'
# Weak scaling at 1/2/4/8/16 ranks, both ways of submitting.
step weak_scaling 120 python benchmarks/weak_scaling.py --ranks 1,2,4,8,16 \
    --tasks-per-rank 5000 --runs 1 --timeout 40 --json /tmp/weak_scaling.json
# The driver feeding 4 ranks with CPUs to spare (issue 12 item 4), against the old tree.
compare=(); [ -f .oldtree/hpcray/__init__.py ] && compare=(--compare .oldtree)
step load_balance 80 python benchmarks/load_balance.py --tasks 100000 --sleep-tasks 0 \
    --runs 1 --timeout 35 "${compare[@]}" --json /tmp/load_balance.json
# Issue 8's per-call rates on a quiet machine, this tree and the old one interleaved.
microbench() {
    for round in 1 2 3; do
        for tree in "$PWD" "$PWD/.oldtree"; do
            [ -f "$tree/hpcray/__init__.py" ] || continue
            echo "# round $round, tree $tree"
            (cd "$tree" && PYTHONPATH="$tree" python benchmarks/microbench.py \
                --backends hpcray --only "$1" | grep '^|' | grep -v '^| -\|^| metric')
        done
    done
}
export -f microbench
step microbench 120 bash -c 'microbench "$0"' "single_client_tasks_sync,single_client_tasks_async,1:1_actor_calls_async,n:n_actor_calls_async,nested_tasks"
step gpu 150 python -m pytest -q -p no:cacheprovider tests/gpu
ls /dev/shm | grep -c hpcray | sed 's/^/hpcray segments left in \/dev\/shm: /'
