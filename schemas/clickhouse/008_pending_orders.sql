-- Orders parked because reference data was missing (no current CRL, unknown registrant or product).
-- A parked order is not filled; its final outcome later appears in verdicts or rejections.
CREATE TABLE IF NOT EXISTS pending_orders
(
    order_id       String,
    received_at    DateTime64(3, 'UTC'),
    parked_at      DateTime64(3, 'UTC'),
    reason_code    LowCardinality(String),
    reason         String,
    order_number   Nullable(String),
    purchaser_dea  Nullable(String),
    ingested_at    DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (order_id)
SETTINGS non_replicated_deduplication_window = 10000
