#!/usr/bin/env bash
# The whole test suite: installs what the tests need, starts the real test Slurm, runs pytest.
# Extra arguments go to pytest (e.g. tests/run.sh -k lifecycle -x).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin/pilotfish --help > /dev/null          # creates .venv and installs the package with its test extras
missing=()
command -v shellcheck > /dev/null || missing+=(shellcheck)
command -v chromium > /dev/null || missing+=(chromium)      # browser tests (Playwright drives it)
command -v ruby > /dev/null || missing+=(ruby)              # renders the Open OnDemand app's ERB as OOD does
command -v espeak-ng > /dev/null || missing+=(espeak-ng)    # speech for the transcription tests
command -v qemu-x86_64 > /dev/null || missing+=(qemu-user)  # older CPUs, emulated, for the portable engine builds
command -v prometheus > /dev/null || missing+=(prometheus prometheus-node-exporter)  # runs docs/prometheus.yml
if [ ${#missing[@]} -gt 0 ]; then           # Debian packages the tests use
  echo "tests/run.sh: installing ${missing[*]}" >&2
  apt-get install -y -qq "${missing[@]}" > /dev/null || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" > /dev/null; }
fi
tests/cluster/start.sh                    # the real two-node Slurm (idempotent)
# The model servers the end-to-end tests run, each in its own virtualenv under ~/.cache/pilotfish/engines:
# installed once per machine (about 4 GB; llama.cpp compiles for several minutes), a no-op afterwards.
"${PILOTFISH_VENV:-$root/.venv}/bin/python" -m portal.engines.installer
# Debian sid's Apptainer (its root file system, entered by tests/apptainer/bin/apptainer) and the Whisper SIF image
# the Apptainer tests run (tests/e2e/test_apptainer.py): built once into ~/.cache/pilotfish/apptainer (about 2 min
# on a first run), a no-op afterwards.
tests/apptainer/build.sh
# Schemathesis checks the API's description (/api/openapi.json) against a live portal (tests/test_openapi_fuzz.py):
# a test extra, installed here too when a virtualenv made before it lacks it.
"${PILOTFISH_VENV:-$root/.venv}/bin/python" -c "import schemathesis" 2> /dev/null \
  || "${PILOTFISH_VENV:-$root/.venv}/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis>=4.0"
exec "${PILOTFISH_VENV:-$root/.venv}/bin/python" -m pytest "$@"
