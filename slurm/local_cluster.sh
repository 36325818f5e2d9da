#!/usr/bin/env bash
# A real one-node Slurm cluster on loopback, for tests and for trying the launchers.
#
#   slurm/local_cluster.sh start    # install (apt, as root) if missing, configure, start, wait until idle
#   slurm/local_cluster.sh status   # daemons, node state; exit 0 only when the node is usable
#   slurm/local_cluster.sh stop     # scontrol shutdown, then munged by its pid file
#   slurm/local_cluster.sh run CMD  # CMD with a cluster up (started and stopped around it
#                                   # unless one is already running); what `make test` uses
#
# Every command is idempotent. Needs root (the daemons run as root, munged as
# the munge user). Tested with Debian bookworm's slurm 22.05 and munge 0.5.15.
#
# Environment:
#   SLURM_STATE_DIR   directory this script owns: slurm.conf, state, spool, logs,
#                     pid files (default /tmp/megatron-gppo-slurm)
#   SLURM_PARTITION   name of the partition jobs run in (default debug, the default partition)
#   SLURM_TIMEOUT_S   how long to wait for munge / the controller / an idle node (default 60)
#
# A second partition, `scale`, adds 15 cloud nodes that never boot to the real one,
# for `sbatch --test-only --partition=scale --nodes=16 ...` (multi-node shape checks).
#
# /etc/slurm/slurm.conf (where sbatch, srun, sinfo look) becomes a symlink to
# $SLURM_STATE_DIR/slurm.conf; an existing /etc/slurm/slurm.conf that is not
# ours is never touched (start fails instead).
set -euo pipefail

STATE_DIR=${SLURM_STATE_DIR:-/tmp/megatron-gppo-slurm}
PARTITION=${SLURM_PARTITION:-debug}
SCALE_PARTITION=scale
SCALE_NODES=16
TIMEOUT_S=${SLURM_TIMEOUT_S:-60}
SYSTEM_CONF=/etc/slurm/slurm.conf
MUNGE_PID=/run/munge/munged.pid
MARKER="# written by megatron-gppo slurm/local_cluster.sh"

log() { echo "[local_cluster] $*" >&2; }

# poll CMD... until it succeeds or TIMEOUT_S passes; short sleeps only.
poll() {
    local what=$1; shift
    local deadline=$((SECONDS + TIMEOUT_S))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${TIMEOUT_S}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { sinfo -h -N -p "$PARTITION" -o %T 2>/dev/null | head -n1; }

node_usable() { [[ $(node_state) =~ ^(idle|mixed|allocated)$ ]]; }

munge_works() { munge -n | unmunge; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]} == 0)) && return
    if ((EUID != 0)) || ! command -v apt-get >/dev/null; then
        log "missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root on Debian/Ubuntu"
        exit 1
    fi
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

write_config() {
    local host hw sockets cores threads memory
    host=$(hostname -s)
    hw=$(slurmd -C | head -n1)
    sockets=$(grep -o 'SocketsPerBoard=[0-9]*' <<<"$hw" | cut -d= -f2)
    cores=$(grep -o 'CoresPerSocket=[0-9]*' <<<"$hw" | cut -d= -f2)
    threads=$(grep -o 'ThreadsPerCore=[0-9]*' <<<"$hw" | cut -d= -f2)
    memory=$(grep -o 'RealMemory=[0-9]*' <<<"$hw" | cut -d= -f2)
    # slurmd drains a node that reports less memory than configured; leave headroom.
    memory=$((memory * 95 / 100))
    mkdir -p "$STATE_DIR"/{state,spool,log,run}
    cat >"$STATE_DIR/slurm.conf" <<EOF
$MARKER
ClusterName=megatron-gppo-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
SchedulerParameters=batch_sched_delay=0
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$memory State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
# Shape checks only: 15 power-saved cloud nodes that never boot, so that
# \`sbatch --test-only --partition=$SCALE_PARTITION --nodes=16\` can schedule multi-node
# launchers. Jobs submitted there for real would wait for nodes that never come.
NodeName=cloud[1-$((SCALE_NODES - 1))] Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$memory State=CLOUD
PartitionName=$SCALE_PARTITION Nodes=$host,cloud[1-$((SCALE_NODES - 1))] Default=NO MaxTime=INFINITE State=UP
ResumeProgram=/bin/true
SuspendProgram=/bin/true
SuspendExcNodes=$host
SuspendTime=600
EOF
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$STATE_DIR/slurm.conf" ]]; then
        return
    fi
    if [[ -e $SYSTEM_CONF ]] && ! grep -qF "$MARKER" "$SYSTEM_CONF"; then
        log "$SYSTEM_CONF exists and was not written by this script; refusing to replace it"
        exit 1
    fi
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -sfn "$STATE_DIR/slurm.conf" "$SYSTEM_CONF"
}

