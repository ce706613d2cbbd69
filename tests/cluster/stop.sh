#!/usr/bin/env bash
# Stop the Slurm test cluster started by tests/cluster/start.sh: slurmctld,
# both slurmd, slurmdbd (if running), mariadb (only if start.sh started it) and
# munged, and remove the second node (its network namespace, the veth pair and
# its /etc/hosts line).  Idempotent: exits 0 when nothing is running.
# Job state is kept in StateSaveLocation, so start.sh brings the first node's
# jobs back; jobs on node2 end with it (its processes are stopped).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=_lib.sh
source "$HERE/_lib.sh"

[[ $(id -u) -eq 0 ]] || die "must run as root"
take_lock

stop_slurm_daemons
remove_node2
[[ -f $MARIADB_MARKER ]] && stop_mariadb
stop_daemon munged /run/munge/munged.pid
log "stopped"
