#!/usr/bin/env bash
# A real-browser check of `excitation app`: serve the page on a free loopback port, load it in
# headless Chromium, and save a screenshot (default docs/images/app.png).  Not part of CI.
#
# Usage (from the repository root, with the venv active; Chromium from Debian:
#   apt-get update && apt-get install -y chromium):
#   benchmarks/app_screenshot.sh [OUT.png] [excitation app options, e.g. --model resnet18 --weights-file W]
#
# The page opens with its first example already explained; --virtual-time-budget lets the
# page's scripts run (and that first request finish) before the screenshot is taken.
# Chromium's flags keep it offline and stateless: no sandbox (runs as root in a container),
# no GPU, no QUIC, no first-run, background, component-update or sync traffic, a throw-away profile.
set -euo pipefail

out=${1:-docs/images/app.png}
[ $# -gt 0 ] && shift
mkdir -p "$(dirname "$out")"
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
profile=$(mktemp -d)

python -m excitation.cli app --host 127.0.0.1 --port "$port" "$@" >"$log" 2>&1 &
server=$!
cleanup() {
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -rf "$profile"
}
trap cleanup EXIT

for _ in $(seq 180); do
    if curl -sf "http://127.0.0.1:$port/" >/dev/null; then break; fi
    if ! kill -0 "$server" 2>/dev/null; then echo "the app did not start:"; cat "$log"; exit 1; fi
    sleep 1
done
curl -sf "http://127.0.0.1:$port/" >/dev/null || { echo "no answer on port $port:"; cat "$log"; exit 1; }

chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
    --virtual-time-budget=60000 --window-size=1400,1000 --screenshot="$out" "http://127.0.0.1:$port/"
echo "wrote $out"
