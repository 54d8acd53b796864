-- Run once, by apply_ddl (connectors/clickhouse/client.py), right after ../017_dashboard_aggregates.sql created the
-- aggregate tables: fills them from the rows stored before (an existing installation's history). {cut} is the
-- engine's clock read just before the views were created: rows ingested up to it are counted here, later ones by
-- the views. FINAL: a copy stored twice by an old re-delivery counts once. The same SELECTs as the views.
INSERT INTO dash_volume_day
SELECT day, drug_family, business_activity, purchaser_state,
       count() AS orders, sum(n) AS lines, sum(units) AS dosage_units, sum(m) AS mme
FROM
(
    SELECT toDate(received_at) AS day, drug_family, any(business_activity) AS business_activity,
           any(purchaser_state) AS purchaser_state, count() AS n, sum(dosage_units) AS units, sum(mme) AS m
    FROM order_lines FINAL
    WHERE ingested_at <= {cut}
    GROUP BY order_id, day, drug_family
)
GROUP BY day, drug_family, business_activity, purchaser_state;

INSERT INTO dash_registrant_week
SELECT week, purchaser_dea, drug_family, business_activity, purchaser_state,
       count() AS orders, sum(n) AS lines, sum(units) AS dosage_units, sum(m) AS mme
FROM
(
    SELECT toMonday(received_at) AS week, purchaser_dea, drug_family, any(business_activity) AS business_activity,
           any(purchaser_state) AS purchaser_state, count() AS n, sum(dosage_units) AS units, sum(mme) AS m
    FROM order_lines FINAL
    WHERE ingested_at <= {cut}
    GROUP BY order_id, week, purchaser_dea, drug_family
)
GROUP BY week, purchaser_dea, drug_family, business_activity, purchaser_state;

INSERT INTO dash_verdict_day
SELECT day, verdict, drug_family, detector, count() AS orders
FROM
(
    SELECT toDate(decided_at) AS day, verdict, drug_family,
           arrayJoin(arrayPushFront(groupUniqArrayIf(toString(detector), fired AND enforced), '')) AS detector
    FROM verdict_reasons FINAL
    WHERE drug_family != '' AND ingested_at <= {cut}
    GROUP BY order_id, day, verdict, drug_family
)
GROUP BY day, verdict, drug_family, detector;

INSERT INTO dash_verdict_day
SELECT toDate(decided_at) AS day, verdict, '' AS drug_family, '' AS detector, count() AS orders
FROM verdicts FINAL
WHERE ingested_at <= {cut}
GROUP BY day, verdict
