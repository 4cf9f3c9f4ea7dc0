#!/usr/bin/env bash
# A real SLURM (with accounting) on this machine, for tests and CI — no systemd needed.
#
#   launch/slurm/setup_slurm.sh            install (if missing), configure, start; wait until usable
#   launch/slurm/setup_slurm.sh --stop     stop the daemons this script started (by their pid files)
#   launch/slurm/setup_slurm.sh --status   exit 0 when `sinfo` shows the node and `sacctmgr` answers
#   launch/slurm/setup_slurm.sh --nodes 2  also run 2 extra slurmd hosts node1..node2, each in its own network
#                                          (and UTS) namespace on a bridge 10.200.0.0/24, partition "multi":
#                                          real multi-node jobs on one machine. Remembered; --nodes 0 removes them.
#
# Idempotent: packages are installed only when missing, config files are rewritten only when they differ,
# a daemon whose pid file names a live process is left alone (a changed slurm.conf restarts slurmctld and the
# slurmds). Needs root (Debian/Ubuntu, apt; network namespaces for --nodes).
# Facts behind the settings (docs: /work/shared/docs/stack-notes.md, docs/cluster.md):
#   - torchx 0.7.0 on slurm needs accounting (sacct) -> slurmdbd + mariadb;
#   - ProctrackType=proctrack/linuxproc + TaskPlugin=task/none (the cgroup plugins fail every step here);
#   - RealMemory must be set (torchx asks --mem); slurmd runs as node "localhost" (-N localhost);
#   - munged runs as user munge; slurmdbd.conf is owned by slurm, mode 0600.
# Environment: HSTU_SLURM_STATE (state/log/pid dir, default /var/lib/hstu-slurm), HSTU_SLURM_WAIT_S (60).
set -euo pipefail

STATE=${HSTU_SLURM_STATE:-/var/lib/hstu-slurm}
WAIT_S=${HSTU_SLURM_WAIT_S:-60}
CLUSTER=hstu
NODE=localhost
CONF_DIR=/etc/slurm
PKGS=(slurm-wlm munge slurmdbd mariadb-server)
DB_PASS=hstu-slurm-local   # the DB listens on its unix socket only (skip-networking)
RUN="$STATE/run"; LOG="$STATE/log"

say() { echo "setup_slurm: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

alive() { [[ -f "$RUN/$1.pid" ]] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

BR=hstubr0; NET=10.200.0   # multi-node: bridge on the host ($NET.1), node i = namespace hstu-node<i> ($NET.<i+1>)
EXTRA=$(cat "$STATE/extra_nodes" 2>/dev/null || echo 0)

slurm_ok() {
  sinfo -h -n "$NODE" -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc|comp)' && \
    sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"
}

multi_ok() {  # all extra nodes usable
  (( EXTRA == 0 )) && return 0
  [[ $(sinfo -h -p multi -o '%t %D' 2>/dev/null | awk '$1 ~ /^(idle|mix|alloc|comp)/ {n += $2} END {print n+0}') -eq $EXTRA ]]
}

stop_one() {
  local name=$1 pid i
  if alive "$name"; then
    pid=$(cat "$RUN/$name.pid")
    say "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { say "$name did not stop in 10 s: SIGKILL"; kill -9 "$pid" 2>/dev/null || true; }
  fi
  rm -f "$RUN/$name.pid"
}

stop_slurm() {  # slurmctld + every slurmd (config changes need a restart)
  local f
  for f in "$RUN"/slurmd-node*.pid; do [[ -e $f ]] && stop_one "$(basename "$f" .pid)"; done
  stop_one slurmd; stop_one slurmctld
}

net_down() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '/^hstu-node/ {print $1}'); do ip netns del "$ns"; done
  ip link show "$BR" >/dev/null 2>&1 && ip link del "$BR"
  sed -i '/# hstu-slurm$/d' /etc/hosts
}

net_up() {  # bridge + one namespace per extra node + /etc/hosts names (idempotent); 1 on any failure
  local i ns
  ip link show "$BR" >/dev/null 2>&1 || ip link add "$BR" type bridge || return 1
  ip addr replace "$NET.1/24" dev "$BR" && ip link set "$BR" up || return 1
  sed -i '/# hstu-slurm$/d' /etc/hosts
  for i in $(seq 1 "$EXTRA"); do
    ns=hstu-node$i
    ip netns list | grep -qw "$ns" || ip netns add "$ns" || return 1
    ip link show "hv$i" >/dev/null 2>&1 || ip link add "hv$i" type veth peer name eth0 netns "$ns" || return 1
    ip link set "hv$i" master "$BR" up || return 1
    ip netns exec "$ns" ip link set lo up || return 1
    ip netns exec "$ns" ip addr replace "$NET.$((i + 1))/24" dev eth0 || return 1
    ip netns exec "$ns" ip link set eth0 up || return 1
    echo "$NET.$((i + 1)) node$i # hstu-slurm" >>/etc/hosts
  done
}

ACTION=start
while (($#)); do
  case "$1" in
    --stop) ACTION=stop ;;
    --status) ACTION=status ;;
    --nodes) shift; [[ ${1:-} =~ ^[0-9]+$ ]] || { echo "--nodes needs a number" >&2; exit 2; }; EXTRA=$1; NODES_SET=1 ;;
    *) echo "usage: $0 [--stop|--status|--nodes N]" >&2; exit 2 ;;
  esac
  shift
done
case "$ACTION" in
  stop) stop_slurm; for n in slurmdbd mariadb munged; do stop_one "$n"; done; net_down; exit 0 ;;
  status) slurm_ok && { say "up$(multi_ok || echo " (partition multi: not all $EXTRA nodes usable)")"; exit 0; } ||
    { say "not usable"; exit 1; } ;;
