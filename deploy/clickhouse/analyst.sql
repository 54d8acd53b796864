-- Read-only access for compliance analysts (the review page, `csos sql`) on a ClickHouse server.
-- Run as an administrator (in deploy/compose.yaml: first, by the image's init scripts); then
-- analyst-user.sh creates the login `analyst` with its password from CLICKHOUSE_ANALYST_PASSWORD.
-- (The embedded engine has no users: there the pipeline itself sets the same limits and readonly=1
-- on the analysts' session, and refuses anything but one SELECT before the engine sees it.)
--
-- readonly = 1, not 2: with 2 a query may change settings and use table functions such as file()
-- and url(). readonly = 1 also fixes every limit below: a query's own SETTINGS clause is refused.
-- The role grants SELECT on the pipeline's tables only: no INSERT, no DDL, no SYSTEM/KILL, no
-- sources (FILE, URL, S3, REMOTE, ...), so INTO OUTFILE and table functions stay out on the server.
-- Keep the limits in step with CSOS_SQL_MAX_SECONDS / _MEMORY_MB / _ROWS (README, configuration).
CREATE DATABASE IF NOT EXISTS csos;
CREATE ROLE IF NOT EXISTS csos_analyst;
GRANT SELECT ON csos.* TO csos_analyst;
CREATE SETTINGS PROFILE IF NOT EXISTS csos_readonly SETTINGS
    readonly = 1,
    -- CHANGEABLE_IN_READONLY with MAX 60: a client may lower it, never raise it. Grafana's ClickHouse
    -- plugin sets it on every query and fails under readonly=1 otherwise (needs constraints.xml).
    max_execution_time = 60 MAX 60 CHANGEABLE_IN_READONLY,
    max_memory_usage = 2147483648,
    max_result_rows = 1000000,
    result_overflow_mode = 'throw',
    allow_ddl = 0,
    allow_introspection_functions = 0
    TO csos_analyst;
