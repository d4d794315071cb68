#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for tests and for trying the Slurm path on a laptop.
# Needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge) and root.
#
#   eval "$(bash jobs/local_slurm.sh start [DIR])"   # starts munged, slurmctld, slurmd; prints `export SLURM_CONF=...`
#   bash jobs/local_slurm.sh stop [DIR]
#
# State, spool, logs and the config live under DIR (default /tmp/fapool-slurm). One partition, `a100`,
# named like the A100 preset; the node advertises 8 CPUs whatever the machine has (config_overrides),
# so that multi-task jobs of the scaled strategies fit on a 2-core machine.
set -euo pipefail
cmd=${1:-start}
DIR=${2:-/tmp/fapool-slurm}
CONF="$DIR/slurm.conf"
NODE=$(hostname -s)

stop() {
  for d in slurmd slurmctld; do
    [ -f "$DIR/$d.pid" ] && kill "$(cat "$DIR/$d.pid")" 2>/dev/null || true
  done
  [ -f "$DIR/munged.pid" ] && kill "$(cat "$DIR/munged.pid")" 2>/dev/null || true
  sleep 1
}

case "$cmd" in
stop)
  stop
  exit 0
  ;;
start)
  stop
  mkdir -p "$DIR"/{state,spool,log,munge}
  chmod 700 "$DIR/munge"
  [ -f "$DIR/munge/munge.key" ] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge/munge.key"
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
  cat > "$CONF" <<EOF
ClusterName=fapool-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CryptoType=crypto/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$NODE CPUs=8 RealMemory=4000 State=UNKNOWN
PartitionName=a100 Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  export SLURM_CONF="$CONF"
  slurmctld -f "$CONF"
  slurmd -f "$CONF"
  for _ in $(seq 1 60); do  # wait until the node takes jobs
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "export SLURM_CONF=$CONF"
      exit 0
    fi
    sleep 0.5
  done
  echo "slurm did not come up; logs in $DIR/log" >&2
  tail -5 "$DIR/log/"*.log >&2 || true
  exit 1
  ;;
*)
  echo "usage: $0 start|stop [DIR]" >&2
  exit 2
  ;;
esac
