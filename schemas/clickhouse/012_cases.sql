-- The current state of every due-diligence case: the latest version wins (query with FINAL).
CREATE TABLE IF NOT EXISTS cases
(
    order_id            String,
    order_number        String,
    purchaser_dea       LowCardinality(String),
    status              LowCardinality(String),
    version             UInt64,
    updated_at          DateTime64(3, 'UTC'),
    held_at             DateTime64(3, 'UTC'),
    due_at              DateTime64(3, 'UTC'),
    escalated_at        Nullable(DateTime64(3, 'UTC')),
    decided_by          String,
    decision_id         Nullable(String),
    rationale           String,
    evidence_notes      String,
    summary             String,
    drug_families       Array(LowCardinality(String)),
    total_dosage_units  UInt64,
    ingested_at         DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY order_id
SETTINGS non_replicated_deduplication_window = 10000
