#!/usr/bin/env bash
# A throwaway Mosquitto (Debian's `mosquitto`) for `make proxy`, configured under target/mosquitto,
# on loopback only.
#   scripts/mosquitto.sh up     write its configuration and start it in the background
#   scripts/mosquitto.sh down   stop it
# MOSQUITTO_PORT (default 1885) picks the port. Anonymous clients may connect; no persistence; no
# limit on queued messages (at its default of 1000 Mosquitto drops QoS 1/2 messages silently).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
port=${MOSQUITTO_PORT:-1885}
base="$root/target/mosquitto"
conf="$base/mosquitto.conf"

binary=$(command -v mosquitto || ls /usr/sbin/mosquitto 2>/dev/null || true)
if [ -z "$binary" ]; then
  echo "mosquitto.sh: mosquitto not found; install it: apt-get install mosquitto (make prerequisites does)" >&2
  exit 1
fi

running() { pgrep -f "mosquitto -c $conf" >/dev/null; }

case "${1:-}" in
  up)
    if running; then
      echo "mosquitto.sh: already running on 127.0.0.1:$port"
      exit 0
    fi
    mkdir -p "$base"
    cat >"$conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 0
set_tcp_nodelay true
log_dest file $base/mosquitto.log
CONF
    # As root, Mosquitto runs as the user `mosquitto`: it must be able to write its log.
    touch "$base/mosquitto.log"
    if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then chown mosquitto "$base/mosquitto.log"; fi
    "$binary" -c "$conf" -d
    for _ in $(seq 50); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "mosquitto.sh: Mosquitto listening on 127.0.0.1:$port (log: $base/mosquitto.log)"
        exit 0
      fi
      sleep 0.1
    done
    echo "mosquitto.sh: Mosquitto did not start; see $base/mosquitto.log" >&2
    exit 1
    ;;
  down)
    pkill -f "mosquitto -c $conf" || true
    ;;
  *)
    echo "usage: scripts/mosquitto.sh up|down" >&2
    exit 2
    ;;
esac
