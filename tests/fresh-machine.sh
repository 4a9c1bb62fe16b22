#!/usr/bin/env bash
# Prove the README's two commands on a fresh machine: build a clean Debian bookworm root (debootstrap), copy
# a clean `git archive` of HEAD into it, and run the two commands exactly as the README writes them (read
# from the README itself, at the `fresh-machine:` markers) inside it, with unshare + chroot (or, with
# --nspawn, systemd-nspawn). The package registries are reachable from inside; nothing installed on this
# machine is.
#
#   sudo bash tests/fresh-machine.sh [--keep DIR] [--log DIR] [--only install|test] [--nspawn]
#
# Prints each command's outcome and wall time; exits 1 when either fails, 2 when it cannot run. What the
# fresh root starts with is what a freshly installed Debian 12 machine that has cloned a repository has:
# the minimal base system plus python3, git, ca-certificates and sudo. Everything else (python3-venv, the
# compiler, the test tools and data) must come from the README's commands.
#
# --keep DIR  build the root in DIR and leave it there (default: a temporary folder, removed at the end)
# --log DIR   write each command's full output to DIR/install.log and DIR/test.log (default: printed tails)
# --only X    run only the install-and-run command, or only the test command
# --nspawn    run the commands in a systemd-nspawn container (its own PID, mount, IPC and UTS namespaces,
#             capability set and /dev; the network is this machine's) instead of unshare + chroot
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KEEP="" LOGDIR="" ONLY="" NSPAWN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=${2:?--keep needs a folder}; shift 2 ;;
    --log) LOGDIR=${2:?--log needs a folder}; shift 2 ;;
    --only) ONLY=${2:?--only needs install or test}; shift 2 ;;
    --nspawn) NSPAWN=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "error: unknown option: $1" >&2; exit 2 ;;
  esac
done
die() { echo "error: $*" >&2; exit 2; }
case "$ONLY" in ""|install|test) ;; *) die "--only takes install or test, got '$ONLY'" ;; esac
[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap and chroot need it)"
command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap"
command -v unshare >/dev/null || die "unshare not found (util-linux)"
RUNNER="unshare + chroot"
[ -z "$NSPAWN" ] || RUNNER=systemd-nspawn
[ -z "$NSPAWN" ] || command -v systemd-nspawn >/dev/null || die "systemd-nspawn not found: apt-get install systemd-container"
git -C "$SRC" rev-parse --verify -q HEAD >/dev/null || die "$SRC is not a git checkout with a commit"

# The two commands, exactly as the README writes them: the first indented line after each marker.
readme_command() {
  awk -v m="<!-- fresh-machine: $1 -->" 'f && /^    [^ ]/ {sub(/^    /, ""); print; exit} index($0, m) {f = 1}' "$SRC/README.md"
}
CMD_INSTALL=$(readme_command install-and-run)
CMD_TEST=$(readme_command test)
[ -n "$CMD_INSTALL" ] || die "README.md has no command after <!-- fresh-machine: install-and-run -->"
[ -n "$CMD_TEST" ] || die "README.md has no command after <!-- fresh-machine: test -->"

CHILD="" STEP_LOG=""
# The command runs in its own PID namespace under unshare or nspawn (CHILD); ending CHILD ends everything
# inside (--kill-child; nspawn does the same). unshare --fork blocks SIGINT and SIGTERM for itself, so only
# SIGKILL ends it. An interrupted step's log goes too, unless it was asked for (--log).
# shellcheck disable=SC2317  # called from the traps
stop_child() {
  [ -z "$CHILD" ] || { kill -KILL "$CHILD" 2>/dev/null; wait "$CHILD" 2>/dev/null; } || true
  [ -n "$LOGDIR" ] || [ -z "$STEP_LOG" ] || rm -f "$STEP_LOG"
}
trap 'stop_child' EXIT
trap 'exit 130' INT TERM
if [ -n "$KEEP" ]; then
  mkdir -p "$KEEP"; ROOT=$(cd "$KEEP" && pwd)
  [ -z "$(ls -A "$ROOT")" ] || die "--keep $KEEP: folder is not empty"
else
  ROOT=$(mktemp -d /var/tmp/edge-quq-fresh.XXXXXX)
  trap 'stop_child; rm -rf --one-file-system "$ROOT"' EXIT
fi
# mktemp -d makes the folder 0700, and it becomes the root's "/". A real machine's / is 0755: daemons that drop
# root need to reach /etc. Mosquitto drops to user mosquitto, and libwrap (Debian builds mosquitto with TCP
# wrappers) then cannot open /etc/hosts.allow or /etc/hosts.deny (EACCES, not ENOENT) and so denies every
# client: "Client connection from 127.0.0.1 denied access by tcpd".
chmod 0755 "$ROOT"
[ -z "$LOGDIR" ] || mkdir -p "$LOGDIR"

t0=$(date +%s)
echo "fresh-machine: debootstrap bookworm into $ROOT"
debootstrap --variant=minbase --include=python3,git,ca-certificates,sudo bookworm "$ROOT" >"$ROOT.debootstrap.log" 2>&1 \
  || { tail -20 "$ROOT.debootstrap.log" >&2; rm -f "$ROOT.debootstrap.log"; die "debootstrap failed"; }
