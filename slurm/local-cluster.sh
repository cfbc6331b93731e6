#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, from Debian's packages: munge, MariaDB + slurmdbd
# (so that sacct and Submitit's job states work), slurmctld and slurmd. Loopback only, no systemd,
# no cgroups (linuxproc process tracking). Everything -- config, state, logs, pid files -- lives under
# one folder, $DISCO_SLURM_HOME (default: .cache/slurm in the repository).
#
#   slurm/local-cluster.sh start     # idempotent; prints the SLURM_CONF line to export
#   slurm/local-cluster.sh start --nodes 3   # also 3 "nodes" disco-n1..3 (partition multi), see below
#   slurm/local-cluster.sh status
#   slurm/local-cluster.sh stop      # ends only the daemons it started, by their pid files; removes the network
#   slurm/local-cluster.sh install   # apt-get the packages (root)
#
# With --nodes N, each extra node is a slurmd in its own network namespace (disco-nI, address 10.77.0.1I on
# the bridge disco-br0, whose root-side address 10.77.0.1 is the controller's), its own UTS namespace (hostname
# disco-nI) and its own mount namespace, where a hosts file naming every node is bind-mounted over /etc/hosts
# (the machine's own /etc/hosts is not touched). The filesystem is shared, as a cluster's is. The machine itself
# stays a node too (partition debug, the default); the namespace nodes form partition multi, 1 CPU each.
# Test timers in this mode: SlurmctldTimeout=10 SlurmdTimeout=10 MessageTimeout=5 KillWait=2, and
# AuthInfo cred_expire=10 (a requeued job becomes eligible after it: 10 s instead of 120).
#
# Then: export SLURM_CONF=$DISCO_SLURM_HOME/etc/slurm.conf; sbatch slurm/ckd.sbatch
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOME_DIR=${DISCO_SLURM_HOME:-$REPO/.cache/slurm}
ETC=$HOME_DIR/etc RUN=$HOME_DIR/run LOG=$HOME_DIR/log STATE=$HOME_DIR/state DB=$HOME_DIR/mysql
MUNGE_SOCKET=$RUN/munge.socket
DB_PORT=${DISCO_SLURM_DB_PORT:-3307}
CTLD_PORT=${DISCO_SLURMCTLD_PORT:-6817} SLURMD_PORT=${DISCO_SLURMD_PORT:-6818} DBD_PORT=${DISCO_SLURMDBD_PORT:-6819}
CLUSTER=disco
NET=10.77.0 BRIDGE=disco-br0
NODES=""  # extra namespace nodes: from --nodes, else what the running cluster was started with, else 0
export SLURM_CONF=$ETC/slurm.conf
PACKAGES="munge slurmctld slurmd slurm-client slurmdbd mariadb-server"

die() { echo "local-cluster: $*" >&2; exit 1; }

node_names() { local i; for i in $(seq 1 "$NODES"); do echo "disco-n$i"; done; }
slurmds() { echo "slurmd-$(hostname)"; for n in $(node_names); do echo "slurmd-$n"; done; }

