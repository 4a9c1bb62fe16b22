#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian/Ubuntu machine and runs it.
# The README's test command and .ci/run are both exactly this script.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# System packages, each named because a fresh Debian 12 / Ubuntu machine lacks it (--no-install-recommends
# below drops anything only recommended, so every package a test needs is listed here itself):
# - python3-venv: the virtual environment; gcc, libc6-dev, python3-dev: the native head kernel is built by
#   `pip install` (without them it is silently left out and its tests would have nothing to test);
# - dataset-fashion-mnist: real data (the IDX files);
# - gcc-aarch64-linux-gnu + libc6-dev-arm64-cross (its C library headers, only "recommended") and
#   qemu-user-static: the NEON kernel, cross-compiled and run under emulation;
# - debootstrap: the aarch64 userland and the clean roots of the deploy and fresh-machine checks;
# - shellcheck, systemd (systemd-analyze): deploy/;
# - mosquitto (a real MQTT broker), chromium + chromium-driver (the live view in a real browser): camera tests.
APT_PACKAGES="python3-venv gcc libc6-dev python3-dev dataset-fashion-mnist gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static debootstrap shellcheck systemd mosquitto chromium chromium-driver"
missing=()
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# A virtual environment keeps the test install away from the system Python (PEP 668 on Debian 12+).
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# Everything is installed now, so no test may skip (tests/conftest.py turns a skip into a failure).
EDGE_QUQ_NO_SKIPS=1 exec .venv/bin/python -m pytest "$@"
