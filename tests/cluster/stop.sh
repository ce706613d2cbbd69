#!/usr/bin/env bash
# Stop the single-node Slurm test cluster started by tests/cluster/start.sh:
# slurmctld, slurmd, slurmdbd (if running), mariadb (only if start.sh started
# it) and munged.  Idempotent: exits 0 when nothing is running.
# Job state is kept in StateSaveLocation, so start.sh brings the jobs back.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=_lib.sh
source "$HERE/_lib.sh"

[[ $(id -u) -eq 0 ]] || die "must run as root"
take_lock

stop_slurm_daemons
[[ -f $MARIADB_MARKER ]] && stop_mariadb
stop_daemon munged /run/munge/munged.pid
log "stopped"
