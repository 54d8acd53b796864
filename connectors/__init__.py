"""The I/O edges: Kafka (``kafka``: topic catalogue, producer/consumer, emit), ClickHouse (``clickhouse``: client,
query, sink writer, audit chain) and the sources that bring data in (``sources``: intake, reference data, ARCOS)."""
