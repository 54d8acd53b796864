"""Faust agents. Each module has a processor (plain class, one job) and the
thin agent loop that feeds it batches of Kafka events."""
