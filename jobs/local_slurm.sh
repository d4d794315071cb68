#!/usr/bin/env bash
# A Slurm cluster on this machine, for tests and for trying the Slurm path: one node (this host), or NODES emulated
# nodes, each slurmd in its own network, UTS and mount namespaces, so that a job's tasks really run on different
# hosts (their own host names and addresses) and talk over a bridge. Needs Debian's slurm-wlm and munge (and
# iproute2 for NODES > 1), and root.
#
#   eval "$(bash jobs/local_slurm.sh start [DIR] [NODES])"   # prints `export SLURM_CONF=...`
#   bash jobs/local_slurm.sh stop [DIR]                      # stops every daemon and task, removes what it made
#
# State, spool, logs and the config live under DIR (default /tmp/fapool-slurm). One partition, `a100`, named like
# the A100 preset; each node advertises 8 CPUs whatever the machine has (config_overrides), so that multi-task
# jobs of the scaled strategies fit on a 2-core machine. The controller's and slurmd's ports are picked free at
# start, so another Slurm on the same machine does not collide with this one, and its job ids start at the
# controller's port times 1000 (below Slurm's MaxJobId), so that two clusters number their jobs apart: submitit seeds
# a job's rendezvous port with its id, and two one-node clusters' jobs of the same id would meet on the same port
# of this host (pytest-xdist workers each start their own cluster). Emulated nodes are node1..nodeN on a
# private /24 of 10.77.x.0 that no interface here uses yet; traffic stays on the addresses this script creates.
set -Eeuo pipefail
cmd=${1:-start}
DIR=${2:-/tmp/fapool-slurm}
NODES=${3:-1}
CONF="$DIR/slurm.conf"
STATE="$DIR/cluster.env"  # what `stop` must undo: namespaces, links, bridge

stop() {
  local BRIDGE="" NETNS=""
  # shellcheck disable=SC1090
  [ -f "$STATE" ] && . "$STATE"
  for f in "$DIR"/slurmd*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  # and by command line: a daemon may not have written its pid file yet (slurmd before it reached the controller)
  pkill -f "^slurm(ctld|d) -f $CONF( |\$)" 2>/dev/null || true
  pkill -f "^munged .*--socket=$DIR/munge/munge.socket" 2>/dev/null || true
  for ns in $NETNS; do  # whatever still runs on an emulated node (slurmstepd, a job's tasks) ends with it
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    ip link del "${ns/n/v}" 2>/dev/null || true  # the node's veth pair, even while its namespace lingers
    ip netns del "$ns" 2>/dev/null || true
  done
  [ -n "$BRIDGE" ] && ip link del "$BRIDGE" 2>/dev/null || true
  rm -f "$STATE"
  sleep 1
  # a slurmd still trying to reach a controller that never came up ignores SIGTERM
  pkill -9 -f "^slurm(ctld|d) -f $CONF( |\$)" 2>/dev/null || true
}

