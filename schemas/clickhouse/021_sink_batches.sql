-- The batch the sink is writing: each topic partition's offset range, recorded before the batch's first insert.
-- A sink killed between that insert and the batch's sink_progress record (019) leaves some tables written and
-- others not. Restarted (or given those partitions), it reads this record back, re-reads exactly those offsets
-- from Kafka and writes them again as the same batch: same runs, so the same insert_deduplication_tokens, and
-- every table and materialized view drops the copy it already has (connectors/clickhouse/progress.py). Without
-- it the batch would be re-formed with whatever Kafka delivered next, under new tokens, and the dashboards'
-- aggregates (017) would count the first inserts twice. One row per partition: its latest batch.
CREATE TABLE IF NOT EXISTS sink_batches
(
    topic            LowCardinality(String),
    partition        UInt32,
    batch_id         String,
    batch_partitions UInt32,
    first_offset     Int64,
    last_offset      Int64,
    begun_at         DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(last_offset)
ORDER BY (topic, partition)
