"""Everything ClickHouse: client and read-only query, SQL guard, the sink's writer, the audit chain."""
