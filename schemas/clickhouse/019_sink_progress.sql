-- How far the sink has stored each topic partition: the highest offset whose rows are in every table.
-- Written by the sink after a batch's inserts succeed and before it commits the offsets to Kafka; read when it
-- (re)starts or is assigned partitions. A batch re-read after a crash between the two (at-least-once delivery,
-- re-formed with more or fewer messages, so with other deduplication tokens) is then skipped up to this offset
-- instead of being inserted again: the dashboards' aggregates (017), which cannot collapse a copy, count it once.
CREATE TABLE IF NOT EXISTS sink_progress
(
    topic         LowCardinality(String),
    partition     UInt32,
    stored_offset Int64,
    stored_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(stored_offset)
ORDER BY (topic, partition)
