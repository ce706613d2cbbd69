#!/usr/bin/env bash
# Install (if missing) and start a real Slurm test cluster of two nodes on this
# machine.  Idempotent: when the cluster is already up with the wanted
# configuration it only verifies and exits 0.
#
#   tests/cluster/start.sh                               # no accounting (sacct disabled)
#   PILOTFISH_TEST_ACCOUNTING=1 tests/cluster/start.sh   # + mariadb + slurmdbd
#   PILOTFISH_TEST_NODES=1 tests/cluster/start.sh        # the first node only
#
# Re-running with other settings switches modes (daemons are restarted when the
# generated configuration changes; job state survives).
# First node, $(hostname -s): 16 "CPUs" (oversubscribed via
# SlurmdParameters=config_overrides), four fake a100 GPUs (/dev/fakegpu0-3),
# partitions "cpu" (default) and "gpu".
# Second node, node2: a slurmd in the network namespace pf-node2 (10.203.0.2,
# reached from here over a veth pair) with its own host name; 4 CPUs, no GPUs,
# only in partition "remote".
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=_lib.sh
source "$HERE/_lib.sh"

[[ $(id -u) -eq 0 ]] || die "must run as root"
take_lock  # fd 9; closed (9>&-) for every daemon started below

CLUSTER=pilotfish-test
HOST=$(hostname -s)
[[ -n $HOST ]] || die "hostname -s returned nothing"
NODE_CPUS=${PILOTFISH_TEST_NODE_CPUS:-16}
NGPUS=4
NODE2_CPUS=4
NODE2_MEM=4000
case "${PILOTFISH_TEST_NODES:-2}" in
    1 | 2) NODES=${PILOTFISH_TEST_NODES:-2} ;;
    *) die "PILOTFISH_TEST_NODES must be 1 or 2" ;;
esac
[[ $HOST != "$NODE2" ]] || die "this machine is called $NODE2, the name of the second test node"
ACCOUNTING=0
case "${PILOTFISH_TEST_ACCOUNTING:-0}" in
    1 | yes | true) ACCOUNTING=1 ;;
    0 | no | false | "") ACCOUNTING=0 ;;
    *) die "PILOTFISH_TEST_ACCOUNTING must be 0 or 1" ;;
