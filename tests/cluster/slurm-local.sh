#!/usr/bin/env bash
# One-node SLURM cluster on localhost for tests (slurm 22.05, run as root).
#   slurm-local.sh start DIR   -> prints "export SLURM_CONF=DIR/slurm.conf" on stdout
#   slurm-local.sh stop  DIR   -> stops the daemons started from DIR (idempotent)
# /etc/slurm is never touched: everything lives under DIR and clients find it via SLURM_CONF.
# Loopback only, as far as slurm allows: controller and node are addressed as 127.0.0.1, and if
# `hostname -s` resolves to 127.0.0.1, CommunicationParameters=NoInAddrAny makes slurmd,
# slurmstepd and srun bind there instead of 0.0.0.0 (otherwise they listen on all interfaces).
# What slurm CANNOT restrict: slurmctld always listens on 0.0.0.0:SlurmctldPort (NoInAddrAny
# does not apply to it, and there is no bind-address option). munged uses a unix socket only.
set -euo pipefail
log() { echo "slurm-local: $*" >&2; }
die() { log "ERROR: $*"; for f in "${DIR:-.}"/slurmctld.log "${DIR:-.}"/slurmd.log; do
          [ -f "$f" ] && { echo "---- tail $f" >&2; tail -n 25 "$f" >&2; }; done
        [ "${CMD:-}" = start ] && "$0" stop "$DIR" >&2; exit 1; }  # don't leave half a cluster
[ $# -eq 2 ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
CMD=$1; mkdir -p "$2"; DIR=$(cd "$2" && pwd)
export SLURM_CONF="$DIR/slurm.conf"

stop_pid() {  # stop_pid PIDFILE NAME: TERM, wait up to 10 s, then KILL
  local pf=$1 pid i; [ -s "$pf" ] || return 0; pid=$(cat "$pf")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { log "$2 ($pid) ignores TERM, killing"; kill -9 "$pid" || true; }
  fi; rm -f "$pf"; log "stopped $2"
}

if [ "$CMD" = stop ]; then
  # cancel jobs first: slurmstepd (and the job's processes) outlive slurmd and ignore TERM
  if [ -s "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    ids=$(timeout 5 squeue -h -o %F 2>/dev/null | sort -u) || true
    [ -n "$ids" ] && { log "cancelling jobs: $ids"; timeout 5 scancel $ids || true; }
  fi
  stepds() { for p in $(pgrep -x slurmstepd); do   # steps of THIS cluster (env carries SLURM_CONF)
    tr '\0' '\n' 2>/dev/null <"/proc/$p/environ" | grep -qx "SLURM_CONF=$SLURM_CONF" && echo "$p"; done; }
  for i in $(seq 50); do [ -z "$(stepds)" ] && break; sleep 0.2; done
  for p in $(stepds); do   # still there after 10 s: kill its whole session (stepd + tasks)
    log "killing leftover slurmstepd $p and its session"; pkill -9 -s "$(ps -o sid= -p "$p" | tr -d " ")" || true; done
  stop_pid "$DIR/slurmd.pid" slurmd
  stop_pid "$DIR/slurmctld.pid" slurmctld
  # munged only if this script started it (its pid was recorded in DIR)
  [ -s "$DIR/munged.started" ] && stop_pid "$DIR/munged.started" munged
  exit 0
fi
[ "$CMD" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "must run as root (SlurmUser=root)"
[ -s "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null &&
  { log "ERROR: a cluster is already running from $DIR (stop it first)"; exit 1; }
T0=$(date +%s.%N)

# --- munge: reuse a running daemon, else start one (key created if missing)
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    mungekey --create 2>/dev/null || create-munge-key 2>/dev/null ||
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    log "created /etc/munge/munge.key"
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key; chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge; chmod 755 /run/munge
  # as the munge user if possible, else as root (which needs --force)
  runuser -u munge -- munged 2>"$DIR/munged.err" || munged --force 2>>"$DIR/munged.err" ||
    die "munged failed: $(cat "$DIR/munged.err")"
  for i in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munge still not answering: $(cat "$DIR/munged.err")"
  cp /run/munge/munged.pid "$DIR/munged.started"; log "started munged"
fi

# --- config: two free TCP ports on loopback, state/spool/logs/pids under DIR
read -r CTLD_PORT SLURMD_PORT < <(python3 -c '
import socket; s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1", 0)) for x in s]; print(*[x.getsockname()[1] for x in s])')
HOST=$(hostname -s)
# NoInAddrAny binds slurmd/srun to what $HOST resolves to (not NodeAddr!): only safe if that is 127.0.0.1
NOANY="# CommunicationParameters=NoInAddrAny not set: $HOST does not resolve to 127.0.0.1"
[ "$(getent ahostsv4 "$HOST" | awk 'NR==1{print $1}')" = 127.0.0.1 ] && NOANY=CommunicationParameters=NoInAddrAny
mkdir -p "$DIR/state" "$DIR/spool"
cat >"$SLURM_CONF" <<EOF
ClusterName=llmbench
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=2
InactiveLimit=0
$NOANY
MinJobAge=60
# start batch jobs at submit time (default delay is up to 3 s)
SchedulerParameters=batch_sched_delay=0
# trust the CPUs= below (8) over the 2 real cores, so two 2-task jobs run at once
SlurmdParameters=config_overrides
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=8 RealMemory=2048 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

# --- daemons (they daemonize themselves and write their pid files under DIR)
slurmctld -f "$SLURM_CONF" || die "slurmctld failed to start"
slurmd -f "$SLURM_CONF" || die "slurmd failed to start"
end=$((SECONDS + 30))   # up to 30 s for the node to register idle
while st=$(timeout 5 sinfo -h -n "$HOST" -o %T 2>/dev/null) || true; [ "$st" != idle ] && [ $SECONDS -lt $end ]; do
  sleep 0.2; done
[ "$st" = idle ] || die "node $HOST not idle after 30 s (state: '${st:-no answer}')"
log "cluster up in $(python3 -c "print(round($(date +%s.%N)-$T0,1))") s (ctld :$CTLD_PORT, slurmd :$SLURMD_PORT)"
echo "export SLURM_CONF=$SLURM_CONF"