esac

[[ $(id -u) -eq 0 ]] || die "must run as root (installs packages, starts daemons)"

# ---------------------------------------------------------------------------------------------- packages
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >"/tmp/hstu-slurm-apt.log" 2>&1 || {
    apt-get update -q >>"/tmp/hstu-slurm-apt.log" 2>&1 || true
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>"/tmp/hstu-slurm-apt.log" 2>&1 ||
      die "apt-get install ${missing[*]} failed (see /tmp/hstu-slurm-apt.log)"
  }
fi

# ------------------------------------------------------------------------------------------------ config
mkdir -p "$RUN" "$LOG" "$STATE/ctld" /run/munge /var/log/munge /var/lib/munge /run/mysqld "$CONF_DIR"
chown slurm:slurm "$RUN" "$LOG" "$STATE/ctld"
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chown mysql:mysql /run/mysqld
chmod 0755 "$STATE" "$RUN" "$LOG"
[[ -n ${NODES_SET:-} ]] && echo "$EXTRA" >"$STATE/extra_nodes"
if (( EXTRA > 0 )); then
  net_up || { say "WARNING: network namespaces unavailable here: continuing with the single node"; EXTRA=0
    echo 0 >"$STATE/extra_nodes"; net_down || true; }
else
  net_down 2>/dev/null || true
fi

write_if_changed() {  # path owner mode  (content on stdin)
  local tmp; tmp=$(mktemp)
  cat >"$tmp"
  if [[ -f "$1" ]] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; say "wrote $1"; CHANGED=1; fi
  chown "$2" "$1"; chmod "$3" "$1"
}

cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
real_mb=$(( mem_mb > 4096 ? mem_mb - 2048 : mem_mb * 3 / 4 ))
ctl_host=$(hostname -s)
ctl_addr=""; (( EXTRA > 0 )) && ctl_addr="($NET.1)"   # namespaced nodes reach slurmctld on the bridge
extra_nodes=""
for i in $(seq 1 "$EXTRA"); do
  extra_nodes+="NodeName=node$i NodeAddr=$NET.$((i + 1)) CPUs=$cpus RealMemory=4096 State=UNKNOWN"$'\n'
done
(( EXTRA > 0 )) && extra_nodes+="PartitionName=multi Nodes=node[1-$EXTRA] Default=NO MaxTime=INFINITE State=UP"$'\n'
CHANGED=0

write_if_changed "$CONF_DIR/slurm.conf" root:root 0644 <<CONF
# Written by launch/slurm/setup_slurm.sh: test cluster with accounting (slurmdbd).
ClusterName=$CLUSTER
SlurmctldHost=$ctl_host$ctl_addr
SlurmUser=slurm
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd-%n.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd-%n
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1   # het jobs (torchx multi-node) are started by the backfill scheduler only
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmdTimeout=60
# extra nodes first: slurm's node lookup treats ANY name as "localhost" while localhost is the only node
$extra_nodes
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

write_if_changed "$CONF_DIR/slurmdbd.conf" slurm:slurm 0600 <<CONF
# Written by launch/slurm/setup_slurm.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=$RUN/slurmdbd.daemon.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONF

start() {  # name cmd...   (foreground daemon, backgrounded here; its pid goes to $RUN/name.pid)
  local name=$1; shift
  if alive "$name"; then return 0; fi
  say "starting $name"
  setsid "$@" >>"$LOG/$name.out" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
}

wait_for() {  # description seconds cmd...
  local what=$1 secs=$2 i; shift 2
  for i in $(seq 1 $((secs * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  die "$what not ready after ${secs}s (logs: $LOG)"
}

# ----------------------------------------------------------------------------------------------- daemons
[[ -s /etc/munge/munge.key ]] || { mungekey -c -k /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; }
start munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F
wait_for munged 20 bash -c 'munge -n | unmunge'

[[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$LOG/mariadb.out" 2>&1
start mariadb /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
  --skip-networking --pid-file=/run/mysqld/hstu-mariadb.pid
wait_for mariadb 30 mariadb -e 'SELECT 1'
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

start slurmdbd /usr/sbin/slurmdbd -D
wait_for slurmdbd 30 sacctmgr -n list cluster
sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null

if (( CHANGED )); then stop_slurm; fi
start slurmctld /usr/sbin/slurmctld -D
wait_for slurmctld 30 scontrol ping
mkdir -p "$STATE/slurmd-$NODE"
start slurmd /usr/sbin/slurmd -D -N "$NODE"
for i in $(seq 1 "$EXTRA"); do  # own network + hostname (UTS) namespace: `hostname` = node<i> inside jobs
  # nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup fs slurmd 22.05 probes at start
  mkdir -p "$STATE/slurmd-node$i"
  start "slurmd-node$i" nsenter --net="/run/netns/hstu-node$i" unshare --uts sh -c \
    "hostname node$i && exec /usr/sbin/slurmd -D -N node$i"
done

for i in $(seq 1 $((WAIT_S * 2))); do
  slurm_ok && break
  state=$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null || true)
  if [[ $state == down* || $state == drain* ]]; then scontrol update nodename="$NODE" state=resume 2>/dev/null || true; fi
  sleep 0.5
done
for i in $(seq 1 $((WAIT_S * 2))); do multi_ok && break; sleep 0.5; done
multi_ok || say "WARNING: partition multi does not show $EXTRA usable nodes: $(sinfo -h -p multi 2>&1 | head -2)"
slurm_ok || die "node $NODE not idle or accounting unusable after ${WAIT_S}s: sinfo='$(sinfo -h 2>&1 | head -3)' (logs: $LOG)"
say "up: $(sinfo -h -o '%P %a %D %t %c cpus %m MB' | tr '\n' ';'); cluster '$CLUSTER' in accounting"