alive() {  # alive NAME: the daemon whose pid file we wrote is running
  local pidfile=$RUN/$1.pid
  [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND... (an external command: it runs under `timeout`)
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  while [ $SECONDS -lt $deadline ]; do timeout 5 "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  die "$what did not come up within ${seconds}s; see $LOG"
}

install_packages() {
  missing=""
  for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  [ -z "$missing" ] && return 0
  [ "$(id -u)" = 0 ] || die "missing packages:$missing; install them as root: apt-get install$missing"
  # policy-rc.d keeps the packages' own init scripts from starting system-wide daemons
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
}

write_config() {
  local host cpus memory ctld_addr=127.0.0.1 timeout=30 message_timeout=10 kill_wait=10 cred_expire=""
  if [ "$NODES" -gt 0 ]; then  # test timers; cred_expire is also how long a requeued job waits (default 120 s)
    ctld_addr=$NET.1 timeout=10 message_timeout=5 kill_wait=2 cred_expire=,cred_expire=10
  fi
  host=$(hostname)
  cpus=$(nproc)
  memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$DB"
  chmod 700 "$RUN"
  local conf=$ETC/slurm.conf.new  # renamed into place at the end: sbatch, squeue... read it at every call
  cat > "$conf" <<EOF
# written by slurm/local-cluster.sh for this host
ClusterName=$CLUSTER
SlurmctldHost=$host($ctld_addr)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET$cred_expire
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# for slurmdbd connections this names the munge socket
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=$timeout
SlurmdTimeout=$timeout
MessageTimeout=$message_timeout
InactiveLimit=0
MinJobAge=300
KillWait=$kill_wait
# the daemons' log level (DISCO_SLURM_DEBUG=debug shows every RPC a node gets, e.g. a signal for a job's step)
SlurmctldDebug=${DISCO_SLURM_DEBUG:-info}
SlurmdDebug=${DISCO_SLURM_DEBUG:-info}
# jobs may be requeued (Submitit's preemption/timeout path); a requeued job starts again soon
JobRequeue=1
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  local i
  for i in $(seq 1 "$NODES"); do
    echo "NodeName=disco-n$i NodeAddr=$NET.1$i CPUs=1 RealMemory=$((memory / 2)) State=UNKNOWN" >> "$conf"
  done
  if [ "$NODES" -gt 0 ]; then
    echo "PartitionName=multi Nodes=disco-n[1-$NODES] Default=NO MaxTime=INFINITE State=UP OverSubscribe=NO" \
      >> "$conf"
  fi
  mv "$conf" "$ETC/slurm.conf"
  cat > "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=disco-local
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ETC/slurmdbd.conf"
}

start_munge() {
  alive munged && return 0
  [ -s "$ETC/munge.key" ] || { dd if=/dev/urandom of="$ETC/munge.key" bs=1024 count=1 status=none; chmod 400 "$ETC/munge.key"; }
  munged --force --key-file="$ETC/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$RUN/munged.pid" \
    --log-file="$LOG/munged.log" --seed-file="$STATE/munge.seed"
  wait_for 10 munged munge --socket="$MUNGE_SOCKET" -n
}

start_mariadb() {
  if ! alive mariadbd; then
    if [ ! -d "$DB/mysql" ]; then
      mariadb-install-db --user=root --datadir="$DB" --auth-root-authentication-method=normal \
        >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $LOG/mariadb-install.log"
    fi
    nohup mariadbd --user=root --datadir="$DB" --socket="$RUN/mysql.sock" --port="$DB_PORT" \
      --bind-address=127.0.0.1 --pid-file="$RUN/mariadbd.pid" --log-error="$LOG/mariadb.log" \
      --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 >/dev/null 2>&1 &
    wait_for 60 MariaDB mariadb --protocol=socket --socket="$RUN/mysql.sock" -uroot -e "SELECT 1"
  fi
  # every start (idempotent; a first start cut short after MariaDB came up still gets its user), retried
  wait_for 60 "MariaDB's slurm user" mariadb --protocol=socket --socket="$RUN/mysql.sock" -uroot -e \
    "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
     CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'disco-local';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurm() {
  if ! alive slurmdbd; then
    slurmdbd
    wait_for 60 slurmdbd sacctmgr -n list cluster
  fi
  if ! alive slurmctld; then
    # the cluster's accounting record, before its controller first starts (retried: a busy slurmdbd can answer a
    # query with nothing); a restart of a node with the controller up never waits on slurmdbd
    wait_for 60 "the cluster's accounting record" sh -c \
      "sacctmgr -n list cluster format=cluster | grep -qw $CLUSTER || sacctmgr -i add cluster $CLUSTER"
    slurmctld
    wait_for 60 slurmctld scontrol ping
  fi
  alive "slurmd-$(hostname)" || slurmd
  local name
  for name in $(node_names); do
    # nsenter, not `ip netns exec` (which remounts /sys: slurmd then finds no cgroup tree and refuses to start)
    alive "slurmd-$name" || nsenter --net="/run/netns/$name" unshare --uts --mount sh -c \
      "mount --bind '$ETC/hosts' /etc/hosts && hostname $name && exec slurmd -N $name"
  done
  local want=$((NODES + 1))
  # A namespace node back from a loss can be DOWN (not responding) or DRAINED with "Kill task failed": SLURM could not
  # end the lost run's step there within UnkillableStepTimeout, its slurmstepd still retrying the step's completion
  # message (seen after a node's link came back up). Its slurmd is up again: resume it, as an administrator would.
  local resume="sinfo -h -N -p multi -t down,drain -o %N | sort -u | xargs -r -I{} scontrol update nodename={} state=resume"
  wait_for 90 "the nodes" sh -c "$resume; [ \$(sinfo -h -N -o %T | grep -cE '^(idle|mixed|allocated)$') -ge $want ]"
}

start_network() {  # the bridge, one namespace and veth pair per node, and the hosts file every node sees
  [ "$NODES" -gt 0 ] || return 0
  command -v ip >/dev/null && command -v nsenter >/dev/null || die "--nodes needs ip (iproute2) and nsenter"
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  case "$(ip addr show dev "$BRIDGE")" in *"inet $NET.1/"*) ;; *) ip addr add "$NET.1/24" dev "$BRIDGE" ;; esac
  ip link set "$BRIDGE" up
  local i name hosts
  hosts=$(printf '127.0.0.1 localhost\n%s.1 %s disco-ctl' "$NET" "$(hostname)")
  for i in $(seq 1 "$NODES"); do
    name=disco-n$i
    [ -e "/run/netns/$name" ] || ip netns add "$name"
    if ! ip link show "disco-v$i" >/dev/null 2>&1; then
      ip link add "disco-v$i" type veth peer name eth0 netns "$name"
      ip link set "disco-v$i" master "$BRIDGE" up
      ip -n "$name" addr add "$NET.1$i/24" dev eth0
      ip -n "$name" link set eth0 up
      ip -n "$name" link set lo up
    fi
    hosts="$hosts"$'\n'"$NET.1$i $name"
  done
  # written only when it changes: every node's /etc/hosts is this very file (bind-mounted), read while jobs run
  [ "$(cat "$ETC/hosts" 2>/dev/null)" = "$hosts" ] || printf '%s\n' "$hosts" > "$ETC/hosts"
  echo "$NODES" > "$RUN/nodes"
}

