#!/usr/bin/env bash
# A throwaway PostgreSQL cluster under target/pg, on loopback only.
#   scripts/pg.sh up     initdb (once) and start; create the `mqtt` database
#   scripts/pg.sh down   stop
#   scripts/pg.sh fresh  drop and recreate the `mqtt` database (make run's demo starts clean)
#   scripts/pg.sh restart  pg_ctl restart (the failure tests use it on a cluster of their own)
# PG_BASE (default target/pg) picks the cluster's directory.
# PGPORT (default 15432, below the ephemeral range) picks the port. TLS is on, with a throwaway CA
# in target/pg/tls/ca.crt (made with the openssl command). Works as root (the server
# runs as the unprivileged `postgres` user, created if missing) and as a normal user.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
port=${PGPORT:-15432}
base="${PG_BASE:-$root/target/pg}"
data="$base/data"
sock="$base/sock"
tls="$base/tls"
server_options="-c listen_addresses=127.0.0.1 -p $port -k $sock -c max_connections=200 \
  -c ssl=on -c ssl_cert_file=$tls/server.crt -c ssl_key_file=$tls/server.key"

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  echo "pg.sh: PostgreSQL server binaries not found under /usr/lib/postgresql; install them: apt-get install postgresql" >&2
  exit 1
fi

# As root, run the server as `postgres`: initdb refuses root.
as_server() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
  up)
    mkdir -p "$base"
    if [ "$(id -u)" = 0 ]; then
      id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
      install -d -o postgres -g postgres -m 700 "$data"
      install -d -o postgres -g postgres -m 755 "$sock"
    else
      install -d -m 700 "$data"
      install -d -m 755 "$sock"
    fi
    if [ ! -f "$data/PG_VERSION" ]; then
      as_server "$bindir/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$base/initdb.log"
    fi
    # TLS for the tests of `ssl = true` pools: a throwaway CA and a server certificate for 127.0.0.1.
    if [ ! -f "$tls/server.key" ]; then
      "$root/scripts/certs.sh" ca "$tls" ca
      "$root/scripts/certs.sh" cert "$tls" ca server
      chmod 600 "$tls/server.key"
      [ "$(id -u)" = 0 ] && chown postgres:postgres "$tls/server.key" "$tls/server.crt"
    fi
    if ! as_server "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
      if ! as_server "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 -o "$server_options" start >/dev/null; then
        echo "pg.sh: PostgreSQL did not start on 127.0.0.1:$port; the end of $data/server.log:" >&2
        tail -n 5 "$data/server.log" >&2
        exit 1
      fi
    fi
    "$bindir/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAq -v ON_ERROR_STOP=1 \
      -c "SELECT 1 FROM pg_database WHERE datname = 'mqtt'" | grep -q 1 \
      || "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres mqtt
    echo "PostgreSQL up on 127.0.0.1:$port (data in $data)"
    ;;
  fresh)
    "$bindir/dropdb" -h 127.0.0.1 -p "$port" -U postgres --if-exists --force mqtt
    "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres mqtt
    ;;
  restart)
    as_server "$bindir/pg_ctl" -D "$data" -m fast -w -t 60 -o "$server_options" restart >/dev/null
    ;;
  down)
    if [ -f "$data/PG_VERSION" ]; then
      as_server "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    echo "PostgreSQL down"
    ;;
  *)
    echo "usage: $0 up|down|fresh|restart" >&2
    exit 2
    ;;
esac
