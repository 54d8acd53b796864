-- The monitor's decision on every verified order.
CREATE TABLE IF NOT EXISTS verdicts
(
    order_id            String,
    order_number        String,
    purchaser_dea       LowCardinality(String),
    verdict             LowCardinality(String),
    decided_at          DateTime64(3, 'UTC'),
    received_at         DateTime64(3, 'UTC'),
    signed_at           DateTime64(3, 'UTC'),
    model_version       LowCardinality(String),
    total_dosage_units  UInt64,
    fired_detectors     Array(LowCardinality(String)),
    summary             String,
    ingested_at         DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (purchaser_dea, order_id)
SETTINGS non_replicated_deduplication_window = 10000
