#!/usr/bin/env bash
# Run the installed edge-quq service under a real systemd, on a machine where systemd is not PID 1 (a CI
# container, a build VM): boot this machine's own root file system in a throw-away systemd-nspawn container
# (an overlay whose writes go to a tmpfs and vanish) and check, with the unit exactly as installed:
#   - `systemctl start` returns once the loop sent READY=1 (Type=notify), the service is active;
#   - an IP camera that freezes (HTTP MJPEG, connection held open, no frames) stops the WATCHDOG=1 pings and
#     systemd restarts the service ("Watchdog timeout"), which comes back once frames flow again;
#   - `systemctl stop` ends it cleanly (STOPPING=1, stats state "stopped") inside TimeoutStopSec;
#   - `edge-quq health` (as an unprivileged monitoring user in group edge-quq, which may read the 0640 stats
#     file) says healthy while it runs.
#
#   sudo deploy/install.sh && sudo deploy/nspawn-check.sh [--report FILE]
#
# Needs root, systemd-nspawn (apt install systemd-container) and overlayfs. Nothing on the host changes: the
# container's writes land in a tmpfs that is unmounted at the end. Not part of the pytest suite (it boots a
# whole system, ~1-2 minutes); its last report is bench/results/service_systemd.md.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPORT=""
WATCHDOG_WAIT=120
while [ $# -gt 0 ]; do
  case "$1" in
    --report) REPORT=${2:?--report needs a file}; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "error: unknown option: $1" >&2; exit 2 ;;
  esac
done

die() { echo "error: $*" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || die "run as root (it mounts an overlay and boots a container)"
command -v systemd-nspawn >/dev/null || die "systemd-nspawn not found: apt install systemd-container"
if [ ! -x /opt/edge-quq/venv/bin/edge-quq ] || [ ! -f /etc/systemd/system/edge-quq-camera.service ]; then
  die "edge-quq is not installed here: run deploy/install.sh first"
fi

WORK=$(mktemp -d /tmp/edge-quq-nspawn.XXXXXX)
MOUNTED=()
SERVER_PID=""
cleanup() {
  local i
  [ -z "$SERVER_PID" ] || kill "$SERVER_PID" 2>/dev/null || true
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do umount "${MOUNTED[$i]}" 2>/dev/null || umount -l "${MOUNTED[$i]}" || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK/tmpfs"
mount -t tmpfs -o size=1g tmpfs "$WORK/tmpfs"; MOUNTED+=("$WORK/tmpfs")
mkdir -p "$WORK/tmpfs/upper" "$WORK/tmpfs/work" "$WORK/root" "$WORK/shared"
# The overlay sees the root file system only, not what is mounted on it (/dev, /proc, ...): what nspawn wants.
mount -t overlay overlay -o "lowerdir=/,upperdir=$WORK/tmpfs/upper,workdir=$WORK/tmpfs/work" "$WORK/root"; MOUNTED+=("$WORK/root")
# nspawn refuses a pre-populated /dev, and keeps its propagation folder under /run/systemd/nspawn, which must
# be a tmpfs: without systemd as PID 1 nobody mounted one.
find "$WORK/root/dev" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
if ! findmnt -n /run/systemd/nspawn >/dev/null 2>&1 && [ "$(findmnt -n -o FSTYPE --target /run)" != tmpfs ]; then
  mkdir -p /run/systemd/nspawn
  mount -t tmpfs tmpfs /run/systemd/nspawn; MOUNTED+=(/run/systemd/nspawn)
fi

# The IP camera, on the host (the container shares its network): Fashion-MNIST samples as MJPEG over HTTP;
# while $WORK/shared/freeze exists it holds the connection and sends nothing. It runs on the service's own
# environment, which install.sh made with OpenCV in it: the host's python3 has no cv2 on a fresh machine.
VENV_PY=/opt/edge-quq/venv/bin/python
PORT=$("$VENV_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$VENV_PY" - "$PORT" "$WORK/shared/freeze" "$SRC/edge_quq/data/samples" <<'EOF' &
import glob, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import cv2
port, freeze, samples = int(sys.argv[1]), sys.argv[2], sys.argv[3]
frames = [cv2.imencode(".jpg", cv2.resize(cv2.imread(f), (96, 96)))[1].tobytes() for f in sorted(glob.glob(samples + "/*.png"))]
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        i = 0
        try:
            while True:
                if os.path.exists(freeze):
                    time.sleep(0.05)
                    continue
                jpg = frames[i % len(frames)]
                i += 1
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg) + jpg + b"\r\n")
                time.sleep(0.04)
        except OSError:
            pass
s = ThreadingHTTPServer(("127.0.0.1", port), H)
s.daemon_threads = True
s.serve_forever()
EOF
SERVER_PID=$!

# What runs inside: a target that boots multi-user and then the check, which powers the container off.
cat > "$WORK/root/etc/systemd/system/edge-quq-nspawn-check.target" <<'EOF'
[Unit]
Description=edge-quq service check
Requires=multi-user.target edge-quq-nspawn-check.service
After=multi-user.target
AllowIsolate=yes
EOF
cat > "$WORK/root/etc/systemd/system/edge-quq-nspawn-check.service" <<'EOF'
[Unit]
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/nscheck/check.sh
StandardOutput=journal+console
StandardError=journal+console
ExecStopPost=/bin/systemctl --no-block poweroff
EOF
cat > "$WORK/shared/check.sh" <<EOF
#!/bin/bash
set -u
URL=http://127.0.0.1:$PORT/stream.mjpg
WATCHDOG_WAIT=$WATCHDOG_WAIT
EOF
cat >> "$WORK/shared/check.sh" <<'EOF'
R=/nscheck/result
say() { echo "CHECK: $*"; }
prop() { systemctl show -P "$1" edge-quq-camera; }
now() { date +%s.%N; }
# The service's own config, pointed at the test camera (the overlay keeps the host's file untouched).
sed -i '/^source *=/d; /^stats-interval *=/d' /etc/edge-quq/config
printf 'source = "%s"\nstats-interval = 1\n' "$URL" >> /etc/edge-quq/config
systemctl stop edge-quq-camera 2>/dev/null; systemctl reset-failed edge-quq-camera 2>/dev/null
t0=$(now)
systemctl start edge-quq-camera; rc=$?
t1=$(now)
echo "start_rc=$rc" > $R
echo "start_s=$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }")" >> $R
echo "active_after_start=$(prop ActiveState)/$(prop SubState)" >> $R
echo "watchdog_usec=$(prop WatchdogUSec)" >> $R
sleep 3
echo "status_text=$(prop StatusText)" >> $R
# A monitoring account as docs/deploy.md describes it: unprivileged, in group edge-quq (the stats file is 0640).
useradd --system --no-create-home --shell /usr/sbin/nologin -G edge-quq eqmonitor 2>/dev/null || true
echo "health=$(runuser -u eqmonitor -- /opt/edge-quq/venv/bin/edge-quq health 2>&1)" >> $R
restarts0=$(prop NRestarts)
pid0=$(prop MainPID)
touch /nscheck/freeze
tf=$(now)
restarted=no
for _ in $(seq 1 $((WATCHDOG_WAIT * 2))); do
  if [ "$(prop NRestarts)" -gt "$restarts0" ]; then restarted=yes; break; fi
  sleep 0.5
