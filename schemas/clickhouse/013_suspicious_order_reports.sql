-- Suspicious order reports for DEA (som.reports), one row per order line. Kept at least two years.
CREATE TABLE IF NOT EXISTS suspicious_order_reports
(
    report_id                 String,
    order_id                  String,
    transaction_id            String,
    order_form_number         String,
    ordering_registrant_dea   LowCardinality(String),
    ordering_registrant_name  String,
    reporting_registrant_dea  LowCardinality(String),
    date_received             DateTime64(3, 'UTC'),
    reported_at               DateTime64(3, 'UTC'),
    reported_by               String,
    circumstances             String,
    line_no                   UInt32,
    ndc                       String,
    product_name              String,
    strength                  String,
    unit                      String,
    package_quantity          UInt32,
    quantity                  UInt32,
    dosage_units              UInt64,
    drug_family               LowCardinality(String),
    schedule                  LowCardinality(String),
    ingested_at               DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(reported_at)
ORDER BY (order_id, line_no)
SETTINGS non_replicated_deduplication_window = 10000
