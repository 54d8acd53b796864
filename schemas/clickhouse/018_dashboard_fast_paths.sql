-- The fill report's status (FILL_REPORT_STATUS in streams/apps/review/dashboard_sql.py) checks every shipped line
-- of 14 days against the orders released in the 74 days before: this table holds just those, so the check reads
-- one narrow column instead of three columns of every verdict (measured with `csos bench-dashboards`, README,
-- Performance > Dashboards). Kept by a materialized view on verdicts. Existing releases are copied once, when
-- the table is still empty (a store upgraded to this version: without them the report would call orders released
-- before the upgrade NOT_RELEASED); on a new store that copy is a no-op and the view does the rest.

-- The orders the monitor released, by the day received: the fill report checks each shipped line against the
-- releases of the 74 days before (one narrow column here, against three columns of every verdict). A duplicate
-- row (a redelivered verdict) changes nothing: the report only asks whether an order is in the set.
CREATE TABLE IF NOT EXISTS dash_released_orders
(
    received_day  Date,
    order_id      String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(received_day)
ORDER BY (received_day, order_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS dash_released_orders_mv TO dash_released_orders AS
SELECT toDate(received_at) AS received_day, order_id
FROM verdicts
WHERE verdict = 'RELEASE';

INSERT INTO dash_released_orders
SELECT toDate(received_at) AS received_day, order_id
FROM verdicts
WHERE verdict = 'RELEASE' AND (SELECT count() FROM dash_released_orders) = 0
;

-- The growth ranking (GROWTH) reads each registrant's weeks of a range: 52 rows per registrant and family for a
-- year in dash_registrant_week, all of whose granules it must read (that table is sorted by registrant first). Here
-- the same sums are kept twice, per week (weeks = 1) and per block of 4 weeks (weeks = 4: 28 days from a Monday,
-- blocks aligned on Monday 1970-01-05), sorted by grain and week first, so the ranking reads whole blocks for the
-- middle of its baseline and single weeks only at its ends and for the recent weeks: ~20 rows per registrant and
-- family for a year, and only those granules. Filled from dash_registrant_week by two views on it (a row inserted
-- there, by the sink's view or by a backfill, reaches this table too), and copied once from it when empty.
CREATE TABLE IF NOT EXISTS dash_growth
(
    weeks              UInt8,
    week               Date,
    purchaser_dea      LowCardinality(String),
    drug_family        LowCardinality(String),
    business_activity  LowCardinality(String),
    purchaser_state    LowCardinality(String),
    dosage_units       UInt64,
    mme                Float64
)
ENGINE = SummingMergeTree((dosage_units, mme))
PARTITION BY toYear(week)
ORDER BY (weeks, week, purchaser_dea, drug_family, business_activity, purchaser_state);

CREATE MATERIALIZED VIEW IF NOT EXISTS dash_growth_week_mv TO dash_growth AS
SELECT toUInt8(1) AS weeks, week, purchaser_dea, drug_family, business_activity, purchaser_state, dosage_units, mme
FROM dash_registrant_week;

CREATE MATERIALIZED VIEW IF NOT EXISTS dash_growth_block_mv TO dash_growth AS
SELECT toUInt8(4) AS weeks, block AS week, purchaser_dea, drug_family, business_activity, purchaser_state,
       dosage_units, mme
FROM
(
    SELECT week - (toUInt32(week) - 4) % 28 AS block, purchaser_dea, drug_family, business_activity, purchaser_state,
           dosage_units, mme
    FROM dash_registrant_week
);

INSERT INTO dash_growth
SELECT g AS weeks, if(g = 1, w, w - (toUInt32(w) - 4) % 28) AS week, purchaser_dea, drug_family, business_activity,
       purchaser_state, dosage_units, mme
FROM (SELECT week AS w, purchaser_dea, drug_family, business_activity, purchaser_state, dosage_units, mme
      FROM dash_registrant_week)
ARRAY JOIN [toUInt8(1), toUInt8(4)] AS g
WHERE (SELECT count() FROM dash_growth) = 0
