#!/usr/bin/env bash
# A PostgreSQL server on localhost for the store tests; sets QD_TEST_POSTGRES_URL.
#
#   source .ci/start-postgres.sh     # exports QD_TEST_POSTGRES_URL in this shell
#   eval "$(bash .ci/start-postgres.sh | tail -n 1)"
#
# Idempotent: installs Debian's postgresql package only when it is missing, creates the cluster,
# role and database only when they are missing, and reuses a server that is already running.
# Meant for a Debian machine, as root (or a user with sudo). Settings, all optional:
# QD_PG_USER (qd), QD_PG_PASSWORD (qd), QD_PG_DB (qd_test), QD_PG_CLUSTER (main).
# It is safe to source from a script running under `set -euo pipefail`: it changes no shell option
# and, when sourced, returns instead of exiting.

_qd_pg_as_postgres() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        sudo -n -u postgres -- "$@"
    fi
}

_qd_pg_main() {
    local user="${QD_PG_USER:-qd}" password="${QD_PG_PASSWORD:-qd}" db="${QD_PG_DB:-qd_test}"
    local cluster="${QD_PG_CLUSTER:-main}" version port status i

    if ! command -v pg_lsclusters >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        echo "start-postgres: installing Debian's postgresql package" >&2
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2 || return 1
        else
            sudo -n apt-get update -qq >&2 && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2 || return 1
        fi
    fi
    version="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
    if [ -z "$version" ]; then
        echo "start-postgres: no server under /usr/lib/postgresql after installing postgresql" >&2
        return 1
    fi

    # The package usually creates the cluster; a minimal image or a removed one may not have it.
    if ! pg_lsclusters -h 2>/dev/null | awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c {found = 1} END {exit !found}'; then
        echo "start-postgres: creating cluster $version/$cluster" >&2
        pg_createcluster "$version" "$cluster" >&2 || return 1
    fi
    port="$(pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c {print $3}')"
    status="$(pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c {print $4}')"
    if [ "$status" != "online" ]; then
        echo "start-postgres: starting cluster $version/$cluster on port $port" >&2
        if [ "$(id -u)" = 0 ]; then
            pg_ctlcluster "$version" "$cluster" start >&2 || return 1
        else
            sudo -n pg_ctlcluster "$version" "$cluster" start >&2 || return 1
        fi
    fi
    for i in $(seq 1 60); do
        pg_isready -q -h 127.0.0.1 -p "$port" && break
        sleep 0.5
    done
    if ! pg_isready -q -h 127.0.0.1 -p "$port"; then
        echo "start-postgres: the server on port $port did not become ready in 30 s" >&2
        return 1
    fi

    if [ "$(_qd_pg_as_postgres psql -p "$port" -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$user'")" != 1 ]; then
        _qd_pg_as_postgres psql -q -p "$port" -c "CREATE ROLE \"$user\" LOGIN PASSWORD '$password'" >&2 || return 1
    else  # the password may have been changed since
        _qd_pg_as_postgres psql -q -p "$port" -c "ALTER ROLE \"$user\" LOGIN PASSWORD '$password'" >&2 || return 1
    fi
    if [ "$(_qd_pg_as_postgres psql -p "$port" -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]; then
        _qd_pg_as_postgres psql -q -p "$port" -c "CREATE DATABASE \"$db\" OWNER \"$user\"" >&2 || return 1
    fi

    QD_TEST_POSTGRES_URL="postgresql://$user:$password@127.0.0.1:$port/$db"
    export QD_TEST_POSTGRES_URL
    echo "start-postgres: ready: QD_TEST_POSTGRES_URL=$QD_TEST_POSTGRES_URL" >&2
    echo "export QD_TEST_POSTGRES_URL=$QD_TEST_POSTGRES_URL"
}

if (return 0 2>/dev/null); then  # sourced
    _qd_pg_main
    _qd_pg_rc=$?
    unset -f _qd_pg_main _qd_pg_as_postgres
    return "$_qd_pg_rc"
else
    _qd_pg_main
    exit $?
fi