esac
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=pilotfish-test
WAIT_SECS=${PILOTFISH_TEST_START_TIMEOUT:-60}
# Clients (squeue, sbatch, ...) give up on an unreachable slurmctld after about
# MessageTimeout-1 seconds (measured: 10 -> 9 s, 2 -> 1 s).
MSG_TIMEOUT=${PILOTFISH_TEST_MESSAGE_TIMEOUT:-10}
[[ $MSG_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "PILOTFISH_TEST_MESSAGE_TIMEOUT must be a positive integer"
# A node whose slurmd has not answered for SlurmdTimeout seconds is set DOWN
# (slurmctld pings every SlurmdTimeout/3 s) and its jobs end NODE_FAIL.
SLURMD_TIMEOUT=${PILOTFISH_TEST_SLURMD_TIMEOUT:-10}
[[ $SLURMD_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "PILOTFISH_TEST_SLURMD_TIMEOUT must be a positive integer"
APT_LOG=/var/log/slurm/pilotfish-apt.log

mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
if ((mem_mb > 4096)); then REAL_MEM=$((mem_mb - 2048)); else REAL_MEM=$((mem_mb * 3 / 4)); fi
# Stay a round, stable number so tiny MemTotal jitter does not change the config.
REAL_MEM=$((REAL_MEM / 1000 * 1000))
((REAL_MEM >= 1000)) || REAL_MEM=1000
((NODE_CPUS >= $(nproc))) || NODE_CPUS=$(nproc)

mkdir -p "$SLURM_LOG"

# ---------------------------------------------------------------- packages --
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

ensure_packages() {
    local missing=() p
    for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]} (apt, log: $APT_LOG)"
    export DEBIAN_FRONTEND=noninteractive
    # Only refresh the package lists when apt does not know the packages.
    if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
        log "apt-get update"
        apt-get update -q >>"$APT_LOG" 2>&1 || { tail -n 20 "$APT_LOG" >&2; die "apt-get update failed"; }
    fi
    if ! apt-get install -y -q -o Dpkg::Options::=--force-confold "${missing[@]}" >>"$APT_LOG" 2>&1; then
        log "apt-get install failed, retrying after apt-get update"
        apt-get update -q >>"$APT_LOG" 2>&1 || true
        apt-get install -y -q -o Dpkg::Options::=--force-confold "${missing[@]}" >>"$APT_LOG" 2>&1 ||
            { tail -n 20 "$APT_LOG" >&2; die "apt-get install ${missing[*]} failed"; }
    fi
}

ensure_packages slurm-wlm munge
for b in slurmctld slurmd sinfo squeue scontrol munged; do
    command -v "$b" >/dev/null || die "$b not found after installing slurm-wlm/munge"
done
if ((NODES == 2)); then
    command -v ip >/dev/null || ensure_packages iproute2
    for b in ip unshare nsenter; do command -v "$b" >/dev/null || die "$b not found (iproute2, util-linux)"; done
fi
if ((ACCOUNTING)); then
    ensure_packages mariadb-server slurmdbd
    command -v slurmdbd >/dev/null || die "slurmdbd not found after installing it"
fi

# ------------------------------------------------------------ config files --
# write_file PATH MODE OWNER CONTENT -- only rewrites when the content differs.
write_file() {
    local path=$1 mode=$2 owner=$3 content=$4
    if [[ ! -f $path ]] || [[ $(cat "$path") != "$content" ]]; then
        printf '%s\n' "$content" >"$path.tmp"
        chmod "$mode" "$path.tmp"
        chown "$owner" "$path.tmp"
        mv -f "$path.tmp" "$path"
        log "wrote $path"
    else
        chmod "$mode" "$path"
        chown "$owner" "$path"
    fi
}

mkdir -p "$SLURM_ETC" "$SLURM_RUN" "$SLURM_SPOOL/ctld" "$SLURM_SPOOL/d/$HOST"
((NODES == 1)) || mkdir -p "$SLURM_SPOOL/d/$NODE2"

if ((ACCOUNTING)); then
    ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu"
else
    ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi

SLURM_CONF="# Generated by tests/cluster/start.sh (Pilotfish test cluster) -- do not edit.
ClusterName=$CLUSTER
SlurmctldHost=$HOST
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SLURM_SPOOL/ctld
SlurmdSpoolDir=$SLURM_SPOOL/d/%n
SlurmctldPidFile=$SLURM_RUN/slurmctld.pid
SlurmdPidFile=$SLURM_RUN/slurmd-%n.pid
SlurmctldLogFile=$SLURM_LOG/slurmctld.log
SlurmdLogFile=$SLURM_LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=60
KillWait=30
InactiveLimit=0
SlurmctldTimeout=120
SlurmdTimeout=$SLURMD_TIMEOUT
MessageTimeout=$MSG_TIMEOUT
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$ACCT_LINES
MailProg=/bin/true
GresTypes=gpu
NodeName=$HOST CPUs=$NODE_CPUS RealMemory=$REAL_MEM Gres=gpu:a100:$NGPUS State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP"
if ((NODES == 2)); then
    SLURM_CONF+="
NodeName=$NODE2 CPUs=$NODE2_CPUS RealMemory=$NODE2_MEM State=UNKNOWN
PartitionName=remote Nodes=$NODE2 MaxTime=INFINITE State=UP"
fi

GRES_CONF="# Generated by tests/cluster/start.sh -- fake GPUs (character devices like /dev/null).
AutoDetect=off
NodeName=$HOST Name=gpu Type=a100 File=/dev/fakegpu[0-$((NGPUS - 1))]"

write_file "$SLURM_ETC/slurm.conf" 0644 root:root "$SLURM_CONF"
write_file "$SLURM_ETC/gres.conf" 0644 root:root "$GRES_CONF"

if ((ACCOUNTING)); then
    SLURMDBD_CONF="# Generated by tests/cluster/start.sh -- do not edit.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$SLURM_LOG/slurmdbd.log
PidFile=$SLURM_RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME"
    write_file "$SLURM_ETC/slurmdbd.conf" 0600 root:root "$SLURMDBD_CONF"
fi

# Fake GPU device nodes (same major/minor as /dev/null).
for ((i = 0; i < NGPUS; i++)); do
    dev=/dev/fakegpu$i
    if [[ ! -c $dev ]]; then
        rm -f "$dev"
        mknod -m 0666 "$dev" c 1 3
    fi
done

# What the running daemons should have been started with.
WANT_HASH=$( {
    echo "accounting=$ACCOUNTING"
    cat "$SLURM_ETC/slurm.conf" "$SLURM_ETC/gres.conf"
    ((ACCOUNTING)) && cat "$SLURM_ETC/slurmdbd.conf"
    true
} | sha256sum | cut -d' ' -f1)

NODE_NAMES=("$HOST")
((NODES == 1)) || NODE_NAMES+=("$NODE2")
node_state() { sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -n1; }
node_ready() { [[ $(node_state "$1") =~ ^(idle|mixed|allocated|completing)$ ]]; }
nodes_ready() {
    local node
    for node in "${NODE_NAMES[@]}"; do node_ready "$node" || return 1; done
}
nodes_summary() {
    local node out=()
    for node in "${NODE_NAMES[@]}"; do out+=("$node $(node_state "$node")"); done
    echo "${out[*]}"
}
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
# slurmd_running NODE: the first node's slurmd runs in this machine's network
# namespace, the second node's in its own.
slurmd_running() {
    if [[ $1 == "$NODE2" ]]; then
        daemon_running slurmd "$SLURM_RUN/slurmd-$NODE2.pid" "$NODE2_NS"
    else
        daemon_running slurmd "$SLURM_RUN/slurmd-$1.pid" .
    fi
}
NODE2_HOSTS_LINE="$NODE2_ADDR $NODE2 $HOSTS_MARK"
NODE2_NS_HOSTS="# Generated by tests/cluster/start.sh: /etc/hosts inside network namespace $NODE2_NS.
127.0.0.1 localhost
$NODE2_ADDR $NODE2
$NODE2_HOST_ADDR $HOST"
# The second node's network: namespace, both veth ends up with their addresses,
# and the names in /etc/hosts here and in the namespace.
node2_net_ok() {
    [[ -e /run/netns/$NODE2_NS ]] &&
        [[ $(ip -o -4 addr show dev "$NODE2_VETH_HOST" 2>/dev/null) == *" $NODE2_HOST_ADDR/$NODE2_PREFIX "* ]] &&
        [[ $(ip -o link show dev "$NODE2_VETH_HOST" 2>/dev/null) == *LOWER_UP* ]] &&
        [[ $(ip -n "$NODE2_NS" -o -4 addr show dev "$NODE2_VETH_NS" 2>/dev/null) == *" $NODE2_ADDR/$NODE2_PREFIX "* ]] &&
        [[ $(grep -F "$HOSTS_MARK" /etc/hosts 2>/dev/null || true) == "$NODE2_HOSTS_LINE" ]] &&
        [[ $(cat "/etc/netns/$NODE2_NS/hosts" 2>/dev/null) == "$NODE2_NS_HOSTS" ]]
}

# --------------------------------------------------------------- fast path --
if [[ -f $APPLIED_FILE && $(cat "$APPLIED_FILE") == "$WANT_HASH" ]] &&
    daemon_running munged && daemon_running slurmctld "$SLURM_RUN/slurmctld.pid" &&
    slurmd_running "$HOST" &&
    { ((NODES == 1)) || { node2_net_ok && slurmd_running "$NODE2"; }; } &&
    { ((NODES == 2)) || [[ ! -e /run/netns/$NODE2_NS ]]; } &&
    { ((ACCOUNTING == 0)) || daemon_running slurmdbd "$SLURM_RUN/slurmdbd.pid"; } &&
    { ((ACCOUNTING == 1)) || ! daemon_running slurmdbd "$SLURM_RUN/slurmdbd.pid"; } &&
    munge_ok && nodes_ready; then
    log "already up: $(nodes_summary), accounting=$ACCOUNTING"
    exit 0
fi

# Config differs from what the daemons were started with -> restart them.
if [[ ! -f $APPLIED_FILE || $(cat "$APPLIED_FILE") != "$WANT_HASH" ]]; then
    if daemon_running slurmctld "$SLURM_RUN/slurmctld.pid" || daemon_running slurmd ||
        daemon_running slurmdbd "$SLURM_RUN/slurmdbd.pid"; then
        log "configuration changed, restarting slurm daemons"
    fi
    stop_slurm_daemons
fi
if ((ACCOUNTING == 0)); then
    stop_daemon slurmdbd "$SLURM_RUN/slurmdbd.pid"
    [[ -f $MARIADB_MARKER ]] && stop_mariadb
fi

# ---------------------------------------------------------- the second node --
ensure_node2_net() {
    local current kept
    # A host end left without its namespace (or without its peer): start afresh.
    if ip link show "$NODE2_VETH_HOST" >/dev/null 2>&1 &&
        ! ip -n "$NODE2_NS" link show "$NODE2_VETH_NS" >/dev/null 2>&1; then
        ip link delete "$NODE2_VETH_HOST"
    fi
    if [[ ! -e /run/netns/$NODE2_NS ]]; then
        # A slurmd outside this machine's namespace now is in a namespace deleted under it.
        stop_daemon slurmd "" elsewhere
        log "creating network namespace $NODE2_NS for $NODE2 ($NODE2_ADDR, this machine $NODE2_HOST_ADDR)"
        ip netns add "$NODE2_NS" || die "ip netns add $NODE2_NS failed"
    fi
    if ! ip link show "$NODE2_VETH_HOST" >/dev/null 2>&1; then
        ip link add "$NODE2_VETH_HOST" type veth peer name "$NODE2_VETH_NS" netns "$NODE2_NS" ||
            die "could not create the veth pair $NODE2_VETH_HOST/$NODE2_VETH_NS"
    fi
    ip addr replace "$NODE2_HOST_ADDR/$NODE2_PREFIX" dev "$NODE2_VETH_HOST"
    ip link set "$NODE2_VETH_HOST" up
    ip -n "$NODE2_NS" addr replace "$NODE2_ADDR/$NODE2_PREFIX" dev "$NODE2_VETH_NS"
    ip -n "$NODE2_NS" link set "$NODE2_VETH_NS" up
    ip -n "$NODE2_NS" link set lo up
    # Inside the namespace this file is /etc/hosts (`ip netns exec` mounts it
    # there, and so does the command starting node2's slurmd).  Rewritten in
    # place, so a running slurmd and its jobs see the new content.
    mkdir -p "/etc/netns/$NODE2_NS"
    touch "/etc/netns/$NODE2_NS/hosts"
    chmod 0644 "/etc/netns/$NODE2_NS/hosts"
    rewrite_in_place "/etc/netns/$NODE2_NS/hosts" "$NODE2_NS_HOSTS"
    current=$(grep -F "$HOSTS_MARK" /etc/hosts 2>/dev/null || true)
    if [[ $current != "$NODE2_HOSTS_LINE" ]]; then
        kept=$(grep -vF "$HOSTS_MARK" /etc/hosts 2>/dev/null || true)
        rewrite_in_place /etc/hosts "${kept:+$kept$'\n'}$NODE2_HOSTS_LINE"
        log "added $NODE2 to /etc/hosts"
    fi
    [[ $(getent hosts "$NODE2" | awk '{print $1; exit}') == "$NODE2_ADDR" ]] ||
        die "$NODE2 does not resolve to $NODE2_ADDR here (getent hosts $NODE2): another /etc/hosts line?"
    [[ $(ip netns exec "$NODE2_NS" getent hosts "$HOST" | awk '{print $1; exit}') == "$NODE2_HOST_ADDR" ]] ||
        die "$HOST does not resolve to $NODE2_HOST_ADDR inside $NODE2_NS"
}

if ((NODES == 2)); then
    node2_net_ok || ensure_node2_net
elif [[ -e /run/netns/$NODE2_NS ]] || grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
    remove_node2
fi

# ------------------------------------------------------------------- munge --
mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    elif command -v create-munge-key >/dev/null; then
        create-munge-key -f
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
chmod 0700 /etc/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! daemon_running munged || ! munge_ok; then
    stop_daemon munged /run/munge/munged.pid
    log "starting munged"
    runuser -u munge -- munged --force 9>&- ||
        { tail -n 20 /var/log/munge/munged.log >&2 2>/dev/null || true; die "munged failed to start"; }
    for ((i = 0; i < 50; i++)); do munge_ok && break; sleep 0.1; done
    munge_ok || { tail -n 20 /var/log/munge/munged.log >&2 2>/dev/null || true; die "munge does not work (munge -n | unmunge)"; }
fi

# ---------------------------------------------------- accounting (optional) --
sql() { mysql --protocol=socket -u root -N -B -e "$1"; }

if ((ACCOUNTING)); then
    if ! mariadb_running; then
        log "starting mariadb"
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
        if [[ -x /etc/init.d/mariadb ]]; then
            /etc/init.d/mariadb start 9>&- >>"$SLURM_LOG/pilotfish-mariadb.log" 2>&1 ||
                { tail -n 20 "$SLURM_LOG/pilotfish-mariadb.log" >&2; die "mariadb failed to start"; }
        else
            (setsid mysqld_safe 9>&- >>"$SLURM_LOG/pilotfish-mariadb.log" 2>&1 &)
        fi
        touch "$MARIADB_MARKER"
    fi
    for ((i = 0; i < 300; i++)); do sql 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.1; done
    sql 'SELECT 1' >/dev/null 2>&1 || die "mariadb is not answering (see $SLURM_LOG/pilotfish-mariadb.log)"
    sql "CREATE DATABASE IF NOT EXISTS $DB_NAME;
         CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
         ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
         GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';" ||
        die "could not create the $DB_NAME database/user"

    if ! daemon_running slurmdbd "$SLURM_RUN/slurmdbd.pid"; then
        log "starting slurmdbd"
        slurmdbd 9>&- || { tail -n 20 "$SLURM_LOG/slurmdbd.log" >&2 || true; die "slurmdbd failed to start"; }
    fi
    ok=0
    for ((i = 0; i < WAIT_SECS * 2; i++)); do
        if sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; then ok=1; break; fi
        daemon_running slurmdbd "$SLURM_RUN/slurmdbd.pid" || break
        sleep 0.5
    done
    if ((!ok)); then
        echo "---- $SLURM_LOG/slurmdbd.log (tail) ----" >&2
        tail -n 30 "$SLURM_LOG/slurmdbd.log" >&2 || true
        die "slurmdbd is not answering (sacctmgr list cluster)"
    fi
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        log "registering cluster $CLUSTER in slurmdbd"
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
    fi
fi

# ------------------------------------------------------------------- slurm --
show_logs() {
    local f
    for f in slurmctld "${NODE_NAMES[@]/#/slurmd-}" $( ((ACCOUNTING)) && echo slurmdbd); do
        echo "---- $SLURM_LOG/$f.log (tail) ----" >&2
        tail -n 25 "$SLURM_LOG/$f.log" >&2 2>/dev/null || true
    done
}
fail() { show_logs; die "$*"; }

if ! daemon_running slurmctld "$SLURM_RUN/slurmctld.pid"; then
    log "starting slurmctld"
    slurmctld 9>&- || fail "slurmctld failed to start"
fi
for ((i = 0; i < WAIT_SECS * 4; i++)); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    daemon_running slurmctld "$SLURM_RUN/slurmctld.pid" || fail "slurmctld exited"
    sleep 0.25
done
scontrol ping 2>/dev/null | grep -q 'is UP' || fail "slurmctld does not answer (scontrol ping)"

if ! slurmd_running "$HOST"; then
    log "starting slurmd for $HOST"
    slurmd 9>&- || fail "slurmd for $HOST failed to start"
fi
if ((NODES == 2)) && ! slurmd_running "$NODE2"; then
    log "starting slurmd for $NODE2 (network namespace $NODE2_NS)"
    # In the namespace's network, with its own host name (slurmd finds its node
    # by it; -N says it too) and its /etc/hosts.  Not `ip netns exec`: that
    # mounts a fresh /sys without the cgroup file systems slurmd needs.
    # shellcheck disable=SC2016  # $1 and $2 are for the inner sh
    nsenter --net="/run/netns/$NODE2_NS" unshare --uts --mount --propagation slave \
        sh -c 'mount --bind "$2" /etc/hosts && hostname "$1" && exec slurmd -N "$1"' \
        sh "$NODE2" "/etc/netns/$NODE2_NS/hosts" 9>&- || fail "slurmd for $NODE2 failed to start"
fi

for node in "${NODE_NAMES[@]}"; do
    resumed=0
    deadline=$((SECONDS + WAIT_SECS))
    while :; do
        state=$(node_state "$node")
        if [[ $state =~ ^(idle|mixed|allocated|completing)$ ]]; then break; fi
        slurmd_running "$node" || fail "slurmd for $node exited (node state: ${state:-?})"
        daemon_running slurmctld "$SLURM_RUN/slurmctld.pid" || fail "slurmctld exited (node state: ${state:-?})"
        # Drained/down (e.g. left over from an earlier run) and slurmd responding: resume.
        if [[ $state =~ ^(drained|draining|down|drain|fail|failing)$ ]] && ((resumed < 3)); then
            log "node $node is $state, resuming"
            scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
            resumed=$((resumed + 1))
        fi
        if ((SECONDS >= deadline)); then
            scontrol show node "$node" >&2 2>/dev/null || true
            fail "node $node not idle after ${WAIT_SECS}s (state: ${state:-unknown})"
        fi
        sleep 0.5
    done
done

echo "$WANT_HASH" >"$APPLIED_FILE"
log "up: node $HOST $(node_state "$HOST") ($NODE_CPUS cpus, ${REAL_MEM}M, gpu:a100:$NGPUS)$( ((NODES == 1)) ||
    echo ", node $NODE2 $(node_state "$NODE2") ($NODE2_CPUS cpus, ${NODE2_MEM}M, $NODE2_ADDR)"), accounting=$ACCOUNTING"
