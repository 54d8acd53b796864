#!/bin/bash
# The analysts' login, read-only through the csos_analyst role and csos_readonly profile (analyst.sql,
# which runs first). Run by the clickhouse-server image's init scripts; the password comes from
# CLICKHOUSE_ANALYST_PASSWORD and only its SHA-256 reaches ClickHouse (no quoting issues, not logged).
set -euo pipefail
: "${CLICKHOUSE_ANALYST_PASSWORD:?set CLICKHOUSE_ANALYST_PASSWORD}"
hash=$(printf '%s' "$CLICKHOUSE_ANALYST_PASSWORD" | sha256sum | cut -d' ' -f1)
clickhouse client --host 127.0.0.1 --user "${CLICKHOUSE_USER:-default}" --password "${CLICKHOUSE_PASSWORD:-}" \
    --query "CREATE USER IF NOT EXISTS analyst IDENTIFIED WITH sha256_hash BY '${hash}' DEFAULT ROLE csos_analyst SETTINGS PROFILE 'csos_readonly'"
