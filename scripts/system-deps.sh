#!/usr/bin/env bash
# Installs the Debian packages GPULocker needs (as root), or says which are missing.
#   scripts/system-deps.sh run    what `gpulocker serve` needs: Python venv, a compiler and
#                                 libacl headers (pylibacl builds from source), the acl tools
#   scripts/system-deps.sh test   the above plus what the test suite drives: chromium, wrk
set -euo pipefail
what=${1:-run}
packages=(python3 python3-venv python3-dev gcc libacl1-dev acl libpam-runtime)
if [ "$what" = test ]; then
  packages+=(chromium fonts-dejavu-core wrk procps util-linux systemd)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q "${missing[@]}" >/dev/null
