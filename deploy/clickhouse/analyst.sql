-- Read-only access for compliance analysts on a ClickHouse server (the embedded
-- engine has no users; there `csos sql` enforces readonly=1 on every query).
-- Run as an administrator; set the password from your secret store, not here.
CREATE DATABASE IF NOT EXISTS csos;
CREATE ROLE IF NOT EXISTS csos_analyst;
GRANT SELECT ON csos.* TO csos_analyst;
CREATE SETTINGS PROFILE IF NOT EXISTS csos_readonly SETTINGS readonly = 2 TO csos_analyst;
-- CREATE USER analyst IDENTIFIED WITH sha256_password BY '<from your secret store>' DEFAULT ROLE csos_analyst;
