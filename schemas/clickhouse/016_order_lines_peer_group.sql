-- The purchaser's business activity and state as the verified order carried them (the registrant master's values
-- at verification): the dashboards compare a registrant with its peers by these and filter on them.
-- '' when the registrant master did not know them, and for rows written before these columns existed.
ALTER TABLE order_lines
    ADD COLUMN IF NOT EXISTS business_activity LowCardinality(String) DEFAULT '',
    ADD COLUMN IF NOT EXISTS purchaser_state   LowCardinality(String) DEFAULT ''
