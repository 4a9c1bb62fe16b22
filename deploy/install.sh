#!/usr/bin/env bash
# Install edge-quq as a systemd service on Raspberry Pi OS (Bookworm and newer) or JetPack (Ubuntu).
#
#   sudo deploy/install.sh [--bundle DIR] [options]      install or update (a second run changes nothing)
#   sudo deploy/install.sh --uninstall                   remove everything it installed
#   deploy/install.sh --root DIR                         stage the files into DIR (no root needed)
#
# What it does, each step skipped when already done:
#   system user edge-quq (group video), virtual environment /opt/edge-quq/venv, pip install of this checkout
#   (or --wheel FILE) with the TFLite interpreter extra that suits the board's Python, the bundle copied
#   to /opt/edge-quq/bundle (checksums verified first), /etc/edge-quq/config (kept when it exists), the unit
#   /etc/systemd/system/edge-quq-camera.service enabled and (re)started when something changed.
#
# Downloads: this script fetches nothing itself. The one step that can reach the network is pip installing
# the package's Python dependencies from the index pip is configured with; --wheelhouse DIR makes that step
# offline (pip --no-index --find-links DIR). docs/deploy.md says how to fill a wheelhouse.
#
# --root DIR installs into a staging tree (an image being built, a package's DESTDIR): files only. Creating
# the user, the virtual environment (not relocatable: its scripts name their absolute path) and the pip
# install are printed as "skipped (--root)", to be done by running this script on the board; enabling the
# unit is done with `systemctl --root`, which only writes a symlink inside DIR.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UNIT_NAME=edge-quq-camera.service
SVC_USER=edge-quq
APP_DIR=/opt/edge-quq
VENV_DIR=$APP_DIR/venv
BUNDLE_DIR=$APP_DIR/bundle
CONF_DIR=/etc/edge-quq
CONF_FILE=$CONF_DIR/config
UNIT_DIR=/etc/systemd/system
STATE_DIR=/var/lib/edge-quq

ROOT=""
DRY_RUN=0
UNINSTALL=0
BUNDLE_SRC=""
BUNDLE_SHA256=""
SOURCE="v4l2:///dev/video0"
MQTT_URL=""
MQTT_DEVICE=""
MQTT_DISCOVERY=""
WHEEL=""
WHEELHOUSE=""
EXTRA=auto
PYTHON=python3
SYSTEM_SITE=0
RESET_CONFIG=0
START=1
CHANGES=0
RESTART_NEEDED=0
TMP_DIRS=()

usage() {
  cat <<'EOF'
Usage: install.sh [options]

  --bundle DIR           bundle folder to install (default: the package's embedded demo bundle)
  --bundle-sha256 HASH   refuse the bundle unless its manifest's sha256 is HASH (`edge-quq info BUNDLE`
                         prints it as "manifest sha256"; the manifest pins every other file's sha256)
  --wheel FILE           install this edge-quq wheel instead of the checkout the script lives in
  --wheelhouse DIR       offline: pip takes every package from DIR (--no-index --find-links DIR)
  --extra NAME           TFLite interpreter extra: auto (default), litert, tflite-runtime, none
  --python PATH          Python for the virtual environment (default: python3; 3.9 or newer)
  --system-site-packages let the venv see apt's Python packages (python3-picamera2, python3-opencv
                         with GStreamer); only when creating the venv
  --mqtt URL             results and stats to this MQTT broker (mqtt://[user:pass@]host[:port]; the config
                         file is 0640, readable by the service's group only)
  --mqtt-device NAME     the camera's MQTT device name (default: the board's host name)
  --mqtt-discovery[=PREFIX]
                         Home Assistant MQTT discovery under PREFIX (default homeassistant); needs --mqtt
                         (docs/camera.md). These three are written into a new config (or with --reset-config)
  --reset-config         rewrite /etc/edge-quq/config from the template (default: keep an existing one)
  --no-start             install and enable, but do not (re)start the service
  --root DIR             stage into DIR instead of / (files only; see the header of this script)
  --dry-run              print what would be done, change nothing
  --uninstall            stop and remove the service, its files, state, config and user
  -h, --help             this text
EOF
}

die() { echo "error: $*" >&2; exit 2; }
say() { echo "$*"; }
note_change() { CHANGES=$((CHANGES + 1)); }

