-- The audit trail's hash chain (connectors/clickhouse/audit_chain.py): one chain per partition of audit.events.
-- event_hash = SHA-256(prev_hash || canonical(chain, chain_seq, chain_offset, the event's fields)), hex;
-- chain_seq is dense per chain (0, 1, 2, ...), chain_offset the event's Kafka offset. Rows written before
-- chaining keep chain = '' (unsealed; `csos audit verify --allow-unsealed` accepts them).
-- The minmax index lets `csos audit verify`'s seq-range pages skip granules of other days (seq grows with time).
ALTER TABLE audit_events
    ADD COLUMN IF NOT EXISTS chain        LowCardinality(String) DEFAULT '',
    ADD COLUMN IF NOT EXISTS chain_seq    UInt64 DEFAULT 0,
    ADD COLUMN IF NOT EXISTS chain_offset Int64 DEFAULT -1,
    ADD COLUMN IF NOT EXISTS prev_hash    String DEFAULT '',
    ADD COLUMN IF NOT EXISTS event_hash   String DEFAULT '';
ALTER TABLE audit_events ADD INDEX IF NOT EXISTS audit_chain_seq chain_seq TYPE minmax GRANULARITY 1
