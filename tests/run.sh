#!/usr/bin/env bash
# The whole test suite: installs what the tests need, starts the real test Slurm, runs pytest.
# Extra arguments go to pytest (e.g. tests/run.sh -k lifecycle -x).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin/pilotfish --help > /dev/null          # creates .venv and installs the package with its test extras
tests/cluster/start.sh                    # the real single-node Slurm (idempotent)
exec "${PILOTFISH_VENV:-$root/.venv}/bin/python" -m pytest "$@"
