# shellcheck shell=bash disable=SC2034
# Shared helpers for tests/cluster/start.sh and tests/cluster/stop.sh.
# Sourced, not executed.  Test-only: a throw-away Slurm cluster of two nodes on
# one machine (the second in its own network and UTS namespace).

SLURM_ETC=/etc/slurm
SLURM_RUN=/run/slurm
SLURM_LOG=/var/log/slurm
SLURM_SPOOL=/var/spool/slurm
APPLIED_FILE="$SLURM_RUN/pilotfish-applied-config.sha256"
MARIADB_MARKER="$SLURM_RUN/pilotfish-started-mariadb"

# The second node: its own network namespace, joined to this machine by a veth
# pair (host end NODE2_HOST_ADDR, namespace end NODE2_ADDR; nothing else is
# routed), its own host name (UTS namespace) and an /etc/hosts line here.
NODE2=node2
NODE2_NS=pf-node2
NODE2_VETH_HOST=pf-node2-h
NODE2_VETH_NS=pf-node2-n
NODE2_HOST_ADDR=10.203.0.1
NODE2_ADDR=10.203.0.2
NODE2_PREFIX=24
HOSTS_MARK="# pilotfish test cluster (tests/cluster/start.sh)"

log() { printf '[cluster] %s\n' "$*"; }
die() { printf '[cluster] ERROR: %s\n' "$*" >&2; exit 1; }

# Serialise concurrent start.sh/stop.sh runs (e.g. parallel test workers).
take_lock() {
    mkdir -p /run/lock
    exec 9>/run/lock/pilotfish-test-cluster.lock
    flock -w 300 9 || die "another start.sh/stop.sh is still running (lock /run/lock/pilotfish-test-cluster.lock)"
}

# PIDs of a daemon: the pid file (if its process is alive and has the right
# name) plus any process with exactly that name; with NETNS only those in that
# network namespace: "." for this shell's own, "elsewhere" for any other,
# otherwise one made by `ip netns add`.  (No command per process: this runs on
# every start.sh.)
daemon_pids() {
    local name=$1 pidfile=${2:-} netns=${3:-} nsfile="" away="" pid comm line st
    case $netns in
        "") ;;
        .) nsfile=/proc/$$/ns/net ;;
        elsewhere) away=/proc/$$/ns/net ;;
        *)
            nsfile=/run/netns/$netns
            [[ -e $nsfile ]] || return 0
            ;;
    esac
    {
        if [[ -n $pidfile && -s $pidfile ]]; then
            tr -dc '0-9' 2>/dev/null <"$pidfile" || true
            echo
        fi
        pgrep -x "$name" || true
    } | sort -un | while read -r pid; do
        [[ -n $pid ]] || continue
        read -r comm 2>/dev/null <"/proc/$pid/comm" || continue
        [[ $comm == "$name" ]] || continue
        # Skip zombies: PID 1 here is not an init that reaps promptly, so a
        # daemon's exited parent can linger as <defunct> for a few seconds.
        read -r line 2>/dev/null <"/proc/$pid/stat" || continue
        st=${line##*) }
        [[ ${st%% *} != Z ]] || continue
        # -ef: the same namespace (device and inode of the nsfs files).
        [[ -z $nsfile || /proc/$pid/ns/net -ef $nsfile ]] || continue
        [[ -z $away || ! /proc/$pid/ns/net -ef $away ]] || continue
        echo "$pid"
    done
}

daemon_running() { [[ -n $(daemon_pids "$@") ]]; }

# stop_daemon NAME [PIDFILE [NETNS]]: SIGTERM, wait up to 30 s, then SIGKILL.
stop_daemon() {
    local name=$1 pidfile=${2:-} netns=${3:-} pids i
    pids=$(daemon_pids "$name" "$pidfile" "$netns")
    if [[ -z $pids ]]; then
        [[ -n $pidfile ]] && rm -f "$pidfile"
        return 0
    fi
    log "stopping $name (pid ${pids//$'\n'/ })"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        daemon_running "$name" "$pidfile" "$netns" || break
        sleep 0.1
    done
    pids=$(daemon_pids "$name" "$pidfile" "$netns")
    if [[ -n $pids ]]; then
        log "$name did not exit after 30 s, sending SIGKILL"
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            daemon_running "$name" "$pidfile" "$netns" || break
            sleep 0.1
        done
        daemon_running "$name" "$pidfile" "$netns" && die "could not stop $name (pid ${pids//$'\n'/ })"
    fi
    [[ -n $pidfile ]] && rm -f "$pidfile"
    return 0
}

mariadb_running() { pgrep -x mariadbd >/dev/null || pgrep -x mysqld >/dev/null; }

stop_mariadb() {
    mariadb_running || { rm -f "$MARIADB_MARKER"; return 0; }
    log "stopping mariadb"
    if [[ -x /etc/init.d/mariadb ]]; then
        /etc/init.d/mariadb stop >/dev/null 2>&1 || true
    fi
    if mariadb_running; then
        local p
        for p in mariadbd mysqld mysqld_safe; do stop_daemon "$p"; done
    fi
    rm -f "$MARIADB_MARKER"
}

# Stop slurmctld + every slurmd, of both nodes (+ slurmdbd).  Job state is
# kept in StateSaveLocation; the jobs' processes keep running.
stop_slurm_daemons() {
    stop_daemon slurmctld "$SLURM_RUN/slurmctld.pid"
    stop_daemon slurmd
    rm -f "$SLURM_RUN"/slurmd*.pid
    stop_daemon slurmdbd "$SLURM_RUN/slurmdbd.pid"
    rm -f "$APPLIED_FILE"
}

# rewrite_in_place PATH CONTENT: keeps the inode (/etc/hosts may be a bind mount).
rewrite_in_place() {
    if [[ $(cat "$1") != "$2" ]]; then printf '%s\n' "$2" >"$1"; fi
}

# Remove the second node: end every process in its namespace (slurmd, the
# jobs' slurmstepd and servers; as if it were switched off), delete the
# namespace (and so the veth pair), its files and its /etc/hosts line.
remove_node2() {
    local pids i kept
    if [[ -e /run/netns/$NODE2_NS ]]; then
        pids=$(ip netns pids "$NODE2_NS" 2>/dev/null || true)
        if [[ -n $pids ]]; then
            log "stopping the processes of $NODE2 (pid ${pids//$'\n'/ })"
            # shellcheck disable=SC2086
            kill -TERM $pids 2>/dev/null || true
            # slurmstepd ignores SIGTERM: a short grace for the jobs, then SIGKILL.
            for ((i = 0; i < 30; i++)); do
                [[ -z $(ip netns pids "$NODE2_NS" 2>/dev/null) ]] && break
                sleep 0.1
            done
            pids=$(ip netns pids "$NODE2_NS" 2>/dev/null || true)
            # shellcheck disable=SC2086
            [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
        fi
        log "deleting network namespace $NODE2_NS"
        ip netns delete "$NODE2_NS" || die "ip netns delete $NODE2_NS failed"
    fi
    if ip link show "$NODE2_VETH_HOST" >/dev/null 2>&1; then
        ip link delete "$NODE2_VETH_HOST" 2>/dev/null || true
    fi
    rm -rf "/etc/netns/$NODE2_NS"
    rm -f "$SLURM_RUN/slurmd-$NODE2.pid"
    if grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
        kept=$(grep -vF "$HOSTS_MARK" /etc/hosts || true)
        rewrite_in_place /etc/hosts "$kept"
        log "removed $NODE2 from /etc/hosts"
    fi
    return 0
}
