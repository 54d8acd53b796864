-- One row per line of every verified order. Re-delivered batches collapse on the sorting key.
CREATE TABLE IF NOT EXISTS order_lines
(
    order_id          String,
    order_number      String,
    purchaser_dea     LowCardinality(String),
    purchaser_name    String,
    supplier_dea      LowCardinality(String),
    signed_at         DateTime64(3, 'UTC'),
    received_at       DateTime64(3, 'UTC'),
    verified_at       DateTime64(3, 'UTC'),
    signer_serial     String,
    line_no           UInt16,
    ndc               String,
    product_name      String,
    strength          String,
    package_quantity  UInt32,
    packages          UInt32,
    dosage_units      UInt64,
    schedule          LowCardinality(String),
    drug_family       LowCardinality(String),
    base_weight_g     Float64,
    mme               Float64,
    ingested_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (purchaser_dea, order_id, line_no)
SETTINGS non_replicated_deduplication_window = 10000
