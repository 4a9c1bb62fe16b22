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
# torch for the PyTorch export tests, as a CPU build only: PyTorch's own CPU index where it is reachable,
# else a CPU wheel that pip's configuration offers (a local wheel house). PyPI's Linux torch is a CUDA
# build of several GB, so it is never taken: without a CPU build, tests/conftest.py leaves the PyTorch
# tests out and says so in pytest's header.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if ! .venv/bin/python -m pip install -q --retries 0 --timeout 15 --index-url https://download.pytorch.org/whl/cpu torch 2>/dev/null; then
    WHEEL=$(.venv/bin/python -m pip install --dry-run --no-deps --quiet --report - "torch==2.13.0" 2>/dev/null \
            | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["install"][0]["download_info"]["url"])' 2>/dev/null || true)
    case "$WHEEL" in
      *%2Bcpu*|*+cpu*) .venv/bin/python -m pip install -q "torch==2.13.0" ;;
      *) echo "tests/run.sh: no CPU build of torch reachable (PyPI's is the CUDA build): the PyTorch export tests are left out" >&2 ;;
    esac
  fi
fi

# onnx2tf, the ONNX -> TFLite converter of the ONNX/PyTorch export, pins an older TensorFlow stack, so it lives
# in a venv of its own (docs/export.md) that the export finds through EDGE_QUQ_ONNX2TF. Measured here: 6 min the
# first time on a loaded 2-core machine (a TensorFlow wheel; about 1.5 min of CPU), nothing once it exists.
if [ ! -x .venv-onnx2tf/bin/onnx2tf ]; then
  "$PY" -m venv .venv-onnx2tf
  .venv-onnx2tf/bin/python -m pip install -q "onnx2tf==1.29.24"
fi
export EDGE_QUQ_ONNX2TF="$PWD/.venv-onnx2tf/bin/onnx2tf"

# Everything is installed now, so no test may skip (tests/conftest.py turns a skip into a failure).
EDGE_QUQ_NO_SKIPS=1 exec .venv/bin/python -m pytest "$@"
