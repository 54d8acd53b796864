-- An insert the sink retries with the same insert_deduplication_token (e.g. a timeout after the server had stored
-- it) is dropped by the source table but still pushed to its materialized views (ClickHouse 24+; measured on the
-- embedded engine, 26.9). The sink inserts with deduplicate_blocks_in_dependent_materialized_views = 1, so each
-- view's block gets a token derived from the source's; these windows make the aggregate tables drop the copy.
ALTER TABLE dash_volume_day MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE dash_registrant_week MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE dash_verdict_day MODIFY SETTING non_replicated_deduplication_window = 10000
;
-- dash_growth is filled by views on dash_registrant_week (018): a copy dropped there must be dropped here too.
ALTER TABLE dash_growth MODIFY SETTING non_replicated_deduplication_window = 10000