rm -f "$ROOT.debootstrap.log"
echo "fresh-machine: base root ready in $(( $(date +%s) - t0 )) s"
# This machine's network set-up comes along, nothing else: its resolver, and the extra CA certificates that a
# TLS-intercepting proxy on the way to the package registries needs (trusted inside with update-ca-certificates).
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
EXTRA_CA=0
for crt in /usr/local/share/ca-certificates/*.crt; do
  [ -f "$crt" ] || continue
  cp "$crt" "$ROOT/usr/local/share/ca-certificates/"; EXTRA_CA=$((EXTRA_CA + 1))
done
# What every installed Debian system has and debootstrap does not write (the installer does): without
# /etc/hosts, "localhost" does not resolve and chromedriver's own start-up check fails.
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOT/etc/hosts"
echo fresh-machine > "$ROOT/etc/hostname"
mkdir -p "$ROOT/src"
git -C "$SRC" archive --format=tar HEAD | tar -x -C "$ROOT/src"
echo "fresh-machine: $(git -C "$SRC" rev-parse --short HEAD) copied to /src (git archive, committed files only)"

# One private mount and PID namespace per command (the root bind-mounted on itself, so that inside it / is a
# mount point, as on a real machine, and `unshare -m` in the tests can change its propagation): /proc, /sys,
# /dev, /dev/shm inside the root vanish with it, and so does every process the command left behind. The
# namespace's PID 1 is this sh, not the command: a test runner as PID 1 sees its own PID where tests expect
# another process's (under nspawn, --as-pid2 does the same). The environment is a login's, nothing of ours.
# With IN_ROOT_EXEC=1 the calling (background) shell becomes unshare or nspawn, so that $! is that process.
ENV_IN_ROOT=(/usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 TERM=dumb "CI=${CI:-}")
in_root() {
  [ -z "$NSPAWN" ] || { in_nspawn "$1"; return; }
  # shellcheck disable=SC2016  # the inner script expands its own positional arguments
  ${IN_ROOT_EXEC:+exec} unshare --mount --pid --fork --kill-child --propagation private sh -c '
    R=$1; shift
    mount --bind "$R" "$R" && mount -t proc proc "$R/proc" && mount -t sysfs sys "$R/sys" && mount --rbind /dev "$R/dev" \
      && mount -t tmpfs -o mode=1777 shm "$R/dev/shm" && mount -t tmpfs -o mode=1777 tmp "$R/tmp" || exit 125
    chroot "$R" "$@"
  ' sh "$ROOT" "${ENV_IN_ROOT[@]}" /bin/bash -c "cd /src && $1"
}
# nspawn keeps its propagation folder under /run/systemd/nspawn, which must be a tmpfs: without systemd as
# PID 1 nobody mounted one, so one is mounted in a private mount namespace that nspawn starts from.
in_nspawn() {
  # shellcheck disable=SC2016  # the inner script expands its own positional arguments
  ${IN_ROOT_EXEC:+exec} unshare --mount --propagation private sh -c '
    R=$1; shift
    if [ "$(findmnt -n -o FSTYPE --target /run/systemd/nspawn)" != tmpfs ]; then
      mkdir -p /run/systemd/nspawn && mount -t tmpfs tmpfs /run/systemd/nspawn || exit 125
    fi
    exec systemd-nspawn -q --register=no --link-journal=no --keep-unit --as-pid2 --resolv-conf=off --timezone=off -D "$R" -- "$@"
  ' sh "$ROOT" "${ENV_IN_ROOT[@]}" /bin/bash -c "cd /src && $1"
}

declare -A RC SECS
run_step() {
  local name=$1 cmd=$2 log start
  log=${LOGDIR:+$LOGDIR/$name.log}
  log=${log:-$ROOT.$name.log}
  STEP_LOG=$log
  echo "fresh-machine: [$name] \$ $cmd"
  start=$(date +%s)
  set +e
  IN_ROOT_EXEC=1 in_root "$cmd" >"$log" 2>&1 &
  CHILD=$!
  wait "$CHILD"
  RC[$name]=$?
  CHILD=""
  set -e
  SECS[$name]=$(( $(date +%s) - start ))
  # A newcomer reads build warnings as something broken (setuptools once warned about every data folder).
  if [ "${RC[$name]}" -eq 0 ] && grep -q "is absent from the .packages. configuration\|SetuptoolsDeprecationWarning" "$log"; then
    echo "fresh-machine: [$name] the package build printed setuptools warnings:"; grep -m5 "absent from\|SetuptoolsDeprecationWarning" "$log"
    RC[$name]=3
  fi
  echo "fresh-machine: [$name] exit ${RC[$name]} after ${SECS[$name]} s; last lines:"
  tail -15 "$log" | sed 's/^/    /'
  [ -n "$LOGDIR" ] || rm -f "$log"
}

if [ "$EXTRA_CA" -gt 0 ]; then
  in_root "update-ca-certificates >/dev/null 2>&1" || die "update-ca-certificates failed in the root"
  echo "fresh-machine: trusting this machine's $EXTRA_CA extra CA certificate(s) inside"
fi
[ "$ONLY" = test ] || run_step install "$CMD_INSTALL"
[ "$ONLY" = install ] || run_step test "$CMD_TEST"

echo
echo "fresh-machine summary (Debian bookworm minbase + python3 git ca-certificates sudo, HEAD $(git -C "$SRC" rev-parse --short HEAD), $RUNNER):"
fail=0
for name in install test; do
  [ -n "${RC[$name]+x}" ] || continue
  if [ "${RC[$name]}" -eq 0 ]; then verdict=PASS; else verdict=FAIL; fail=1; fi
  printf '  %-8s %s  exit %s  %s s\n' "$name" "$verdict" "${RC[$name]}" "${SECS[$name]}"
done
echo "  total    $(( $(date +%s) - t0 )) s"
exit "$fail"
