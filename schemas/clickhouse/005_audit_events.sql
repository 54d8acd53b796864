-- Every step the system took. Kept at least two years (no TTL deletes them earlier).
CREATE TABLE IF NOT EXISTS audit_events
(
    event_id       String,
    occurred_at    DateTime64(3, 'UTC'),
    stage          LowCardinality(String),
    action         LowCardinality(String),
    order_id       Nullable(String),
    purchaser_dea  Nullable(String),
    outcome        LowCardinality(String),
    detail         String,
    actor          LowCardinality(String),
    ingested_at    DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (toDate(occurred_at), event_id)
SETTINGS non_replicated_deduplication_window = 10000
