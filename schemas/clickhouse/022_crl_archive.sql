-- Every certificate revocation list published to the pipeline (pki.crl), exactly as issued: the revocation
-- evidence behind each decision. An archived order (007) re-verifies offline only against the CRLs that were
-- current when it was decided (a later CRL that lists the certificate would reject it whatever the date);
-- `csos archive export` writes those beside the order, from here (streams/apps/archive.py).
--
-- crl_der       the CRL's DER as published. Not re-verified here: the workers verify every CRL's signature
--               before using it, and an offline re-verification does so again; a refused (forged) CRL is kept
--               too, as the record of what was published.
-- published_at  when it was published to the pipeline (`csos crl publish`): what the workers could know.
--
-- Retention: a CRL is current until its nextUpdate at the latest, and an order is kept 2 years and 90 days
-- from receipt (007), so a CRL is kept 2 years and 90 days from its nextUpdate (from its publication if it
-- has none).
CREATE TABLE IF NOT EXISTS crl_archive
(
    crl_sha256    String,
    issuer        String,
    this_update   DateTime64(3, 'UTC'),
    next_update   Nullable(DateTime64(3, 'UTC')),
    published_at  DateTime64(3, 'UTC'),
    source        String,
    crl_der       String,
    archived_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (issuer, published_at, crl_sha256)
TTL toDateTime(coalesce(next_update, published_at)) + INTERVAL 2 YEAR + INTERVAL 90 DAY
SETTINGS non_replicated_deduplication_window = 10000