while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE_SRC=${2:?--bundle needs a folder}; shift 2 ;;
    --bundle-sha256) BUNDLE_SHA256=${2:?--bundle-sha256 needs a hash}; shift 2 ;;
    --source) SOURCE=${2:?--source needs a URI}; shift 2 ;;
    --mqtt) MQTT_URL=${2:?--mqtt needs a broker URL}; shift 2 ;;
    --mqtt-device) MQTT_DEVICE=${2:?--mqtt-device needs a name}; shift 2 ;;
    --mqtt-discovery) MQTT_DISCOVERY=homeassistant; shift ;;
    --mqtt-discovery=*) MQTT_DISCOVERY=${1#*=}; shift ;;
    --wheel) WHEEL=${2:?--wheel needs a file}; shift 2 ;;
    --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a folder}; shift 2 ;;
    --extra) EXTRA=${2:?--extra needs a name}; shift 2 ;;
    --python) PYTHON=${2:?--python needs a path}; shift 2 ;;
    --system-site-packages) SYSTEM_SITE=1; shift ;;
    --reset-config) RESET_CONFIG=1; shift ;;
    --no-start) START=0; shift ;;
    --root) ROOT=${2:?--root needs a folder}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

case "$EXTRA" in auto|litert|tflite-runtime|none) ;; *) die "--extra must be auto, litert, tflite-runtime or none (got '$EXTRA')" ;; esac
BUNDLE_SHA256=$(printf '%s' "$BUNDLE_SHA256" | tr 'A-F' 'a-f')
case "$BUNDLE_SHA256" in
  "") ;;
  *[!0-9a-f]*) die "--bundle-sha256 must be 64 hex digits (got '$BUNDLE_SHA256')" ;;
  *) [ ${#BUNDLE_SHA256} -eq 64 ] || die "--bundle-sha256 must be 64 hex digits (got ${#BUNDLE_SHA256})" ;;
esac
if [ -n "$MQTT_DISCOVERY" ] && [ -z "$MQTT_URL" ]; then
  die "--mqtt-discovery needs --mqtt URL"
fi
case "$MQTT_DISCOVERY" in
  *[#+]*|/*|*/) die "--mqtt-discovery=$MQTT_DISCOVERY: the prefix must have no MQTT wildcards (# +) and no leading or trailing '/'" ;;
esac
# Home Assistant's discovery topics and unique_ids take only these characters (the camera refuses others too).
case "$MQTT_DEVICE" in
  *[!A-Za-z0-9_-]*) [ -z "$MQTT_DISCOVERY" ] || die "--mqtt-device '$MQTT_DEVICE': Home Assistant discovery needs letters, digits, '_' and '-' only" ;;
esac
if [ -n "$ROOT" ]; then
  [ -d "$ROOT" ] || die "--root $ROOT: folder does not exist"
  ROOT=$(cd "$ROOT" && pwd)
  [ "$ROOT" != / ] || ROOT=""
fi
if [ -z "$ROOT" ] && [ "$DRY_RUN" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
  die "run as root (sudo $0 ...), or use --root DIR / --dry-run"
fi

cleanup() {
  local d
  for d in "${TMP_DIRS[@]+"${TMP_DIRS[@]}"}"; do rm -rf -- "$d"; done
}
trap cleanup EXIT

# Real-system commands (useradd, pip, systemctl ...): printed in --dry-run, skipped in --root.
sys_run() {
  if [ -n "$ROOT" ]; then
    say "  skipped (--root): $*"
  elif [ "$DRY_RUN" -eq 1 ]; then
    say "  would run: $*"
  else
    say "  run: $*"
    "$@"
  fi
}

# Changes to files under ROOT: printed in --dry-run, done otherwise.
fs_run() {
  if [ "$DRY_RUN" -eq 1 ]; then
    say "  would run: $*"
  else
    "$@"
  fi
}

systemd_booted() { [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }

# install_file SRC DEST MODE: copy only when the content or mode differs, so a re-run keeps mtimes.
install_file() {
  local src=$1 dest=$ROOT$2 mode=$3
  if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
    return 0
  fi
  say "  write $2"
  note_change
  fs_run install -D -m "$mode" "$src" "$dest"
  return 0
}

# --- checks ---------------------------------------------------------------------------------------

check_python() {
  command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (install python3, or pass --python PATH)"
  "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' \
    || die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); edge-quq needs 3.9 or newer (JetPack 5: docs/deploy.md)"
}

# The bundle is verified (manifest + sha256 of every file) with the package's own reader, which needs only
# the standard library, before anything is copied: a corrupt bundle never replaces a good one. A symlink
# anywhere in the folder that leads outside it is refused too (cp -L below would copy what it points at);
# --bundle-sha256 pins the manifest itself, the one file no checksum in the manifest covers.
verify_bundle() {
  local out name digest
  if ! out=$("$PYTHON" -I -c '
import os, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from edge_quq.bundle import load_bundle
from edge_quq.errors import EdgeQuqError
root = Path(sys.argv[2]).resolve()
for dirpath, dirnames, filenames in os.walk(root):
    for n in dirnames + filenames:
        p = Path(dirpath) / n
        if p.is_symlink():
            real = p.resolve()
            if real != root and root not in real.parents:
                print(f"{p}: symlink to {real}, outside the bundle folder")
                sys.exit(1)
try:
    b = load_bundle(sys.argv[2])
except EdgeQuqError as e:
    print(e)
    sys.exit(1)
print(b.manifest_sha256, b.manifest.get("name", "?"))
' "$SRC" "$1" 2>&1); then
    die "bundle $1 does not verify: $out"
  fi
  digest=${out%% *}
  name=${out#* }
  if [ -n "$BUNDLE_SHA256" ] && [ "$digest" != "$BUNDLE_SHA256" ]; then
    die "bundle $1: manifest sha256 is $digest, not the pinned --bundle-sha256 $BUNDLE_SHA256"
  fi
  say "bundle $1: '$name', manifest sha256 $digest, checksums verified"
}

# Which TFLite interpreter extra suits this Python (README "Which TFLite interpreter"): ai-edge-litert works
# with numpy 2 and 1 on Python 3.9+; tflite-runtime (2.14, numpy<2, Python <= 3.11) only when the venv
# must share apt's numpy 1.x (--system-site-packages) or a wheelhouse holds only tflite-runtime.
choose_extra() {
  [ "$EXTRA" = auto ] || return 0
  local arch py np
  arch=$(uname -m)
  py=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$arch" = armv7l ] || [ "$arch" = armv6l ]; then
    EXTRA=none
    say "TFLite: no interpreter wheels for 32-bit ARM ($arch); the service will use ONNX Runtime if it installs (a 64-bit OS is recommended)"
    return 0
  fi
  if [ -n "$WHEELHOUSE" ]; then
    if ! compgen -G "$WHEELHOUSE/ai_edge_litert-*.whl" >/dev/null && compgen -G "$WHEELHOUSE/tflite_runtime-*.whl" >/dev/null; then
      EXTRA=tflite-runtime
      say "TFLite: tflite-runtime (the only interpreter in $WHEELHOUSE)"
      return 0
    fi
  fi
  np=""
  if [ "$SYSTEM_SITE" -eq 1 ]; then
    np=$("$PYTHON" -c 'import numpy; print(numpy.__version__)' 2>/dev/null || true)
  fi
  if [ -n "$np" ] && [ "${np%%.*}" -lt 2 ] && "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info < (3, 12) else 1)'; then
    EXTRA=tflite-runtime
    say "TFLite: tflite-runtime (Python $py sharing apt's numpy $np, which is < 2)"
  else
    EXTRA=litert
    say "TFLite: litert (ai-edge-litert; Python $py${np:+, numpy $np})"
  fi
}

# --- install steps ------------------------------------------------------------------------------------

ensure_user() {
  if [ -n "$ROOT" ]; then
    sys_run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home --shell /usr/sbin/nologin --groups video "$SVC_USER"
    return 0
  fi
  if ! getent passwd "$SVC_USER" >/dev/null; then
    getent group video >/dev/null || sys_run groupadd --system video
    sys_run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home --shell /usr/sbin/nologin --groups video "$SVC_USER"
    note_change
  elif ! id -nG "$SVC_USER" | tr ' ' '\n' | grep -qx video; then
    sys_run usermod -a -G video "$SVC_USER"
    note_change
  fi
}

# A short digest of what pip would install: the package sources (or the wheel), the extra and the
# wheelhouse. Stored in the venv after a successful install; equal digest = nothing to reinstall.
source_digest() {
  {
    echo "extra=$EXTRA wheelhouse=$WHEELHOUSE system_site=$SYSTEM_SITE"
    if [ -n "$WHEEL" ]; then
      sha256sum "$WHEEL"
    else
      (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    fi
  } | sha256sum | cut -c1-64
}

# pip builds in the source folder (build/, *.egg-info); a private copy of just the package sources keeps
# the checkout clean and stale build products out of the install.
stage_sources() {
  (cd "$SRC" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' --exclude='*.so' \
      pyproject.toml setup.py MANIFEST.in README.md edge_quq export) | tar -xf - -C "$1"
}

ensure_venv_and_package() {
  local py="$VENV_DIR/bin/python" src spec digest stamp="$VENV_DIR/.edge-quq-install"
  if [ -n "$ROOT" ]; then
    if [ "$SYSTEM_SITE" -eq 1 ]; then
      sys_run "$PYTHON" -m venv --system-site-packages "$VENV_DIR"
    else
      sys_run "$PYTHON" -m venv "$VENV_DIR"
    fi
    sys_run "$py" -m pip install "${WHEEL:-$SRC}[$EXTRA]"
    return 0
  fi
  if [ ! -x "$py" ]; then
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
      || die "$PYTHON cannot create virtual environments: apt install python3-venv"
    if [ "$SYSTEM_SITE" -eq 1 ]; then
      sys_run "$PYTHON" -m venv --system-site-packages "$VENV_DIR"
    else
      sys_run "$PYTHON" -m venv "$VENV_DIR"
    fi
    note_change
  fi
  if [ -n "$WHEEL" ]; then
    [ -f "$WHEEL" ] || die "--wheel $WHEEL: file does not exist"
    src=$WHEEL
  else
    src=$(mktemp -d)
    TMP_DIRS+=("$src")
    stage_sources "$src"
  fi
  digest=$(source_digest "$src")
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
    return 0
  fi
  spec=$src
  [ "$EXTRA" = none ] || spec="${src}[$EXTRA]"
  local pip=("$py" -m pip install --disable-pip-version-check --no-input --quiet)
  [ -z "$WHEELHOUSE" ] || pip+=(--no-index --find-links "$WHEELHOUSE")
  # --force-reinstall --no-deps for the package itself: same version number, new code.
  sys_run "${pip[@]}" "$spec"
  sys_run "${pip[@]}" --force-reinstall --no-deps "$src"
  if [ "$DRY_RUN" -eq 0 ]; then
    echo "$digest" > "$stamp"
  fi
  note_change
  RESTART_NEEDED=1
}

sync_bundle() {
  local src=$1 dest=$ROOT$BUNDLE_DIR
  if [ -d "$dest" ] && diff -rq "$src" "$dest" >/dev/null 2>&1; then
    return 0
  fi
  say "  copy bundle $src -> $BUNDLE_DIR"
  note_change
  RESTART_NEEDED=1
  # Copy next to the target and swap with two renames: the service never sees a half-copied bundle.
  fs_run mkdir -p "$ROOT$APP_DIR"
  fs_run rm -rf "$dest.new" "$dest.old"
  # -L: copy what an inside symlink points at, as a regular file (verify_bundle refused outside ones)
  fs_run cp -RL "$src" "$dest.new"
  fs_run chmod -R u=rwX,go=rX "$dest.new"
  if [ -e "$dest" ]; then fs_run mv "$dest" "$dest.old"; fi
  fs_run mv "$dest.new" "$dest"
  fs_run rm -rf "$dest.old"
}

write_config() {
  local dest=$ROOT$CONF_FILE tmp
  if [ -f "$dest" ] && [ "$RESET_CONFIG" -eq 0 ]; then
    if [ -n "$MQTT_URL$MQTT_DEVICE$MQTT_DISCOVERY" ]; then
      say "  kept $CONF_FILE: the --mqtt options are not applied to an existing config (edit it, or --reset-config)"
    fi
    return 0
  fi
  tmp=$(mktemp)
  local keys=()
  [ -z "$MQTT_URL" ] || keys+=(mqtt "$MQTT_URL")
  [ -z "$MQTT_DEVICE" ] || keys+=(mqtt-device "$MQTT_DEVICE")
  [ -z "$MQTT_DISCOVERY" ] || keys+=(mqtt-discovery "$MQTT_DISCOVERY")
  # The template's @...@ placeholders are TOML strings; json.dumps writes a valid TOML basic string. After
  # "--": keys whose commented-out example line ("#key = ...") becomes a setting.
  "$PYTHON" -I -c '
import json, re, sys
text = open(sys.argv[1], encoding="utf-8").read()
args = sys.argv[2:]
cut = args.index("--")
for key, value in zip(args[:cut:2], args[1:cut:2]):
    text = text.replace(json.dumps("@%s@" % key), json.dumps(value)).replace("@%s@" % key, value)
for key, value in zip(args[cut + 1::2], args[cut + 2::2]):
    line = "%s = %s" % (key, json.dumps(value))
    text, n = re.subn("^#%s = .*$" % re.escape(key), lambda m: line, text, count=1, flags=re.M)
    if n != 1:
        sys.exit("error: deploy/config.example has no #%s line" % key)
sys.stdout.write(text)
' "$SRC/deploy/config.example" SOURCE "$SOURCE" BUNDLE_DIR "$BUNDLE_DIR" STATE_DIR "$STATE_DIR" -- "${keys[@]+"${keys[@]}"}" > "$tmp"
  install_file "$tmp" "$CONF_FILE" 0640
  rm -f "$tmp"
  RESTART_NEEDED=1
}

# The config can hold broker passwords: root writes it, the service's group reads it.
config_permissions() {
  [ -z "$ROOT" ] || return 0
  if [ -f "$CONF_FILE" ] && [ "$(stat -c %G "$CONF_FILE")" != "$SVC_USER" ]; then
    sys_run chgrp "$SVC_USER" "$CONF_FILE"
    note_change
  fi
}

# Checked as the service user with the installed package against the installed camera command: an
# interpreter the user cannot run (a pyenv Python under /root) or a typo in the config fails here, not in a
# restart loop.
check_installed() {
  [ -z "$ROOT" ] && [ "$DRY_RUN" -eq 0 ] || return 0
  local as_user=()
  command -v runuser >/dev/null 2>&1 && as_user=(runuser -u "$SVC_USER" --)
  if ! "${as_user[@]}" "$VENV_DIR/bin/python" -c 'import edge_quq' 2>/dev/null; then
    die "user $SVC_USER cannot run $VENV_DIR/bin/python (-> $(readlink -f "$VENV_DIR/bin/python")): use a system Python, e.g. --python /usr/bin/python3 (after --uninstall)"
  fi
  "${as_user[@]}" "$VENV_DIR/bin/python" -c '
import sys
from edge_quq.cli import main
from edge_quq.config import ConfigError, load_config
camera = main.commands.get("camera")
if camera is not None:
    try:
        load_config(camera, sys.argv[1])
    except ConfigError as e:
        sys.exit("error: " + str(e))
' "$CONF_FILE"
}

enable_unit() {
  local wants=$ROOT/etc/systemd/system/multi-user.target.wants/$UNIT_NAME
  if [ -n "$ROOT" ]; then
    [ -L "$wants" ] && return 0
    say "  enable $UNIT_NAME (in $ROOT)"
    note_change
    if command -v systemctl >/dev/null 2>&1; then
      fs_run systemctl --root="$ROOT" --quiet enable "$UNIT_NAME"
    else
      fs_run mkdir -p "$(dirname "$wants")"
      fs_run ln -s "$UNIT_DIR/$UNIT_NAME" "$wants"
    fi
    return 0
  fi
  if systemd_booted; then
    [ "$UNIT_CHANGED" -eq 0 ] || sys_run systemctl daemon-reload
    if ! systemctl --quiet is-enabled "$UNIT_NAME" 2>/dev/null; then
      sys_run systemctl --quiet enable "$UNIT_NAME"
      note_change
    fi
    if [ "$START" -eq 1 ]; then
      if ! systemctl --quiet is-active "$UNIT_NAME"; then
        sys_run systemctl start "$UNIT_NAME"
      elif [ "$RESTART_NEEDED" -eq 1 ]; then
        sys_run systemctl restart "$UNIT_NAME"
      fi
    fi
  else
    # No systemd running (a container, a chroot): enabling is still a symlink.
    if [ ! -L "$wants" ]; then
      sys_run systemctl --quiet enable "$UNIT_NAME"
      note_change
    fi
    say "systemd is not running here: not starting $UNIT_NAME"
  fi
}

do_install() {
  local before bundle_src=$BUNDLE_SRC
  check_python
  [ -n "$bundle_src" ] || bundle_src=$SRC/edge_quq/data/default_bundle
  [ -d "$bundle_src" ] || die "--bundle $bundle_src: folder does not exist"
  bundle_src=$(cd "$bundle_src" && pwd)
  [ -z "$WHEEL" ] || WHEEL=$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")
  [ -z "$WHEELHOUSE" ] || { [ -d "$WHEELHOUSE" ] || die "--wheelhouse $WHEELHOUSE: folder does not exist"; WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd); }
  verify_bundle "$bundle_src"
  choose_extra

  ensure_user
  ensure_venv_and_package
  sync_bundle "$bundle_src"
  write_config
  config_permissions
  check_installed
  install_file "$SRC/docs/deploy.md" "$APP_DIR/docs/deploy.md" 0644
  before=$CHANGES
  install_file "$SRC/deploy/systemd/$UNIT_NAME" "$UNIT_DIR/$UNIT_NAME" 0644
  UNIT_CHANGED=$((CHANGES - before))
  [ "$UNIT_CHANGED" -eq 0 ] || RESTART_NEEDED=1
  enable_unit

  if [ "$CHANGES" -eq 0 ]; then
    say "edge-quq: already installed, nothing changed${ROOT:+ in $ROOT}"
  elif [ "$DRY_RUN" -eq 1 ]; then
    say "edge-quq: $CHANGES change(s) would be made${ROOT:+ in $ROOT}"
  else
    say "edge-quq: installed ($CHANGES change(s))${ROOT:+ in $ROOT}; logs: journalctl -u ${UNIT_NAME%.service}"
  fi
}

# --- uninstall ------------------------------------------------------------------------------------------

remove_path() {
  local p=$ROOT$1
  [ -e "$p" ] || [ -L "$p" ] || return 0
  say "  remove $1"
  note_change
  fs_run rm -rf -- "$p"
}

do_uninstall() {
  local d
  if [ -n "$ROOT" ]; then
    if [ -L "$ROOT/etc/systemd/system/multi-user.target.wants/$UNIT_NAME" ]; then
      say "  disable $UNIT_NAME (in $ROOT)"
      note_change
      if command -v systemctl >/dev/null 2>&1; then
        fs_run systemctl --root="$ROOT" --quiet disable "$UNIT_NAME"
      else
        fs_run rm -f "$ROOT/etc/systemd/system/multi-user.target.wants/$UNIT_NAME"
      fi
    fi
  elif [ -f "$UNIT_DIR/$UNIT_NAME" ]; then
    if systemd_booted; then
      sys_run systemctl disable --now "$UNIT_NAME"
    else
      sys_run systemctl --quiet disable "$UNIT_NAME"
    fi
    note_change
  fi
  remove_path "$UNIT_DIR/$UNIT_NAME"
  if [ -z "$ROOT" ] && systemd_booted && [ "$CHANGES" -gt 0 ]; then sys_run systemctl daemon-reload; fi
  remove_path "$APP_DIR"
  remove_path "$CONF_DIR"
  remove_path "$STATE_DIR"
  if [ -z "$ROOT" ]; then
    if getent passwd "$SVC_USER" >/dev/null; then
      sys_run userdel "$SVC_USER"
      note_change
    fi
    if getent group "$SVC_USER" >/dev/null; then
      sys_run groupdel "$SVC_USER"
    fi
  else
    say "  skipped (--root): userdel $SVC_USER"
    # A staging tree is ours: drop the folders the install created once they are empty.
    if [ "$DRY_RUN" -eq 0 ]; then
      for d in etc/systemd/system/multi-user.target.wants etc/systemd/system etc/systemd etc opt var/lib var; do
        [ ! -d "$ROOT/$d" ] || rmdir --ignore-fail-on-non-empty "$ROOT/$d"
      done
    fi
  fi
  if [ "$CHANGES" -eq 0 ]; then
    say "edge-quq: not installed, nothing to remove${ROOT:+ in $ROOT}"
  else
    if [ "$DRY_RUN" -eq 1 ]; then
      say "edge-quq: $CHANGES change(s) would be made${ROOT:+ in $ROOT}"
    else
      say "edge-quq: removed ($CHANGES change(s))${ROOT:+ in $ROOT}"
    fi
  fi
}

UNIT_CHANGED=0
if [ "$UNINSTALL" -eq 1 ]; then
  do_uninstall
else
  do_install
fi
