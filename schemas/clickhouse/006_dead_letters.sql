-- Messages that could not be decoded or processed, kept whole (base64) with the reason.
CREATE TABLE IF NOT EXISTS dead_letters
(
    dead_letter_id    String,
    failed_at         DateTime64(3, 'UTC'),
    stage             LowCardinality(String),
    source_topic      LowCardinality(String),
    source_partition  Int32,
    source_offset     Int64,
    reason            String,
    payload_base64    String,
    ingested_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(failed_at)
ORDER BY (source_topic, source_partition, source_offset, dead_letter_id)
SETTINGS non_replicated_deduplication_window = 10000
