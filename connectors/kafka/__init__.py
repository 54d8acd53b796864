"""Everything Kafka: the topic catalogue, producer/consumer, emit (send, audit, dead letter), security, ACLs."""
