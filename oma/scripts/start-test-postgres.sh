#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster for the OMA's tests and prints its URL.
#
#   oma/scripts/start-test-postgres.sh [DIR] [PORT]
#   export OMA_TEST_POSTGRES_URL=$(oma/scripts/start-test-postgres.sh /tmp/oma-pg 55432)
#
# Installs Debian's `postgresql` package when its binaries are missing, creates the cluster in
# DIR (default /tmp/oma-test-pg) unless one is there, and starts it on 127.0.0.1:PORT (default
# 55432) with trust authentication on loopback only. The server runs as the `postgres` user
# when invoked as root (PostgreSQL refuses to run as root). Idempotent: a running cluster is
# left running. Stop it with: pg_ctl -D DIR stop (as the same user).
set -euo pipefail

dir="${1:-/tmp/oma-test-pg}"
port="${2:-55432}"

find_bindir() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            echo "$d"
        fi
    done | sort -V | tail -n 1
}

bindir="$(find_bindir)"
if [ -z "$bindir" ]; then
    echo "start-test-postgres: installing postgresql from Debian's packages" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    bindir="$(find_bindir)"
fi
if [ -z "$bindir" ]; then
    echo "start-test-postgres: no initdb/pg_ctl found after installing postgresql" >&2
    exit 1
fi

run_as=()
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    run_as=(runuser -u postgres --)
fi

mkdir -p "$dir"
if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
chmod 700 "$dir"

if [ ! -f "$dir/PG_VERSION" ]; then
    "${run_as[@]}" "$bindir/initdb" -D "$dir" -U postgres --auth=trust --no-sync -E UTF8 >&2
fi

if ! "${run_as[@]}" "$bindir/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    "${run_as[@]}" "$bindir/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=200" \
        start >&2
fi

echo "postgres://postgres@127.0.0.1:$port/postgres"
