#!/usr/bin/env bash
# A real one-machine Slurm (Debian's slurmctld, slurmd and munged) for hpcray's tests and for
# trying `srun ... python -m hpcray` on a laptop or CI machine. Not for production clusters:
# it runs everything as root, declares CPUs the machine may not have, and keeps no accounting.
#
#   slurm/local-cluster.sh start    install the packages if missing, start the daemons, wait
#                                   until the node is idle (idempotent)
#   slurm/local-cluster.sh stop     cancel jobs, stop the daemons by their PID files, wait until
#                                   they are gone (fine when nothing runs)
#   slurm/local-cluster.sh status   the daemons and sinfo; exit 0 when all three run
#   slurm/local-cluster.sh env      prints `export SLURM_CONF=...`: eval "$(... env)"
#   slurm/local-cluster.sh clean-mpich JOB [STEP...]
#                                   remove the MPICH shared-memory segments of a job's steps
#                                   (every step when none is named); the cluster's Epilog runs
#                                   it at the end of every job
#
# Settings (environment):
#   HPCRAY_SLURM_DIR    state dir: config, logs, PID files, spool (default /tmp/hpcray-slurm)
#   HPCRAY_SLURM_PORT   slurmctld's port; slurmd takes the next one (default 6817, Slurm's own)
#   HPCRAY_SLURM_CPUS   CPUs the node declares, whatever the machine has (default 8)
#
# Exit status 2 means this machine cannot run it (not root, no apt-get, packages not
# installable); tests skip on it. Every other failure exits 1 and points at the logs.
#
# The settings below were measured to work in a Debian 12 container with no systemd (see
# the project's notes on MPI and Slurm); the comments say why each one is there.

set -euo pipefail
# The daemons live in /usr/sbin, which a non-login root shell may not have on its PATH.
PATH=$PATH:/usr/sbin:/sbin

STATE_DIR=${HPCRAY_SLURM_DIR:-/tmp/hpcray-slurm}
CTLD_PORT=${HPCRAY_SLURM_PORT:-6817}
SLURMD_PORT=$((CTLD_PORT + 1))
NODE_CPUS=${HPCRAY_SLURM_CPUS:-8}
CONF=$STATE_DIR/slurm.conf
MUNGE_DIR=$STATE_DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
UP_TIMEOUT_S=30
STOP_TIMEOUT_S=15
PACKAGES=(slurmd slurmctld slurm-client munge)

say() { echo "local-cluster: $*" >&2; }
die() { say "$*"; exit 1; }
unavailable() { say "$*"; exit 2; }