done
tr=$(now)
echo "restarted_after_freeze=$restarted" >> $R
echo "freeze_to_restart_s=$(awk "BEGIN { printf \"%.1f\", $tr - $tf }")" >> $R
echo "watchdog_timeout_logged=$(journalctl -u edge-quq-camera --no-pager | grep -c 'Watchdog timeout')" >> $R
echo "health_while_frozen=$(runuser -u eqmonitor -- /opt/edge-quq/venv/bin/edge-quq health --no-model 2>&1)" >> $R
rm -f /nscheck/freeze
for _ in $(seq 1 120); do
  [ "$(prop ActiveState)" = active ] && [ "$(prop MainPID)" != "$pid0" ] && break
  sleep 0.5
done
sleep 3
echo "active_after_unfreeze=$(prop ActiveState)/$(prop SubState)" >> $R
echo "health_after_unfreeze=$(runuser -u eqmonitor -- /opt/edge-quq/venv/bin/edge-quq health 2>&1)" >> $R
ts=$(now)
systemctl stop edge-quq-camera
te=$(now)
echo "stop_s=$(awk "BEGIN { printf \"%.1f\", $te - $ts }")" >> $R
echo "result_after_stop=$(prop Result)" >> $R
echo "stats_state_after_stop=$(python3 -c 'import json; print(json.load(open("/var/lib/edge-quq/stats.json")).get("state"))' 2>&1)" >> $R
journalctl -u edge-quq-camera --no-pager -o short-monotonic > /nscheck/journal.txt
say done
EOF
chmod +x "$WORK/shared/check.sh"

echo "booting the container (the journal of the run goes to $WORK/shared/journal.txt) ..."
start=$(date +%s)
timeout 600 systemd-nspawn -q --keep-unit --register=no --link-journal=no --bind="$WORK/shared:/nscheck" \
  -D "$WORK/root" -b -- systemd.unit=edge-quq-nspawn-check.target > "$WORK/console.log" 2>&1 || true
end=$(date +%s)
[ -f "$WORK/shared/result" ] || { tail -40 "$WORK/console.log"; die "the check did not run to the end"; }

cat "$WORK/shared/result"
fail=0
grep -qx 'start_rc=0' "$WORK/shared/result" || fail=1
grep -qx 'active_after_start=active/running' "$WORK/shared/result" || fail=1
grep -q '^health=healthy' "$WORK/shared/result" || fail=1
grep -qx 'restarted_after_freeze=yes' "$WORK/shared/result" || fail=1
grep -qx 'active_after_unfreeze=active/running' "$WORK/shared/result" || fail=1
grep -qx 'result_after_stop=success' "$WORK/shared/result" || fail=1
grep -qx 'stats_state_after_stop=stopped' "$WORK/shared/result" || fail=1

if [ -n "$REPORT" ]; then
  {
    echo "# edge-quq-camera.service under systemd (nspawn check)"
    echo
    echo "Produced by \`deploy/nspawn-check.sh --report\` on $(date -u +%Y-%m-%dT%H:%MZ), $(systemd-nspawn --version | head -1),"
    echo "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end, whole run $((end - start)) s."
    echo "The unit is the installed one, unchanged; the camera is an HTTP MJPEG stream on the host (25 fps, 96x96)."
    echo
    echo "| check | value |"
    echo "|---|---|"
    sed -e 's/|/\\|/g' -e 's/^\([^=]*\)=\(.*\)$/| \1 | \2 |/' "$WORK/shared/result"
    echo
    echo "Verdict: $([ $fail -eq 0 ] && echo PASS || echo FAIL)"
    echo
    echo "## Journal of the service in the container"
    echo
    echo '```'
    grep -v '^-- ' "$WORK/shared/journal.txt" | tail -60
    echo '```'
  } > "$REPORT"
  echo "report: $REPORT"
fi
if [ $fail -ne 0 ]; then
  echo "FAIL"
  exit 1
fi
echo "PASS"