fail() {  # the real cause, from the daemons' own logs, then nothing left running
  echo "local_slurm: $1; logs in $DIR/log:" >&2
  for f in "$DIR"/log/*.log; do
    [ -s "$f" ] && { echo "== $f" >&2; grep -iE "error|fatal" "$f" | tail -n 5 >&2 || tail -n 5 "$f" >&2; }
  done
  stop
  exit 1
}

free_ports() {  # two distinct TCP ports free on this machine now (on every interface)
  PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" python3 -c \
    'from harness.launch import free_ports; print(*free_ports(2, ""))'
}

start_emulated_nodes() {  # sets SUBNET, BRIDGE, NETNS; one namespace per node with a veth to the bridge
  local x
  for x in $(seq 101 250); do
    ip -br addr | grep -q " 10\.77\.$x\." && continue
    ip -br link | grep -q "^fpb${x}v" && continue  # a stopped cluster's links not yet gone
    ip netns list | grep -q "^fpb${x}n" && continue
    ip link add "fpb$x" type bridge 2>/dev/null || continue  # taken by a cluster started meanwhile
    SUBNET=10.77.$x BRIDGE=fpb$x
    break
  done
  [ -n "${BRIDGE:-}" ] || fail "no free 10.77.x.0/24 subnet for the emulated nodes"
  NETNS=""
  for i in $(seq 1 "$NODES"); do NETNS="$NETNS ${BRIDGE}n$i"; done
  printf 'BRIDGE=%s\nNETNS="%s"\n' "$BRIDGE" "$NETNS" > "$STATE"
  ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  { echo "127.0.0.1 localhost"; echo "$SUBNET.1 $(hostname -s)"
    for i in $(seq 1 "$NODES"); do echo "$SUBNET.$((10 + i)) node$i"; done; } > "$DIR/hosts"
  echo "hosts: files" > "$DIR/nsswitch.conf"  # no DNS: a node cannot reach one, and reverse lookups would wait on it
  for i in $(seq 1 "$NODES"); do
    local ns=${BRIDGE}n$i
    ip netns add "$ns"
    ip link add "${BRIDGE}v$i" type veth peer name eth0 netns "$ns"
    ip link set "${BRIDGE}v$i" master "$BRIDGE" up
    ip -n "$ns" addr add "$SUBNET.$((10 + i))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
}

slurm_conf() {  # $1 controller (name or name(addr)), $2 controller port, $3 slurmd port, then the node lines
  local ctl=$1 ctl_port=$2 d_port=$3
  shift 3
  cat <<EOF
ClusterName=fapool-local
SlurmctldHost=$ctl
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CryptoType=crypto/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
SlurmctldPort=$ctl_port
SlurmdPort=$d_port
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
FirstJobId=$((ctl_port * 1000))
EOF
  printf '%s\n' "$@"
}

case "$cmd" in
stop)
  stop
  exit 0
  ;;
start)
  [ "$NODES" -ge 1 ] 2>/dev/null || { echo "local_slurm: NODES=$NODES: give a whole number >= 1" >&2; exit 2; }
  stop
  trap 'fail "a step of the start failed (line $LINENO)"' ERR
  rm -rf "$DIR/log"
  mkdir -p "$DIR"/{state,spool,log,munge}
  chmod 700 "$DIR/munge"
  [ -f "$DIR/munge/munge.key" ] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge/munge.key"
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed" \
    || fail "munged did not start"
  read -r CTL_PORT D_PORT < <(free_ports)
  HOST=$(hostname -s)
  if [ "$NODES" = 1 ]; then
    mkdir -p "$DIR/spool/$HOST"
    slurm_conf "$HOST" "$CTL_PORT" "$D_PORT" \
      "NodeName=$HOST CPUs=8 RealMemory=4000 State=UNKNOWN" \
      "PartitionName=a100 Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" > "$CONF"
  else
    start_emulated_nodes
    nodes=()
    for i in $(seq 1 "$NODES"); do
      mkdir -p "$DIR/spool/node$i"
      nodes+=("NodeName=node$i NodeAddr=$SUBNET.$((10 + i)) NodeHostname=node$i CPUs=8 RealMemory=4000 State=UNKNOWN")
    done
    slurm_conf "$HOST($SUBNET.1)" "$CTL_PORT" "$D_PORT" "${nodes[@]}" \
      "PartitionName=a100 Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" > "$CONF"
  fi
  export SLURM_CONF="$CONF"
  slurmctld -f "$CONF" || fail "slurmctld did not start"
  if [ "$NODES" = 1 ]; then
    slurmd -f "$CONF" || fail "slurmd did not start"
  else
    for i in $(seq 1 "$NODES"); do
      # nsenter + unshare rather than `ip netns exec`, which remounts /sys and leaves slurmd without its cgroups
      nsenter --net="/run/netns/${BRIDGE}n$i" unshare --uts --mount --propagation private sh -c \
        "hostname node$i && mount --bind '$DIR/hosts' /etc/hosts && mount --bind '$DIR/nsswitch.conf' /etc/nsswitch.conf \
         && exec slurmd -f '$CONF' -N node$i" || fail "slurmd of node$i did not start"
    done
  fi
  deadline=$((SECONDS + 60))
  while [ $SECONDS -lt $deadline ]; do  # until every node takes jobs, or a daemon is gone
    for f in "$DIR"/slurmctld.pid "$DIR"/slurmd*.pid; do
      [ -f "$f" ] && ! kill -0 "$(cat "$f")" 2>/dev/null && fail "$(basename "$f" .pid) exited"
    done
    up=$(timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$' || true)
    if [ "$up" -ge "$NODES" ]; then
      echo "export SLURM_CONF=$CONF"
      exit 0
    fi
    sleep 0.5
  done
  fail "$NODES node(s) did not come up within 60 s"
  ;;
*)
  echo "usage: $0 start|stop [DIR] [NODES]" >&2
  exit 2
  ;;
esac