# alive PID: the process exists and is not a zombie (a killed daemon stays a zombie for a
# second or so before init reaps it, and must not count as running).
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [[ ${stat##*) } != Z* ]]
}

# pid_of NAME PIDFILE: the PID in PIDFILE if that process is alive and is NAME (PIDs get
# reused, so a stale file must not make us signal a stranger).
pid_of() {
    local name=$1 pidfile=$2 pid comm
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc 0-9 <"$pidfile")
    [[ -n $pid ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name" ]] && alive "$pid" || return 1
    echo "$pid"
}

install_packages() {
    local missing=0 cmd
    for cmd in slurmctld slurmd munged sinfo srun sbatch; do
        command -v "$cmd" >/dev/null 2>&1 || missing=1
    done
    ((missing)) || return 0
    ((EUID == 0)) || unavailable "Slurm is not installed and installing it needs root"
    command -v apt-get >/dev/null 2>&1 || unavailable "Slurm is not installed and there is no apt-get"
    say "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists only when they do not know the packages yet (a fresh image).
    if ! apt-cache show slurmd >/dev/null 2>&1; then
        apt-get -o DPkg::Lock::Timeout=120 update -q >&2 \
            || unavailable "apt-get update failed: is the Debian registry reachable?"
    fi
    apt-get -o DPkg::Lock::Timeout=120 install -y -q --no-install-recommends "${PACKAGES[@]}" >&2 \
        || unavailable "apt-get install ${PACKAGES[*]} failed"
}

write_conf() {
    local host=$1 first_job_id
    # A fresh cluster would number its jobs from 1 again, and MPICH names its shared-memory
    # segment after the job and step: a rank killed in job 4.0 of an earlier cluster leaves
    # /dev/shm/mpich_shm_* behind, and job 4.0 of the next one attaches to it and fails in
    # MPI_Init or hangs. So each state dir draws its own first job id, once.
    if [[ ! -s $STATE_DIR/first-job-id ]]; then
        echo $(((RANDOM << 15 | RANDOM) % 60000000 + 1000)) >"$STATE_DIR/first-job-id"
    fi
    first_job_id=$(<"$STATE_DIR/first-job-id")
    cat >"$CONF" <<EOF
# Written by slurm/local-cluster.sh; rewritten on every start.
ClusterName=hpcray-local
# The node talks to the controller over loopback whatever the host name resolves to.
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# root everywhere: this is a throwaway cluster in a container, with no slurm user.
SlurmUser=root
SlurmdUser=root
# Our own munged, not the system one (which nothing starts without systemd).
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE_DIR/ctld-state
SlurmdSpoolDir=$STATE_DIR/slurmd-spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups without systemd: track processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Trust the CPUs declared below over the cores slurmd counts, so a 2-core CI machine can run
# 8 tasks instead of having its node drained for "low CPUs".
SlurmdParameters=config_overrides
# PyPI's MPICH (and Debian's) start under srun through PMI-2; Open MPI needs --mpi=pmix.
MpiDefault=pmi2
# A rank that exits non-zero kills the whole step: without this a dead MPICH rank leaves the
# others blocked forever.
KillOnBadExit=1
# Signal-to-SIGKILL delay when a job ends or is cancelled: short, so stop does not wait.
KillWait=2
# A node that comes back (slurmd restarted) is usable again without an admin.
ReturnToService=2
MailProg=/bin/true
# Keep finished jobs visible to scontrol show job for a while: there is no sacct.
MinJobAge=300
# Removes what MPICH leaves in /dev/shm when a step's ranks are killed (clean-mpich below).
Epilog=$STATE_DIR/epilog
FirstJobId=$first_job_id
NodeName=$host NodeAddr=127.0.0.1 CPUs=$NODE_CPUS State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

write_epilog() {
    # slurmd exec()s the Epilog with no arguments, so a small script that calls this one; it
    # must exit 0 whatever happens, or slurmd drains the node.
    cat >"$STATE_DIR/epilog" <<EOF
#!/bin/bash
# Written by slurm/local-cluster.sh; runs as root on the node at the end of every job.
bash '$(realpath "$0")' clean-mpich "\$SLURM_JOB_ID" >/dev/null 2>&1
exit 0
EOF
    chmod 0755 "$STATE_DIR/epilog"
}

start_munged() {
    local key=/etc/munge/munge.key
    id munge >/dev/null 2>&1 || die "no user munge: is the munge package installed?"
    mkdir -p "$MUNGE_DIR"
    chown munge: "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR"  # clients must reach the socket inside
    if [[ ! -s $key ]]; then
        # The package normally creates it; a broken install may not have.
        key=$MUNGE_DIR/munge.key
        [[ -s $key ]] || { dd if=/dev/urandom of="$key" bs=1024 count=1 status=none \
            && chown munge: "$key" && chmod 0400 "$key"; }
    fi
    pid_of munged "$MUNGE_DIR/munged.pid" >/dev/null && return 0
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    runuser -u munge -- /usr/sbin/munged \
        --key-file="$key" \
        --socket="$MUNGE_SOCKET" \
        --pid-file="$MUNGE_DIR/munged.pid" \
        --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        || die "munged did not start: see $MUNGE_DIR/munged.log"
}

node_state() {
    SLURM_CONF=$CONF sinfo -h -n "$1" -o %t 2>/dev/null | head -n 1 || true
}

cmd_start() {
    local host t0 ms state="" deadline
    t0=$(date +%s%N)
    install_packages
    ((EUID == 0)) || unavailable "the local cluster runs its daemons as root"
    host=$(hostname -s)
    mkdir -p "$STATE_DIR/ctld-state" "$STATE_DIR/slurmd-spool"
    # munged runs as user munge and must reach its socket dir inside (mktemp makes 0700).
    chmod 0755 "$STATE_DIR"
    write_conf "$host"
    write_epilog
    start_munged
    if ! pid_of slurmctld "$STATE_DIR/slurmctld.pid" >/dev/null; then
        # -c: a fresh controller forgets the jobs of an earlier run (stop cancels them all, but
        # a crashed controller would recover and rerun them).
        slurmctld -c -f "$CONF" || die "slurmctld did not start: see $STATE_DIR/slurmctld.log"
    fi
    if ! pid_of slurmd "$STATE_DIR/slurmd.pid" >/dev/null; then
        slurmd -f "$CONF" || die "slurmd did not start: see $STATE_DIR/slurmd.log"
    fi
    deadline=$(($(date +%s) + UP_TIMEOUT_S))
    while (($(date +%s) < deadline)); do
        state=$(node_state "$host")
        # mix/alloc: already up with jobs running (a second start).
        [[ $state == idle || $state == mix || $state == alloc ]] && break
        sleep 0.2
    done
    [[ $state == idle || $state == mix || $state == alloc ]] \
        || die "node $host is '${state:-not reported}' after ${UP_TIMEOUT_S} s: see $STATE_DIR/*.log"
    ms=$((($(date +%s%N) - t0) / 1000000))
    say "up in $((ms / 1000)).$(printf %03d $((ms % 1000))) s:" \
        "node $host ($NODE_CPUS CPUs) $state; eval \"\$($0 env)\""
}

# stop_daemons NAME PIDFILE...: SIGTERM to all at once (each takes 1-2 s to exit, so one
# after the other would triple the wait), SIGKILL to those still there after STOP_TIMEOUT_S;
# returns once all are gone.
stop_daemons() {
    local pids=() still=() pid i
    while (($# >= 2)); do
        if pid=$(pid_of "$1" "$2"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$2"
        shift 2
    done
    for ((i = 0; i < STOP_TIMEOUT_S * 10; i++)); do
        still=()
        for pid in "${pids[@]}"; do alive "$pid" && still+=("$pid"); done
        ((${#still[@]})) || return 0
        sleep 0.1
    done
    say "still running after SIGTERM and ${STOP_TIMEOUT_S} s, killing: ${still[*]}"
    kill -KILL "${still[@]}" 2>/dev/null || true
    for pid in "${still[@]}"; do
        while alive "$pid"; do sleep 0.1; done
    done
}

# PIDs of slurmstepd processes serving this cluster: they listen on sockets in our spool dir.
our_stepds() {
    local spool=$STATE_DIR/slurmd-spool inodes pid fd link
    inodes=$(awk -v dir="$spool/" 'index($8, dir) == 1 { print $7 }' /proc/net/unix 2>/dev/null)
    [[ -n $inodes ]] || return 0
    for pid in $(pgrep -x slurmstepd || true); do
        for fd in /proc/"$pid"/fd/*; do
            link=$(readlink "$fd" 2>/dev/null) || continue
            [[ $link == socket:* ]] || continue
            if grep -qx "${link//[^0-9]/}" <<<"$inodes"; then echo "$pid"; break; fi
        done
    done
}

# fnv1a32 TEXT: MPICH's HASH_FNV (32-bit FNV-1a) of TEXT, in lowercase hex without padding.
fnv1a32() {
    local text=$1 hash=2166136261 i code
    for ((i = 0; i < ${#text}; i++)); do
        printf -v code %d "'${text:i:1}"
        hash=$((((hash ^ code) * 16777619) & 0xffffffff))
    done
    printf %x "$hash"
}

# clean-mpich JOB [STEP...]: MPICH (ch4, as in PyPI's wheel) maps one segment per node and
# step, /dev/shm/mpich_shm_<FNV-1a of the PMI job id>_<node> (and mpich_vci_... with several
# VCIs). Only the local rank that happened to create it unlinks it, in MPI_Finalize: when that
# rank is killed (KillOnBadExit after another rank failed, scancel, a time limit) or leaves by
# os._exit or MPI_Abort, the segment stays until reboot. Under `srun --mpi=pmi2` the PMI job id
# is "<job>.<step>", so a finished job's segments are known by name; nothing else is touched
# (mpiexec's own names, other clusters' jobs).
MAX_STEPS=256
cmd_clean_mpich() {
    local job=${1:-} steps step segment name hex
    local -A ours=()
    [[ $job =~ ^[0-9]+$ ]] || die "clean-mpich: not a job id: '$job'"
    shift
    if (($#)); then steps=("$@"); else mapfile -t steps < <(seq 0 $((MAX_STEPS - 1))); fi
    shopt -s nullglob
    local segments=(/dev/shm/mpich_shm_* /dev/shm/mpich_vci_*)
    ((${#segments[@]})) || return 0
    for step in "${steps[@]}"; do ours[$(fnv1a32 "$job.$step")]=1; done
    for segment in "${segments[@]}"; do
        name=${segment##*/}
        hex=${name#mpich_*_}
        hex=${hex%_*}
        if [[ -n ${ours[$hex]:-} ]]; then
            rm -f -- "$segment"
            say "removed $segment (job $job)"
        fi
    done
}

# descendants PID...: every process below the given ones.
descendants() {
    local pid child
    for pid in "$@"; do
        for child in $(pgrep -P "$pid" || true); do
            echo "$child"
            descendants "$child"
        done
    done
}

cmd_stop() {
    local i pids pid jobs=()
    if pid_of slurmctld "$STATE_DIR/slurmctld.pid" >/dev/null; then
        # slurmd leaves running steps alone when it stops, so end the jobs first. timeout: a
        # client retries for MessageTimeout (10 s) when the controller does not answer.
        if [[ -n $(SLURM_CONF=$CONF timeout 5 squeue -h -o %i 2>/dev/null) ]]; then
            SLURM_CONF=$CONF timeout 5 scancel --full --user=root 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                [[ -z $(SLURM_CONF=$CONF timeout 5 squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.1
            done
        fi
    fi
    # Steps the cancel did not reach (the controller was already dead): the step daemons and
    # the tasks under them, which would otherwise outlive the cluster.
    pids=$(our_stepds | tr '\n' ' ')
    if [[ -n $pids ]]; then
        # Their jobs' Epilog will never run: clean up after them once they are gone.
        for pid in $pids; do
            [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) =~ \[([0-9]+)\. ]] \
                && jobs+=("${BASH_REMATCH[1]}")
        done
        # shellcheck disable=SC2086
        pids="$(descendants $pids | tr '\n' ' ')$pids"
        say "killing leftover job steps: $pids"
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        for pid in $pids; do
            while alive "$pid"; do sleep 0.1; done
        done
        for i in $( ((${#jobs[@]})) && printf '%s\n' "${jobs[@]}" | sort -u); do
            cmd_clean_mpich "$i"
        done
    fi
    stop_daemons slurmd "$STATE_DIR/slurmd.pid" slurmctld "$STATE_DIR/slurmctld.pid" \
        munged "$MUNGE_DIR/munged.pid"
    return 0
}

cmd_status() {
    local name pidfile pid running=0
    for name in munged slurmctld slurmd; do
        pidfile=$STATE_DIR/$name.pid
        [[ $name == munged ]] && pidfile=$MUNGE_DIR/munged.pid
        if pid=$(pid_of "$name" "$pidfile"); then
            echo "$name: running (pid $pid)"
            running=$((running + 1))
        else
            echo "$name: stopped"
        fi
    done
    if ((running == 3)); then
        SLURM_CONF=$CONF sinfo || true
        return 0
    fi
    return 3
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    clean-mpich)
        shift
        cmd_clean_mpich "$@"
        ;;
    *)
        echo "usage: $0 start|stop|status|env|clean-mpich JOB [STEP...]" >&2
        exit 64
        ;;
esac
