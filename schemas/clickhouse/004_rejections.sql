-- Orders that failed verification, with every check made and its result.
CREATE TABLE IF NOT EXISTS rejections
(
    order_id        String,
    received_at     DateTime64(3, 'UTC'),
    rejected_at     DateTime64(3, 'UTC'),
    reason_code     LowCardinality(String),
    reason          String,
    order_number    Nullable(String),
    purchaser_dea   Nullable(String),
    signer_subject  Nullable(String),
    checks          Array(Tuple(check String, passed Bool, detail String)),
    ingested_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (order_id)
SETTINGS non_replicated_deduplication_window = 10000
