-- Shipment confirmations from the warehouse (warehouse.shipments), one row per shipped line: the CSOS fill report's source.
CREATE TABLE IF NOT EXISTS shipments
(
    shipment_id       String,
    order_id          String,
    order_number      String,
    purchaser_dea     LowCardinality(String),
    supplier_dea      LowCardinality(String),
    shipped_at        DateTime64(3, 'UTC'),
    line_no           UInt32,
    ndc               String,
    packages_shipped  UInt32,
    ingested_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(shipped_at)
ORDER BY (shipment_id, line_no)
SETTINGS non_replicated_deduplication_window = 10000
