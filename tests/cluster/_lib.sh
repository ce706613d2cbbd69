# shellcheck shell=bash disable=SC2034
# Shared helpers for tests/cluster/start.sh and tests/cluster/stop.sh.
# Sourced, not executed.  Test-only: a throw-away single-node Slurm cluster.

SLURM_ETC=/etc/slurm
SLURM_RUN=/run/slurm
SLURM_LOG=/var/log/slurm
SLURM_SPOOL=/var/spool/slurm
APPLIED_FILE="$SLURM_RUN/pilotfish-applied-config.sha256"
MARIADB_MARKER="$SLURM_RUN/pilotfish-started-mariadb"

log() { printf '[cluster] %s\n' "$*"; }
die() { printf '[cluster] ERROR: %s\n' "$*" >&2; exit 1; }

# Serialise concurrent start.sh/stop.sh runs (e.g. parallel test workers).
take_lock() {
    mkdir -p /run/lock
    exec 9>/run/lock/pilotfish-test-cluster.lock
    flock -w 300 9 || die "another start.sh/stop.sh is still running (lock /run/lock/pilotfish-test-cluster.lock)"
}

# PIDs of a daemon: the pid file (if its process is alive and has the right
# name) plus any process with exactly that name.
daemon_pids() {
    local name=$1 pidfile=${2:-} pid st
    {
        if [[ -n $pidfile && -s $pidfile ]]; then
            pid=$(tr -dc '0-9' 2>/dev/null <"$pidfile" || true)
            if [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
                echo "$pid"
            fi
        fi
        pgrep -x "$name" || true
    } | sort -u | while read -r pid; do
        # Skip zombies: PID 1 here is not an init that reaps promptly, so a
        # daemon's exited parent can linger as <defunct> for a few seconds.
        st=$(ps -o stat= -p "$pid" 2>/dev/null || true)
        if [[ -n $st && $st != Z* ]]; then echo "$pid"; fi
    done
}

daemon_running() { [[ -n $(daemon_pids "$@") ]]; }

# stop_daemon NAME [PIDFILE]: SIGTERM, wait up to 30 s, then SIGKILL.
stop_daemon() {
    local name=$1 pidfile=${2:-} pids i
    pids=$(daemon_pids "$name" "$pidfile")
    if [[ -z $pids ]]; then
        [[ -n $pidfile ]] && rm -f "$pidfile"
        return 0
    fi
    log "stopping $name (pid ${pids//$'\n'/ })"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        daemon_running "$name" "$pidfile" || break
        sleep 0.1
    done
    pids=$(daemon_pids "$name" "$pidfile")
    if [[ -n $pids ]]; then
        log "$name did not exit after 30 s, sending SIGKILL"
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            daemon_running "$name" "$pidfile" || break
            sleep 0.1
        done
        daemon_running "$name" "$pidfile" && die "could not stop $name (pid ${pids//$'\n'/ })"
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

# Stop slurmctld + slurmd (+ slurmdbd).  Job state is kept in StateSaveLocation.
stop_slurm_daemons() {
    stop_daemon slurmctld "$SLURM_RUN/slurmctld.pid"
    stop_daemon slurmd "$SLURM_RUN/slurmd.pid"
    stop_daemon slurmdbd "$SLURM_RUN/slurmdbd.pid"
    rm -f "$APPLIED_FILE"
}
