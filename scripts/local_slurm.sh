#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost, for tests of launch.sh (needs root; no systemd, no cgroups).
#
#   scripts/local_slurm.sh start DIR    install slurm + munge if missing, write DIR/slurm.conf, start munged,
#                                       slurmctld and slurmd, wait until the node is idle, print the export line
#   scripts/local_slurm.sh stop DIR     cancel this cluster's jobs and stop its daemons (by their pid files)
#   scripts/local_slurm.sh status DIR   daemons and node state
#
# Every file (config, munge key and socket, state, spool, pids, logs) lives under DIR, so several clusters can
# run side by side; the ports are picked free once and kept in DIR/slurm.conf. All commands are idempotent.
set -euo pipefail

readonly DAEMONS=(munged slurmctld slurmd)   # start order
readonly START_TIMEOUT_S=60

usage() {
    echo "usage: $0 start|stop|status DIR" >&2
    exit 2
}

log() { printf 'local_slurm: %s\n' "$*" >&2; }

install_packages() {
    local missing=0 bin
    for bin in slurmctld slurmd sbatch srun scontrol munged munge; do
        command -v "$bin" >/dev/null 2>&1 || missing=1
    done
    [ "$missing" = 0 ] && return 0
    [ "$(id -u)" = 0 ] || { log "slurm/munge are missing and installing them needs root"; exit 1; }
    log "installing slurmctld slurmd slurm-client munge (apt-get)"
    # Concurrent starts on one machine take turns; apt waits for dpkg's own lock too.
    (
        flock 9
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=300 update -qq
        apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null
    ) 9>/tmp/megatron-slim-local-slurm-apt.lock
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

free_port_pair() {
    # Two consecutive free ports in 10000-14999: away from SLURM's defaults (6817/6818), from the ephemeral range
    # and from launch.sh's MASTER_PORT range (15000-29999).
    local port tries
    for tries in $(seq 1 50); do
        port=$(( 10000 + RANDOM % 4999 ))
        if ! port_in_use "$port" && ! port_in_use "$((port + 1))"; then
            echo "$port"
            return 0
        fi
    done
    log "no free port pair found after $tries tries"
    return 1
}

write_config() {
    local dir="$1" conf="$1/slurm.conf"
    [ -f "$conf" ] && return 0
    local node cpus mem_mb port
    node="$(hostname -s)"
    cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"   # nproc obeys the OpenMP variables
    mem_mb="$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)"
    port="$(free_port_pair)"
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run" "$dir/munge"
    chmod 711 "$dir/munge"
    cat >"$conf.tmp" <<EOF
# Written by scripts/local_slurm.sh: a one-node localhost cluster; all files under $dir.
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
# Run the schedulers every 2 s (defaults 60/30 s) so a requeued job starts soon after its begin time.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
# Finished jobs stay listed at least this long. sbatch --wait backs off from 2 s polls towards MinJobAge/2
# (up to 32 s); at 4 it keeps polling every 2 s.
MinJobAge=4
InactiveLimit=0
MailProg=/bin/true
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$conf.tmp" "$conf"
}

pid_of() {
    # The pid in DIR/run/NAME.pid when that process is alive and is NAME (guards against pid reuse).
    local dir="$1" name="$2" pid
    pid="$(cat "$dir/run/$name.pid" 2>/dev/null)" || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 1
    echo "$pid"
}

start_daemon() {
    local dir="$1" name="$2"
    pid_of "$dir" "$name" >/dev/null && return 0
    case "$name" in
        munged)
            if [ ! -f "$dir/munge/munge.key" ]; then
                (umask 077 && head -c 1024 /dev/urandom >"$dir/munge/munge.key")
                chmod 400 "$dir/munge/munge.key"
            fi
            munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
                --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
                --seed-file="$dir/munge/munged.seed"
            ;;
        slurmctld) slurmctld -c -f "$dir/slurm.conf" ;;
        slurmd) slurmd -f "$dir/slurm.conf" -N "$(hostname -s)" ;;
    esac
    local i
    for i in $(seq 1 50); do
        pid_of "$dir" "$name" >/dev/null && return 0
        sleep 0.2
    done
    log "$name did not start (after $i checks); see $dir/log/$name.log"
    return 1
}

node_state() {
    sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true
}

start() {
    local dir="$1"
    install_packages
    write_config "$dir"
    export SLURM_CONF="$dir/slurm.conf"
    local name
    for name in "${DAEMONS[@]}"; do
        start_daemon "$dir" "$name"
    done
    local deadline=$((SECONDS + START_TIMEOUT_S)) state=""
    while [ "$SECONDS" -lt "$deadline" ]; do
        state="$(node_state)"
        case "$state" in
            idle|mixed|allocated) break ;;
        esac
        sleep 0.5
    done
    case "$state" in
        idle|mixed|allocated) ;;
        *) log "node not ready after ${START_TIMEOUT_S}s (state '${state}'); logs in $dir/log"; return 1 ;;
    esac
    log "cluster up (node $(hostname -s): $state)"
    echo "export SLURM_CONF=$(printf '%q' "$SLURM_CONF")"
}

stop() {
    local dir="$1" i name pid pids=()
    if [ -f "$dir/slurm.conf" ] && pid_of "$dir" slurmctld >/dev/null; then
        # Jobs would otherwise outlive slurmd as orphaned slurmstepd processes.
        SLURM_CONF="$dir/slurm.conf" scancel --partition=debug 2>/dev/null || true
        for i in $(seq 1 20); do
            [ -z "$(SLURM_CONF="$dir/slurm.conf" squeue -h -o '%i' 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    # TERM all daemons at once (each takes a second or two to exit), then KILL whatever outlives 10 s.
    for name in "${DAEMONS[@]}"; do
        pid="$(pid_of "$dir" "$name")" || continue
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid")
    done
    for pid in "${pids[@]}"; do
        for i in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for name in "${DAEMONS[@]}"; do
        rm -f "$dir/run/$name.pid"
    done
    log "stopped"
}

status() {
    local dir="$1" name pid rc=0
    for name in "${DAEMONS[@]}"; do
        if pid="$(pid_of "$dir" "$name")"; then
            echo "$name: running (pid $pid)"
        else
            echo "$name: stopped"
            rc=1
        fi
    done
    if [ "$rc" = 0 ]; then
        SLURM_CONF="$dir/slurm.conf" sinfo -N
        echo "export SLURM_CONF=$(printf '%q' "$dir/slurm.conf")"
    fi
    return "$rc"
}

[ "$#" = 2 ] || usage
cmd="$1"
[ "$cmd" = start ] && mkdir -p "$2"
[ -d "$2" ] || { log "no such directory: $2"; exit 1; }
dir="$(cd "$2" && pwd)"
case "$cmd" in
    start) start "$dir" ;;
    stop) stop "$dir" ;;
    status) status "$dir" ;;
    *) usage ;;
esac
