"""What brings data into the pipeline and out of it: test PKI, simulator,
Kafka producers and topic admin, the ClickHouse sink."""