start_munge() {
    if munge_works >/dev/null 2>&1; then
        return
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID"
    poll "munged" munge_works
}

start() {
    local started=$SECONDS
    install_packages
    # Pid files first: sinfo against a controller that is down hangs for seconds.
    if pid_alive "$STATE_DIR/run/slurmctld.pid" && pid_alive "$STATE_DIR/run/slurmd.pid" && node_usable; then
        log "already running: node $(node_state)"
        return
    fi
    write_config
    start_munge
    pid_alive "$STATE_DIR/run/slurmctld.pid" || slurmctld -i
    poll "slurmctld" scontrol ping
    pid_alive "$STATE_DIR/run/slurmd.pid" || slurmd
    if ! poll "an idle node" node_usable; then
        log "node state: $(node_state); see $STATE_DIR/log/"
        exit 1
    fi
    log "up in $((SECONDS - started))s: partition $PARTITION, node $(hostname -s) $(node_state)"
}

stop() {
    local daemon pid pids=()
    for daemon in slurmctld slurmd; do
        pid_alive "$STATE_DIR/run/$daemon.pid" && pids+=("$(cat "$STATE_DIR/run/$daemon.pid")")
    done
    if ((${#pids[@]})); then
        scontrol shutdown >/dev/null 2>&1 || true
        for pid in "${pids[@]}"; do
            # `scontrol shutdown` stops both daemons; be firm with one that lingers.
            poll "pid $pid to exit" bash -c "! kill -0 $pid" || kill "$pid" 2>/dev/null || true
        done
    fi
    if pid_alive "$MUNGE_PID"; then
        pid=$(cat "$MUNGE_PID")
        kill "$pid"
        poll "munged to exit" bash -c "! kill -0 $pid"
    fi
    log "stopped"
}

status() {
    local daemon ok=0
    for daemon in slurmctld slurmd; do
        if pid_alive "$STATE_DIR/run/$daemon.pid"; then
            echo "$daemon: running (pid $(cat "$STATE_DIR/run/$daemon.pid"))"
        else
            echo "$daemon: stopped"; ok=1
        fi
    done
    if pid_alive "$MUNGE_PID"; then echo "munged: running (pid $(cat "$MUNGE_PID"))"; else echo "munged: stopped"; ok=1; fi
    if ((ok == 0)); then
        echo "node: $(node_state)"
        node_usable || ok=1
    fi
    return $ok
}

# Run CMD with a cluster up: start one when none answers and this machine can
# (root with apt, or the packages installed), stop it afterwards if we started it.
# Without one, CMD still runs (the Slurm tests then skip, saying why).
run_with_cluster() {
    local rc=0
    if command -v sinfo >/dev/null && timeout 10 sinfo -h >/dev/null 2>&1; then
        log "using the running Slurm cluster"
        "$@" || rc=$?
        return $rc
    fi
    if ((EUID != 0)) || { ! command -v slurmctld >/dev/null && ! command -v apt-get >/dev/null; }; then
        log "no Slurm cluster, and this is not root on a machine with apt: running without one"
        "$@" || rc=$?
        return $rc
    fi
    start
    "$@" || rc=$?
    stop
    return $rc
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    run) shift; run_with_cluster "$@" ;;
    *) echo "usage: $0 start|stop|status|run CMD [ARGS...]" >&2; exit 2 ;;
esac
