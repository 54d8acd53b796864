-- The key that sealed each audit row (connectors/clickhouse/audit_chain.py): with CSOS_AUDIT_KEY set the sink seals with
-- HMAC-SHA256(key, prev_hash || canonical(...)) and stores the key's id here, the first 16 hex digits of
-- SHA-256(fixed label || key): a fingerprint that names the key, never the key. '' = plain SHA-256 seal
-- (no key configured, or rows sealed before keys). `csos audit verify` checks each row with the key it names.
ALTER TABLE audit_events ADD COLUMN IF NOT EXISTS key_id LowCardinality(String) DEFAULT ''