stop_network() {
  local i
  for i in $(seq 1 "$NODES"); do
    ip link del "disco-v$i" 2>/dev/null || true
    [ -e "/run/netns/disco-n$i" ] && ip netns del "disco-n$i"
  done
  ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
  rm -f "$RUN/nodes"
}

status() {
  for d in munged mariadbd slurmdbd slurmctld $(slurmds); do
    if alive "$d"; then echo "$d: running (pid $(cat "$RUN/$d.pid"))"; else echo "$d: stopped"; fi
  done
  if alive slurmctld; then sinfo; fi
}

stop() {
  for d in $(slurmds) slurmctld slurmdbd mariadbd munged; do
    if alive "$d"; then
      pid=$(cat "$RUN/$d.pid")
      kill "$pid"
      for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      echo "stopped $d (pid $pid)"
    fi
    rm -f "$RUN/$d.pid"
  done
  stop_network
}

command=${1:-}
shift || true
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=${2:-}; shift 2 || die "--nodes needs a number" ;;
    *) die "unknown argument $1 (usage: $0 start [--nodes N]|stop|status|install)" ;;
  esac
done
[ -n "$NODES" ] || NODES=$(cat "$RUN/nodes" 2>/dev/null || echo 0)
case "$NODES" in ''|*[!0-9]*) die "--nodes takes a number of nodes, got '$NODES'" ;; esac

case "$command" in
  install) install_packages ;;
  start)
    install_packages
    if alive slurmctld && [ "$(cat "$RUN/nodes" 2>/dev/null || echo 0)" != "$NODES" ]; then
      die "the cluster runs with $(cat "$RUN/nodes" 2>/dev/null || echo 0) extra nodes; stop it first to start it with $NODES"
    fi
    write_config
    start_network
    start_munge
    start_mariadb
    start_slurm
    # plain `sbatch` finds this cluster without SLURM_CONF when no other cluster is configured here
    if [ -w /etc/slurm ] && { [ ! -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; }; then
      ln -sfn "$SLURM_CONF" /etc/slurm/slurm.conf
    fi
    echo "local SLURM cluster '$CLUSTER' is up on $(hostname) ($(nproc) CPUs)$([ "$NODES" -gt 0 ] && echo " and $NODES namespace nodes, partition multi"); state and logs in $HOME_DIR"
    echo "export SLURM_CONF=$SLURM_CONF"
    ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start [--nodes N]|stop|status|install" >&2; exit 2 ;;
esac
