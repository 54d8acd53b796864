-- Every step of every due-diligence case (som.cases): opened, escalated, released, reported, cancelled, refused.
CREATE TABLE IF NOT EXISTS case_events
(
    event_id            String,
    order_id            String,
    order_number        String,
    purchaser_dea       LowCardinality(String),
    kind                LowCardinality(String),
    status              LowCardinality(String),
    version             UInt64,
    at                  DateTime64(3, 'UTC'),
    held_at             DateTime64(3, 'UTC'),
    due_at              DateTime64(3, 'UTC'),
    escalated_at        Nullable(DateTime64(3, 'UTC')),
    actor               LowCardinality(String),
    decision_id         Nullable(String),
    rationale           String,
    evidence_notes      String,
    error               String,
    summary             String,
    drug_families       Array(LowCardinality(String)),
    total_dosage_units  UInt64,
    ingested_at         DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(held_at)
ORDER BY (order_id, event_id)
SETTINGS non_replicated_deduplication_window = 10000
