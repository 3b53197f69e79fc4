#!/usr/bin/env bash
# What `make run` and `make test` need, installed where missing; CI runs the same through them.
#   - the Rust target of the extension, wasm32-wasip2 (rustup);
#   - the PostgreSQL server binaries (the throwaway server), the openssl command (test
#     certificates), mosquitto (the broker behind the proxy, and mosquitto_passwd for test
#     password files) and mosquitto_sub/mosquitto_pub (a second MQTT client in the tests), from
#     Debian's packages when run as root; otherwise a line says what to install.
set -euo pipefail

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  if ! command -v rustup >/dev/null; then
    echo "prerequisites: rustup is missing: install Rust with rustup, then: rustup target add wasm32-wasip2" >&2
    exit 1
  fi
  rustup target add wasm32-wasip2
fi

missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v openssl >/dev/null || missing+=(openssl)
command -v mosquitto_passwd >/dev/null || missing+=(mosquitto)
command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "prerequisites: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "prerequisites: missing ${missing[*]}: install them (Debian: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi
