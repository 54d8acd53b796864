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
