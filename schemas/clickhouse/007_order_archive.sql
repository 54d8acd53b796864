-- Archive of every received order, accepted or rejected (21 CFR 1311.55(c)(11), 1305.27, 1311.60):
-- the exact bytes received, the CMS signature and every certificate it carried, kept at least two years.
--
-- document      the order bytes exactly as received; NULL when the signature is attached (the CMS carries
--               the content). Nullable, not '' : a detached signature with an empty document is a
--               different message from an attached one, and re-verification must see exactly what arrived.
--               ClickHouse String holds arbitrary bytes; clickhouse-connect inserts Python bytes as-is
--               and returns them as bytes with column_formats={'document': 'bytes'} (tests/unit/test_archive.py).
-- signature     the DER CMS SignedData as received.
-- certificates  DER of every certificate in the CMS, the signer's first when it could be identified;
--               empty when the signature is unreadable (the signature bytes are still kept).
-- order_number, purchaser_dea  best effort from the signed content, for lookup; NULL when unparsable.
--
-- Retention: 2 years (1305.27) run from the last record linked to the order. An order may be filled,
-- in parts, until 60 days after signing (1305.22(e)), and it is signed before it is received, so the
-- last linked record is at most 60 days after receipt: 2 years + 90 days after receipt covers it with
-- 30 days to spare. Rows are dropped only when a whole monthly partition has expired
-- (ttl_only_drop_parts). For a legal hold: SYSTEM STOP TTL MERGES order_archive, or ALTER ... MODIFY TTL.
CREATE TABLE IF NOT EXISTS order_archive
(
    order_id            String,
    received_at         DateTime64(3, 'UTC'),
    source              LowCardinality(String),
    format              LowCardinality(String),
    document            Nullable(String),
    signature           String,
    certificates        Array(String),
    signer_fingerprint  String,
    order_number        Nullable(String),
    purchaser_dea       Nullable(String),
    archived_at         DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX idx_order_number order_number TYPE bloom_filter GRANULARITY 4,
    INDEX idx_purchaser_dea purchaser_dea TYPE bloom_filter GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (order_id)
TTL toDateTime(received_at) + INTERVAL 2 YEAR + INTERVAL 90 DAY
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1
