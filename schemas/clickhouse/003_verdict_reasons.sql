-- Every detector's finding behind every verdict, with the numbers (fired = caused the HOLD).
CREATE TABLE IF NOT EXISTS verdict_reasons
(
    order_id       String,
    purchaser_dea  LowCardinality(String),
    decided_at     DateTime64(3, 'UTC'),
    verdict        LowCardinality(String),
    detector       LowCardinality(String),
    dimension      LowCardinality(String),
    drug_family    LowCardinality(String),
    value          Float64,
    baseline       Float64,
    threshold      Float64,
    window         String,
    fired          Bool,
    explanation    String,
    ingested_at    DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(decided_at)
ORDER BY (purchaser_dea, order_id, detector, drug_family)
SETTINGS non_replicated_deduplication_window = 10000
