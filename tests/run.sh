#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian/Ubuntu machine and runs it.
# The README's test command and .ci/run are both exactly this script.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# System packages: real data (Fashion-MNIST IDX files) and the aarch64 toolchain + emulator that the
# NEON kernel tests use; shellcheck and systemd (systemd-analyze) check deploy/.
# mosquitto (a real MQTT broker), chromium + chromium-driver (the HTTP live view in a real browser): the
# camera tests.
APT_PACKAGES="dataset-fashion-mnist qemu-user-static gcc-aarch64-linux-gnu debootstrap shellcheck systemd mosquitto chromium chromium-driver"
missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

# A virtual environment keeps the test install away from the system Python (PEP 668 on Debian 12+).
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
exec .venv/bin/python -m pytest "$@"
