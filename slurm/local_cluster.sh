#!/usr/bin/env bash
# A real Slurm cluster on this machine, for tests and for trying ling-slurm without a cluster:
# slurmctld + N slurmd daemons, each serving one fake node (n1..nN on 127.0.0.11.., one port each),
# all on loopback. Debian/Ubuntu packages (Slurm 22.05 on Debian 12); no systemd, no cgroups.
#
#   slurm/local_cluster.sh install   apt-get the packages (daemons are not auto-started)
#   slurm/local_cluster.sh start     install if needed, then munged + slurmctld + N slurmd;
#                                    does nothing if this cluster is already up
#   slurm/local_cluster.sh status    sinfo + squeue
#   slurm/local_cluster.sh stop      cancel all jobs, stop the daemons it started (by pid file)
#
# Needs root (daemons run as root; writes /etc/slurm, /etc/munge, appends n1..nN to /etc/hosts).
# Env: LING_SLURM_NODES=2   fake nodes
#      LING_SLURM_CPUS=$(nproc)   CPUs each fake node advertises (oversubscribing is fine)
# Every step prints the seconds since start; exit status != 0 on any failure.
set -euo pipefail

NODES=${LING_SLURM_NODES:-2}
CPUS=${LING_SLURM_CPUS:-$(nproc)}
CLUSTER=lingtest
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
STATE=/var/spool/slurmctld-$CLUSTER
T0=$(date +%s.%N)

say() { awk -v now="$(date +%s.%N)" -v t0="$T0" -v msg="$*" 'BEGIN { printf "[local_cluster %5.1fs] %s\n", now - t0, msg }'; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }
# poll CMD every 0.2 s, at most N times
retry() { local n=$1; shift; local i; for ((i = 0; i < n; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }
running() { [ -n "${1:-}" ] && [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (it starts Slurm daemons and writes /etc/slurm)"; }

cluster_up() {
    # Up = our cluster's controller answers and all N nodes are registered and usable.
    scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
    grep -q "^ClusterName=$CLUSTER\$" "$CONF" 2>/dev/null || return 1
    [ "$(sinfo -h -N -t idle,alloc,mix -o %N 2>/dev/null | sort -u | wc -l)" -eq "$NODES" ]
}

do_install() {
    need_root
    command -v apt-get >/dev/null || die "apt-get not found: install munge, slurmctld, slurmd and slurm-client yourself"
    local policy_made=0
    # policy-rc.d exit 101 = "do not start services" while the packages are configured
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy_made=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
    [ "$policy_made" = 1 ] && rm -f /usr/sbin/policy-rc.d
    say "installed: $(sinfo --version)"
}

write_config() {
    mkdir -p /etc/slurm "$LOGDIR"
    rm -rf "$STATE"; mkdir -p "$STATE"   # fresh controller state every start
    local mem_mb
    mem_mb=$(( $(awk '/^MemTotal/ { print int($2 / 1024) }' /proc/meminfo) / NODES ))
    cat > "$CONF" <<EOF
# Written by megatron-ling slurm/local_cluster.sh: $NODES fake nodes on loopback.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again cred_expire+1 seconds after its requeue (default 120 s: too slow
# for tests of the preemption/requeue path).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE
# %n = node name: each slurmd needs its own spool dir, pid file and log
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdLogFile=$LOGDIR/slurmd-%n.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No cgroup plugins: works in containers and without systemd (cgroup v1 or v2).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
# Without a database, 'sacct -c' reads finished jobs from this job completion log.
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGDIR/jobcomp.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# Trust the CPUs/RealMemory below even where they exceed the hardware (fake nodes share one host).
SlurmdParameters=config_overrides
KillWait=5
# Keep finished jobs visible to scontrol for an hour.
MinJobAge=3600
InactiveLimit=0
Waittime=0
NodeName=n[1-$NODES] NodeHostname=$(hostname -s) NodeAddr=127.0.0.[11-$((10 + NODES))] Port=[17001-$((17000 + NODES))] CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # Fake node names must resolve (the job's MASTER_ADDR is n1). Append only: containers often
    # bind-mount /etc/hosts, so it cannot be replaced.
    local i
    for ((i = 1; i <= NODES; i++)); do
        grep -qE "^127\.0\.0\.$((10 + i))[[:space:]]+n$i([[:space:]]|\$)" /etc/hosts || echo "127.0.0.$((10 + i)) n$i" >> /etc/hosts
    done
}

start_munge() {
    if munge -n < /dev/null 2>/dev/null | unmunge > /dev/null 2>&1; then say "munged already running"; return; fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
    chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key; chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    retry 50 sh -c 'munge -n < /dev/null | unmunge' || die "munged did not start (see /var/log/munge/munged.log)"
    say "munged up (pid $(cat /run/munge/munged.pid))"
}

do_start() {
    need_root
    if command -v scontrol >/dev/null && cluster_up; then
        say "already running: $(sinfo -h -o '%P %D %T %N' | xargs)"
        return 0
    fi
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null || do_install
    do_stop quiet   # a half-started earlier attempt would hold the ports
    start_munge
    write_config
    # -c: clean start, no jobs or node states recovered from an old run
    /usr/sbin/slurmctld -c || die "slurmctld did not start: $(tail -n 1 "$LOGDIR/slurmctld.log" 2>/dev/null)"
    retry 100 scontrol ping || die "slurmctld did not answer (see $LOGDIR/slurmctld.log)"
    # slurmctld creates the completion log 0644; 'sacct -c' opens it for appending, even as a reader
    chmod 666 "$LOGDIR/jobcomp.log" 2>/dev/null || true
    say "slurmctld up (pid $(cat /run/slurmctld.pid))"
    local i
    for ((i = 1; i <= NODES; i++)); do
        mkdir -p "/var/spool/slurmd/n$i"
        # -N: the NodeName this daemon serves
        /usr/sbin/slurmd -N "n$i" || die "slurmd n$i did not start: $(tail -n 1 "$LOGDIR/slurmd-n$i.log" 2>/dev/null)"
    done
    retry 250 cluster_up || die "not all $NODES slurmd registered: $(sinfo -h -N -o '%N %T' | xargs) (see $LOGDIR/slurmd-n*.log)"
    say "cluster $CLUSTER up: $(sinfo -h -o '%P %D %T %N' | xargs)"
}

do_stop() {
    if scontrol ping 2>/dev/null | grep -q 'is UP'; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        squeue -h -o %i | xargs -r scancel 2>/dev/null || true
        retry 100 sh -c '[ -z "$(squeue -h -o %i)" ]' || true
    fi
    local f pid i
    # slurmd first, slurmctld next; munged last (other software may use it: only ours, by pid file)
    for f in /run/slurmd-*.pid /run/slurmctld.pid /run/munge/munged.pid; do
        [ -s "$f" ] || continue
        pid=$(cat "$f")
        if running "$pid"; then
            kill -TERM "$pid"
            for ((i = 0; i < 100; i++)); do running "$pid" || break; sleep 0.1; done
            running "$pid" && kill -KILL "$pid"
            [ "${1:-}" = quiet ] || say "stopped $(basename "$f" .pid) (pid $pid)"
        fi
        rm -f "$f"
    done
}

case "${1:-}" in
    install) do_install ;;
    start) do_start ;;
    stop) need_root; do_stop ;;
    status) sinfo; squeue ;;
    *) echo "usage: $0 install|start|status|stop" >&2; exit 2 ;;
esac
