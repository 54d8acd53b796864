-- Aggregates behind the analysts' dashboards (streams/apps/review/dashboard_sql.py), kept up to date at insert time by
-- materialized views, so a dashboard reads thousands of rows per day instead of every order line.
--
-- Each view groups the inserted block by order first, then sums: an order's rows always arrive in one insert
-- block (one message -> one batch), so "orders" counts each order once per day and family. A block the server
-- drops as a retry (same insert_deduplication_token) is dropped by these tables too (019). A batch re-formed
-- differently after a crash (other tokens) would be counted twice here, where FINAL on the source collapses it:
-- so the sink never inserts it again (it skips what sink_progress, 018, says is stored; connectors/clickhouse/sink.py).
-- Rows stored before these tables existed are filled in once, when this file creates them, by
-- backfill/017_dashboard_aggregates.sql (run by apply_ddl; see README, Dashboards).

-- Orders, dosage units and MME per day, drug family and peer group (business activity, state): the volume charts
-- and the filters' choices. At most days x families x activities x states rows, whatever the number of orders.
CREATE TABLE IF NOT EXISTS dash_volume_day
(
    day                Date,
    drug_family        LowCardinality(String),
    business_activity  LowCardinality(String),
    purchaser_state    LowCardinality(String),
    orders             UInt64,
    lines              UInt64,
    dosage_units       UInt64,
    mme                Float64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, drug_family, business_activity, purchaser_state);

CREATE MATERIALIZED VIEW IF NOT EXISTS dash_volume_day_mv TO dash_volume_day AS
SELECT day, drug_family, business_activity, purchaser_state,
       count() AS orders, sum(n) AS lines, sum(units) AS dosage_units, sum(m) AS mme
FROM
(
    SELECT toDate(received_at) AS day, drug_family, any(business_activity) AS business_activity,
           any(purchaser_state) AS purchaser_state, count() AS n, sum(dosage_units) AS units, sum(mme) AS m
    FROM order_lines
    GROUP BY order_id, day, drug_family
)
GROUP BY day, drug_family, business_activity, purchaser_state;

-- The same per registrant and week (Monday): growth against its own history and its peers, and the registrant
-- page's totals. Weekly, because a registrant orders a few times a week: daily rows would be nearly one per order.
CREATE TABLE IF NOT EXISTS dash_registrant_week
(
    week               Date,
    purchaser_dea      LowCardinality(String),
    drug_family        LowCardinality(String),
    business_activity  LowCardinality(String),
    purchaser_state    LowCardinality(String),
    orders             UInt64,
    lines              UInt64,
    dosage_units       UInt64,
    mme                Float64
)
ENGINE = SummingMergeTree
PARTITION BY toYear(week)
ORDER BY (purchaser_dea, drug_family, week, business_activity, purchaser_state);

CREATE MATERIALIZED VIEW IF NOT EXISTS dash_registrant_week_mv TO dash_registrant_week AS
SELECT week, purchaser_dea, drug_family, business_activity, purchaser_state,
       count() AS orders, sum(n) AS lines, sum(units) AS dosage_units, sum(m) AS mme
FROM
(
    SELECT toMonday(received_at) AS week, purchaser_dea, drug_family, any(business_activity) AS business_activity,
           any(purchaser_state) AS purchaser_state, count() AS n, sum(dosage_units) AS units, sum(mme) AS m
    FROM order_lines
    GROUP BY order_id, week, purchaser_dea, drug_family
)
GROUP BY week, purchaser_dea, drug_family, business_activity, purchaser_state;

-- Orders per day, verdict and drug family (families the monitor recorded a finding for: every family of an order
-- when all detectors are recorded, SOM_RECORD_ALL=1, the default), and holds per detector that decided them.
CREATE TABLE IF NOT EXISTS dash_verdict_day
(
    day          Date,
    verdict      LowCardinality(String),
    drug_family  LowCardinality(String),
    detector     LowCardinality(String),
    orders       UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, verdict, drug_family, detector);

-- From the findings (drug_family != ""): detector "" rows count orders per verdict and family; detector "x" rows
-- count held orders whose finding by x for that family decided the hold.
CREATE MATERIALIZED VIEW IF NOT EXISTS dash_verdict_day_mv TO dash_verdict_day AS
SELECT day, verdict, drug_family, detector, count() AS orders
FROM
(
    SELECT toDate(decided_at) AS day, verdict, drug_family,
           arrayJoin(arrayPushFront(groupUniqArrayIf(toString(detector), fired AND enforced), '')) AS detector
    FROM verdict_reasons
    WHERE drug_family != ''
    GROUP BY order_id, day, verdict, drug_family
)
GROUP BY day, verdict, drug_family, detector
;

-- Orders per day and verdict, whatever their families (drug_family = '', detector = ''): one row per verdict.
CREATE MATERIALIZED VIEW IF NOT EXISTS dash_verdict_total_mv TO dash_verdict_day AS
SELECT toDate(decided_at) AS day, verdict, '' AS drug_family, '' AS detector, count() AS orders
FROM verdicts
GROUP BY day, verdict
