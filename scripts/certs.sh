#!/usr/bin/env bash
# Throwaway certificates for the tests (TLS to PostgreSQL, the broker's TLS listener), with the
# openssl command:
#   certs.sh ca DIR NAME                 DIR/NAME.crt and DIR/NAME.key: a CA
#   certs.sh cert DIR CA NAME            DIR/NAME.crt and DIR/NAME.key: a certificate for
#                                        127.0.0.1 and localhost, signed by DIR/CA
# Nothing here is for production.
set -euo pipefail

case "${1:-}" in
  ca)
    dir=$2 name=$3
    mkdir -p "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=$name" \
      -keyout "$dir/$name.key" -out "$dir/$name.crt" 2>/dev/null
    ;;
  cert)
    dir=$2 ca=$3 name=$4
    openssl req -newkey rsa:2048 -nodes -subj /CN=localhost \
      -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' >"$dir/$name.ext"
    openssl x509 -req -days 3650 -in "$dir/$name.csr" -CA "$dir/$ca.crt" -CAkey "$dir/$ca.key" \
      -CAcreateserial -extfile "$dir/$name.ext" -out "$dir/$name.crt" 2>/dev/null
    rm "$dir/$name.csr" "$dir/$name.ext"
    ;;
  *)
    echo "usage: certs.sh ca DIR NAME | certs.sh cert DIR CA NAME" >&2
    exit 2
    ;;
esac
