#!/usr/bin/env bash
# Builds an aarch64 Python 3.11 userland plus the device wheels (real aarch64 builds from PyPI) so the
# runtime can be run under qemu-aarch64-static on an x86-64 machine. No chroot and no binfmt needed:
# see ../shared/notes/arm-emulation.md. Idempotent; the result is cached.
#
#   tests/aarch64/setup_rootfs.sh [CACHE_DIR]      (default: $EDGE_QUQ_AARCH64_CACHE or ~/.cache/edge-quq-aarch64)
#
# Produces CACHE_DIR/rootfs (the userland), CACHE_DIR/site (unpacked wheels for sys.path) and
# CACHE_DIR/cpuinfo (an ARM /proc/cpuinfo to bind-mount, since onnxruntime and LiteRT crash reading x86's).
set -euo pipefail
CACHE="${1:-${EDGE_QUQ_AARCH64_CACHE:-$HOME/.cache/edge-quq-aarch64}}"
MIRROR="${EDGE_QUQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
[ -f "$CACHE/.ready" ] && { echo "$CACHE"; exit 0; }
for tool in debootstrap qemu-aarch64-static dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install debootstrap qemu-user-static)" >&2; exit 2; }
done
mkdir -p "$CACHE"
rm -rf "$CACHE/debootstrap" "$CACHE/rootfs" "$CACHE/site" "$CACHE/wheels"

# --foreign only downloads and unpacks the base; the included packages stay as .deb files, which we
# extract ourselves because the second stage would need to execute aarch64 binaries as root in a chroot.
debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,libpython3.11 bookworm "$CACHE/debootstrap" "$MIRROR" >/dev/null
mkdir -p "$CACHE/rootfs"
for deb in "$CACHE"/debootstrap/var/cache/apt/archives/*.deb; do
  dpkg-deb -x "$deb" "$CACHE/rootfs"
done
rm -rf "$CACHE/debootstrap"

PIP_PLATFORMS="--platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_28_aarch64"
# PYTHON: an interpreter with pip (the tests pass their own; a fresh machine's python3 has no pip module).
PY="${PYTHON:-python3}"
# shellcheck disable=SC2086
"$PY" -m pip download -q --only-binary=:all: --python-version 3.11 $PIP_PLATFORMS -d "$CACHE/wheels" \
  numpy onnxruntime ai-edge-litert psutil click opencv-python-headless
mkdir -p "$CACHE/site"
for whl in "$CACHE"/wheels/*.whl; do
  "$PY" -m zipfile -e "$whl" "$CACHE/site"
done

cat > "$CACHE/cpuinfo" <<'CPUINFO'
processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0xd08
CPU revision	: 3

CPUINFO
touch "$CACHE/.ready"
echo "$CACHE"
